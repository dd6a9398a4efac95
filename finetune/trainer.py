"""The Hugging Face Trainer with three additions: length-grouped batches from the token counts the data scan
already computed (transformers would otherwise encode every sample, images included, to learn them); a stop on
a non-finite loss that names the step and the samples (the last saved checkpoint stays as it was); and, for a
bf16 model without DeepSpeed, AdamW on fp32 master weights (what DeepSpeed's bf16 mode does), so the model
computes in bf16 throughout instead of under autocast with fp32 trainable weights cast at every use."""
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler


class NonFiniteLossError(RuntimeError):
    pass


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose update is applied to fp32 copies of 16-bit parameters, then copied back into them."""

    def __init__(self, param_groups, **kwargs):
        self.model_params, groups = [], []
        for group in param_groups:
            params = list(group["params"])
            self.model_params += params
            groups.append(dict(group, params=[p.detach().float().requires_grad_() for p in params]))
        super().__init__(groups, **kwargs)
        self.master_params = [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for master, param in zip(self.master_params, self.model_params):
            master.grad = None if param.grad is None else param.grad.float()
        loss = super().step(closure)
        torch._foreach_copy_(self.model_params, self.master_params)
        return loss

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        # masters restart from the (16-bit) model weights of the checkpoint; moments and step come back
        super().load_state_dict(state_dict)
        torch._foreach_copy_(self.master_params, [p.float() for p in self.model_params])


class MiniCPMVTrainer(Trainer):
    def __init__(self, *args, master_weights=False, **kwargs):
        self.master_weights = master_weights
        super().__init__(*args, **kwargs)

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
                                           fused=torch.cuda.is_available())
        return self.optimizer

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
