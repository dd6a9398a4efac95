"""Every speed decision of a run, made before the weights load: micro-batch and accumulation for the global
batch, recomputation, compiled blocks, padding-free or padded batches, CUDA graphs, AdamW moment dtype, and on
several GPUs the ZeRO stage and offload. The planner predicts each candidate's peak memory per GPU and its speed,
and takes the fastest whose peak fits the budget (the GPU's memory less HEADROOM_GIB, or --gpu_memory_limit).
Flags the user gave always win; the plan fills in the rest and says why.

    python -m finetune.plan --model_name_or_path M --data_path D --gpus 8 --gpu_memory 24GiB [finetune flags] [--json F]

prints the same plan on a machine without a GPU, from the model folder's config.json and tokenizer (no weights).

The memory model: weights, gradients and optimizer states from the parameter counts (a meta-device model, so
exact); activations per sample from its tokens and vision patches, per stored or recomputed block, with
constants measured on an H200 (bench/plan_calibration.py; bench/RESULTS.md). The speed model: the sample's model
FLOPs (recomputation adds its forward) at a fixed fraction of the GPU's peak, plus a per-micro-batch cost
(kernel launches, the host's share), also measured there; it only has to rank candidates.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from .quantization import EIGHT_BIT_OPTIMIZERS, NF4_BYTES_PER_WEIGHT, optim_name

GIB = 2 ** 30
HEADROOM_GIB = 2.0  # CUDA context, allocator fragmentation, the collectives' buffers
LIMIT_MARGIN = 0.05  # of a --gpu_memory_limit, for the allocator's fragmentation
NEAR_BEST = 0.99  # among plans this close to the fastest, the one with the smallest peak (room for longer samples)
DEFAULT_GLOBAL_BATCH = 16  # samples per optimizer step: ms-swift's default, LLaMA-Factory's examples use 8-16

# Activation bytes, measured on an H200 with compiled blocks and padding-free batches (bench/plan_calibration.py,
# LoRA r=64 with dropout on every LLM projection): per token for each stored LLM block, for each recomputed one (its
# input), and for the last block recomputed at the start of the backward pass (only when every block is); per
# vision patch for each stored or recomputed block when the vision tower is trained; per patch for the resampler's
# stored activations. A least-squares fit over 89 measured micro-batches, within 0.5 GiB of each.
PER_TOKEN = 7.2e3
PER_TOKEN_LLM_BLOCK = {"lora": 216.5e3, "plain": 118e3}  # plain (no adapters): attention + MLP tensors, no dropout
PER_TOKEN_LLM_RECOMPUTED_BLOCK = 13.6e3
PER_PATCH_VISION_BLOCK = 35.8e3
PER_PATCH_VISION_RECOMPUTED_BLOCK = 2.4e3
PER_PATCH_RESAMPLER = 44.1e3
# Eager blocks with the vision tower trained: what they keep beyond the compiled-block figures, per patch; fitted on an
# H200 (2026-12-03, bench/RESULTS.md#qlora) to the 4-bit LoRA run with 2 samples of 18,576 patches per micro-batch and
# all blocks recomputed (18.10 GiB). Runs still under autocast measured 57.5 kB (which tensors hold it: not measured)
PER_PATCH_EAGER_VISION = 25e3
# Speed: sustained fraction of the bf16 peak on the model's matrix work, and the cost of one micro-batch beyond it
SUSTAINED_FRACTION = 0.43
MICRO_BATCH_SECONDS = 0.035
ZERO_SPEED = {0: 1.0, 1: 0.97, 2: 0.95, 3: 0.85}  # several GPUs: what each stage's communication costs
OFFLOAD_SPEED = {"none": 1.0, "optimizer": 0.5, "optimizer+params": 0.3}
# Measured against the compiled-block model's 5.7 samples/s on an H200 (2026-12-03, LoRA, vision tower trained, 4 x 4,
# all blocks recomputed, both runs still under autocast): eager blocks 4.65 samples/s, with 4-bit base weights 4.26
EAGER_SPEED = 0.82
NF4_SPEED = 0.92
BF16_DENSE_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12,
                   "A10G": 70e12, "L4": 121e12, "3090": 71e12}

# Recomputation choices, from least to most memory saved: (modules, every n-th block)
RECOMPUTE_CHOICES = [("none", 1), ("resampler", 1), ("llm", 16), ("llm", 8), ("llm", 4), ("llm", 2), ("llm", 1),
                     ("vision", 2), ("vision", 1), ("all", 4), ("all", 2), ("all", 1)]


def parse_gib(text):
    """'24GiB', '24GB' (decimal), '24' (GiB) -> GiB."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|G)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise SystemExit(f"memory size {text!r}: write it as e.g. 24GiB, 24GB or 24")
    value, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    return value * 1e9 / GIB if unit == "gb" else value


