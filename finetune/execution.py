"""Applying a plan's execution choices to a built model: which blocks are recomputed in the backward pass, which
blocks are compiled. The choices themselves are made in finetune.plan; these functions only carry them out."""
import functools
import logging

import torch
import torch.utils.checkpoint
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

logger = logging.getLogger(__name__)

RECOMPUTE_MODULES = ("none", "resampler", "vision", "llm", "all")


def _trained_copy(module):
    """The module that runs: peft's `modules_to_save` wraps a trained-in-full module around its copy."""
    from peft.utils.other import ModulesToSaveWrapper
    return module.modules_to_save[module.active_adapter] if isinstance(module, ModulesToSaveWrapper) else module


def _minicpmv(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_recompute(model, modules, every_n_layers=1, checkpoint_kwargs=None):
    """Recompute in the backward pass the blocks of `modules` (none | resampler | vision | llm | all; vision
    includes the resampler), every n-th block of each; works before or after LoRA wrapping, and resets what an
    earlier call set. Non-reentrant checkpointing, so frozen embeddings need no gradients."""
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, **(checkpoint_kwargs or {"use_reentrant": False}))
    base = _minicpmv(model)
    llm, vpm, resampler = base.llm, _trained_copy(base.vpm), _trained_copy(base.resampler)
    for module, wanted in ((llm, modules in ("llm", "all")), (vpm, modules in ("vision", "all"))):
        module._set_gradient_checkpointing(enable=False)
        if wanted:
            module._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint,
                                               every_n_layers=every_n_layers)
    resampler.gradient_checkpointing = modules in ("resampler", "vision", "all")
    resampler._gradient_checkpointing_func = checkpoint


def compile_blocks(model, cuda_graphs=False):
    """Regional compilation: each vision and LLM block compiled in place (one graph per block class, shared by
    all its instances; dynamic shapes, as images and lengths vary). The rest (embeddings, resampler, loss)
    has data-dependent shapes and little to fuse, so it stays eager. With `cuda_graphs` the blocks' kernels are
    recorded as CUDA graphs (inductor's graph trees: one recording per batch shape, then replays)."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    if cuda_graphs:
        from .cuda_graphs import enable_cuda_graphs
        enable_cuda_graphs()
    blocks = (LlamaDecoderLayer, Idefics2EncoderLayer)
    # recent transformers (5.25) wraps the attention's forward in one that sets and restores a global (the `kernels`
    # package's function routing): inside a recomputed block dynamo refuses that side effect and breaks the graph.
    # Not replaying it in the backward is harmless, as the forward restores it on the way out.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    zero3 = is_deepspeed_zero3_enabled()
    if zero3:  # ZeRO-3's parameter hooks do not trace (graph breaks, then recompiles until dynamo gives up):
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, list(blocks))  # hooks on the blocks only, each gathering its parameters at once
        # torch's linear inside them is kept by distributed.setup_deepspeed, before ZeRO-3 builds the model
    for module in model.modules():
        if isinstance(module, blocks):
            if zero3:
                module.forward = torch.compile(module.forward, dynamic=True)  # the block's hooks stay outside
            else:
                module.compile(dynamic=True)


def upcast_trainable(model):
    """fp16 without DeepSpeed: trainable parameters in fp32 under autocast (the gradient scaler needs them)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class GraphBreakReport(TrainerCallback):
    """Says which parts of the compiled blocks dynamo could not trace (a graph break: that part runs eagerly, the
    run goes on, slower), after the first step, when every block has been compiled, and at the end for any new."""

    def __init__(self):
        self.reported = {}

    def report(self):
        from torch._dynamo.utils import counters
        new = {reason: count for reason, count in counters["graph_break"].items() if self.reported.get(reason) != count}
        if new:
            logger.warning("compiled blocks: %d graph break(s); these parts run eagerly:\n%s", sum(new.values()),
                           "\n".join(f"  {count} x " + reason.replace("\n", "\n    ") for reason, count in new.items()))
            self.reported.update(new)
        return new

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and state.is_world_process_zero:
            self.report()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.report()
