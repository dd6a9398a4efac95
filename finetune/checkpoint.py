"""Checkpoint folders: the official layout (config.json, sharded safetensors with the official tensor names,
tokenizer with the *inference* chat template, our model files for trust_remote_code), written so that an
interrupted save is never taken for a complete one."""
import json
import os
import re
import shutil

from peft import PeftModel
from transformers import AutoModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from replace_file.tokenization_minicpmv_fast import INFERENCE_CHAT_TEMPLATE, TRAIN_CHAT_TEMPLATE

from .cli import UserError

TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: its presence marks a complete checkpoint


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
            self.get_base_model().config.save_pretrained(save_directory)


def latest_complete_checkpoint(output_dir):
    """The newest checkpoint-N folder whose save finished (None if there is none); logs skipped ones."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(match.group(1)))
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if os.path.isfile(os.path.join(folder, TRAINER_STATE)):
            return folder
        print(f"warning: {folder} is incomplete (no {TRAINER_STATE}, the save was interrupted); not resuming from it")
    return None


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