@dataclass
class Hardware:
    gpus: int          # processes of the run
    memory_gib: float  # per GPU (per process on a CPU machine)
    bf16: bool = True
    name: str = "GPU"
    peak_flops: float = 989e12
    gpu: bool = True

    @classmethod
    def detect(cls, world_size):
        """This process's GPU (all GPUs of a run are taken to be alike); on a machine without one, the CPU: fp32,
        eager blocks, padded batches, its memory shared by the processes."""
        import torch
        if not torch.cuda.is_available():
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
            return cls(world_size, memory / world_size, bf16=False, name="CPU", peak_flops=1e12, gpu=False)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return cls.named(world_size, props.total_memory / GIB, props.name, torch.cuda.is_bf16_supported())

    @classmethod
    def named(cls, gpus, memory_gib, name="GPU", bf16=True):
        peak = next((v for k, v in BF16_DENSE_PEAK.items() if k in name), 989e12)
        return cls(gpus, memory_gib, bf16, name, peak)


@dataclass
class ParameterCounts:
    """Parameters by part (a meta-device model built from the config, so exact), and what is trained."""
    total: int              # every parameter of the base model
    llm_linear: int         # the LLM blocks' projections (4-bit with nf4)
    lora: int               # adapters added
    trained: int            # parameters that get gradients and optimizer states
    trained_copies: int     # peft keeps a frozen original of embed_tokens when it is trained in full
    llm_layers: int
    vision_layers: int
    llm_flops_per_token: float      # forward, 2 x the block parameters
    vision_flops_per_patch: float   # forward, vision tower + resampler
    resampler_flops_per_patch: float

    @classmethod
    def from_config(cls, config, tune):
        import torch
        from replace_file import MiniCPMV
        with torch.device("meta"):
            model = MiniCPMV(config)
        total = llm_linear = lora = 0
        parts = {"llm": 0, "vpm": 0, "resampler": 0, "embed_tokens": 0}
        pattern = re.compile(tune.lora_target_modules)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("llm.model.layers."):
                llm_linear += module.weight.numel()
                if tune.use_lora and pattern.fullmatch(name):
                    lora += tune.lora_r * (module.in_features + module.out_features)
        for name, param in model.named_parameters():
            total += param.numel()
            part = "embed_tokens" if "embed_tokens" in name else name.split(".")[0]
            parts[part] += param.numel()
        if tune.use_lora:
            trained = lora + parts["resampler"] * tune.tune_resampler + parts["vpm"] * tune.tune_vision \
                + parts["embed_tokens"] * tune.tune_embed_tokens
            copies = parts["embed_tokens"] * tune.tune_embed_tokens
        else:
            trained = (parts["llm"] + parts["embed_tokens"]) * tune.tune_llm + parts["vpm"] * tune.tune_vision \
                + parts["resampler"] * tune.tune_resampler
            copies = 0
        return cls(total=total, llm_linear=llm_linear, lora=lora, trained=trained, trained_copies=copies,
                   llm_layers=config.num_hidden_layers, vision_layers=len(model.vpm.encoder.layers),
                   llm_flops_per_token=2 * llm_linear,
                   vision_flops_per_patch=2 * (parts["vpm"] + parts["resampler"]),
                   resampler_flops_per_patch=2 * parts["resampler"])


