"""The Hugging Face Trainer, with one addition: length-grouped batches from the token counts the data scan
already computed (transformers would otherwise encode every sample, images included, to learn them)."""
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler


class MiniCPMVTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths.tolist())
        return super()._get_train_sampler(train_dataset)
