"""Extra memory of the loss head: logits at supervised positions only (ours) vs full logits (the official
code and a plain Hugging Face causal LM). Forward + backward of the head alone, bf16 weights and hidden
states, fp32 loss, on the given device. CPU: peak RSS growth of a fresh process; CUDA: peak allocated.

    python bench/loss_head_memory.py [--device cpu|cuda] [--seq 2048 --vocab 128256 --hidden 4096 --supervised 8]
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replace_file.modeling_minicpmv import supervised_loss  # noqa: E402


def full_logits_loss(hidden, labels, lm_head):
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(method, a):
    device = torch.device(a.device)
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(a.hidden, a.vocab, bias=False, device=device, dtype=torch.bfloat16)
    hidden = torch.randn(1, a.seq, a.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((1, a.seq), -100, device=device)
    labels[0, -a.supervised:] = torch.randint(0, a.vocab, (a.supervised,), device=device)
    head = supervised_loss if method == "supervised" else full_logits_loss
    if device.type == "cuda":  # warm up kernels and the caching allocator, then measure
        head(hidden, labels, lm_head).backward()
        lm_head.weight.grad = hidden.grad = None
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:  # no warm-up: the process's peak RSS would keep its high-water mark
        before = current_rss_bytes()
    start = time.perf_counter()
    head(hidden, labels, lm_head).backward()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra = peak_rss_bytes() - before
    # the weight gradient is the same for both; report it so the head's own overhead is visible
    weight_grad = lm_head.weight.numel() * 2
    return dict(method=method, extra_peak_bytes=extra, extra_peak_gib=round(extra / 2**30, 3),
                weight_grad_gib=round(weight_grad / 2**30, 3), seconds=round(seconds, 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--supervised", type=int, default=8)
    ap.add_argument("--method", choices=["supervised", "full"])
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.method:  # child process: one measurement, printed as JSON
        print(json.dumps(measure(a.method, a)))
        return
    results = []
    for method in ("supervised", "full"):  # a fresh process each, so peak RSS starts clean
        cmd = [sys.executable, __file__, "--method", method] + sys.argv[1:]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    report = dict(command="python bench/loss_head_memory.py " + " ".join(sys.argv[1:]), date=time.strftime("%Y-%m-%d"),
                  machine=f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
                  torch=torch.__version__, settings=dict(seq=a.seq, vocab=a.vocab, hidden=a.hidden, supervised=a.supervised,
                                                         device=a.device), results=results)
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
