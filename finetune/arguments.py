"""Command-line arguments of finetune.py: the official flags plus every transformers TrainingArguments flag. Parsing
and checking only: what the run does with them is decided by finetune.plan."""
import json
import os
import sys
from dataclasses import dataclass, field

import transformers

from . import quantization
from .cli import Parser
from .data.mixing import parse_sources
from .plan import DEFAULT_GLOBAL_BATCH, given_flags

DEFAULT_LORA_TARGETS = r"llm\..*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


@dataclass
class ModelArguments:
    _argument_group_name = "model"
    model_name_or_path: str = field(default=None, metadata={"help": "MiniCPM-Llama3-V 2.5 folder (official layout)"})
    llm_type: str = field(default="llama3", metadata={"help": "kept from the official scripts; only llama3 is valid"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, flash_attention_2, eager"})


@dataclass
class DataArguments:
    _argument_group_name = "data"
    data_path: str = field(default=None, metadata={"help": "training data: JSON/JSONL, several separated by commas, "
                                                           "each with an optional weight (a.jsonl:0.3,b.jsonl:2): the "
                                                           "fraction of the file used per epoch"})
    eval_data_path: str = field(default=None, metadata={"help": "evaluation data (as --data_path)"})
    model_max_length: int = field(default=2048, metadata={"help": "longer samples are skipped (or truncated)"})
    max_slice_nums: int = field(default=None, metadata={"help": "override the model's slice_config.max_slice_nums"})
    overlong: str = field(default="skip", metadata={"help": "skip | truncate (at a turn boundary, keeping an answer)"})
    on_bad_sample: str = field(default="error", metadata={"help": "error: stop before training with the list of "
                                                                  "bad samples | skip: train without them"})
    max_image_pixels: int = field(default=50_000_000, metadata={"help": "larger images are bad samples"})
    check_workers: int = field(default=0, metadata={"help": "processes for the pre-training data check (0: all cores)"})
    decode_images_in_check: bool = field(default=False, metadata={"help": "fully decode images in the check"})
    pad_to_multiple_of: int = field(default=None, metadata={
        "help": "padded batches: round each batch's token length up to a multiple of this, for fewer distinct shapes; "
                "not with --padding_free (default: the plan's)"})
    padding_free: bool = field(default=None, metadata={
        "help": "concatenate each batch's samples in one row instead of padding them to the longest (each attends "
                "only to itself; on GPUs through flash attention's variable-length kernel): no compute on padding "
                "(default: the plan's: on GPUs with bf16)"})
    eval_generate_samples: int = field(default=None, metadata={
        "help": "at every evaluation, greedily decode this many eval samples and log their task metrics (GUICourse, "
                "ScreenSpot) beside the eval loss as eval_gen_*; default 32 when the run evaluates (none under "
                "ZeRO-3), 0: off"})


@dataclass
class TuneArguments:
    _argument_group_name = "what is trained, and how"
    tune_vision: bool = field(default=True, metadata={"help": "train the vision tower in full"})
    tune_llm: bool = field(default=True, metadata={"help": "train the LLM in full (ignored with --use_lora)"})
    tune_resampler: bool = field(default=True, metadata={"help": "train the resampler in full"})
    tune_embed_tokens: bool = field(default=False, metadata={"help": "with LoRA: also train embed_tokens in full"})
    checkpointing_modules: str = field(default=None, metadata={
        "help": "with --gradient_checkpointing: all | vision | llm | resampler | none. 'vision' recomputes the vision "
                "tower and the resampler, 'resampler' only the resampler (default: the plan's)"})
    checkpointing_every_n_layers: int = field(default=None, metadata={
        "help": "recompute only every n-th block of the chosen modules (2: half of them), trading memory for speed "
                "(default: the plan's)"})
    compile_blocks: bool = field(default=None, metadata={
        "help": "torch.compile (inductor) each vision and LLM block: fused norms, activations, LoRA and residual "
                "kernels; the first steps compile, shapes are dynamic (default: on GPUs)"})
    cuda_graphs: bool = field(default=None, metadata={
        "help": "with --compile_blocks on one GPU without DeepSpeed: each block's kernels replayed as CUDA graphs, "
                "for 1-sample steps whose kernels the host cannot launch fast enough; each batch shape is recorded "
                "once, so batches are padded to a multiple of 64 tokens (default: the plan's)"})
    optimizer_moments_dtype: str = field(default=None, metadata={
        "help": "float32 | bfloat16: AdamW's moments in bf16 take 4 bytes less per trained parameter; bf16 models "
                "without DeepSpeed only (default: the plan's, float32 unless that does not fit)"})
    global_batch_size: int = field(default=None, metadata={
        "help": f"samples per optimizer step over all GPUs (default {DEFAULT_GLOBAL_BATCH}); the plan splits it into "
                "micro-batches and accumulation steps. Giving --per_device_train_batch_size or "
                "--gradient_accumulation_steps instead fixes that split (global = their product x GPUs)"})
    gpu_memory_limit: str = field(default=None, metadata={
        "help": "plan for this much GPU memory per GPU, e.g. 24GiB, and hold the run to it (to share a GPU, or to "
                "rehearse a smaller card); default: the GPU's memory less a headroom"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters on the LLM instead of all its "
                                                            "weights (the modules chosen by --tune_* train in full)"})
    q_lora: bool = field(default=False, metadata={"help": "the official scripts' flag: --quantization nf4"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "regex over module names"})
    quantization: str = field(default="none", metadata={
        "help": "none | nf4: the LLM's linear layers stored in 4 bits instead of 16 (QLoRA, with --use_lora; "
                "--q_lora true is the same), for GPUs too small for bf16 LoRA. It changes the numerics, so it is never "
                "chosen for you; the adapters also load on the bf16 model"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    _argument_group_name = "training (transformers TrainingArguments)"
    # the toolkit's defaults differ from transformers' where the official scripts needed them
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep every batch entry for the model"})
    prediction_loss_only: bool = field(default=True, metadata={"help": "evaluation computes the loss only (no "
                                                                       "logits kept)"})
    logging_nan_inf_filter: bool = field(default=False, metadata={  # the filter synchronised the GPU every step
        "help": "leave non-finite losses out of the logged mean (off: a non-finite loss stops the run instead)"})
    output_dir: str = field(default="output", metadata={"help": "where checkpoints and the final model are written"})


# Flags of the official scripts that transformers 5 renamed or dropped.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}
DROPPED_FLAGS = {"--logging_dir": "use TENSORBOARD_LOGGING_DIR", "--save_safetensors": "always safetensors"}


def translate_legacy_flags(argv):
    """Rewrite the official scripts' flags for transformers 5, with a notice for each."""
    out, i = [], 0
    while i < len(argv):
        name, _, inline = argv[i].partition("=")
        value_given = bool(inline)
        value = inline if value_given else (argv[i + 1] if i + 1 < len(argv) else "")
        consumed = 1 if value_given else 2
        if name in RENAMED_FLAGS:
            print(f"notice: {name} is now {RENAMED_FLAGS[name]}", file=sys.stderr)
            out += [RENAMED_FLAGS[name], value]
        elif name == "--group_by_length":
            print("notice: --group_by_length is now --train_sampling_strategy group_by_length", file=sys.stderr)
            if value.lower() in ("true", "1", "yes"):
                out += ["--train_sampling_strategy", "group_by_length"]
        elif name in DROPPED_FLAGS:
            print(f"notice: {name} is not a transformers 5 flag ({DROPPED_FLAGS[name]}); ignored", file=sys.stderr)
            if name == "--logging_dir":
                os.environ.setdefault("TENSORBOARD_LOGGING_DIR", value)
        else:
            out.append(argv[i])
            consumed = 1
        i += consumed
    return out


def pop_deepspeed(argv):
    """Take `--deepspeed CONFIG` out of argv: DeepSpeed is set up once the plan is made (finetune.distributed), so
    that a planned ZeRO stage and a given one take the same path. Returns (argv, the config as a dict or None, given)."""
    out, config, given = [], None, False
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name != "--deepspeed":
            out.append(argv[i])
            i += 1
            continue
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        i += 1 if eq else 2
        given = True
        if value.lower() in ("", "none", "false"):
            config = None
        elif value.lstrip().startswith("{"):
            config = json.loads(value)
        elif not os.path.isfile(value):
            raise SystemExit(f"--deepspeed {value}: no such file (ds_config_zero1.json, ds_config_zero2.json, "
                             "ds_config_zero3.json, or none)")
        else:
            with open(value) as f:
                config = json.load(f)
    return out, config, given


def parse_args(argv=None):
    """The dataclasses, checked. `training_args.deepspeed` holds the given DeepSpeed config (a dict) or None; it is
    set up by finetune.distributed after planning."""
    argv = translate_legacy_flags(list(sys.argv[1:] if argv is None else argv))
    argv, deepspeed, _ = pop_deepspeed(argv)
    parser = build_parser()
    model_args, data_args, tune_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.deepspeed = deepspeed
    check(model_args, data_args, tune_args, training_args, given_flags(argv))
    return model_args, data_args, tune_args, training_args


MOMENTS_NEED = ("--optimizer_moments_dtype bfloat16 needs bf16 (a GPU that has it) and no DeepSpeed (DeepSpeed keeps "
                "its own optimizer states)")


def check(model_args, data_args, tune_args, training_args, given):
    """Refuse what cannot work, and contradictions between given flags, with the fix."""
    if model_args.llm_type != "llama3":
        raise SystemExit(f"--llm_type {model_args.llm_type!r}: MiniCPM-Llama3-V 2.5 is a Llama-3 model, so only "
                         "'llama3' is valid (the official scripts' 'minicpm' is MiniCPM-V 2.0, 'qwen' is 2.6)")
    if not model_args.model_name_or_path or not data_args.data_path:
        raise SystemExit("--model_name_or_path and --data_path are required")
    try:  # data file weights, checked before anything loads
        [parse_sources(p) for p in (data_args.data_path, data_args.eval_data_path) if p]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if tune_args.checkpointing_modules not in (None, "all", "vision", "llm", "resampler", "none"):
        raise SystemExit("--checkpointing_modules takes all|vision|llm|resampler|none")
    for flag, value in (("--checkpointing_every_n_layers", tune_args.checkpointing_every_n_layers),
                        ("--pad_to_multiple_of", data_args.pad_to_multiple_of),
                        ("--global_batch_size", tune_args.global_batch_size)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    if data_args.padding_free and (data_args.pad_to_multiple_of or 1) != 1:
        raise SystemExit("--pad_to_multiple_of pads batches, which --padding_free true does not build: add "
                         "--padding_free false to pad")
    if tune_args.optimizer_moments_dtype not in (None, "float32", "bfloat16"):
        raise SystemExit("--optimizer_moments_dtype takes float32|bfloat16")
    if tune_args.optimizer_moments_dtype == "bfloat16" and (training_args.deepspeed or training_args.fp16):
        raise SystemExit(MOMENTS_NEED)
    if tune_args.cuda_graphs:
        check_cuda_graphs(data_args, tune_args, training_args)
    if data_args.overlong not in ("skip", "truncate") or data_args.on_bad_sample not in ("error", "skip"):
        raise SystemExit("--overlong takes skip|truncate, --on_bad_sample error|skip")
    recompute_given = {"--checkpointing_modules", "--checkpointing_every_n_layers"} & given
    if "--gradient_checkpointing" in given and not training_args.gradient_checkpointing and recompute_given and \
            tune_args.checkpointing_modules != "none":
        raise SystemExit(f"--gradient_checkpointing false and {' / '.join(sorted(recompute_given))} contradict each "
                         "other: drop one (or say --checkpointing_modules none)")
    if tune_args.global_batch_size and {"--per_device_train_batch_size", "--gradient_accumulation_steps"} & given:
        raise SystemExit("--global_batch_size and --per_device_train_batch_size / --gradient_accumulation_steps "
                         "both set the global batch: give one or the other")
    if tune_args.gpu_memory_limit:
        from .plan import parse_gib
        parse_gib(tune_args.gpu_memory_limit)
    quantization.check_arguments(tune_args, training_args)


ABOUT = """Finetune MiniCPM-Llama3-V 2.5 (all weights, or LoRA with --use_lora true) on JSON/JSONL conversation data
with the Hugging Face Trainer, optionally under DeepSpeed. Several GPUs: torchrun --nproc_per_node N
finetune/finetune.py ... The launch scripts (bash finetune_lora.sh --help, bash finetune_ds.sh --help) set the
recommended defaults. Check data first: python -m finetune.data check DATA --model FOLDER."""


class TrainingParser(Parser, transformers.HfArgumentParser):
    """finetune.py's flags, from the dataclasses above (finetune.cli: help with defaults, one-line mistakes)."""


def build_parser(prog=None, description=ABOUT):
    """The parser of finetune.py's flags; the launch scripts' --help (finetune.launch) shows it too."""
    prog = prog or os.environ.get("FINETUNE_PROG", "python finetune/finetune.py")
    usage = "%(prog)s --model_name_or_path FOLDER --data_path FILE[,FILE] [--flag VALUE ...]"
    return TrainingParser((ModelArguments, DataArguments, TuneArguments, TrainingArguments), prog=prog, usage=usage,
                          description=description)


def check_cuda_graphs(data_args, tune_args, training_args):
    """--cuda_graphs: refused where it is untested or would record a graph per batch."""
    import torch
    problem = ("needs compiled blocks (not --compile_blocks false)" if tune_args.compile_blocks is False else
               "does not run under --deepspeed (with the launch scripts: DS_CONFIG=none)" if training_args.deepspeed else
               "needs padded batches (--padding_free false): every new length would be recorded"
               if data_args.padding_free else
               "does not take recomputation (--gradient_checkpointing false)" if training_args.gradient_checkpointing else
               "needs a CUDA GPU" if not torch.cuda.is_available() else None)
    if problem:
        raise SystemExit(f"--cuda_graphs {problem}")
