"""GPU and host time of one optimizer step (with the Trainer's gradient clipping) over the trainable parameters of
the LoRA recipe (LoRA r=64 on the LLM q,k,v,o; vision tower and resampler in full), in their real shapes.

    python bench/optimizer_step.py [--moments_dtype bfloat16] [--json OUT]

Gradients are written into the parameters' `.grad` as the backward pass leaves them; the step is then timed with
CUDA events (GPU time) and on the host (time to return, GPU not synchronised).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.arguments import TuneArguments  # noqa: E402
from finetune.model import configure_trainable  # noqa: E402
from finetune.official_format import official_config  # noqa: E402
from finetune.optimizer import MasterWeightAdamW  # noqa: E402
from replace_file import MiniCPMV, MiniCPMVConfig  # noqa: E402


def trainable_shapes():
    """The recipe's trainable parameters, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MiniCPMV._from_config(MiniCPMVConfig(**official_config()), dtype=torch.bfloat16)
    tune = TuneArguments(use_lora=True, tune_vision=True,
                         lora_target_modules=r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)")
    model = configure_trainable(model, tune)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moments_dtype", default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    shapes = trainable_shapes()
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02) for s in shapes]
    optimizer = MasterWeightAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-5, betas=(0.9, 0.95),
                                  moments_dtype=getattr(torch, a.moments_dtype))

    def leave_gradients():  # what the backward pass leaves
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        torch.cuda.synchronize()

    def clip_and_step():  # as the Trainer does
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    gpu_ms, host_ms = [], []
    for step in range(a.steps):
        leave_gradients()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        clip_and_step()
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if step >= 3:
            gpu_ms.append(start.elapsed_time(end))
            host_ms.append(1e3 * (t1 - t0))
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  moments_dtype=a.moments_dtype,
                  tensors=len(shapes), parameters=sum(p.numel() for p in params),
                  gpu_ms_median=sorted(gpu_ms)[len(gpu_ms) // 2], host_ms_median=sorted(host_ms)[len(host_ms) // 2],
                  peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                  command="python bench/optimizer_step.py " + " ".join(sys.argv[1:]))
    leave_gradients()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        clip_and_step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))  # where the GPU time goes
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