@dataclass
class Workload:
    """What the user asked to train, and the data's shapes (from the data scan)."""
    counts: ParameterCounts
    use_lora: bool
    tune_vision: bool
    tune_resampler: bool
    quantization: str = "none"
    lengths: np.ndarray = field(default=None, repr=False)   # tokens per sample
    patches: np.ndarray = field(default=None, repr=False)   # vision patches per sample (units x widest unit)
    common_shapes_share: float = 0.0  # share of samples in the 32 most common one-sample batch shapes

    @classmethod
    def from_scan(cls, counts, tune, entries, shapes=None):
        share = 0.0
        if shapes:
            share = sum(len(indices) for _, indices in shapes[:32]) / max(len(entries), 1)
        return cls(counts, tune.use_lora, tune.tune_vision, tune.tune_resampler, tune.quantization,
                   entries["length"].astype(np.float64),
                   (entries["image_units"] * entries["widest_unit"]).astype(np.float64), share)


@dataclass
class Plan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    recompute: str
    recompute_every_n_layers: int
    compile_blocks: bool
    padding_free: bool
    pad_to_multiple_of: int
    cuda_graphs: bool
    moments_dtype: str
    zero_stage: int         # 0: no DeepSpeed
    offload: str            # none | optimizer | optimizer+params
    bf16: bool
    gpus: int
    global_batch_size: int
    predicted_peak_gib: float
    budget_gib: float
    device: str
    fits: bool
    predicted_samples_per_s: float
    reasons: dict = field(default_factory=dict)
    suggestions: list = field(default_factory=list)

    def to_json(self):
        data = asdict(self)
        data["recompute"] = dict(modules=self.recompute, every_n_layers=self.recompute_every_n_layers)
        del data["recompute_every_n_layers"]
        return data

    def describe(self):
        lines = [f"plan for {self.gpus} x {self.device}, budget {self.budget_gib:.1f} GiB each: "
                 f"{self.global_batch_size} samples per step = {self.micro_batch_size} per micro-batch x "
                 f"{self.gradient_accumulation_steps} accumulation x {self.gpus}; predicted peak "
                 f"{self.predicted_peak_gib:.1f} GiB, ~{self.predicted_samples_per_s:.1f} samples/s"
                 + ("" if self.fits else " - DOES NOT FIT")]
        lines += [f"  {key}: {why}" for key, why in self.reasons.items()]
        lines += [f"  to fit: {s}" for s in self.suggestions]
        return "\n".join(lines)


def _divisors(n):
    return [d for d in range(n, 0, -1) if n % d == 0]


def _recomputed(layers, modules, every_n, part):
    """How many of `layers` blocks of `part` (llm | vision) are recomputed, and whether the last one is."""
    chosen = modules == "all" or modules == part
    if not chosen:
        return 0, False
    return math.ceil(layers / every_n), every_n == 1


def activation_bytes(work, modules, every_n, tokens, patches, compiled=True):
    """Activation bytes at the start of the backward pass (the peak) for a micro-batch of these tokens and patches,
    with compiled or eager blocks."""
    c = work.counts
    llm_recomputed, llm_last = _recomputed(c.llm_layers, modules, every_n, "llm")
    per_block = PER_TOKEN_LLM_BLOCK["lora" if work.use_lora else "plain"]
    llm = tokens * (PER_TOKEN + (c.llm_layers - llm_recomputed) * per_block
                    + llm_recomputed * PER_TOKEN_LLM_RECOMPUTED_BLOCK + llm_last * per_block)
    vision = 0.0
    if work.tune_vision:
        vit_recomputed, _ = _recomputed(c.vision_layers, modules, every_n, "vision")
        vision = patches * ((c.vision_layers - vit_recomputed) * PER_PATCH_VISION_BLOCK
                            + vit_recomputed * PER_PATCH_VISION_RECOMPUTED_BLOCK + (not compiled) * PER_PATCH_EAGER_VISION)
    resampler_trained = work.tune_resampler or work.tune_vision
    resampler = patches * PER_PATCH_RESAMPLER * (resampler_trained and modules not in ("resampler", "vision", "all"))
    return llm + vision + resampler


# Bytes of AdamW's two moments per trained parameter: fp32, bf16 (finetune.optimizer), 8-bit (bitsandbytes' blockwise
# states, --optim adamw_bnb_8bit; their per-block scales are a fraction of a byte per parameter)
MOMENT_BYTES = {"float32": 8, "bfloat16": 4, "int8": 2}


