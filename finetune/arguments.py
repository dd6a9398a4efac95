"""Command-line arguments of finetune.py: the official flags plus every transformers TrainingArguments flag."""
import os
import sys
from dataclasses import dataclass, field

import transformers

from . import quantization

DEFAULT_LORA_TARGETS = r"llm\..*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "MiniCPM-Llama3-V 2.5 folder (official layout)"})
    llm_type: str = field(default="llama3", metadata={"help": "kept from the official scripts; only llama3 is valid"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, flash_attention_2, eager"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "training data: JSON/JSONL, several separated by commas"})
    eval_data_path: str = field(default=None, metadata={"help": "evaluation data (loss only)"})
    model_max_length: int = field(default=2048, metadata={"help": "longer samples are skipped (or truncated)"})
    max_slice_nums: int = field(default=None, metadata={"help": "override the model's slice_config.max_slice_nums"})
    overlong: str = field(default="skip", metadata={"help": "skip | truncate (at a turn boundary, keeping an answer)"})
    on_bad_sample: str = field(default="error", metadata={"help": "error: stop before training with the list of "
                                                                  "bad samples | skip: train without them"})
    max_image_pixels: int = field(default=50_000_000)
    check_workers: int = field(default=0, metadata={"help": "processes for the pre-training data check (0: all cores)"})
    decode_images_in_check: bool = field(default=False, metadata={"help": "fully decode images in the check"})
    pad_to_multiple_of: int = field(default=1, metadata={
        "help": "padded batches: round each batch's token length up to a multiple of this, for fewer distinct shapes "
                "(cuDNN attention builds plans for every new one, ~0.1 s per shape on an H100); not with --padding_free"})
    padding_free: bool = field(default=False, metadata={
        "help": "concatenate each batch's samples in one row instead of padding them to the longest (each attends "
                "only to itself; on GPUs through flash attention's variable-length kernel): no compute on padding"})


@dataclass
class TuneArguments:
    tune_vision: bool = field(default=True, metadata={"help": "train the vision tower (in full)"})
    tune_llm: bool = field(default=True, metadata={"help": "train the LLM in full (ignored with --use_lora)"})
    tune_resampler: bool = field(default=True, metadata={"help": "train the resampler (in full)"})
    tune_embed_tokens: bool = field(default=False, metadata={"help": "with LoRA: also train embed_tokens in full"})
    checkpointing_modules: str = field(default="all", metadata={
        "help": "with --gradient_checkpointing: all | vision | llm | resampler. 'vision' recomputes only the vision "
                "tower and resampler, whose activations are the largest per FLOP; 'resampler' only the resampler "
                "(1.8 GiB per 4 samples, ~4 %% slower). Measured on one H200: recomputing two LLM blocks (llm, "
                "--checkpointing_every_n_layers 16) saves ~1 GiB at no measurable cost"})
    checkpointing_every_n_layers: int = field(default=1, metadata={
        "help": "with --gradient_checkpointing: recompute only every n-th block of the chosen modules (2: half "
                "of them), trading memory for speed"})
    compile_blocks: bool = field(default=False, metadata={
        "help": "torch.compile (inductor) each vision and LLM block: fused norms, activations, LoRA and residual "
                "kernels. The first steps compile (a minute or two); shapes are dynamic, so no recompiles after"})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "with --compile_blocks on a GPU without DeepSpeed: each block's kernels replayed as CUDA graphs, "
                "for small steps whose kernels the host cannot launch fast enough (1 sample per step on an H100: "
                "~4 -> 6.2 samples/s). Each batch shape is recorded once (seconds; with 1 sample per step the "
                "data's most common shapes before the first step), so batches are padded to a multiple of 64 "
                "tokens unless --pad_to_multiple_of says otherwise; not with --padding_free or "
                "--gradient_checkpointing"})
    optimizer_moments_dtype: str = field(default="float32", metadata={
        "help": "bfloat16: AdamW's moments stored in bf16, 4 bytes less per trained parameter (2 GiB for LoRA with "
                "the vision tower trained); bf16 models without DeepSpeed only"})
    use_lora: bool = False
    q_lora: bool = field(default=False, metadata={"help": "the official scripts' flag: --quantization nf4"})
    lora_r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "regex over module names"})
    quantization: str = field(default="none", metadata={
        "help": "none | nf4: the LLM's linear layers stored in 4 bits instead of 16 (QLoRA, with --use_lora; "
                "--q_lora true is the same), for GPUs too small for bf16 LoRA. It changes the numerics, so it is never "
                "chosen for you; the adapters also load on the bf16 model"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    # the toolkit's defaults differ from transformers' where the official scripts needed them
    remove_unused_columns: bool = False
    prediction_loss_only: bool = True
    logging_nan_inf_filter: bool = False  # a non-finite loss stops the run instead; the filter synchronised every step
    output_dir: str = "output"


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


def parse_args(argv=None):
    argv = translate_legacy_flags(list(sys.argv[1:] if argv is None else argv))
    if any(a.split("=")[0] == "--deepspeed" for a in argv) and os.environ.get("DS_ACCELERATOR") == "cpu":
        argv += setup_cpu_deepspeed()
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TuneArguments, TrainingArguments))
    model_args, data_args, tune_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.llm_type != "llama3":
        raise SystemExit(f"--llm_type {model_args.llm_type!r}: MiniCPM-Llama3-V 2.5 is a Llama-3 model, so only "
                         "'llama3' is valid (the official scripts' 'minicpm' is MiniCPM-V 2.0, 'qwen' is 2.6)")
    if not model_args.model_name_or_path or not data_args.data_path:
        raise SystemExit("--model_name_or_path and --data_path are required")
    if tune_args.checkpointing_modules not in ("all", "vision", "llm", "resampler"):
        raise SystemExit("--checkpointing_modules takes all|vision|llm|resampler")
    for flag, value in (("--checkpointing_every_n_layers", tune_args.checkpointing_every_n_layers),
                        ("--pad_to_multiple_of", data_args.pad_to_multiple_of)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    if data_args.padding_free and data_args.pad_to_multiple_of != 1:
        raise SystemExit("--pad_to_multiple_of pads batches, which --padding_free true does not build (the launch "
                         "scripts' GPU default): add --padding_free false to pad")
    if tune_args.optimizer_moments_dtype not in ("float32", "bfloat16"):
        raise SystemExit("--optimizer_moments_dtype takes float32|bfloat16")
    if tune_args.optimizer_moments_dtype != "float32" and (training_args.deepspeed or not training_args.bf16):
        raise SystemExit("--optimizer_moments_dtype bfloat16 needs --bf16 true and no --deepspeed (DeepSpeed keeps "
                         "its own optimizer states)")
    if tune_args.cuda_graphs:
        check_cuda_graphs(data_args, tune_args, training_args)
    if data_args.overlong not in ("skip", "truncate") or data_args.on_bad_sample not in ("error", "skip"):
        raise SystemExit("--overlong takes skip|truncate, --on_bad_sample error|skip")
    if training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if training_args.deepspeed:
        resolve_deepspeed_config(training_args, tune_args.compile_blocks)
    quantization.check_arguments(tune_args, training_args)
    return model_args, data_args, tune_args, training_args


def check_cuda_graphs(data_args, tune_args, training_args):
    """--cuda_graphs: refused where it is untested or would record a graph per batch; pads to 64 tokens by default."""
    import torch
    problem = ("needs --compile_blocks true" if not tune_args.compile_blocks else
               "does not run under --deepspeed (with the launch scripts: DS_CONFIG=none)" if training_args.deepspeed else
               "needs padded batches (--padding_free false): every new length would be recorded"
               if data_args.padding_free else
               "does not take recomputation (--gradient_checkpointing false)" if training_args.gradient_checkpointing else
               "needs a CUDA GPU" if not torch.cuda.is_available() else None)
    if problem:
        raise SystemExit(f"--cuda_graphs {problem}")
    if data_args.pad_to_multiple_of == 1:
        data_args.pad_to_multiple_of = 64


def setup_cpu_deepspeed():
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu, used by the tests): accelerate only starts DeepSpeed's process
    group on accelerators, so start it here (gloo) and have the TrainingArguments use this state."""
    from accelerate import PartialState
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return ["--accelerator_config", '{"use_configured_state": true}']


def resolve_deepspeed_config(training_args, compile_blocks):
    """Fill the DeepSpeed config's "auto" values again once the process group exists: transformers 5 fills
    them when the arguments are created, before it knows the world size, and ZeRO-3 model creation (before
    the Trainer exists) would then fail its batch-size check on more than one process.
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
