"""The Hugging Face Trainer with four additions: length-grouped batches from the token counts the data scan
already computed (transformers would otherwise encode every sample, images included, to learn them); a stop on
a non-finite loss that names the step and the samples (the last saved checkpoint stays as it was); batches that
reach the GPU without synchronising it (image metadata kept on the host, non-blocking copies); and, for a bf16
model without DeepSpeed, AdamW on fp32 master weights (what DeepSpeed's bf16 mode does), so the model computes
in bf16 throughout instead of under autocast with fp32 trainable weights cast at every use."""
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from .data.collator import HOST_KEYS


class NonFiniteLossError(RuntimeError):
    pass


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW applied to fp32 master copies of 16-bit parameters, then copied back into them. Each parameter
    group's masters are one flat fp32 tensor, so gathering the gradients, the update and the copy back are a
    few large kernels instead of several small ones per parameter (hundreds of them: 20-30 ms a step).
    A parameter without a gradient in a step counts as a zero gradient (its moments decay).

    `moments_dtype=torch.bfloat16` stores the two moments in bf16 (4 bytes less per trained parameter); torch's
    AdamW kernels need moments in the parameters' dtype, so that update is written out here, computed in fp32
    one chunk at a time. With the launch scripts' betas (0.9, 0.95) every step moves a moment by 5-10 %, far
    above bf16's rounding (0.4 %)."""

    CHUNK = 1 << 26  # elements per fp32 chunk of the bf16-moment update (256 MiB per temporary)

    def __init__(self, param_groups, moments_dtype=torch.float32, **kwargs):
        self.moments_dtype = moments_dtype
        self.model_groups, groups = [], []
        for group in param_groups:
            params = list(group["params"])
            self.model_groups.append(params)
            master = torch.cat([p.detach().float().flatten() for p in params]).requires_grad_()
            groups.append(dict(group, params=[master]))
        super().__init__(groups, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        for group, params in zip(self.param_groups, self.model_groups):
            master = group["params"][0]
            # the (already clipped) 16-bit gradients, converted while concatenated; freed at once
            master.grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                     for p in params], out=torch.empty_like(master))
            for p in params:
                p.grad = None
        loss = super().step(closure) if self.moments_dtype == torch.float32 else self._step_low_precision_moments()
        for group, params in zip(self.param_groups, self.model_groups):
            master = group["params"][0]
            master.grad = None
            flat = master.to(params[0].dtype).split([p.numel() for p in params])
            torch._foreach_copy_(params, [t.view_as(p) for t, p in zip(flat, params)])
        return loss

    def _step_low_precision_moments(self):
        """AdamW (torch's single-tensor formulas) with moments stored in `moments_dtype`."""
        for group in self.param_groups:
            master = group["params"][0]
            state = self.state[master]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(master, dtype=self.moments_dtype),
                             exp_avg_sq=torch.zeros_like(master, dtype=self.moments_dtype))
            state["step"] += 1
            step, (beta1, beta2), lr = state["step"].item(), group["betas"], group["lr"]
            step_size, bias_correction2_sqrt = lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5
            chunks = (t.split(self.CHUNK) for t in (master, master.grad, state["exp_avg"], state["exp_avg_sq"]))
            for p, g, m, v in zip(*chunks):
                m32 = m.float().lerp_(g, 1 - beta1)
                v32 = v.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(m32, (v32.sqrt() / bias_correction2_sqrt).add_(group["eps"]), value=-step_size)
                m.copy_(m32)
                v.copy_(v32)

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        # masters restart from the (16-bit) model weights of the checkpoint; moments and step come back (torch
        # casts them to the masters' dtype: back to moments_dtype)
        super().load_state_dict(state_dict)
        for group, params in zip(self.param_groups, self.model_groups):
            master = group["params"][0]
            torch.cat([p.float().flatten() for p in params], out=master.data)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in self.state[master]:
                    self.state[master][key] = self.state[master][key].to(self.moments_dtype)


class OnHost:
    """A batch entry that accelerate's device placement passes over (it moves whatever has a `.to`)."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class HostEntriesCollator:
    """Wraps the collator so that the HOST_KEYS entries reach `_prepare_inputs` still on the CPU."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        return {k: OnHost(v) if k in HOST_KEYS else v for k, v in self.collate(examples).items()}


class MiniCPMVTrainer(Trainer):
    def __init__(self, model, args, data_collator, master_weights=False, moments_dtype=torch.float32, **kwargs):
        self.master_weights, self.moments_dtype = master_weights, moments_dtype
        # pinned batches are copied without waiting for the GPU (accelerate's default copy synchronises)
        args.accelerator_config.non_blocking = args.dataloader_pin_memory
        super().__init__(model=model, args=args, data_collator=HostEntriesCollator(data_collator), **kwargs)

    def create_optimizer(self, model=None):
        if not self.master_weights:
            return super().create_optimizer(model)
        model = model or self.model
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = MasterWeightAdamW([g for g in groups if g["params"]], lr=self.args.learning_rate,
                                           betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                                           fused=torch.cuda.is_available(), moments_dtype=self.moments_dtype)
        return self.optimizer

    def _prepare_inputs(self, inputs):
        # image metadata is read on the host (positions, spans); on the GPU each read would be a synchronisation,
        # and so would moving it there
        on_host = {k: inputs.pop(k).value for k in HOST_KEYS if k in inputs}
        return {**super()._prepare_inputs(inputs), **on_host}

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths.tolist())
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs.pop("sample_ids", None)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1} on samples {sample_ids} "
                f"(rank {self.args.process_index}); stopping. The last saved checkpoint is intact; lower the "
                "learning rate or check these samples.")
        return result