def static_bytes(work, zero_stage, offload, moments_dtype, gpus, weight_bytes=2):
    """Weights, gradients and optimizer states per GPU. Without DeepSpeed: fp32 masters + moments (finetune.optimizer);
    ZeRO: fp32 partitions of masters, moments and gradients, split over the GPUs by stage."""
    c = work.counts
    weights = (c.total + c.lora + c.trained_copies) * weight_bytes
    if work.quantization == "nf4":  # the LLM's projections in 4 bits, with their scales
        weights -= c.llm_linear * (weight_bytes - NF4_BYTES_PER_WEIGHT)
    t = c.trained
    if zero_stage == 0:
        return weights + 2 * t + (4 + MOMENT_BYTES[moments_dtype]) * t
    shard = gpus
    grads = 2 * t / (shard if zero_stage >= 2 else 1)
    # fp32 masters, two moments, fp32 gradient partition
    optimizer = 0 if offload != "none" else (8 + MOMENT_BYTES[moments_dtype]) * t / shard
    if zero_stage == 3:  # plus the blocks gathered at a time and the parameters kept whole (persistence threshold)
        weights = (weights / shard if offload != "optimizer+params" else 0) + min(0.6e9, c.total) * weight_bytes
    return weights + grads + optimizer + 2 * min(5e8, c.total) * 2  # reduce and all-gather buckets (bf16)


def optimizer_step_bytes(work, zero_stage):
    """Transient memory of the optimizer step on top of the static part (its temporaries), when activations are gone."""
    return 4 * work.counts.trained if zero_stage == 0 else 0


def sample_seconds(work, hw, modules, every_n, tokens, patches):
    """Seconds of model work for these tokens and patches at the GPU's sustained rate, recomputation included."""
    c = work.counts
    llm_forward = tokens * c.llm_flops_per_token
    vision_forward = patches * c.vision_flops_per_patch
    llm_train = llm_forward * (2 if work.use_lora else 3)  # frozen weights need no weight gradients
    vision_train = vision_forward * (3 if work.tune_vision else 1)
    llm_recomputed, _ = _recomputed(c.llm_layers, modules, every_n, "llm")
    vit_recomputed, _ = _recomputed(c.vision_layers, modules, every_n, "vision")
    extra = llm_forward * llm_recomputed / c.llm_layers
    if work.tune_vision:
        extra += vision_forward * vit_recomputed / c.vision_layers
    if modules in ("resampler", "vision", "all"):
        extra += patches * c.resampler_flops_per_patch
    return (llm_train + vision_train + extra) / (hw.peak_flops * SUSTAINED_FRACTION)


def data_shapes(work):
    """The data's shapes the candidates are sized by, computed once: the tokens and patches of the largest
    micro-batch of each size (its longest samples together, as cumulative sums), and the mean sample."""
    order = np.argsort(-(work.lengths * PER_TOKEN_LLM_BLOCK["lora"] + work.patches * PER_PATCH_VISION_BLOCK))
    return dict(tokens=np.cumsum(work.lengths[order]), patches=np.cumsum(work.patches[order]),
                mean_tokens=float(work.lengths.mean()), mean_patches=float(work.patches.mean()))


@dataclass
class Fixed:
    """Choices the user made with flags: the plan keeps them."""
    micro_batch_size: int = None
    gradient_accumulation_steps: int = None
    recompute: tuple = None        # (modules, every_n)
    compile_blocks: bool = None
    padding_free: bool = None
    pad_to_multiple_of: int = None
    cuda_graphs: bool = None
    moments_dtype: str = None      # float32 | bfloat16 | int8 (an 8-bit --optim)
    zero_stage: int = None
    offload: str = None
    global_batch_size: int = None
    bf16: bool = None              # --bf16 / --fp16 given: that precision, whatever the GPU has


