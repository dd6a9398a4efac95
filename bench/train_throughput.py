"""Training throughput and memory of the real training path (finetune.finetune.main, what finetune_lora.sh and
finetune_ds.sh run) on the full-size MiniCPM-Llama3-V 2.5 architecture with random bf16 weights.

    python bench/train_throughput.py --data DIR/train.json --name lora_speed -- [finetune.py flags]
    torchrun --nproc_per_node N bench/train_throughput.py --data ... --name full_zero2 -- --deepspeed ds_config_zero2.json ...

Data: ../shared/bench/make_bench_data.py --n 256 --seed 1234. Times optimizer steps (the GPU synchronised where
the timed window starts and ends), discards the first --warmup, and writes JSON: samples/s, LLM tokens/s, vision patches/s (real, unpadded), MFU
(peers.md section 4: LLM 6N per token, or 4N for frozen LoRA weights, attention 3x forward; vision 3x forward
when trained, 1x when frozen; resampler likewise; dense peak 989.4 TFLOP/s per GPU), peak allocated/reserved
memory, GPU utilisation, versions and the command.
"""
import argparse
import json
import os
import platform
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.cli import CUDA_ALLOC_CONF  # noqa: E402

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)  # as the entry points and launch scripts set it
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from finetune import finetune as entry  # noqa: E402
from finetune.checkpoint import save_final  # noqa: E402
from finetune.model import load_model  # noqa: E402
from finetune.trainer import OnHost  # noqa: E402
from finetune.official_format import official_config, reference_model_dir  # noqa: E402
from replace_file import MiniCPMV, MiniCPMVConfig  # noqa: E402

PEAK_FLOPS = 989.4e12
CFG = official_config()
D, L, N_LLM = CFG["hidden_size"], CFG["num_hidden_layers"], 7.505e9
V = CFG["vision_config"]
N_VIT = V["num_hidden_layers"] * (4 * V["hidden_size"] ** 2 + 2 * V["hidden_size"] * V["intermediate_size"])


def random_model(path, dtype, attn_implementation, quantization=None):
    """The full architecture with random weights, created on the GPU (partitioned under ZeRO-3)."""
    if quantization not in (None, "none"):
        raise SystemExit("4-bit weights are quantized as they load: pass --checkpoint (bench/launch_script_rate.py --make_checkpoint writes one)")
    config = MiniCPMVConfig.from_pretrained(path)
    if transformers.integrations.is_deepspeed_zero3_enabled():
        return MiniCPMV._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    with torch.device("cuda"):
        return MiniCPMV._from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def batch_counts(batch, lora, tune_vision, tune_resampler=True):
    """Samples, model FLOPs (honest: 4N for frozen LoRA weights; as peers report: 6N), LLM tokens and vision
    patches of one micro-batch."""
    if "cu_seq_lens_q" in batch:  # padding-free: the samples concatenated in one row
        lengths = batch["cu_seq_lens_q"].diff().double()
    else:
        lengths = batch["attention_mask"].sum(1).double().cpu()
    attn = 3 * (2 * lengths ** 2 * D * L).sum()  # causal-halved 2*s*d*L per token, x3 for training
    tokens = lengths.sum()
    vision = 0.0
    if batch["pixel_values"] is not None:
        patches = (batch["tgt_sizes"][:, 0] * batch["tgt_sizes"][:, 1]).double().cpu()
        k = 3 if tune_vision else 1
        vit_attn = 4 * patches ** 2 * V["hidden_size"] * V["num_hidden_layers"]
        vision += k * (2 * N_VIT * patches + vit_attn).sum()
        q, h, kv = CFG["query_num"], D, V["hidden_size"]
        resampler = 2 * patches * kv * h + 4 * patches * h * h + 2 * q * h * h * 3 + 4 * q * patches * h
        vision += (3 if tune_resampler else 1) * resampler.sum()
    honest = (4 if lora else 6) * N_LLM * tokens + attn + vision
    as_peers = 6 * N_LLM * tokens + attn + vision
    patches = float(patches.sum()) if batch["pixel_values"] is not None else 0.0
    return len(lengths), float(honest), float(as_peers), float(tokens), patches


def counted_collate(collate, lora, tune_vision, examples):
    """The training collator, plus the batch's sample count and FLOPs, computed in the dataloader worker while
    the tensors are still on the CPU (counting them on the GPU would synchronise it)."""
    batch = collate(examples)
    batch["bench_counts"] = OnHost(batch_counts(batch, lora, tune_vision))
    return batch


def communication_seconds(events):
    """(NCCL kernel time, the part of it during which no other kernel runs) over profiled device events, in s.
    The second is the communication the step waits on: transfers not hidden behind compute, and NCCL kernels
    spinning while a slower rank catches up."""
    edges = []
    for e in events:
        if e.device_type == DeviceType.CUDA:
            kind = 0 if "nccl" in e.name.lower() else 1
            edges += [(e.time_range.start, kind, 1), (e.time_range.end, kind, -1)]
    active, last, total, exposed = [0, 0], None, 0.0, 0.0
    for t, kind, delta in sorted(edges):
        if last is not None and active[0]:
            total += t - last
            exposed += (t - last) * (active[1] == 0)
        active[kind] += delta
        last = t
    return total / 1e6, exposed / 1e6


