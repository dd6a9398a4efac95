"""Finetune MiniCPM-Llama3-V 2.5 (full or LoRA) with the Hugging Face Trainer, optionally under DeepSpeed.

    torchrun --nproc_per_node N -m finetune.finetune --model_name_or_path M --data_path D [flags]

Order of setup, and why:
1. arguments (legacy flags of the official scripts translated; bad combinations stop here), then the process group;
2. tokenizer and config, then the data check: every sample is validated and measured on the main process
   before any weights load, so a bad data set fails in seconds, with the full list of problems;
3. the plan (finetune.plan): how to run on these GPUs, from the data's exact shapes and the model config, printed
   before any weights load; a run that cannot fit stops here with what would make it fit;
4. the TrainingArguments rebuilt with the plan, so that under ZeRO-3 the model is created partitioned; the
   checkpoint to continue from: the newest complete one of the same run by default (finetune.checkpoint);
5. the model, recomputation and trainable modules / LoRA, compiled blocks, as planned;
6. train, stopping with a saved checkpoint on SIGTERM/SIGUSR1 (finetune.preemption); then save the final folder
   atomically.
"""
import gc
import logging
import os
import sys
from functools import partial

if not __package__:  # run as a script (python finetune/finetune.py, as with the official repo): run the module
    import runpy
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not finetune/
    runpy.run_module("finetune.finetune", run_name="__main__", alter_sys=True)
    sys.exit()

import torch
from transformers import set_seed

from replace_file.modeling_minicpmv import SDPA_VARLEN

from . import distributed
from .arguments import parse_args
from .checkpoint import record_slicing, register_model_files, resolve_resume, run_fingerprint, save_final
from .cli import finetune_inputs, run
from .cuda_graphs import CudaGraphRecording
from .data.collator import collate
from .data.conversation import ImageSettings
from .data.dataset import ConversationDataset, ScanOptions, scan
from .data.mixing import apply_weights, parse_sources
from .data.records import RecordFile
from .execution import GraphBreakReport, apply_recompute, compile_blocks, upcast_trainable
from .generation_eval import GenerationMetrics, generation_samples
from .model import configure_trainable, load_model, load_tokenizer, read_config, trainable_summary
from .model_card import ModelCardCallback
from .plan import GIB, Hardware, ParameterCounts, Workload, deepspeed_config_for, fixed_from_args, make_plan, parse_gib
from .preemption import StopOnSignal
from .quantization import check_optimizer
from .trainer import MemoryReport, MiniCPMVTrainer

logger = logging.getLogger("finetune")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOMENTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # int8: the 8-bit --optim keeps its own


def main_process_scan(paths, tokenizer, settings, options, args):
    """Scan on the main process and share the result (file paths travel, not their buffers)."""
    def compute():
        result = scan(paths, tokenizer, settings, options)
        result.files = [rf.path for rf in result.files]
        return result
    result = distributed.from_main_process(compute, args)
    result.files = [RecordFile(p) for p in result.files]  # every rank reads the files itself
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


def setup_plan(argv, config, datasets, data_args, tune_args, training_args):
    """The run's plan, made on the main process from the data scan (finetune.plan), and its DeepSpeed config."""
    def compute():
        train = datasets["train"]
        shapes = train.batch_shapes(64)
        work = Workload.from_scan(ParameterCounts.from_config(config, tune_args), tune_args, train.entries, shapes)
        hardware = Hardware.detect(training_args.world_size)
        budget = parse_gib(tune_args.gpu_memory_limit) if tune_args.gpu_memory_limit else None
        return make_plan(work, hardware, fixed_from_args(argv, data_args, tune_args, training_args,
                                                         training_args.deepspeed), budget)
    plan = distributed.from_main_process(compute, training_args)
    logger.info(plan.describe())
    if not plan.fits:
        raise SystemExit(plan.describe())
    given = training_args.deepspeed
    deepspeed = given if given is not None else deepspeed_config_for(plan, REPO_DIR)
    return plan, deepspeed


def hold_to_budget(tune_args):
    """--gpu_memory_limit: the allocator refuses more than the limit (an overrun fails as on the smaller card)."""
    if tune_args.gpu_memory_limit and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(parse_gib(tune_args.gpu_memory_limit) * GIB / total, 1.0))


