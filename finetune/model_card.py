"""Model cards: the README.md (Hugging Face format) of every checkpoint this toolkit writes, in place of peft's
placeholder. YAML metadata for the Hub (base_model when it is a Hub id, library_name, pipeline_tag, tags), then
the base model, what was trained and how (LoRA settings, slicing, steps and epochs, global batch), the data files
with their sample counts, the final losses, and evaluation scores once known (`finetune.evaluate --model_card`).

A card is a title, an introduction and `## ` sections; later writers (evaluation, merging) replace sections."""
import datetime
import json
import os
import re
import sys

from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainerCallback


TAG = "minicpmv-finetune"  # marks the cards this toolkit wrote
CARD = "README.md"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(folder):
    """The Hub id a local model folder was downloaded from, when it says so (the release's config.json
    records it as `_name_or_path`; the Hub cache names its folders models--owner--name), else None."""
    match = re.search(r"models--([^/]+)--([^/]+)", os.path.abspath(folder))
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            name = json.load(f).get("_name_or_path") or ""
    except (OSError, ValueError):
        return None
    return name if HUB_ID.fullmatch(name) and not os.path.exists(name) else None


def metadata(base, lora, merged=False):
    base_id = hub_id(base) if base else None
    tags = ["minicpm-v", "minicpm-llama3-v-2.5", "gui-agent", "lora" if lora else "full-finetune", TAG]
    extra = {"base_model_relation": "adapter" if lora and not merged else "finetune"} if base_id else {}
    return ModelCardData(base_model=base_id, library_name="peft" if lora and not merged else "transformers",
                         pipeline_tag="image-text-to-text", tags=tags + (["merged-lora"] if merged else []), **extra)


def compose(data, title, intro, sections):
    """The card: YAML metadata, `# title`, the introduction, then each (heading, body) as a `## ` section."""
    body = "".join(f"\n## {heading}\n\n{text.strip()}\n" for heading, text in sections.items())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{intro.strip()}\n{body}")


def parse(card):
    """(title, introduction, {heading: body}) of a card this module composed."""
    head, *rest = re.split(r"^## ", card.text, flags=re.M)
    title, _, intro = head.strip().partition("\n")
    sections = {}
    for part in rest:
        heading, _, text = part.partition("\n")
        sections[heading.strip()] = text.strip()
    return title.lstrip("# ").strip(), intro.strip(), sections


def load(folder):
    """The folder's card when this toolkit wrote it, else None (peft's placeholder, the release's own card)."""
    path = os.path.join(folder, CARD)
    if not os.path.isfile(path):
        return None
    card = ModelCard.load(path)
    return card if TAG in (card.data.tags or []) else None


def save(card, folder):
    """Written whole or not at all (a rename), like the rest of a checkpoint."""
    path = os.path.join(folder, CARD)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(card))
    os.replace(path + ".tmp", path)


