"""PyTorch's SDPA backends on the two attention shapes of a training step (4 samples of the benchmark data):
the vision tower (32 images x 1032 patches, 16 heads of 72, no mask) and the LLM (4 x 957 tokens, 32 query /
8 key-value heads of 128, causal). Per backend: GPU time of forward + backward, host time to launch them, how
often the host blocks on the GPU (pageable copies and synchronisations), which stalls the launch queue, and the
wall time of the first forward + backward at a sequence length not seen before (cuDNN builds plans per shape).

    python bench/attention_backends.py --json bench/results/DATE_h100x1_attention-backends.json
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"vision": dict(q=(32, 16, 1032, 72), kv_heads=16, causal=False),
          "llm": dict(q=(4, 32, 957, 128), kv_heads=8, causal=True)}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def step(q, k, v, causal):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    out.backward(torch.ones_like(out))


def tensors(shape, s):
    b, h, _, d = shape["q"]
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, shape["kv_heads"], s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    return q, k, v


def new_length_ms(shape, lengths=5):
    """Median wall time of one forward + backward at each of `lengths` sequence lengths not seen before."""
    times = []
    for s in range(shape["q"][2] + 1, shape["q"][2] + 1 + lengths):
        q, k, v = tensors(shape, s)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(q, k, v, shape["causal"])
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[lengths // 2]


def measure(shape, backend, iters=20):
    q, k, v = tensors(shape, shape["q"][2])
    with sdpa_kernel([backend]):
        for _ in range(3):
            step(q, k, v, shape["causal"])
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        host = time.perf_counter()
        for _ in range(iters):
            step(q, k, v, shape["causal"])
        host = time.perf_counter() - host
        end.record()
        torch.cuda.synchronize()
        with torch.profiler.profile() as prof:
            step(q, k, v, shape["causal"])
            torch.cuda.synchronize()
        first_at_new_length = new_length_ms(shape)
    blocking = sum(1 for e in prof.events() if e.name in ("cudaMemcpyAsync", "cudaStreamSynchronize"))
    return dict(gpu_ms=begin.elapsed_time(end) / iters, host_ms=1e3 * host / iters, blocking_calls=blocking,
                new_length_wall_ms=first_at_new_length)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    results = {}
    for name, shape in SHAPES.items():
        for backend_name, backend in BACKENDS.items():
            try:
                results[f"{name}/{backend_name}"] = measure(shape, backend)
            except RuntimeError as e:
                results[f"{name}/{backend_name}"] = dict(error=str(e).splitlines()[0][:200])
            print(name, backend_name, results[f"{name}/{backend_name}"], flush=True)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  note="blocking_calls: pageable copies and stream synchronisations in one forward+backward",
                  results=results)
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
