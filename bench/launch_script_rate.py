"""Throughput of a run of the launch scripts themselves (finetune_lora.sh / finetune_ds.sh), read from the
TensorBoard events they write (`--report_to tensorboard`, the scripts' default): samples/s between two logged
steps, so start-up and compilation stay out of the figure.

    python bench/launch_script_rate.py --make_checkpoint /tmp/random-8b    # full-size random weights, once
    MODEL=/tmp/random-8b DATA=... bash finetune_lora.sh ... --max_steps 40 --logging_steps 5 --output_dir OUT
    python bench/launch_script_rate.py --events OUT --from_step 10 --data ... [--gpus N]

Samples are counted from the epoch progress the Trainer logs (micro-batches done / micro-batches per epoch)
times the data's size, not as steps x batch: an epoch whose micro-batches do not divide into whole
accumulation steps ends with a shorter step. MFU: the data's mean model FLOPs per sample (counted as
bench/train_throughput.py counts them, full finetuning unless --lora) over the run's samples/s and --gpus.
"""
import argparse
import glob
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoint(folder):
    """The full architecture with random bf16 weights, saved in the official layout (GPU needed)."""
    import torch
    from finetune.official_format import reference_model_dir
    from bench.train_throughput import random_model
    reference = reference_model_dir()
    random_model(reference, torch.bfloat16, "sdpa").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if Path(reference, name).exists():
            shutil.copy(Path(reference, name), Path(folder, name))


def data_stats(data, lora=False, tune_vision=True):
    """Samples in DATA (as the scripts' data check keeps them) and their mean model FLOPs, each sample alone
    (padding-free batches cost the same)."""
    from finetune.data.collator import collate
    from finetune.data.conversation import ImageSettings
    from finetune.data.dataset import ConversationDataset, ScanOptions, scan
    from finetune.model import load_tokenizer, read_config
    from finetune.official_format import reference_model_dir
    from bench.train_throughput import batch_counts
    path = reference_model_dir()
    tokenizer, settings, options = load_tokenizer(path), ImageSettings.from_config(read_config(path)), ScanOptions()
    dataset = ConversationDataset(scan([data], tokenizer, settings, options), tokenizer, settings, options)
    flops = [batch_counts(collate([dataset[i]], pad_token_id=tokenizer.pad_token_id), lora, tune_vision)[1]
             for i in range(len(dataset))]
    return len(flops), sum(flops) / len(flops)


def rate(output_dir, from_step, samples_per_epoch):
    """Samples/s from the first logged step at or after FROM_STEP to the last one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(sorted(glob.glob(f"{output_dir}/**/events.out.tfevents.*", recursive=True))[-1])
    events.Reload()
    epoch = {e.step: e.value for e in events.Scalars("train/epoch")}
    points = [(e.step, e.wall_time) for e in events.Scalars("train/loss")]
    (s0, t0), (s1, t1) = next(p for p in points if p[0] >= from_step), points[-1]
    samples = (epoch[s1] - epoch[s0]) * samples_per_epoch
    return dict(steps=s1 - s0, samples=samples, seconds=t1 - t0, samples_per_s=samples / (t1 - t0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make_checkpoint")
    ap.add_argument("--events", help="the run's output_dir")
    ap.add_argument("--from_step", type=int, default=10)
    ap.add_argument("--data", help="the run's training data (with --events)")
    ap.add_argument("--gpus", type=int, default=1, help="the run's GPUs, for MFU")
    ap.add_argument("--lora", action="store_true", help="the run trained LoRA adapters (4N for frozen weights)")
    a = ap.parse_args()
    if a.make_checkpoint:
        make_checkpoint(a.make_checkpoint)
    if a.events:
        if not a.data:
            ap.error("--events needs --data")
        from bench.train_throughput import PEAK_FLOPS
        samples_per_epoch, flops = data_stats(a.data, a.lora)
        result = rate(a.events, a.from_step, samples_per_epoch)
        result.update(flops_per_sample=flops, mfu=result["samples_per_s"] * flops / (PEAK_FLOPS * a.gpus))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