def make_plan(work, hw, fixed=None, budget_gib=None):
    """The fastest plan that fits; if none fits, the smallest one, with fits=False and what would make it fit."""
    fixed = fixed or Fixed()
    if fixed.bf16 is not None:
        hw = dataclasses.replace(hw, bf16=fixed.bf16)
    budget = budget_gib * (1 - LIMIT_MARGIN) if budget_gib is not None else hw.memory_gib - HEADROOM_GIB
    global_batch, reasons = _global_batch(fixed, hw.gpus)
    per_gpu = global_batch // hw.gpus
    compiled, compile_reason = _compiled_blocks(work, hw, fixed)
    shapes, candidates = data_shapes(work), []
    for zero, offload in _zero_choices(work, hw, fixed):
        for moments in _moment_choices(zero, hw, fixed):
            for modules, every_n in _recompute_choices(work, fixed):
                for mbs in _micro_batches(per_gpu, fixed):
                    candidates.append(_evaluate(work, shapes, hw, zero, offload, moments, modules, every_n, mbs,
                                                per_gpu, compiled))
    fitting = [c for c in candidates if c["peak"] <= budget * GIB]
    pool = fitting or candidates
    if fitting:
        fastest = max(c["speed"] for c in fitting)
        best = min((c for c in fitting if c["speed"] >= NEAR_BEST * fastest),
                   key=lambda c: (c["moments"] != "float32", c["peak"]))  # bf16 moments only where needed
    else:
        best = min(pool, key=lambda c: c["peak"])
    plan = _build(work, hw, fixed, best, budget, global_batch, per_gpu, bool(fitting), reasons, compiled,
                  compile_reason)
    if not fitting:
        plan.suggestions = _suggestions(work, hw, fixed, budget_gib, best)
    return plan


def _compiled_blocks(work, hw, fixed):
    """Whether blocks are compiled, and why: on GPUs, but eager with 4-bit base weights (on an H200, 2026-12-03,
    bench/RESULTS.md#qlora, compiled 4-bit blocks had not finished their first optimizer step after 5.7 minutes,
    eager ones ran 4.3 samples/s)."""
    if fixed.compile_blocks is not None:
        return fixed.compile_blocks, "compiled blocks" if fixed.compile_blocks else "eager blocks"
    if hw.gpu and work.quantization != "none":
        return False, "eager blocks: 4-bit blocks compile too slowly"
    return hw.gpu, "compiled blocks" if hw.gpu else "eager blocks"


def _global_batch(fixed, gpus):
    reasons = {}
    if fixed.micro_batch_size or fixed.gradient_accumulation_steps:  # the user's own split: its product
        size = (fixed.micro_batch_size or 1) * (fixed.gradient_accumulation_steps or 1) * gpus
        reasons["global batch"] = (f"{size} = per_device_train_batch_size x gradient_accumulation_steps x GPUs, "
                                   "as given")
        return size, reasons
    size = fixed.global_batch_size or DEFAULT_GLOBAL_BATCH
    if size % gpus:
        if fixed.global_batch_size:
            raise SystemExit(f"--global_batch_size {size} does not split over {gpus} GPUs: give a multiple of {gpus}")
        size = math.ceil(size / gpus) * gpus
    reasons["global batch"] = (f"{size} samples per optimizer step" + ("" if fixed.global_batch_size else
                               f" (the default {DEFAULT_GLOBAL_BATCH}, rounded to the GPU count)" if size != DEFAULT_GLOBAL_BATCH
                               else " (the default; --global_batch_size changes it)"))
    return size, reasons


def _zero_choices(work, hw, fixed):
    if fixed.zero_stage is not None:
        return [(fixed.zero_stage, fixed.offload or "none")]
    if hw.gpus == 1:  # plain PyTorch is fastest; DeepSpeed only to offload the optimizer to the CPU
        return [(0, "none"), (2, "optimizer")]
    stages = [(1, "none"), (2, "none"), (3, "none"), (2, "optimizer"), (3, "optimizer"), (3, "optimizer+params")]
    return stages if fixed.offload is None else [(s, o) for s, o in stages if o == fixed.offload]


def _moment_choices(zero, hw, fixed):
    if fixed.moments_dtype == "bfloat16":  # AdamW on fp32 masters: bf16 runs without DeepSpeed only
        if not hw.bf16:
            from .arguments import MOMENTS_NEED
            raise SystemExit(MOMENTS_NEED)
        return ["bfloat16"] if zero == 0 else []
    if fixed.moments_dtype:
        return [fixed.moments_dtype]
    return ["float32", "bfloat16"] if zero == 0 and hw.bf16 else ["float32"]  # bf16 moments: fp32-master AdamW


