"""4-bit base weights (QLoRA) and 8-bit optimizer states through bitsandbytes: the loading settings, what the
planner needs to predict their memory, and the combinations refused at start with the reason.

`--quantization nf4` stores the LLM's linear layers (the 32 blocks' attention and MLP projections, 7.0 of the 8.5 B
parameters) as 4-bit NormalFloat with double quantization, computed in the run's dtype (bf16 on GPUs); LoRA
adapters train on top of them. Everything else stays in the run's dtype and trains as without quantization: the
vision tower, the resampler, the token embeddings, the LM head and the norms. Numerics change (each weight becomes
one of 16 levels scaled per block of 64), so a run never switches to 4-bit by itself.

peft's `prepare_model_for_kbit_training` is not called, for what each of its three steps would do here: it freezes
every parameter (configure_trainable does, before choosing what trains); it casts every parameter that is not
4-bit to fp32, for stable updates (here the optimizer keeps fp32 masters of what trains, and fp32 copies of the
frozen embeddings, LM head and vision tower would add 3 GiB to the 8B model and run them in fp32); and it turns on
reentrant recomputation with inputs made to require gradients (finetune.py recomputes per module, non-reentrant).
Under ZeRO-3 the 4-bit weights are partitioned like the others.
"""
import importlib.util
import logging

NF4 = "nf4"
QUANTIZATIONS = ("none", NF4)

# --optim values that keep AdamW's moments in 8 bits (bitsandbytes), with whether they are paged
EIGHT_BIT_OPTIMIZERS = {"adamw_bnb_8bit": False, "adamw_8bit": False, "paged_adamw_8bit": True}
# --optim values that name the AdamW finetune.optimizer computes on fp32 masters
FP32_STATE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")

# Modules kept out of quantization: trained in full (vision tower, resampler; their 4-bit weights could not
# require gradients, which is how the official --q_lora failed), or the LM head, whose rows pick the next token.
# Embeddings and norms are not nn.Linear, so bitsandbytes leaves them as they are.
UNQUANTIZED_MODULES = ["vpm", "resampler", "llm.lm_head"]

# Bytes per quantized weight as bitsandbytes stores NF4 with double quantization: two weights per byte, one 8-bit
# absmax per block of 64 weights, one fp32 absmax (and offset) per 256 of those; plus per layer two small code
# tables (16 + 256 fp32 values). Dequantizing a layer for its matmul takes a transient copy of that layer in the
# compute dtype (the largest, an MLP projection of the 8B model: 112 MiB in bf16).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BLOCK_SIZE = 64


def quiet_bitsandbytes():
    """On CPUs with AVX512-BF16, importing bitsandbytes (peft does, whenever it is installed) logs a warning that it
    could not fetch a faster CPU kernel from the Hugging Face Hub through the optional `kernels` package; it then
    uses its own bundled kernel, which is what these runs want (the Hub cannot be reached from the GPU hosts, and a
    kernel downloaded at run time is not a dependency we pin). Drop that one message, nothing else."""
    noise = "Failed to load CPU gemm_4bit_forward from kernels-community"
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: not record.getMessage().startswith(noise))


def bitsandbytes_config(quantization, dtype):
    """transformers' BitsAndBytesConfig for `quantization` (None for "none"), computing in `dtype`."""
    if quantization in (None, "none"):
        return None
    if quantization != NF4:
        raise ValueError(f"quantization {quantization!r}: expected one of {QUANTIZATIONS}")
    require_bitsandbytes("--quantization nf4")
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=NF4, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=UNQUANTIZED_MODULES)


def require_bitsandbytes(flag):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit(f"{flag} needs bitsandbytes: pip install bitsandbytes (it is in requirements.txt)")


def optim_name(optim):
    """`--optim` as its name: the Trainer's arguments hold an enum, whose members do not look up as strings."""
    return getattr(optim, "value", optim)


def check_arguments(tune_args, training_args):
    """Stop combinations that cannot work, with the reason; `--q_lora true` (the official flag) means nf4."""
    optim = optim_name(training_args.optim)
    if optim in EIGHT_BIT_OPTIMIZERS:
        if tune_args.optimizer_moments_dtype == "bfloat16":
            raise SystemExit(f"--optim {optim} keeps the moments in 8 bits: drop --optimizer_moments_dtype")
        require_bitsandbytes(f"--optim {optim}")
    if tune_args.q_lora:
        if tune_args.quantization not in ("none", NF4):
            raise SystemExit(f"--q_lora true is --quantization nf4, not {tune_args.quantization}")
        tune_args.quantization = NF4
    if tune_args.quantization not in QUANTIZATIONS:
        raise SystemExit(f"--quantization takes {'|'.join(QUANTIZATIONS)}, got {tune_args.quantization!r}")
    if tune_args.quantization == "none":
        return
    problem = ("needs --use_lora true: 4-bit weights have no gradients, so the LLM cannot train in full; LoRA "
               "adapters train on top of them" if not tune_args.use_lora else
               "does not take --cuda_graphs: untested with bitsandbytes' 4-bit kernels" if tune_args.cuda_graphs else
               None)
    if problem:
        raise SystemExit(f"--quantization nf4 {problem}")
    require_bitsandbytes("--quantization nf4")


def check_optimizer(optim, master_weights):
    """Once the plan has settled bf16 and DeepSpeed: runs with `master_weights` (bf16 without DeepSpeed) train with
    AdamW on fp32 masters (finetune.optimizer), so --optim may only choose how its moments are stored. Elsewhere the
    Trainer builds the optimizer --optim names (under DeepSpeed, on DeepSpeed's fp32 partitions)."""
    optim = optim_name(optim)
    if master_weights and optim not in FP32_STATE_OPTIMIZERS + tuple(EIGHT_BIT_OPTIMIZERS):
        raise SystemExit(f"--optim {optim}: bf16 runs without DeepSpeed use AdamW on fp32 master weights, with "
                         f"moments in fp32 ({' or '.join(FP32_STATE_OPTIMIZERS)}) or 8 bits "
                         f"({', '.join(EIGHT_BIT_OPTIMIZERS)})")
