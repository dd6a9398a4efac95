"""Finetune MiniCPM-Llama3-V 2.5 (full or LoRA) with the Hugging Face Trainer, optionally under DeepSpeed.

    torchrun --nproc_per_node N -m finetune.finetune --model_name_or_path M --data_path D [flags]

Order of setup, and why:
1. arguments (legacy flags of the official scripts translated; bad combinations stop here);
2. tokenizer and config, then the data check: every sample is validated and measured on the main process
   before any weights load, so a bad data set fails in seconds, with the full list of problems;
3. the model, after the TrainingArguments exist, so that under ZeRO-3 it is created partitioned;
4. gradient checkpointing on the chosen modules (non-reentrant, so frozen embeddings need no gradients), then
   trainable modules / LoRA;
5. train (resuming from the newest *complete* checkpoint when asked), then save the final folder atomically.
"""
import gc
import logging
import os
from functools import partial

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from transformers import set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from .arguments import parse_args
from .checkpoint import latest_complete_checkpoint, register_model_files, save_final
from .data.collator import collate
from .data.conversation import ImageSettings
from .data.dataset import ConversationDataset, ScanOptions, scan
from .model import configure_trainable, load_model, load_tokenizer, read_config, trainable_summary
from .cuda_graphs import CudaGraphRecording, enable_cuda_graphs
from .trainer import MiniCPMVTrainer

logger = logging.getLogger("finetune")


def main_process_scan(paths, tokenizer, settings, options, args):
    """Scan on the main process and share the result: other ranks wait rather than repeat the work."""
    result = files = None
    if args.process_index == 0:
        result = scan(paths, tokenizer, settings, options)
        files, result.files = result.files, [rf.path for rf in result.files]  # paths travel, not the buffers
    if dist.is_available() and dist.is_initialized() and args.world_size > 1:
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    from .data.records import RecordFile
    result.files = files or [RecordFile(p) for p in result.files]  # other ranks read the files themselves
    return result


def report_scan(result, name, on_bad_sample, model_max_length):
    """Stop on bad samples (or list them when skipping), name every over-long sample."""
    if result.errors:
        listing = "\n".join(f"  [{e.kind}] {e}" for e in result.errors)
        if on_bad_sample == "error":
            raise SystemExit(f"{name}: {len(result.errors)} bad samples; fix them, or pass --on_bad_sample skip to "
                             f"train without them (python -m finetune.data check shows statistics too):\n{listing}")
        logger.warning("%s: skipping %d bad samples (--on_bad_sample skip):\n%s", name, len(result.errors), listing)
    for path, index, sample_id, length in result.overlong:
        logger.warning("%s: skipping sample %d (id %r) of %s: %d tokens > model_max_length %d",
                       name, index, sample_id, path, length, model_max_length)
    summary = (f"{name}: {len(result.entries)} samples to use; skipped {len(result.errors)} bad and "
               f"{len(result.overlong)} over {model_max_length} tokens; {result.truncated} truncated at a turn")
    logger.warning(summary)
    return summary


def enable_checkpointing(model, modules, every_n_layers, checkpoint_kwargs):
    """Recompute the blocks of the chosen modules in the backward pass (every n-th block of each)."""
    for module in {"all": (model.llm, model.vpm), "vision": (model.vpm,), "llm": (model.llm,)}.get(modules, ()):
        module.gradient_checkpointing_enable(checkpoint_kwargs, every_n_layers=every_n_layers)
    if modules in ("all", "vision", "resampler"):  # one block, whose activations are 1.8 GiB per 4 samples
        model.resampler.gradient_checkpointing = True
        model.resampler._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, **checkpoint_kwargs)