class Meter(TrainerCallback):
    """Per optimizer step: samples, tokens, patches, FLOPs and wall time. The GPU is synchronised only where the
    timed window starts and ends (per-step times inside it are host-side and approximate; their sum is exact).
    With profiling, the two steps before the window are profiled (and not timed): GPU busy fraction, top
    operators, and which operators block the host (synchronisations, pageable copies)."""

    def __init__(self, name, lora, tune_vision, warmup, total_steps, profile=False, out_dir=None):
        self.name, self.lora, self.tune_vision, self.out_dir = name, lora, tune_vision, out_dir
        self.profile_at = warmup if profile else None
        self.first_timed, self.total_steps = warmup + (2 if profile else 0), total_steps
        self.steps, self.current, self.last_end, self.profiler, self.communication = [], None, None, None, None
        self.util, self._stop = [], threading.Event()
        # peak memory per phase (allocated, reserved GiB): where the peak is says which saving can lower it
        self.peaks = dict(setup=(0.0, 0.0), forward_backward=(0.0, 0.0), optimizer=(0.0, 0.0))

    def take_peak(self, phase):
        """Fold the allocator's peak since the last call into `phase` and restart it (host-side, no sync)."""
        now = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
        self.peaks[phase] = tuple(max(a, b) for a, b in zip(self.peaks[phase], now))
        torch.cuda.reset_peak_memory_stats()

    def count(self, counts):
        samples, honest, peers, tokens, patches = counts
        c = self.current
        c["samples"] += samples
        c["tokens"] += tokens
        c["patches"] += patches
        c["flops"] += honest
        c["flops_6n"] += peers

    def on_step_begin(self, args, state, control, **kw):
        self.take_peak("optimizer" if self.steps else "setup")
        if len(self.steps) == self.profile_at:
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA], with_stack=True)
            self.profiler.__enter__()
            self.last_end = time.perf_counter()
        start = self.last_end if self.last_end is not None else time.perf_counter()
        self.current = dict(start=start, samples=0, tokens=0.0, patches=0.0, flops=0.0, flops_6n=0.0)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.take_peak("forward_backward")

    def on_step_end(self, args, state, control, **kw):
        if self.profiler is not None or len(self.steps) + 1 in (self.first_timed, self.total_steps):
            torch.cuda.synchronize()
        self.last_end = time.perf_counter()
        self.current["seconds"] = self.last_end - self.current.pop("start")
        self.steps.append(self.current)
        if self.profiler is not None and len(self.steps) == self.profile_at + 2:
            self.profiler.__exit__(None, None, None)
            self.write_profile(sum(s["seconds"] for s in self.steps[-2:]))
            self.profiler = None
            self.last_end = time.perf_counter()  # the next step starts after the report was written

    def write_profile(self, wall_s):
        averages = self.profiler.key_averages()
        kernel_s = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e6
        busy = f"GPU kernel time {kernel_s:.3f} s of {wall_s:.3f} s wall over 2 steps: busy {100 * kernel_s / wall_s:.0f} %"
        comm_s, exposed_s = communication_seconds(self.profiler.events())
        self.communication = dict(wall_s=round(wall_s, 4), nccl_s=round(comm_s, 4), nccl_exposed_s=round(exposed_s, 4))
        busy += f"; NCCL kernels {comm_s:.3f} s, {exposed_s:.3f} s of it with no other kernel running"
        blocking = Counter()
        for e in self.profiler.events():
            if e.name in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize"):
                chain, parent = [], e.cpu_parent
                while parent is not None and len(chain) < 3:
                    chain.append(parent.name)
                    parent = parent.cpu_parent
                frames = [f for f in (e.stack or []) if "site-packages/torch/" not in f][:4]
                blocking[f"{e.name} < {' < '.join(chain)} @ {' | '.join(frames)}"] += 1
        lines = [busy, "host-blocking calls over 2 steps (count, call < parent ops @ Python frames):"]
        lines += [f"{n:5d} {k}" for k, n in blocking.most_common(25)]
        lines += [averages.table(sort_by=key, row_limit=40) for key in ("self_cpu_time_total", "self_cuda_time_total")]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            Path(self.out_dir, f"profile_{self.name}.txt").write_text("\n\n".join(lines))
        print(f"rank {rank}: {busy}")

    def on_train_begin(self, *a, **kw):
        def sample():
            while not self._stop.wait(0.5):
                if len(self.steps) < self.first_timed:  # timed steps only
                    continue
                try:
                    self.util.append(torch.cuda.utilization())
                except Exception:
                    return
        threading.Thread(target=sample, daemon=True).start()

    def on_train_end(self, *a, **kw):
        self._stop.set()
        self.take_peak("optimizer")


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--checkpoint", help="load this model folder (e.g. the real weights) instead of random weights")
    ap.add_argument("--save_to", help="after training, save the model folder here (the launch scripts' final save) "
                                      "and report its time and size")
    ap.add_argument("--profile", action="store_true", help="profile the two steps after the warm-up (not timed) into OUT/profile_NAME.txt; "
                    "with several GPUs, the JSON gets their NCCL time and its part not hidden behind compute")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    lora = "--use_lora" in extra and extra[extra.index("--use_lora") + 1] == "true"
    tune_vision = not ("--tune_vision" in extra and extra[extra.index("--tune_vision") + 1] == "false")
    meter = Meter(a.name, lora, tune_vision, a.warmup, a.steps, a.profile, a.out)
    orig_trainer = entry.MiniCPMVTrainer

    class MeteredTrainer(orig_trainer):
        def __init__(self, model, args, data_collator, **kw):
            super().__init__(model, args, partial(counted_collate, data_collator, lora, tune_vision), **kw)
            self.add_callback(meter)

        def _prepare_inputs(self, inputs):
            counts = inputs.pop("bench_counts").value
            if self.model.training and meter.current is not None:
                meter.count(counts)  # each micro-batch the step consumes
            return super()._prepare_inputs(inputs)

    entry.MiniCPMVTrainer = MeteredTrainer
    args = ["--model_name_or_path", a.checkpoint or reference_model_dir(), "--data_path", a.data, "--output_dir", f"/tmp/bench_{a.name}",
            "--max_steps", str(a.steps), "--save_strategy", "no", "--report_to", "none", "--bf16", "true",
            "--logging_steps", "5", "--learning_rate", "1e-5", "--dataloader_num_workers", "8",
            "--dataloader_pin_memory", "true", "--dataloader_persistent_workers", "true"] + extra
    torch.cuda.reset_peak_memory_stats()
    trainer = entry.main(args, build_model=load_model if a.checkpoint else random_model)
    # the dataloader prefetches: count only what the timed steps consumed, per step
    timed = meter.steps[meter.first_timed:]  # profiled steps run slower: not timed
    world = trainer.args.world_size
    seconds = sum(s["seconds"] for s in timed)
    # totals, then each timed step's model FLOPs (summed over ranks: all ranks' work in that step)
    totals = [sum(s[k] for s in timed) for k in ("samples", "tokens", "patches", "flops_6n")]
    tensor = torch.tensor(totals + [s["flops"] for s in timed], device="cuda", dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(tensor)
    (samples, tokens, patches, flops_6n), step_flops = tensor[:4].tolist(), tensor[4:].tolist()
    flops = sum(step_flops)
    phases = list(meter.peaks)
    peaks = torch.tensor([meter.peaks[p] for p in phases], device="cuda")  # [phase, (allocated, reserved)]
    if world > 1:
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    peak_alloc = peaks.max(0).values
    report = dict(
        name=a.name, command="python bench/train_throughput.py " + " ".join(argv), date=time.strftime("%Y-%m-%d"),
        device=torch.cuda.get_device_name(), gpus=world, host=platform.node(),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version()),
        steps_timed=len(timed), samples_per_step=int(samples / max(len(timed), 1)),
        samples_per_s=samples / seconds, samples_per_s_per_gpu=samples / seconds / world,
        llm_tokens_per_s=tokens / seconds, vision_patches_per_s=patches / seconds,
        mfu=flops / seconds / (PEAK_FLOPS * world), mfu_6n=flops_6n / seconds / (PEAK_FLOPS * world),
        peak_allocated_gib=peak_alloc[0].item(), peak_reserved_gib=peak_alloc[1].item(),
        peak_allocated_gib_by_phase={p: round(v, 2) for p, v in zip(phases, peaks[:, 0].tolist())},
        gpu_utilisation_mean=sum(meter.util) / max(len(meter.util), 1), step_seconds=[round(s["seconds"], 3) for s in timed],
        step_tflop=[round(f / 1e12, 1) for f in step_flops],
        finetune_args=args)
    if meter.communication:  # rank 0's two profiled steps
        report["profiled_communication"] = meter.communication
    if a.save_to:
        start = time.perf_counter()
        save_final(trainer, a.save_to)
        report["save_seconds"] = time.perf_counter() - start
        report["save_gib"] = sum(f.stat().st_size for f in Path(a.save_to).rglob("*") if f.is_file()) / 2**30
    if trainer.args.process_index == 0:
        print(json.dumps({k: v for k, v in report.items() if k not in ("finetune_args", "step_seconds", "step_tflop")}, indent=1))
        os.makedirs(a.out, exist_ok=True)
        Path(a.out, f"train_{a.name}.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
