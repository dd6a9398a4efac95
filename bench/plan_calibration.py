"""Measures what finetune.plan predicts, on one GPU: the activation peak and the time of one forward + backward
for each micro-batch size and recomputation choice, the optimizer step's time and memory, for LoRA with the
vision tower frozen and trained, on the full-size architecture with random bf16 weights (compiled blocks,
padding-free batches: the GPU defaults). The micro-batches are the data's longest samples (the plan sizes
memory for the worst batch). Writes one JSON; bench/RESULTS.md says how the planner's constants came from it.

    python bench/plan_calibration.py --data DIR/train.json --json out.json
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_throughput import random_model  # noqa: E402
from finetune.arguments import TuneArguments  # noqa: E402
from finetune.data.collator import collate  # noqa: E402
from finetune.data.conversation import ImageSettings  # noqa: E402
from finetune.data.dataset import ConversationDataset, ScanOptions, scan  # noqa: E402
from finetune.execution import apply_recompute, compile_blocks  # noqa: E402
from finetune.model import configure_trainable, load_tokenizer, read_config  # noqa: E402
from finetune.official_format import reference_model_dir  # noqa: E402
from finetune.optimizer import MasterWeightAdamW  # noqa: E402

GIB = 2 ** 30
RECOMPUTE = [("none", 1), ("resampler", 1), ("llm", 16), ("llm", 4), ("llm", 2), ("llm", 1), ("vision", 1), ("all", 2),
             ("all", 1)]


def batch_of(dataset, indices, tokenizer):
    batch = collate([dataset[i] for i in indices], pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return {k: v.to("cuda", non_blocking=True) if torch.is_tensor(v) and k not in ("image_bound", "tgt_sizes") else v
            for k, v in batch.items() if k != "sample_ids"}


def measure(model, batch, repeats=3):
    """(activation peak above the weights and optimizer state, GiB; seconds per forward + backward)."""
    times = []
    for i in range(repeats):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    model.zero_grad(set_to_none=True)
    return peak, min(times[1:])


def run_setup(name, tune_vision, dataset, order, tokenizer, micro_batches, save):
    torch.manual_seed(0)
    model = random_model(reference_model_dir(), torch.bfloat16, "sdpa_varlen")
    model.config.use_cache = False
    tune = TuneArguments(use_lora=True, tune_vision=tune_vision)
    model = configure_trainable(model, tune)
    compile_blocks(model)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    out = dict(setup=name, tune_vision=tune_vision, weights_gib=torch.cuda.memory_allocated() / GIB,
               trained_params=sum(p.numel() for p in trained), total_params=sum(p.numel() for p in model.parameters()))
    # optimizer: states and the step's transient memory, time
    optimizer = MasterWeightAdamW([{"params": trained, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95))
    for p in trained:
        p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    optimizer.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.cuda.synchronize()
    out["optimizer_step_s"] = time.perf_counter() - start
    out["optimizer_state_gib"] = (torch.cuda.memory_allocated() - before) / GIB + sum(p.numel() * 2 for p in trained) / GIB
    out["optimizer_step_peak_above_gib"] = (torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()) / GIB
    out["after_optimizer_gib"] = torch.cuda.memory_allocated() / GIB
    rows = out["rows"] = []
    for modules, every_n in RECOMPUTE:
        apply_recompute(model, modules, every_n)
        for mbs in micro_batches:
            indices = order[:mbs]
            batch = batch_of(dataset, indices, tokenizer)
            tokens = int(dataset.entries["length"][indices].sum())
            units = int(dataset.entries["image_units"][indices].sum())
            patches = int((dataset.entries["image_units"][indices] * dataset.entries["widest_unit"][indices]).sum())
            try:
                peak, seconds = measure(model, batch)
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                rows.append(dict(recompute=modules, every_n=every_n, mbs=mbs, oom=True))
                print(name, modules, every_n, mbs, "OOM", flush=True)
                break
            row = dict(recompute=modules, every_n=every_n, mbs=mbs, tokens=tokens, image_units=units, patches=patches,
                       activation_peak_gib=round(peak, 3), seconds=round(seconds, 4),
                       samples_per_s_fwd_bwd=round(mbs / seconds, 3))
            rows.append(row)
            save(out)
            print(name, json.dumps(row), flush=True)
    del model, optimizer, trained
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--micro_batches", default="1,2,4,8,16")
    ap.add_argument("--setups", default="frozen,trained")
    a = ap.parse_args()
    path = reference_model_dir()
    tokenizer, settings, options = load_tokenizer(path), ImageSettings.from_config(read_config(path)), ScanOptions()
    dataset = ConversationDataset(scan([a.data], tokenizer, settings, options), tokenizer, settings, options)
    order = list(reversed(dataset.entries["length"].argsort(kind="stable")))  # longest first
    micro_batches = [int(x) for x in a.micro_batches.split(",")]
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                   data=a.data, samples=len(dataset), command="python bench/plan_calibration.py " + " ".join(sys.argv[1:]),
                   mean_tokens=float(dataset.entries["length"].mean()),
                   mean_patches=float((dataset.entries["image_units"] * dataset.entries["widest_unit"]).mean()),
                   setups=[])
    for setup in a.setups.split(","):
        def save(partial):
            Path(a.json).write_text(json.dumps(dict(results, setups=results["setups"] + [partial]), indent=1))
        results["setups"].append(run_setup(setup, setup == "trained", dataset, order, tokenizer, micro_batches, save))
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results)[:2000])


if __name__ == "__main__":
    main()
