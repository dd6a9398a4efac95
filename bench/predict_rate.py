"""Predict throughput on one GPU with the full-size MiniCPM-Llama3-V 2.5 architecture and random bf16 weights:
`finetune.predict` with its defaults (greedy answers through the model's padding-free generate_greedy) against
generate() on the same batches (left-padded prompts, transformers' decoding loop: predict's greedy path until
2026-12-03), and whether the answers agree.

    python bench/predict_rate.py --data .benchdata/train.json [--json bench/results/predict_h200.json] [--profile F]

Data: ../shared/bench/make_bench_data.py --n 256 --seed 1234 (half 1280x720, half 1920x1080 screenshots). Every run
is a whole predict() call with --max_new_tokens 32 (random weights never stop early, so each sample decodes all 32
tokens), with the allocator setting of predict's command line, timed after a warm-up call (first kernels, cuBLAS
plans), on fresh output files:
- defaults, all samples, twice (the first full-size batches meet first-time costs the 8-sample warm-up did not,
  mostly pinned host memory for the images in flight);
  the same with one new token (vision and prefill alone: the rest is decoding);
- defaults on the same samples with their screenshots resized to assorted sizes (common phone, laptop and desktop
  screens, and random ones), as real data has them; the same with the vision tower's attention through cuDNN (SDPA's
  own choice on Hopper, predict's until 2026-12-04), which builds a plan for each new shape;
- generate()'s path, all samples (the model's attention set to plain SDPA, which predict then decodes through);
- one sample at a time in the main process on the first 16 (no batch at all).
Then one batch of 128 in parts (GPU synchronised between them): image strips to prompt embeddings, prompts through
the LLM (one new token), decoding the rest (also without the CUDA graph of a step, and whether its token ids are the
graph's); with --profile, torch.profiler's table of that batch's GPU kernels.
Answers are compared with the defaults' for the same samples: exactly, and where they differ, the first differing
character. Prints each run as it ends and one JSON object at the end (also written to --json).
"""
import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from PIL import Image
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_throughput import random_model  # noqa: E402
from finetune.model import load_tokenizer  # noqa: E402
from finetune.official_format import reference_model_dir  # noqa: E402
from finetune.data.conversation import ImageSettings  # noqa: E402
import finetune.predict  # noqa: E402
from finetune.cli import CUDA_ALLOC_CONF  # noqa: E402
from finetune.predict import BATCH_SIZE, VISION_ATTENTION, Prompts, predict, prompt_embeddings, read_samples  # noqa: E402
from replace_file.modeling_minicpmv import SDPA_VARLEN  # noqa: E402

MAX_NEW_TOKENS = 32
SCREENS = [(1080, 2400), (1170, 2532), (1440, 3200), (720, 1600), (1366, 768), (1440, 900), (1536, 864), (1920, 1080),
           (2560, 1440), (1280, 800), (2048, 1536), (1280, 720), (3840, 2160), (1600, 900)]


def assorted_sizes(samples, folder):
    """The samples with each screenshot resized to another size: every other one a common screen, the rest random
    (600-2600 x 400-2600), so that vision passes rarely repeat a shape."""
    rng, out = random.Random(0), []
    (folder / "assorted").mkdir()
    for k, sample in enumerate(samples):
        size = rng.choice(SCREENS) if k % 2 else (rng.randint(600, 2600), rng.randint(400, 2600))
        path = folder / "assorted" / f"{k:05d}.png"
        Image.open(sample["image"]).convert("RGB").resize(size).save(path)
        out.append(dict(sample, image=str(path)))
    return out


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
    """How many of other's answers equal the reference's, the mean length of their common beginnings, and the first
    few that differ."""
    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    same = [k for k in other if other[k] == reference[k]]
    differing = []
    for k in [k for k in other if other[k] != reference[k]][:3]:
        a, b, at = reference[k], other[k], common(reference[k], other[k])
        differing.append({"id": k, "first_difference_at_char": at, "default": a[:at + 20], "other": b[:at + 20]})
    return {"identical": len(same), "compared": len(other),
            "mean_common_prefix_chars": round(sum(common(reference[k], other[k]) for k in other) / len(other), 1),
            "mean_answer_chars": round(sum(len(other[k]) for k in other) / len(other), 1),
            "differing_examples": differing}


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, round(time.perf_counter() - start, 3)


