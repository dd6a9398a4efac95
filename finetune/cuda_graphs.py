"""CUDA graphs for small steps whose kernels the host cannot launch fast enough: compiled blocks replayed as
inductor's graph trees, and the data's batch shapes recorded before the first step."""
import logging
import time

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# shapes recorded before training; rarer ones are recorded where they first occur (seconds each)
MAX_RECORDED_SHAPES = 32


def enable_cuda_graphs():
    """Inductor's CUDA graph trees for every compiled function from here on."""
    from torch._inductor import config as inductor_config
    # set globally: per-compile options reach the forward graph but not the backward, compiled later (crashes)
    inductor_config.triton.cudagraphs = True
    # debug checks that walk the graph memory pool at every recording: seconds per new shape
    inductor_config.triton.slow_path_cudagraph_asserts = False


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