def compile_blocks(model, cuda_graphs=False):
    """Regional compilation: each vision and LLM block compiled in place (one graph per block class, shared by
    all its instances; dynamic shapes, as images and lengths vary). The rest (embeddings, resampler, loss)
    has data-dependent shapes and little to fuse, so it stays eager. With `cuda_graphs` the blocks' kernels are
    recorded as CUDA graphs (inductor's graph trees: one recording per batch shape, then replays)."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    if cuda_graphs:
        enable_cuda_graphs()
    blocks = (LlamaDecoderLayer, Idefics2EncoderLayer)
    zero3 = is_deepspeed_zero3_enabled()
    if zero3:  # ZeRO-3's parameter hooks do not trace (graph breaks, then recompiles until dynamo gives up):
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, list(blocks))  # hooks on the blocks only, each gathering its parameters at once
        # torch's linear inside them is kept by arguments.resolve_deepspeed_config, before ZeRO-3 builds the model
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


def main(argv=None, build_model=load_model):
    """`build_model(path, dtype=, attn_implementation=, quantization=)` returns the model; benchmarks pass one that
    builds random weights of the same architecture."""
    model_args, data_args, tune_args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    path = model_args.model_name_or_path
    tokenizer, config = load_tokenizer(path), read_config(path)
    settings = ImageSettings.from_config(config, data_args.max_slice_nums)
    options = ScanOptions(model_max_length=data_args.model_max_length, overlong=data_args.overlong,
                          max_image_pixels=data_args.max_image_pixels, decode_images=data_args.decode_images_in_check,
                          workers=data_args.check_workers or os.cpu_count() or 1)
    summaries, datasets = [], {}
    for split, paths in (("train", data_args.data_path), ("eval", data_args.eval_data_path)):
        if paths:
            result = main_process_scan(paths.split(","), tokenizer, settings, options, training_args)
            summaries.append(report_scan(result, split, data_args.on_bad_sample, data_args.model_max_length))
            datasets[split] = ConversationDataset(result, tokenizer, settings, options)
    if len(datasets["train"]) == 0:
        raise SystemExit("no training samples left after the data check")

    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    set_seed(training_args.seed)  # the new LoRA weights are drawn before the Trainer would seed
    attn_implementation = model_args.attn_implementation
    if data_args.padding_free and attn_implementation == "sdpa":
        attn_implementation = "sdpa_varlen"  # SDPA, and flash's variable-length kernel for concatenated samples
    model = build_model(path, dtype=dtype, attn_implementation=attn_implementation, quantization=tune_args.quantization)
    model.config.use_cache = False
    if training_args.gradient_checkpointing:  # enabled here, per module, instead of by the Trainer
        enable_checkpointing(model, tune_args.checkpointing_modules, tune_args.checkpointing_every_n_layers,
                             training_args.gradient_checkpointing_kwargs)
        training_args.gradient_checkpointing = False
    model = configure_trainable(model, tune_args)
    if tune_args.compile_blocks:
        compile_blocks(model, tune_args.cuda_graphs)
    # bf16 without DeepSpeed: compute in bf16 throughout (no autocast), fp32 master weights in the optimizer
    master_weights = training_args.bf16 and not training_args.deepspeed
    if master_weights:
        training_args.bf16 = False
    elif training_args.fp16 and not training_args.deepspeed:
        upcast_trainable(model)
    logger.info(trainable_summary(model))
    register_model_files()

    trainer = MiniCPMVTrainer(model=model, args=training_args, master_weights=master_weights,
                              cuda_graphs=tune_args.cuda_graphs,
                              moments_dtype=getattr(torch, tune_args.optimizer_moments_dtype),
                              train_dataset=datasets["train"], eval_dataset=datasets.get("eval"), processing_class=tokenizer,
                              data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id,
                                                    pad_to_multiple_of=data_args.pad_to_multiple_of,
                                                    padding_free=data_args.padding_free))
    if tune_args.cuda_graphs and training_args.per_device_train_batch_size == 1:  # larger batches: shapes vary
        trainer.add_callback(CudaGraphRecording(trainer, data_args.pad_to_multiple_of))
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", "auto", "latest"):
        resume = latest_complete_checkpoint(training_args.output_dir)
        logger.info("resuming from %s", resume or "scratch (no complete checkpoint yet)")
    gc.collect()
    gc.freeze()  # the long-lived setup objects leave the collector's view: no multi-second full collections
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, training_args.output_dir)
    if training_args.process_index == 0:
        print("\n".join(summaries + [f"saved to {training_args.output_dir}"]))
    return trainer


if __name__ == "__main__":
    main()
