"""The Hugging Face Trainer, thin: length-grouped batches from the token counts the data scan already computed
(transformers would otherwise encode every sample, images included, to learn them); a stop on a non-finite loss
that names the step and the samples (the last saved checkpoint stays as it was); batches that reach the GPU
without synchronising it (image metadata kept on the host, non-blocking copies); AdamW on fp32 master weights
(finetune.optimizer) for a bf16 model without DeepSpeed; resumed LoRA runs keep their adapters in the model's
dtype; with CUDA graphs, each forward starts a new step of inductor's graph trees; checkpoints marked complete
only once every rank has written its part (finetune.checkpoint), and a length-grouped order that a resumed run
draws again (finetune.data.sampler)."""
import logging

import torch
from transformers import Trainer, TrainerCallback

from .checkpoint import CompleteCheckpoints
from .cli import UserError
from .data.collator import HOST_KEYS
from .data.sampler import EpochLengthGroupedSampler
from .optimizer import master_weight_optimizer

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError, UserError):
    """Names the step, the samples and the fix: reported as one line (finetune.cli)."""


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


class MiniCPMVTrainer(CompleteCheckpoints, Trainer):
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
        embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        self.optimizer = master_weight_optimizer(self.args.optim, [g for g in groups if g["params"]],
                                                 moments_dtype=self.moments_dtype, embeddings=embeddings,
                                                 lr=self.args.learning_rate, eps=self.args.adam_epsilon,
                                                 betas=(self.args.adam_beta1, self.args.adam_beta2))
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

    def log(self, logs, *args, **kwargs):
        if torch.cuda.is_available() and "loss" in logs:  # the measured peak, to set beside the plan's prediction
            logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return EpochLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                             dataset.lengths.tolist(), seed=self.args.data_seed or self.args.seed,
                                             epoch=lambda: int(self.state.epoch or 0))  # a resumed run starts inside one
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


class MemoryReport(TrainerCallback):
    """The measured peak of GPU memory beside the plan's prediction, at the end of training."""

    def __init__(self, predicted_gib):
        self.predicted_gib = predicted_gib

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            logger.info("peak GPU memory %.2f GiB allocated (%.2f reserved); the plan predicted %.2f GiB",
                        torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30,
                        self.predicted_gib)
