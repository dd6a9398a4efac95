"""Processes and DeepSpeed: the process group before the data scan (rank 0 scans and plans, the others receive
the result), the run's TrainingArguments rebuilt with the plan (DeepSpeed set up there, whether the plan chose it
or the user gave it), and the process group closed at the end."""
import dataclasses
import json
import os

import torch
import torch.distributed as dist


def prepare(argv):
    """Before the TrainingArguments exist. On a machine without a GPU, DeepSpeed runs on the CPU, and several
    processes (which always train under DeepSpeed: see finetune.plan) need DeepSpeed's process group started here
    (gloo): accelerate only starts it on accelerators, and takes the processes for separate runs otherwise.
    Returns the flags that make the TrainingArguments use this state."""
    if torch.cuda.is_available():
        return []
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and "--deepspeed" not in {a.split("=")[0] for a in argv}:
        return []
    from accelerate import PartialState
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return ["--accelerator_config", json.dumps(CONFIGURED_STATE)]


CONFIGURED_STATE = {"use_configured_state": True}


def start(training_args):
    """Start the process group (transformers' own device set-up); returns this process's rank."""
    return training_args.process_index


def from_main_process(compute, training_args):
    """`compute()` on rank 0, its result sent to the other ranks (they wait rather than repeat the work)."""
    result = compute() if training_args.process_index == 0 else None
    if dist.is_available() and dist.is_initialized() and training_args.world_size > 1:
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    return result


def apply_plan(training_args, plan, deepspeed_config, compile_blocks):
    """The TrainingArguments of the run: the plan's batch split and precision, and its DeepSpeed config. Built anew
    so that transformers sets DeepSpeed up as for a `--deepspeed` given on the command line."""
    changes = dict(per_device_train_batch_size=plan.micro_batch_size,
                   gradient_accumulation_steps=plan.gradient_accumulation_steps,
                   gradient_checkpointing=False,  # recomputation is applied per module (finetune.execution)
                   deepspeed=deepspeed_config)
    if not training_args.fp16:
        changes["bf16"] = plan.bf16
    if deepspeed_config is not None and os.environ.get("DS_ACCELERATOR") == "cpu":  # the state prepare() started
        changes["accelerator_config"] = dict(dataclasses.asdict(training_args.accelerator_config), **CONFIGURED_STATE)
    args = dataclasses.replace(training_args, **changes)
    if deepspeed_config is not None:
        _fill_deepspeed_config(args, compile_blocks)
    return args


def _fill_deepspeed_config(training_args, compile_blocks):
    """Fill the DeepSpeed config's "auto" values once the process group exists (transformers fills them when the
    arguments are created, which under ZeRO-3 must agree with the world size before the model is created).
    With compiled blocks under ZeRO-3, DeepSpeed keeps torch's linear: its replacement (memory_efficient_linear)
    makes dynamo guard on each weight's ZeRO id, so every block recompiles until dynamo gives up and runs them
    eagerly (as DeepSpeed does for its own compile option)."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    _ = training_args.device  # sets up the process group
    training_args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(training_args.deepspeed)
    if compile_blocks and training_args.hf_deepspeed_config.is_zero3():
        training_args.hf_deepspeed_config.config["zero_optimization"]["memory_efficient_linear"] = False
    training_args.hf_deepspeed_config.trainer_config_process(training_args)
    training_args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=training_args.hf_deepspeed_config)


def finish():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
