"""The order of training samples: length-grouped batches (similar lengths together, less padding), shuffled
anew each epoch from the run's seed and the epoch's number alone, so that a resumed run draws the order the
uninterrupted run drew. (transformers' LengthGroupedSampler draws from the global random state, or from a
generator accelerate seeds once per run, which a resumed run does not reach in the same state; and accelerate's
set_epoch does not reach a sampler under both its process shards and the batch skipping of a resumed epoch.)"""
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


class EpochLengthGroupedSampler(LengthGroupedSampler):
    def __init__(self, batch_size, lengths, seed, epoch):
        """`epoch()`: the number of the epoch about to be drawn."""
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch())
        return super().__iter__()
