"""Data start-up time and memory per dataloader worker for a GUICourse-sized training file.

Writes N synthetic GUIEnv-style samples (JSONL, one shared screenshot), then measures: reading the file
into our record buffer (time, RSS), the proportional set size (PSS: shared pages split between processes)
of each dataloader worker after it has read random samples, and the scan rate (samples/s per process, with
image headers and exact token counts) from which the pre-training check time is extrapolated.

    python bench/data_memory.py [--samples 750000] [--workers 4] [--json bench/results/DATE_cpu_data-memory.json]
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.data.conversation import ImageSettings  # noqa: E402
from finetune.data.dataset import ScanOptions, scan  # noqa: E402
from finetune.data.records import RecordFile  # noqa: E402
from finetune.model import load_tokenizer, read_config  # noqa: E402
from finetune.official_format import reference_model_dir  # noqa: E402

PROMPT = ("<image>\n## Your Task\nIf the input is a string, please give me the element regions including this string. "
          "Else if the input is a region, please give me the string (text) in this region.## Input\n")


def rss_mib(pid="self"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024


def pss_mib(pid="self"):
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024


class Reader(torch.utils.data.Dataset):
    """What a training worker does with the records: parse one sample per index."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.records.record(i)
        return os.getpid()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=750_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--scan_samples", type=int, default=2000)
    ap.add_argument("--json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    Image.new("RGB", (1280, 720), "white").save(tmp / "screen.png")
    with open(tmp / "train.jsonl", "w") as f:
        for i in range(a.samples):
            box = f"<box>{i % 997} {i % 991} {i % 983 + 10} {i % 977 + 10}</box>"
            f.write(json.dumps({"id": f"guienv_{i}_bbox2text", "image": "screen.png", "conversations": [
                {"role": "user", "content": PROMPT + box + "\n## Output\n"},
                {"role": "assistant", "content": f"Sample text number {i}"}]}) + "\n")
    file_mib = (tmp / "train.jsonl").stat().st_size / 2**20

    base_rss = rss_mib()
    start = time.perf_counter()
    records = RecordFile(str(tmp / "train.jsonl"))
    read_seconds = time.perf_counter() - start
    records_rss = rss_mib() - base_rss

    loader = torch.utils.data.DataLoader(Reader(records), batch_size=64, num_workers=a.workers,
                                         sampler=torch.utils.data.RandomSampler(records, num_samples=20_000),
                                         persistent_workers=True)
    pids = {int(p) for batch in loader for p in batch}
    worker_pss = {pid: round(pss_mib(pid), 1) for pid in pids}
    worker_rss = {pid: round(rss_mib(pid), 1) for pid in pids}
    del loader

    model_dir = reference_model_dir()
    tokenizer, config = load_tokenizer(model_dir), read_config(model_dir)
    subset = tmp / "subset.jsonl"
    subset.write_text("".join(open(tmp / "train.jsonl").readlines()[:a.scan_samples]))
    start = time.perf_counter()
    scan([str(subset)], tokenizer, ImageSettings.from_config(config), ScanOptions(), progress=False)
    scan_rate = a.scan_samples / (time.perf_counter() - start)

    report = dict(
        command="python bench/data_memory.py " + " ".join(sys.argv[1:]), date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores", samples=a.samples, file_mib=round(file_mib, 1),
        read_seconds=round(read_seconds, 2), records_rss_mib=round(records_rss, 1),
        main_process_pss_mib=round(pss_mib(), 1), worker_pss_mib=list(worker_pss.values()),
        worker_rss_mib=list(worker_rss.values()),
        scan_samples_per_second_per_process=round(scan_rate, 1),
        scan_minutes_for_all_samples_per_process=round(a.samples / scan_rate / 60, 1))
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