def number(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrainingRun:
    """What a finetune.py run is: the card's facts that do not change during it. The trainer state (steps,
    losses) and arguments are read at each save."""

    def __init__(self, model_args, data_args, tune_args, settings, datasets):
        self.base = model_args.model_name_or_path
        self.data_args, self.tune, self.settings = data_args, tune_args, settings
        self.data = {split: [(rf.path, len(rf), int((ds.entries["file"] == i).sum())) for i, rf in enumerate(ds.files)]
                     for split, ds in datasets.items()}
        self.command = " ".join(["finetune/finetune.py"] + sys.argv[1:])

    def trained(self):
        tune = self.tune
        modules = {"the vision tower": tune.tune_vision, "the resampler": tune.tune_resampler}
        if tune.use_lora:
            modules["embed_tokens"] = tune.tune_embed_tokens
            in_full = [name for name, on in modules.items() if on]
            return (f"LoRA adapters (r={tune.lora_r}, alpha={tune.lora_alpha}, dropout {tune.lora_dropout}) on the "
                    f"LLM modules matching `{tune.lora_target_modules}`"
                    + (f"; in full: {', '.join(in_full)}" if in_full else "; nothing else"))
        in_full = [name for name, on in {"the LLM": tune.tune_llm, **modules}.items() if on]
        return f"in full: {', '.join(in_full)}" + ("" if len(in_full) == 3 else " (the rest frozen)")

    def card(self, args, state, dtype):
        """The card of a save at this point of the run."""
        world = max(args.world_size, 1)
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        s, d = self.settings, self.data_args
        schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # an enum, or its name
        epochs = f"{state.epoch:.2f}" if state.epoch is not None else "?"
        training = "\n".join([
            f"- Base model: `{self.base}`" + (f" ({hub_id(self.base)})" if hub_id(self.base) else ""),
            f"- Trained: {self.trained()}",
            f"- Images: sliced into up to {s.max_slice_nums} slices of {s.scale_resolution} px, {s.query_num} "
            f"tokens each; samples up to {d.model_max_length} tokens (longer ones: {d.overlong})",
            f"- Steps: {state.global_step} of {state.max_steps} ({epochs} epochs)",
            f"- Global batch: {batch} samples per optimizer step ({args.per_device_train_batch_size} per process "
            f"x {args.gradient_accumulation_steps} accumulated x {world} processes)",
            f"- Optimizer: AdamW, learning rate {args.learning_rate:g}, {schedule} schedule "
            f"(warm-up {args.warmup_steps:g}), weight decay {args.weight_decay:g}; weights in {dtype}",
            f"- DeepSpeed: `{args.deepspeed}`" if args.deepspeed else "- DeepSpeed: no",
            f"- Seed: {args.seed}",
            f"- Command: `{self.command}`",
        ])
        data = "| split | file | samples | used |\n|---|---|---|---|\n" + "\n".join(
            f"| {split} | `{path}` | {total} | {used} |" for split, files in self.data.items()
            for path, total, used in files)
        sections = {"Training": training, "Data": data, "Results": results(state.log_history),
                    "Evaluation": "Not evaluated yet. `python -m finetune.predict` then `python -m finetune.evaluate "
                                  "... --model_card THIS_FOLDER` add the scores here.",
                    "Use": usage(self.tune.use_lora)}
        kind = "LoRA adapter" if self.tune.use_lora else "full finetune"
        intro = (f"A {kind} of MiniCPM-Llama3-V 2.5 (Llama-3-8B + SigLIP + resampler), written by this toolkit's "
                 f"finetune.py on {datetime.date.today().isoformat()}.")
        return compose(metadata(self.base, self.tune.use_lora), f"MiniCPM-Llama3-V 2.5, {kind}", intro, sections)


def results(log_history):
    """The last logged training loss, the run's mean training loss (at its end) and the last evaluation loss."""
    last = {}
    for entry in log_history:
        for key in ("loss", "train_loss", "eval_loss"):
            if key in entry:
                last[key] = (entry[key], entry.get("step"))
    names = {"loss": "training loss (last logged)", "train_loss": "mean training loss over the run",
             "eval_loss": "evaluation loss (last)"}
    rows = [f"| {names[k]} | {number(v)} | {step} |" for k, (v, step) in last.items()]
    return "| | value | step |\n|---|---|---|\n" + "\n".join(rows) if rows else "No loss logged yet."


def usage(lora):
    direct = ("With peft: `PeftModel.from_pretrained(AutoModel.from_pretrained(BASE, trust_remote_code=True), FOLDER)`"
              if lora else "With transformers: `AutoModel.from_pretrained(FOLDER, trust_remote_code=True)` (the model "
                           "files are in the folder)")
    return (f"- With this toolkit: `model, tokenizer = finetune.load(FOLDER)`, or talk about a screenshot with "
            f"`python -m finetune.chat --model FOLDER --image screen.png`\n- {direct}")


def callback_of(trainer):
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, ModelCardCallback)), None)


class ModelCardCallback(TrainerCallback):
    """Holds the run's description for its cards: finetune.checkpoint writes one into every checkpoint-N (before
    the checkpoint's completeness mark) and into the final folder (write_card)."""

    def __init__(self, *run_args):
        self.run = TrainingRun(*run_args)


def model_dtype(model):
    return str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else "?"


def write_card(trainer, folder):
    """A checkpoint's or the final folder's card (nothing when the run was not set up with a ModelCardCallback)."""
    callback = callback_of(trainer)
    if callback is not None and trainer.args.should_save:
        save(callback.run.card(trainer.args, trainer.state, model_dtype(trainer.model)), folder)


def write_merged_card(adapter, output, base, dtype):
    """The merged checkpoint's card: the adapter's (when this toolkit wrote it) as a full model."""
    card = load(adapter)
    if card is not None:
        sections = parse(card)[2]
    else:  # an adapter from elsewhere: what its config says
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        sections = {"Training": f"- Trained: LoRA adapters (r={config.get('r')}, alpha={config.get('lora_alpha')}) on "
                                f"`{config.get('target_modules')}`; in full: {config.get('modules_to_save')}"}
    intro = (f"A full checkpoint of MiniCPM-Llama3-V 2.5: the LoRA adapter `{os.path.abspath(adapter)}` merged into "
             f"its base `{base}` by python -m finetune.merge_lora, weights in {str(dtype).replace('torch.', '')}.")
    sections["Use"] = usage(lora=False)
    save(compose(metadata(base, lora=True, merged=True), "MiniCPM-Llama3-V 2.5, merged LoRA finetune", intro,
                 sections), output)


def add_evaluation(folder, data, rows):
    """Put evaluation scores into the folder's card: rows of (task, metric, percent, samples) on the data file
    `data`, replacing earlier scores on that file. A folder without a card of ours gets nothing (returns False)."""
    card = load(folder)
    if card is None:
        return False
    title, intro, sections = parse(card)
    data = os.path.abspath(data)
    header = "| data | task | metric | score (%) | samples |\n|---|---|---|---|---|"
    kept = [line for line in sections.get("Evaluation", "").splitlines()
            if line.startswith("| `") and not line.startswith(f"| `{data}` |")]
    new = [f"| `{data}` | {task} | {metric} | {value:.2f} | {n} |" for task, metric, value, n in rows]
    sections["Evaluation"] = "\n".join([header] + kept + new)
    save(compose(card.data, title, intro, sections), folder)
    return True
