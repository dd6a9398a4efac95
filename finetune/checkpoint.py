"""Checkpoint folders: the official layout (config.json, sharded safetensors with the official tensor names,
tokenizer with the *inference* chat template, our model files for trust_remote_code), written so that an
interrupted save is never taken for a complete one, and the choice of the checkpoint a run continues from.

A `checkpoint-N` folder is complete once its trainer_state.json is there and reads back: the Trainer writes it
after every other file, and `CompleteCheckpoints` makes every rank finish its files before that. A SIGKILL at
any moment therefore leaves the newest complete checkpoint usable: the Trainer's rotation (`save_total_limit`)
deletes older folders only after a new one is complete, and the interrupted saves it would count as newer are
removed before training starts. Each checkpoint also holds the run's fingerprint (run_fingerprint.json: model,
data files, the flags that change training), so that re-running a command never continues a different run."""
import copy
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import fields
from enum import Enum

from peft import PeftModel
from transformers import AutoModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from replace_file.tokenization_minicpmv_fast import INFERENCE_CHAT_TEMPLATE, TRAIN_CHAT_TEMPLATE

from .cli import UserError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: its presence marks a complete checkpoint
FINGERPRINT = "run_fingerprint.json"
# TrainingArguments that change what a run computes. Flags not listed (logging, saving and evaluation cadence,
# output_dir, data loader workers, ...) may differ between a run and its continuation.
TRAINING_FLAGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
                  "optim_args", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "num_train_epochs",
                  "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
                  "bf16", "fp16", "train_sampling_strategy", "dataloader_drop_last", "label_smoothing_factor",
                  "average_tokens_across_devices")
# our flags that change speed, memory or the checks before training, not the result; every other one counts
NOT_TRAINING_FLAGS = {"data_path", "model_name_or_path", "eval_data_path", "check_workers", "decode_images_in_check",
                      "pad_to_multiple_of", "padding_free", "attn_implementation", "checkpointing_modules",
                      "checkpointing_every_n_layers", "compile_blocks", "cuda_graphs", "gpu_memory_limit",
                      "eval_generate_samples"}
START_OVER = ("false", "no", "0")


def register_model_files():
    """Make save_pretrained copy our model files beside the weights and point auto_map at them."""
    from replace_file import MiniCPMV, MiniCPMVConfig, MiniCPMVTokenizerFast
    MiniCPMVConfig.register_for_auto_class()
    MiniCPMV.register_for_auto_class("AutoModel")
    MiniCPMVTokenizerFast.register_for_auto_class("AutoTokenizer")


def record_slicing(model, settings):
    """Write the slicing training uses into the model's config, which every checkpoint saves (a LoRA folder
    through `LoraFolderModel`): chat, predict and load then slice images as training did."""
    model.config.slice_config = dict(model.config.slice_config, max_slice_nums=settings.max_slice_nums,
                                     scale_resolution=settings.scale_resolution)


class LoraFolderModel(PeftModel):
    """A PeftModel whose folder also holds config.json, the model's config as trained (its slicing), which
    `finetune.load` applies to the base, and an auto mapping that peft's `AutoPeftModel` can follow."""

    def _get_base_model_class(self, is_prompt_tuning=False):
        # what peft records as the adapter's auto mapping: transformers' AutoModel, which loads the base folder
        # through its auto_map (our model files copied beside its config.json); peft would record our module,
        # which AutoPeftModel's import allowlist refuses
        return AutoModel

    def save_pretrained(self, save_directory, is_main_process=True, **kwargs):
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            config = copy.deepcopy(self.get_base_model().config)
            if hasattr(config, "quantization_config"):  # 4-bit weights are chosen when loading (--quantization nf4),
                del config.quantization_config  # not by the folder: the config applies to the bf16 base too
            config.save_pretrained(save_directory)


def checkpoint_folders(output_dir):
    """{step: folder} of the checkpoint-N folders in output_dir, complete or not."""
    if not os.path.isdir(output_dir):
        return {}
    folders = {}
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            folders[int(match.group(1))] = os.path.join(output_dir, name)
    return folders


