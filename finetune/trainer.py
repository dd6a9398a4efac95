"""The Hugging Face Trainer with two additions: length-grouped batches from the token counts the data scan
already computed (transformers would otherwise encode every sample, images included, to learn them), and a
stop on a non-finite loss that names the step and the samples (the last saved checkpoint stays as it was)."""
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler


class NonFiniteLossError(RuntimeError):
    pass


class MiniCPMVTrainer(Trainer):
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