def batch_parts(model, tokenizer, data, profile=None):
    """Seconds of one default batch's parts, its images sliced beforehand; with `profile`, the batch's kernel table."""
    items = read_samples(data)[:BATCH_SIZE]
    examples = [ex for _, ex in Prompts(items, tokenizer, ImageSettings.from_config(model.config), torch.bfloat16)]
    eos = [tokenizer.eos_token_id, tokenizer.eot_id]
    prompts, vision = timed(lambda: prompt_embeddings(model, examples))
    _, prefill = timed(lambda: model.generate_greedy(prompts, 1, eos))
    graphed, whole = timed(lambda: model.generate_greedy(prompts, MAX_NEW_TOKENS, eos))
    launched, whole_launched = timed(lambda: model.generate_greedy(prompts, MAX_NEW_TOKENS, eos, cuda_graph=False))
    parts = {"samples": len(examples), "prompt_tokens": sum(len(p) for p in prompts), "embed_prompts_s": vision,
             "llm_prompts_s": prefill, "decode_s": round(whole - prefill, 3),
             "decode_ms_per_step": round(1000 * (whole - prefill) / (MAX_NEW_TOKENS - 1), 1),
             "decode_ms_per_step_without_cuda_graph": round(1000 * (whole_launched - prefill) / (MAX_NEW_TOKENS - 1), 1),
             "cuda_graph_token_ids_identical": bool(torch.equal(graphed, launched))}
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.generate_greedy(prompt_embeddings(model, examples), MAX_NEW_TOKENS, eos)
            torch.cuda.synchronize()
        Path(profile).write_text(prof.key_averages().table(sort_by="device_time_total", row_limit=40,
                                                           max_name_column_width=60))
    return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="make_bench_data.py's train.json")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--profile", help="write torch.profiler's kernel table of one default batch here")
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)  # as predict's command line runs
    samples = json.loads(Path(args.data).read_text())
    folder = Path(tempfile.mkdtemp(prefix="predict_rate_"))

    def subset(name, part):
        path = folder / f"{name}.json"
        path.write_text(json.dumps(part))
        return str(path)

    data, first16, warm = subset("all", samples), subset("first16", samples[:16]), subset("warm", samples[-8:])
    assorted = subset("assorted", assorted_sizes(samples, folder))
    reference = reference_model_dir()
    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = random_model(reference, torch.bfloat16, SDPA_VARLEN).eval(), load_tokenizer(reference)
    predict(model, tokenizer, warm, str(folder / "warm.jsonl"), progress=False, max_new_tokens=MAX_NEW_TOKENS)
    print(f"model built and warmed up in {time.perf_counter() - started:.0f} s", flush=True)

    runs, answers = {}, {}
    cudnn_first = [SDPBackend.CUDNN_ATTENTION] + VISION_ATTENTION
    plan = [("defaults", data, {}, SDPA_VARLEN, VISION_ATTENTION),
            ("defaults_again", data, {}, SDPA_VARLEN, VISION_ATTENTION),
            ("defaults_1_new_token", data, {"max_new_tokens": 1}, SDPA_VARLEN, VISION_ATTENTION),
            ("assorted_sizes", assorted, {}, SDPA_VARLEN, VISION_ATTENTION),
            ("assorted_sizes_vision_cudnn", assorted, {}, SDPA_VARLEN, cudnn_first),
            ("generate_path", data, {}, "sdpa", VISION_ATTENTION),
            ("one_by_one", first16, {"batch_size": 1, "num_workers": 0}, SDPA_VARLEN, VISION_ATTENTION)]
    for name, part, settings, attention, vision_attention in plan:
        model.config._attn_implementation = attention  # the LLM's config: "sdpa" sends greedy decoding to generate()
        finetune.predict.VISION_ATTENTION = vision_attention
        runs[name], answers[name] = timed_run(model, tokenizer, part, str(folder / f"{name}.jsonl"), **settings)
        print(name, json.dumps(runs[name]), flush=True)
    model.config._attn_implementation, finetune.predict.VISION_ATTENTION = SDPA_VARLEN, VISION_ATTENTION
    parts = batch_parts(model, tokenizer, data, args.profile)
    print("one batch in parts", json.dumps(parts), flush=True)
    result = {
        "gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "command": " ".join(sys.argv), "max_new_tokens": MAX_NEW_TOKENS, "default_batch_size": BATCH_SIZE,
        "runs": runs, "one_batch_in_parts": parts,
        "decoding_share_of_default_time": round(1 - runs["defaults_1_new_token"]["seconds"] / runs["defaults"]["seconds"], 3),
        "answers_vs_defaults": {name: agreement(answers["defaults"], answers[name])
                                for name in ("defaults_again", "generate_path", "one_by_one")},
        "assorted_sizes_vision_cudnn_vs_assorted_sizes": agreement(answers["assorted_sizes"],
                                                                   answers["assorted_sizes_vision_cudnn"]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