def _recompute_choices(work, fixed):
    if fixed.recompute:
        return [fixed.recompute]
    choices = RECOMPUTE_CHOICES
    if not work.tune_vision:  # a frozen vision tower keeps no activations: recomputing it saves nothing
        choices = [(m, n) for m, n in choices if m not in ("vision",) and not (m == "all" and n != 1)]
    return choices


def _micro_batches(per_gpu, fixed):
    if fixed.micro_batch_size:
        return [fixed.micro_batch_size]
    if fixed.gradient_accumulation_steps:
        return [max(per_gpu // fixed.gradient_accumulation_steps, 1)]
    return _divisors(per_gpu)


def _evaluate(work, shapes, hw, zero, offload, moments, modules, every_n, mbs, per_gpu, compiled):
    last = min(mbs, len(shapes["tokens"])) - 1
    tokens, patches = float(shapes["tokens"][last]), float(shapes["patches"][last])
    static = static_bytes(work, zero, offload, moments, hw.gpus, weight_bytes=2 if hw.bf16 else 4)
    peak = static + max(activation_bytes(work, modules, every_n, tokens, patches, compiled),
                        optimizer_step_bytes(work, zero))
    mean_tokens, mean_patches = shapes["mean_tokens"], shapes["mean_patches"]
    per_sample = sample_seconds(work, hw, modules, every_n, mean_tokens, mean_patches)
    cuda_graphs = _cuda_graphs_pay(work, hw, zero, modules, mbs)
    if cuda_graphs:  # kernels replayed: less host time per micro-batch, but padded to 64 tokens
        per_sample *= 1 + 32 / mean_tokens
    per_micro_batch = MICRO_BATCH_SECONDS * (0.6 if cuda_graphs else 1.0)
    step = per_gpu * per_sample + (per_gpu // mbs) * per_micro_batch
    speed = per_gpu * hw.gpus / step * ZERO_SPEED[zero] * OFFLOAD_SPEED[offload]
    speed *= (1.0 if compiled or not hw.gpu else EAGER_SPEED) * (NF4_SPEED if work.quantization == "nf4" else 1.0)
    speed *= 1.0 if moments == "float32" else 0.999  # the same speed: keep fp32 moments unless they do not fit
    return dict(zero=zero, offload=offload, moments=moments, modules=modules, every_n=every_n, mbs=mbs, peak=peak,
                speed=speed, cuda_graphs=cuda_graphs)


def _cuda_graphs_pay(work, hw, zero, modules, mbs):
    """One sample per step on one GPU leaves it waiting for kernel launches; graphs replay them, if the data has
    few shapes (each new shape is recorded once, seconds each)."""
    return (hw.gpu and hw.gpus == 1 and zero == 0 and mbs == 1 and modules == "none"
            and work.common_shapes_share >= 0.9 and work.quantization == "none")  # untested with 4-bit kernels


def _build(work, hw, fixed, best, budget, global_batch, per_gpu, fits, reasons, compiled, compile_reason):
    mbs = best["mbs"]
    cuda_graphs = fixed.cuda_graphs if fixed.cuda_graphs is not None else best["cuda_graphs"]
    # padding-free on GPUs with bf16: flash attention's variable-length kernel (the CPU pads, like the tests)
    padding_free = fixed.padding_free if fixed.padding_free is not None else (hw.gpu and hw.bf16 and not cuda_graphs)
    pad = fixed.pad_to_multiple_of or (64 if cuda_graphs else 1)
    plan = Plan(micro_batch_size=mbs, gradient_accumulation_steps=per_gpu // mbs, recompute=best["modules"],
                recompute_every_n_layers=best["every_n"], compile_blocks=compiled, padding_free=padding_free,
                pad_to_multiple_of=pad, cuda_graphs=cuda_graphs, moments_dtype=best["moments"], zero_stage=best["zero"],
                offload=best["offload"], bf16=hw.bf16, gpus=hw.gpus, global_batch_size=global_batch,
                predicted_peak_gib=round(best["peak"] / GIB, 2), budget_gib=round(budget, 2), device=hw.name, fits=fits,
                predicted_samples_per_s=round(best["speed"], 2), reasons=reasons)
    given = "as given" if fixed.micro_batch_size or fixed.gradient_accumulation_steps else None
    fitting = "that fits" if fits else "(nothing fits: the smallest plan)"
    reasons["micro-batch"] = given or (f"{mbs} x {per_gpu // mbs} accumulation: the fastest split of {per_gpu} "
                                       f"samples per GPU {fitting}")
    reasons["recompute"] = "as given" if fixed.recompute else (
        "none: everything fits without recomputing" if best["modules"] == "none" else
        f"{best['modules']} blocks, every {best['every_n']}: the least recomputation {fitting}")
    reasons["zero"] = "as given" if fixed.zero_stage is not None else (
        "no DeepSpeed" + (": one GPU, AdamW on fp32 master weights" if hw.bf16 else "") if best["zero"] == 0 else
        f"ZeRO-{best['zero']}" + ("" if best["offload"] == "none" else f" with {best['offload']} offloaded to the CPU")
        + f": the fastest stage {fitting}")
    reasons["moments"] = "as given" if fixed.moments_dtype else (
        "float32" if best["moments"] == "float32" else f"bfloat16: 4 bytes less per trained parameter, {fitting}")
    reasons["batches"] = ("padding-free (samples concatenated, no compute on padding)" if padding_free else
                          f"padded to a multiple of {pad}")
    reasons["compile"] = compile_reason
    if cuda_graphs:
        reasons["cuda graphs"] = "1 sample per step on one GPU: the host cannot launch kernels fast enough"
    return plan


def _suggestions(work, hw, fixed, budget_gib, smallest):
    need = smallest["peak"] / GIB + HEADROOM_GIB
    out = [f"a GPU with at least {math.ceil(need)} GiB (--gpu_memory_limit {math.ceil(need)}GiB)"]

    def fits(work=work, hw=hw, fixed=fixed):
        return make_plan(work, hw, fixed, budget_gib).fits

    more = next((n for n in (2, 4, 8, 16, 32, 64) if n > hw.gpus and fits(
        hw=dataclasses.replace(hw, gpus=n), fixed=Fixed(global_batch_size=max(DEFAULT_GLOBAL_BATCH, n)))), None)
    if more:
        out.append(f"{more} GPUs of this size (ZeRO shares the weights and optimizer states among them)")
    # numerics change with 4-bit weights: proposed, never chosen
    if work.use_lora and work.quantization == "none" and fits(work=dataclasses.replace(work, quantization="nf4")):
        out.append("4-bit base weights: --quantization nf4 (QLoRA; it changes the numerics, so it is not chosen for you)")
    if fixed.moments_dtype is None and fits(fixed=dataclasses.replace(fixed, moments_dtype="int8")):
        out.append("8-bit optimizer states: --optim adamw_bnb_8bit")
    if not work.use_lora:
        out.append("LoRA (bash finetune_lora.sh) instead of full finetuning")
    if work.tune_vision:
        out.append("a frozen vision tower (--tune_vision false)")
    if smallest["offload"] == "none":
        out.append("optimizer offload to the CPU (DeepSpeed ZeRO with offload_optimizer)")
    return out


# -- the run's flags -> planner inputs, and the plan -> the run's settings -------------------------------------------

SPEED_FLAGS = ("--per_device_train_batch_size", "--gradient_accumulation_steps", "--gradient_checkpointing",
               "--checkpointing_modules", "--checkpointing_every_n_layers", "--compile_blocks", "--padding_free",
               "--pad_to_multiple_of", "--cuda_graphs", "--optimizer_moments_dtype", "--deepspeed")


def given_flags(argv):
    """Names of the flags on the command line (explicit choices win over the plan)."""
    return {a.split("=")[0] for a in argv if a.startswith("--")}


def fixed_from_args(argv, data_args, tune_args, training_args, deepspeed_config=None):
    given = given_flags(argv)
    fixed = Fixed(global_batch_size=tune_args.global_batch_size)
    if "--per_device_train_batch_size" in given:
        fixed.micro_batch_size = training_args.per_device_train_batch_size
    if "--gradient_accumulation_steps" in given:
        fixed.gradient_accumulation_steps = training_args.gradient_accumulation_steps
    if "--gradient_checkpointing" in given and not training_args.gradient_checkpointing:
        fixed.recompute = ("none", 1)
    elif {"--gradient_checkpointing", "--checkpointing_modules", "--checkpointing_every_n_layers"} & given:
        fixed.recompute = (tune_args.checkpointing_modules or "all", tune_args.checkpointing_every_n_layers or 1)
    for name in ("compile_blocks", "cuda_graphs"):
        setattr(fixed, name, getattr(tune_args, name))
    fixed.padding_free = data_args.padding_free
    fixed.pad_to_multiple_of = data_args.pad_to_multiple_of
    fixed.moments_dtype = tune_args.optimizer_moments_dtype
    if optim_name(training_args.optim) in EIGHT_BIT_OPTIMIZERS:
        fixed.moments_dtype = "int8"
    if {"--bf16", "--fp16"} & given:
        fixed.bf16 = training_args.bf16
    if deepspeed_config is not None:
        zero = deepspeed_config.get("zero_optimization", {})
        fixed.zero_stage = int(zero.get("stage", 0))
        kinds = [k for k in ("optimizer", "param") if zero.get(f"offload_{k}", {}).get("device", "none") != "none"]
        fixed.offload = {(): "none", ("optimizer",): "optimizer"}.get(tuple(kinds), "optimizer+params")
    elif "--deepspeed" in given:  # --deepspeed none
        fixed.zero_stage, fixed.offload = 0, "none"
    return fixed


def deepspeed_config_for(plan, repo_dir):
    """The shipped ZeRO config of the plan's stage, with the plan's offload; None without DeepSpeed."""
    if plan.zero_stage == 0:
        return None
    with open(os.path.join(repo_dir, f"ds_config_zero{plan.zero_stage}.json")) as f:
        config = json.load(f)
    zero = config.setdefault("zero_optimization", {})
    if plan.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


# -- the dry run ------------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m finetune.plan", description=(
        "Print the plan a run would take (micro-batch, accumulation, recomputation, ZeRO stage, predicted peak "
        "memory) on GPUs you do not have yet, from the model folder's config.json and tokenizer: no weights, no "
        "GPU. Any finetune.py flag may follow; flags it gives are kept as the run would keep them."))
    ap.add_argument("--gpus", type=int, default=1, help="GPUs of the run")
    ap.add_argument("--gpu_memory", default="80GiB", help="memory of each GPU, e.g. 24GiB")
    ap.add_argument("--gpu_name", default="H100", help="GPU model, for the speed estimate (H200, A100, 4090, ...)")
    ap.add_argument("--json", help="also write the plan as JSON here")
    own, rest = ap.parse_known_args(argv)
    from .arguments import parse_args
    from .data.conversation import ImageSettings
    from .data.dataset import ConversationDataset, ScanOptions, scan
    from .model import load_tokenizer, read_config
    model_args, data_args, tune_args, training_args = parse_args(rest)
    path = model_args.model_name_or_path
    tokenizer, config = load_tokenizer(path), read_config(path)
    settings = ImageSettings.from_config(config, data_args.max_slice_nums)
    options = ScanOptions(model_max_length=data_args.model_max_length, overlong=data_args.overlong,
                          max_image_pixels=data_args.max_image_pixels, workers=os.cpu_count() or 1)
    result = scan(data_args.data_path.split(","), tokenizer, settings, options, progress=False)
    if len(result.entries) == 0:
        raise SystemExit(f"{data_args.data_path}: no usable samples")
    shapes = ConversationDataset(result, tokenizer, settings, options).batch_shapes(64)
    work = Workload.from_scan(ParameterCounts.from_config(config, tune_args), tune_args, result.entries, shapes)
    hw = Hardware.named(own.gpus, parse_gib(own.gpu_memory), own.gpu_name)
    budget = parse_gib(tune_args.gpu_memory_limit) if tune_args.gpu_memory_limit else None
    plan = make_plan(work, hw, fixed_from_args(rest, data_args, tune_args, training_args, training_args.deepspeed),
                     budget)
    print(plan.describe())
    if own.json:
        with open(own.json, "w") as f:
            json.dump(plan.to_json(), f, indent=1)
    return plan


if __name__ == "__main__":
    main()
