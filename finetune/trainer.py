"""The Hugging Face Trainer with six additions: length-grouped batches from the token counts the data scan
already computed (transformers would otherwise encode every sample, images included, to learn them); a stop on
a non-finite loss that names the step and the samples (the last saved checkpoint stays as it was); batches that
reach the GPU without synchronising it (image metadata kept on the host, non-blocking copies); and, for a bf16
model without DeepSpeed, AdamW on fp32 master weights (what DeepSpeed's bf16 mode does), so the model computes
in bf16 throughout instead of under autocast with fp32 trainable weights cast at every use; resumed LoRA runs
keep their adapters in the model's dtype; with CUDA graphs, each forward starts a new step of inductor's graph
trees (and `CudaGraphRecording` records the data's batch shapes before the first step)."""
import logging
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from .data.collator import HOST_KEYS

logger = logging.getLogger(__name__)

# shapes recorded before training; rarer ones are recorded where they first occur (seconds each)
MAX_RECORDED_SHAPES = 32


class NonFiniteLossError(RuntimeError):
    pass


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
    copy: a few kernels instead of several per parameter (706 in the LoRA recipe with the vision tower trained,
    whose step, clipping included, went from 21.6 to 15.1 ms on an H100; 37.0 to 10.5 ms with bf16 moments).
    A parameter without a gradient in a step counts as a zero gradient (its moments decay).

    `moments_dtype=torch.bfloat16` stores the two moments in bf16 (4 bytes less per trained parameter), updated in
    fp32. With the launch scripts' betas (0.9, 0.95) every step moves a moment by 5-10 %, far above bf16's
    rounding (0.4 %)."""

    def __init__(self, param_groups, moments_dtype=torch.float32, **kwargs):
        self.moments_dtype = moments_dtype
        self.model_groups, groups = [], []
        for group in param_groups:
            params = list(group["params"])
            self.model_groups.append(params)
            master = torch.cat([p.detach().float().flatten() for p in params])
            groups.append(dict(group, params=[master]))
        super().__init__(groups, **kwargs)

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
            # the (already clipped) gradients, concatenated in their own dtype (one batched copy), freed at once
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            for p in params:
                p.grad = None
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
            weights = weights.split([p.numel() for p in params])
            torch._foreach_copy_(params, [w.view_as(p) for w, p in zip(weights, params)])

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        # torch casts the saved state to the masters' dtype: moments go back to moments_dtype. Checkpoints
        # without masters (earlier versions) restart them from the 16-bit model weights.
        super().load_state_dict(state_dict)
        for group, params in zip(self.param_groups, self.model_groups):
            master = group["params"][0]
            state = self.state[master]
            saved = state.pop("master", None)
            if saved is not None:
                master.copy_(saved)
            else:
                torch.cat([p.float().flatten() for p in params], out=master)
            if state:
                state["master"] = master
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moments_dtype)


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
    def __init__(self, model, args, data_collator, master_weights=False, moments_dtype=torch.float32,
                 cuda_graphs=False, **kwargs):
        self.master_weights, self.moments_dtype, self.cuda_graphs = master_weights, moments_dtype, cuda_graphs
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
                                           moments_dtype=self.moments_dtype)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # peft's load_adapter, which the Trainer resumes LoRA runs with, upcasts adapters to fp32; they trained
        # (and keep training) in the model's dtype
        model = model if model is not None else self.model
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, p in model.named_parameters():
            if p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])

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
        if self.cuda_graphs:  # a new forward: the graphs' previous outputs (last step's activations) may be reused
            torch.compiler.cudagraph_mark_step_begin()
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1} on samples {sample_ids} "
                f"(rank {self.args.process_index}); stopping. The last saved checkpoint is intact; lower the "
                "learning rate or check these samples.")
        return result


class CudaGraphRecording(TrainerCallback):
    """CUDA graphs with one sample per batch: before the first step, one sample of each batch shape (the most
    common MAX_RECORDED_SHAPES) runs forward and backward twice, as inductor warms a new shape up and then records
    it, so that training replays graphs from its first step instead of stalling seconds per new shape during the
    run. Gradients are discarded: weights and optimizer state do not change (dropout draws random numbers)."""

    def __init__(self, trainer, pad_to_multiple_of):
        self.trainer = trainer
        dataset = trainer.train_dataset
        shapes = dataset.batch_shapes(pad_to_multiple_of)
        recorded = shapes[:MAX_RECORDED_SHAPES]
        self.samples = [int(indices[0]) for _, indices in recorded]
        covered = sum(len(indices) for _, indices in recorded)
        logger.info("CUDA graphs: %d batch shapes (tokens, image units, widest unit) are recorded before the first "
                    "step, %d of %d samples; %d rarer shapes when they first occur", len(recorded), covered,
                    len(dataset), len(shapes) - len(recorded))

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, model = self.trainer, self.trainer.model
        start = time.perf_counter()
        model.train()
        for _ in range(2):  # warm-up, recording
            for i in self.samples:
                inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i]]))
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(model, inputs)
                loss.backward()
                model.zero_grad(set_to_none=True)
        logger.info("CUDA graphs recorded for %d batch shapes in %.1f s", len(self.samples), time.perf_counter() - start)
