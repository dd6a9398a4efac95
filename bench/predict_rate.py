"""Predict throughput on one GPU with the full-size MiniCPM-Llama3-V 2.5 architecture and random bf16 weights:
`finetune.predict` with its defaults against the settings predict had before (8 samples a batch, images sliced in the
main process), and whether the answers agree.

    python bench/predict_rate.py --data .benchdata/train.json [--json bench/results/predict_h200.json]

Data: ../shared/bench/make_bench_data.py --n 256 --seed 1234 (half 1280x720, half 1920x1080 screenshots). Every run
is a whole predict() call with --max_new_tokens 32 (random weights never stop early, so each sample decodes all 32
tokens), timed after a warm-up call (first kernels, cuBLAS plans), on fresh output files:
- defaults, all samples; the same with one new token (vision and prefill alone: the rest is decoding);
- the settings predict had before, on the first quarter of the data;
- one sample at a time in the main process on the first 16 (chat()'s answer, no batch at all).
Answers are compared with the defaults' for the same samples: exactly, and where they differ, the first differing
character. Prints each run as it ends and one JSON object at the end (also written to --json).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_throughput import random_model  # noqa: E402
from finetune.model import load_tokenizer  # noqa: E402
from finetune.official_format import reference_model_dir  # noqa: E402
from finetune.predict import BATCH_SIZE, predict  # noqa: E402

MAX_NEW_TOKENS = 32


def timed_run(model, tokenizer, data, out, **settings):
    """(samples/s, {id: answer}, peak GiB) of one predict() call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    written = predict(model, tokenizer, data, out, progress=False, **dict(dict(max_new_tokens=MAX_NEW_TOKENS), **settings))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    errors = [r for r in rows if "error" in r]
    if errors:
        raise SystemExit(f"{len(errors)} samples failed, e.g. {errors[0]}")
    return dict(samples=written, seconds=round(seconds, 2), samples_per_s=round(written / seconds, 2),
                peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1),
                settings=settings), {r["id"]: r["prediction"] for r in rows}


def agreement(reference, other):
    """How many of other's answers equal the reference's, and the first few that do not."""
    same = [k for k in other if other[k] == reference[k]]
    differing = []
    for k in [k for k in other if other[k] != reference[k]][:3]:
        a, b = reference[k], other[k]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        differing.append({"id": k, "first_difference_at_char": at, "default": a[:at + 20], "other": b[:at + 20]})
    return {"identical": len(same), "compared": len(other), "differing_examples": differing}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="make_bench_data.py's train.json")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    samples = json.loads(Path(args.data).read_text())
    folder = Path(tempfile.mkdtemp(prefix="predict_rate_"))

    def subset(name, part):
        path = folder / f"{name}.json"
        path.write_text(json.dumps(part))
        return str(path)

    data, quarter, first16, warm = (subset("all", samples), subset("quarter", samples[:len(samples) // 4]),
                                    subset("first16", samples[:16]), subset("warm", samples[-8:]))
    reference = reference_model_dir()
    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = random_model(reference, torch.bfloat16, "sdpa").eval(), load_tokenizer(reference)
    predict(model, tokenizer, warm, str(folder / "warm.jsonl"), progress=False, max_new_tokens=MAX_NEW_TOKENS)
    print(f"model built and warmed up in {time.perf_counter() - started:.0f} s", flush=True)

    runs, answers = {}, {}
    plan = [("defaults", data, {}),
            ("defaults_1_new_token", data, {"max_new_tokens": 1}),
            ("previous_settings", quarter, {"batch_size": 8, "num_workers": 0}),
            ("one_by_one", first16, {"batch_size": 1, "num_workers": 0})]
    for name, part, settings in plan:
        runs[name], answers[name] = timed_run(model, tokenizer, part, str(folder / f"{name}.jsonl"), **settings)
        print(name, json.dumps(runs[name]), flush=True)
    result = {
        "gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "command": " ".join(sys.argv), "max_new_tokens": MAX_NEW_TOKENS, "default_batch_size": BATCH_SIZE,
        "runs": runs,
        "decoding_share_of_default_time": round(1 - runs["defaults_1_new_token"]["seconds"] / runs["defaults"]["seconds"], 3),
        "answers_vs_defaults": {name: agreement(answers["defaults"], answers[name])
                                for name in ("previous_settings", "one_by_one")},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