def trainer_state(folder):
    """The checkpoint's trainer_state.json, or None if its save did not finish (a SIGKILL while the Trainer wrote it
    leaves it cut short; its step must be the folder's)."""
    try:
        with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as f:
            state = json.load(f)
        step = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(os.path.normpath(folder)))
    return state if match is None or int(match.group(1)) == step else None


def is_complete(folder):
    return trainer_state(folder) is not None


def latest_complete_checkpoint(output_dir):
    """The newest checkpoint-N folder whose save finished (None if there is none)."""
    for step, folder in sorted(checkpoint_folders(output_dir).items(), reverse=True):
        if is_complete(folder):
            return folder
    return None


def discard(folder):
    """Remove a checkpoint folder, its completeness mark first: an interrupted removal leaves no folder that
    would pass for complete."""
    if os.path.exists(os.path.join(folder, TRAINER_STATE)):
        os.remove(os.path.join(folder, TRAINER_STATE))
    shutil.rmtree(folder, ignore_errors=True)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(model_args, data_args, tune_args, training_args):
    """What a run's result depends on, as {name: value}: the model (path and config.json), each data file (size and
    SHA-256 of its content; images are not hashed), the number of processes, the ZeRO stage, and every flag that
    changes training."""
    config = os.path.join(model_args.model_name_or_path, "config.json")
    found = {"model": os.path.abspath(model_args.model_name_or_path),
             "model config.json sha256": file_sha256(config) if os.path.isfile(config) else None,
             "processes": training_args.world_size,
             "ZeRO stage": training_args.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage", 0)
             if training_args.deepspeed else None}
    from .data.mixing import parse_sources
    for source in parse_sources(data_args.data_path):  # the weights count as the data_path flag below
        path = source.path
        found[f"data file {os.path.abspath(path)}"] = f"{os.path.getsize(path)} bytes, sha256 {file_sha256(path)}"
    for args in (model_args, data_args, tune_args):
        found.update({f"--{f.name}": getattr(args, f.name) for f in fields(args) if f.name not in NOT_TRAINING_FLAGS})
    found.update({f"--{name}": getattr(training_args, name) for name in TRAINING_FLAGS})
    return json.loads(json.dumps(found, default=lambda v: v.value if isinstance(v, Enum) else str(v)))  # as stored


def fingerprint_differences(folder, fingerprint):
    """One line per difference between the run that saved `folder` and this one ([] if none, or if the folder
    predates fingerprints)."""
    path = os.path.join(folder, FINGERPRINT)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return [f"  {name}: {saved.get(name, '(absent)')} then, {fingerprint.get(name, '(absent)')} now"
            for name in sorted(saved.keys() | fingerprint.keys()) if saved.get(name) != fingerprint.get(name)]


def finished(folder, output_dir):
    """Whether `folder` is the last step of its run and the final folder was saved after it."""
    state = trainer_state(folder)
    saved = [os.path.getmtime(os.path.join(output_dir, name)) for name in ("config.json", "adapter_config.json")
             if os.path.isfile(os.path.join(output_dir, name))]  # written last by save_final
    return state["global_step"] >= state.get("max_steps", float("inf")) and saved and \
        max(saved) >= os.path.getmtime(os.path.join(folder, TRAINER_STATE))


