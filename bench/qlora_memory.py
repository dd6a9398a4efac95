"""QLoRA (4-bit base weights) against bf16 LoRA on one GPU: peak memory and throughput of the real training path
(bench/train_throughput.py, i.e. finetune.finetune.main), each run in its own process under a memory cap
(torch.cuda.set_per_process_memory_fraction) so that a run needing more than its card has fails instead of
reporting a peak it could not have on that card.

    python bench/qlora_memory.py --data .benchdata/train.json --checkpoint /tmp/random-8b [--eager]

All runs take the launch scripts' GPU defaults (bf16, compiled blocks, padding-free batches, recomputation
everywhere, 1 sample per step, LoRA r=64 on every LLM projection) with 8-bit AdamW moments (`--optim
adamw_bnb_8bit`):
- qlora_resampler: `--quantization nf4`, vision tower frozen, resampler trained; capped at 12 GiB (16 GB cards);
- qlora_vision: `--quantization nf4`, vision tower trained; capped at 20 GiB (24 GB cards);
- lora_vision: the same with bf16 weights, for the throughput ratio; capped at 48 GiB.
The checkpoint folder gets random full-size bf16 weights in the official layout if it has none (4-bit weights are
quantized as they load, so they need weights on disk; ~16 GB). Writes OUT/qlora_memory_TAG.json: per run the cap,
whether it fit, peak allocated memory (total and by phase), samples/s, the graph breaks dynamo logged in the
compiled blocks (pieces that ran eagerly), and the train_throughput report.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = ["--use_lora", "true", "--lora_r", "64", "--lora_alpha", "64", "--per_device_train_batch_size", "1",
          "--padding_free", "true", "--gradient_checkpointing", "true", "--optim", "adamw_bnb_8bit",
          "--train_sampling_strategy", "random"]
RUNS = {  # name: (cap in GiB, flags)
    "qlora_resampler": (12, ["--quantization", "nf4", "--tune_vision", "false"]),
    "qlora_vision": (20, ["--quantization", "nf4", "--tune_vision", "true"]),
    "lora_vision": (48, ["--tune_vision", "true"]),
}


def run_capped(cap_gib, argv):
    """bench/train_throughput.py's main in this process, the caching allocator capped at cap_gib."""
    from bench import train_throughput  # first: it sets the allocator's configuration, as the launch scripts do
    import torch
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    sys.argv = ["bench/train_throughput.py"] + argv
    train_throughput.main()


def main():
    if sys.argv[1:2] == ["--capped"]:  # one run, in a child process
        return run_capped(float(sys.argv[2]), sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", required=True, help="model folder; random full-size weights are written if empty")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="h200", help="the machine, in the result names")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=6, help="steps not timed (compilation happens in the first)")
    ap.add_argument("--eager", action="store_true", help="no compiled blocks (faster to start)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    a = ap.parse_args()

    import bitsandbytes
    import torch
    if not any((Path(a.checkpoint) / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        from bench.launch_script_rate import make_checkpoint
        start = time.perf_counter()
        make_checkpoint(a.checkpoint)
        print(f"random full-size weights written to {a.checkpoint} in {time.perf_counter() - start:.0f} s", flush=True)
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    report = dict(command="python bench/qlora_memory.py " + " ".join(sys.argv[1:]), date=time.strftime("%Y-%m-%d"),
                  device=torch.cuda.get_device_name(), bitsandbytes=bitsandbytes.__version__, runs={})
    for name in a.runs.split(","):
        cap, flags = RUNS[name]
        flags = COMMON + flags + ([] if a.eager else ["--compile_blocks", "true"])
        argv = ["--data", a.data, "--name", f"{name}_{a.tag}", "--checkpoint", a.checkpoint, "--steps", str(a.steps),
                "--warmup", str(a.warmup), "--out", a.out, "--"] + flags
        start = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--capped", str(cap)] + argv, cwd=REPO,
                               env=dict(os.environ, TORCH_LOGS="graph_breaks"), capture_output=True, text=True)
        breaks = [line for line in child.stderr.splitlines() if "Graph break" in line]
        result = dict(cap_gib=cap, fits=child.returncode == 0, wall_s=round(time.perf_counter() - start),
                      graph_breaks=len(breaks), first_graph_breaks=breaks[:5], flags=flags)
        if child.returncode == 0:
            run = json.loads(Path(a.out, f"train_{name}_{a.tag}.json").read_text())
            result.update(peak_allocated_gib=round(run["peak_allocated_gib"], 2),
                          peak_allocated_gib_by_phase=run["peak_allocated_gib_by_phase"],
                          samples_per_s=round(run["samples_per_s"], 3), report=run)
        else:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1][-300:]
            over = "OutOfMemoryError" in child.stderr or "out of memory" in child.stderr
            result["failure"] = f"{'over the cap (out of memory)' if over else 'error'}: {last}"
            Path(a.out, f"qlora_memory_{name}_{a.tag}.log").write_text(child.stdout[-20000:] + child.stderr[-20000:])
        report["runs"][name] = result
        print(name, {k: v for k, v in result.items() if k not in ("report", "flags")}, flush=True)
    runs = report["runs"]
    if all(runs.get(n, {}).get("samples_per_s") for n in ("qlora_vision", "lora_vision")):
        report["qlora_vision_speed_vs_lora"] = round(runs["qlora_vision"]["samples_per_s"]
                                                     / runs["lora_vision"]["samples_per_s"], 3)
    Path(a.out, f"qlora_memory_{a.tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
