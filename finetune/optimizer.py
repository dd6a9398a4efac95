"""AdamW on fp32 master weights for a bf16 model without DeepSpeed (what DeepSpeed's bf16 mode does): the model
computes in bf16 throughout instead of under autocast with fp32 trainable weights cast at every use. The moments
are fp32 or bf16 here, 8-bit through bitsandbytes in finetune.optimizer_8bit; `master_weight_optimizer` picks."""
import torch

from .quantization import EIGHT_BIT_OPTIMIZERS, optim_name


def adamw_update(master, grad, exp_avg, exp_avg_sq, coefficients):
    """One AdamW step (torch's formulas) on flat fp32 master weights, in place, from gradients in the 16-bit
    parameter dtype, moments kept in their own dtype (computed in fp32). Returns the new weights in the gradient
    dtype. Compiled, this is one elementwise kernel. `coefficients` (float32, [7]): 1 - lr * weight_decay,
    lr / bias_correction1, sqrt(bias_correction2), 1 - beta1, beta2, 1 - beta2, eps; a tensor, so that the
    compiled kernel is not specialised to one step's values."""
    decay, step_size, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps = coefficients.unbind()
    g = grad.float()
    m = exp_avg.float().lerp(g, one_minus_beta1)
    v = exp_avg_sq.float() * beta2 + one_minus_beta2 * g * g
    updated = master * decay - step_size * m / (v.sqrt() / bias_correction2_sqrt + eps)
    master.copy_(updated)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return updated.to(grad.dtype)


# in place on its inputs, which CUDA graphs cannot take (--cuda_graphs turns them on for every compiled function)
compiled_adamw_update = torch.compile(adamw_update, dynamic=True, fullgraph=True, options={"triton.cudagraphs": False})


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW applied to fp32 master copies of 16-bit parameters, then copied back into them. Each parameter
    group's masters (and moments) are one flat tensor; the step concatenates the 16-bit gradients, updates
    masters and moments in one compiled kernel on the GPU, and copies the new weights back with one multi-tensor
    copy: a few kernels instead of several per parameter (bench/optimizer_step.py times both).
    A parameter without a gradient in a step counts as a zero gradient (its moments decay).

    `moments_dtype=torch.bfloat16` stores the two moments in bf16 (4 bytes less per trained parameter), updated in
    fp32. With the launch scripts' betas (0.9, 0.95) every step moves a moment by 5-10 %, far above bf16's
    rounding (0.4 %)."""

    def __init__(self, param_groups, moments_dtype=torch.float32, **kwargs):
        self.moments_dtype = moments_dtype
        self.model_groups = [list(group["params"]) for group in param_groups]
        super().__init__([dict(group, params=[flat_master(params)])
                          for group, params in zip(param_groups, self.model_groups)], **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW takes no closure")
        for group, params in zip(self.param_groups, self.model_groups):
            master = group["params"][0]
            state = self.state[master]
            if not state:
                # the masters are part of the state, so that checkpoints resume them exactly
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(master, dtype=self.moments_dtype),
                             exp_avg_sq=torch.zeros_like(master, dtype=self.moments_dtype), master=master)
            state["step"] += 1
            grad = take_grads(params)
            (beta1, beta2), step, lr = group["betas"], state["step"].item(), group["lr"]
            coefficients = torch.tensor([1 - lr * group["weight_decay"], lr / (1 - beta1 ** step),
                                         (1 - beta2 ** step) ** 0.5, 1 - beta1, beta2, 1 - beta2, group["eps"]])
            if master.is_cuda:  # one compiled kernel; the coefficients' copy does not wait for the GPU
                update = compiled_adamw_update
                coefficients = coefficients.pin_memory().to(master.device, non_blocking=True)
            else:  # CPU runs: tests and demos
                update = adamw_update
            weights = update(master, grad, state["exp_avg"], state["exp_avg_sq"], coefficients)
            del grad
            write_back(params, weights)

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        # torch casts the saved state to the masters' dtype: moments go back to moments_dtype
        super().load_state_dict(state_dict)
        restore_masters(self)
        for group in self.param_groups:
            state = self.state[group["params"][0]]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moments_dtype)


def flat_master(params):
    """fp32 copies of 16-bit parameters, concatenated."""
    return torch.cat([p.detach().float().flatten() for p in params])


def take_grads(params):
    """The (already clipped) gradients, concatenated in their own dtype (one batched copy), freed at once; a
    parameter without one counts as a zero gradient."""
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p in params:
        p.grad = None
    return grad


def write_back(params, weights):
    """The flat new weights (in the parameters' dtype) into the parameters: one multi-tensor copy."""
    weights = weights.split([p.numel() for p in params])
    torch._foreach_copy_(params, [w.view_as(p) for w, p in zip(weights, params)])


@torch.no_grad()
def restore_masters(optimizer):
    """After `load_state_dict`: the optimizer's parameters are flat fp32 masters (`optimizer.model_groups[i]` the
    16-bit parameters behind group i, concatenated in order), each also in its own state so that checkpoints
    resume exactly; each takes its saved value back. States saved without masters (earlier versions) restart
    them from the 16-bit model weights."""
    for group, params in zip(optimizer.param_groups, optimizer.model_groups):
        weights, start = None, 0
        for master in group["params"]:
            state = optimizer.state[master]
            saved = state.pop("master", None)
            if saved is None:
                weights = flat_master(params) if weights is None else weights
                saved = weights[start:start + master.numel()]
            master.copy_(saved)
            start += master.numel()
            if state:
                state["master"] = master


def master_weight_optimizer(optim, param_groups, moments_dtype=torch.float32, embeddings=(), **kwargs):
    """The AdamW on fp32 masters that `--optim` names: this module's (moments in fp32 or `moments_dtype`), or with
    8-bit moments (finetune.optimizer_8bit; `embeddings`, the embedding weights among the parameters, keep 32-bit
    moments there, as the Trainer does for bitsandbytes' optimizers)."""
    optim = optim_name(optim)
    if optim in EIGHT_BIT_OPTIMIZERS:
        from .optimizer_8bit import MasterWeightAdamW8bit
        return MasterWeightAdamW8bit(param_groups, paged=EIGHT_BIT_OPTIMIZERS[optim], embeddings=embeddings, **kwargs)
    return MasterWeightAdamW(param_groups, moments_dtype=moments_dtype, **kwargs)