def resolve_resume(training_args, fingerprint):
    """The checkpoint this run continues from (None: from the start), by --resume_from_checkpoint:
    - unset (or true): the newest complete checkpoint in output_dir, when the run that saved it had this
      fingerprint; otherwise the run stops and says what differs and how to go on;
    - false: start over; the checkpoints already in output_dir are removed (they would be continued later);
    - a path: that checkpoint, whatever differs (listed as a warning).
    The main process first removes interrupted saves: the Trainer's rotation would count them as the newest."""
    value, output_dir = training_args.resume_from_checkpoint, training_args.output_dir
    main = training_args.process_index == 0
    start_over = value is not None and value.lower() in START_OVER
    if main:
        for step, folder in sorted(checkpoint_folders(output_dir).items()):
            if start_over:
                logger.warning("removing %s: starting over (--resume_from_checkpoint false)", folder)
                discard(folder)
            elif not is_complete(folder):
                logger.warning("%s is incomplete (no readable %s: its save was interrupted); removing it",
                               folder, TRAINER_STATE)
                discard(folder)
    if start_over:
        return None
    if value is None or value.lower() in ("true", "yes", "1", "latest", "auto"):
        folder = latest_complete_checkpoint(output_dir)
        if folder is None:
            if main:
                logger.info("no complete checkpoint in %s: training from the start", output_dir)
            return None
        differences = fingerprint_differences(folder, fingerprint)
        if differences:
            raise SystemExit(
                f"{folder} was saved by a run with other settings, so this run does not continue it:\n"
                + "\n".join(differences) + "\nTo start over: --resume_from_checkpoint false (removes the checkpoints in "
                f"{output_dir}) or another --output_dir. To continue from it with the new settings: "
                f"--resume_from_checkpoint {folder}")
        if finished(folder, output_dir):  # the Trainer would train a step past the end (an epoch not yet over)
            if main:
                logger.warning("%s: training finished at %s and the final model is saved; nothing to do "
                               "(--resume_from_checkpoint false trains again)", output_dir, folder)
            raise SystemExit(0)
    else:
        folder = value
        if not is_complete(folder):
            raise SystemExit(f"--resume_from_checkpoint {folder}: not a complete checkpoint (no readable {TRAINER_STATE})")
        differences = fingerprint_differences(folder, fingerprint)
        if differences and main:
            logger.warning("continuing from %s, saved with other settings:\n%s", folder, "\n".join(differences))
    if main:
        logger.warning("continuing from %s", folder)
    return folder


class CompleteCheckpoints:
    """Trainer mixin: each checkpoint is written into a fresh folder, with the run's fingerprint, and every rank
    finishes its files (weights, optimizer shards, RNG states, the model card) before the main process writes
    trainer_state.json, the mark of a complete checkpoint."""

    def __init__(self, *args, run_fingerprint=None, **kwargs):
        self.run_fingerprint, self.saved_step = run_fingerprint, None
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        if self.state.global_step == self.saved_step:
            return  # saved at this step already (a stop on a signal at an epoch's end): a rewrite would put it at risk
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            discard(folder)  # left by an earlier run: its files must not mix with this save's
            if self.run_fingerprint is not None:
                os.makedirs(folder)
                with open(os.path.join(folder, FINGERPRINT), "w", encoding="utf-8") as f:
                    json.dump(self.run_fingerprint, f, indent=1)
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        self.saved_step = self.state.global_step

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)  # each rank's last file; the Trainer writes trainer_state.json next
        from .model_card import write_card
        write_card(self, output_dir)  # the checkpoint's model card, before the mark too
        self.accelerator.wait_for_everyone()


def save_final(trainer, output_dir):
    """trainer.save_model (and the model card) into a temporary folder beside output_dir, then move the files in,
    config last."""
    staging = output_dir.rstrip("/") + ".saving"
    if trainer.args.should_save and os.path.isdir(staging):
        shutil.rmtree(staging)
    trainer.save_model(staging)
    if trainer.args.should_save:
        from .model_card import write_card
        write_card(trainer, staging)  # in place of peft's placeholder
        os.makedirs(output_dir, exist_ok=True)
        last = ("config.json", "adapter_config.json")  # what marks a model folder, then a LoRA folder
        names = sorted(os.listdir(staging), key=lambda n: last.index(n) + 1 if n in last else 0)
        for name in names:
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
    trainer.accelerator.wait_for_everyone()


def restore_template(folder):
    """Put the inference chat template back into a checkpoint saved with the training one (official scripts
    of May-June 2024), which makes chat() answer empty. Returns what was done."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: give a checkpoint folder (the one holding tokenizer_config.json)")
    config = json.load(open(path, encoding="utf-8"))
    template = config.get("chat_template")
    if template == INFERENCE_CHAT_TEMPLATE:
        return f"{path}: already has the inference chat template"
    if template not in (TRAIN_CHAT_TEMPLATE, None) and "assistant<|end_header_id|>" in (template or ""):
        return f"{path}: has a chat template that already adds the assistant header; left unchanged"
    config["chat_template"] = INFERENCE_CHAT_TEMPLATE
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
    return f"{path}: restored the inference chat template (it was {'missing' if template is None else 'the training one'})"