def main(argv=None, build_model=load_model):
    """`build_model(path, dtype=, attn_implementation=, quantization=)` returns the model; benchmarks pass one that
    builds random weights of the same architecture."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, tune_args, training_args = parse_args(argv + distributed.prepare(argv))
    finetune_inputs(model_args, data_args, training_args)  # paths and machine, before anything loads
    rank = distributed.start(training_args)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
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
            sources = parse_sources(paths)
            result = main_process_scan([s.path for s in sources], tokenizer, settings, options, training_args)
            summaries.append(report_scan(result, split, data_args.on_bad_sample, data_args.model_max_length))
            apply_weights(result, sources, training_args.seed, split)
            datasets[split] = ConversationDataset(result, tokenizer, settings, options)
    if len(datasets["train"]) == 0:
        raise SystemExit("no training samples left after the data check")

    plan, deepspeed = setup_plan(argv, config, datasets, data_args, tune_args, training_args)
    hold_to_budget(tune_args)
    training_args = distributed.apply_plan(training_args, plan, deepspeed, plan.compile_blocks)
    # bf16 without DeepSpeed (settled now): compute in bf16 throughout (no autocast), fp32 master weights in the
    # optimizer (finetune.optimizer), which --optim may only choose the moments of
    master_weights = training_args.bf16 and not training_args.deepspeed
    check_optimizer(training_args.optim, master_weights)
    data_args.padding_free, data_args.pad_to_multiple_of = plan.padding_free, plan.pad_to_multiple_of
    generate_samples = generation_samples(data_args, training_args)  # knows ZeRO-3 now
    fingerprint = run_fingerprint(model_args, data_args, tune_args, training_args)  # with the plan's batch and stage
    resume = resolve_resume(training_args, fingerprint)  # stops here if the checkpoint is from other settings

    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    set_seed(training_args.seed)  # the new LoRA weights are drawn before the Trainer would seed
    # SDPA, and flash's variable-length kernel for concatenated samples and generation metrics' decoding
    attn_implementation = SDPA_VARLEN if model_args.attn_implementation == "sdpa" else model_args.attn_implementation
    model = build_model(path, dtype=dtype, attn_implementation=attn_implementation, quantization=tune_args.quantization)
    record_slicing(model, settings)
    model.config.use_cache = False
    model = configure_trainable(model, tune_args)
    apply_recompute(model, plan.recompute, plan.recompute_every_n_layers, training_args.gradient_checkpointing_kwargs)
    if plan.compile_blocks:
        compile_blocks(model, plan.cuda_graphs)
    if master_weights:  # the Trainer's accelerator autocasts by mixed_precision, set when the arguments were made
        training_args.bf16, training_args.mixed_precision = False, "no"
    elif training_args.fp16 and not training_args.deepspeed:
        upcast_trainable(model)
    logger.info(trainable_summary(model))
    register_model_files()

    trainer = MiniCPMVTrainer(model=model, args=training_args, master_weights=master_weights, run_fingerprint=fingerprint,
                              cuda_graphs=plan.cuda_graphs, moments_dtype=MOMENTS_DTYPES.get(plan.moments_dtype, torch.float32),
                              train_dataset=datasets["train"], eval_dataset=datasets.get("eval"), processing_class=tokenizer,
                              data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id,
                                                    pad_to_multiple_of=plan.pad_to_multiple_of,
                                                    padding_free=plan.padding_free))
    trainer.add_callback(MemoryReport(plan.predicted_peak_gib))
    if plan.compile_blocks:
        trainer.add_callback(GraphBreakReport())
    trainer.add_callback(ModelCardCallback(model_args, data_args, tune_args, settings, datasets))  # README.md
    if plan.cuda_graphs and plan.micro_batch_size == 1:  # larger batches: shapes vary
        trainer.add_callback(CudaGraphRecording(trainer, plan.pad_to_multiple_of))
    if generate_samples:
        trainer.add_callback(GenerationMetrics(trainer, generate_samples))
    stop = StopOnSignal()
    trainer.add_callback(stop)
    gc.collect()
    gc.freeze()  # the long-lived setup objects leave the collector's view: no multi-second full collections
    with stop.training():
        trainer.train(resume_from_checkpoint=resume)
    stop.exit_if_stopped(trainer)  # stopped on a signal: the checkpoint is saved, the final folder is not
    save_final(trainer, training_args.output_dir)
    if training_args.process_index == 0:
        from .plot import write_plots
        trainer.save_state()  # the run's log beside the model: trainer_state.json, which finetune.plot reads
        write_plots(training_args.output_dir)
        print("\n".join(summaries + [f"saved to {training_args.output_dir}"]))
    return trainer


if __name__ == "__main__":
    try:
        run(main)  # exits, with the run's status
    finally:
        distributed.finish()  # also after an error: NCCL's threads stopped, not left to hold the exit up
