"""What holds GPU memory when a training run runs out of it: records the allocations of every torchrun worker a command
starts and, at the first out-of-memory error, saves torch's memory snapshot; then lists the live allocations grouped
by the line of the project (or peft, bitsandbytes) that made them, largest first.

    python bench/oom_snapshot.py record /tmp/oom.pickle -- bash finetune_lora.sh --gpu_memory_limit 12GiB ...
    python bench/oom_snapshot.py summarize /tmp/oom.pickle

Recording keeps a Python stack per allocation: the run is slower, so do not read its speed.
"""
import argparse
import collections
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2 ** 30
OUR_CODE = ("finetune/", "replace_file/", "bench/", "peft/", "bitsandbytes/")
HOOK = """import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("OOM_SNAPSHOT"):  # torchrun's workers only
    import sys
    sys.path.insert(0, {bench!r})
    from oom_snapshot import install
    install(os.environ.pop("OOM_SNAPSHOT"))  # popped: the worker's own subprocesses (compilers) do not record
"""


def install(path):
    """Record allocations in this process; at its first out-of-memory error, pickle the snapshot to `path` (rank 0)
    or `path.rankN`."""
    import torch
    rank = os.environ.get("RANK", "0")
    path = path if rank == "0" else f"{path}.rank{rank}"
    torch.cuda.memory._record_memory_history(max_entries=100000)
    saved = []

    def on_out_of_memory(device, alloc, device_alloc, device_free):
        if not saved:
            saved.append(path)
            with open(path, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)

    torch._C._cuda_attach_out_of_memory_observer(on_out_of_memory)


def record(path, command):
    """Run `command` with the hook in every torchrun worker (through a sitecustomize on PYTHONPATH)."""
    with tempfile.TemporaryDirectory() as hook_dir:
        Path(hook_dir, "sitecustomize.py").write_text(HOOK.format(bench=str(Path(__file__).resolve().parent)))
        pythonpath = os.pathsep.join(p for p in (hook_dir, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=pythonpath, OOM_SNAPSHOT=str(Path(path).resolve()))
        return subprocess.run(command, env=env).returncode


def where(frames, depth=3):
    """The innermost `depth` frames in our code (all frames if none is), as file:line function."""
    ours = [f for f in frames if any(part in f["filename"] for part in OUR_CODE)] or frames
    return " < ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in ours[:depth])


def summarize(path, groups=45, largest=12):
    with open(path, "rb") as f:
        snapshot = pickle.load(f)
    segments = snapshot["segments"]
    blocks = [b for s in segments for b in s["blocks"] if b["state"] == "active_allocated"]
    print(f"reserved {sum(s['total_size'] for s in segments) / GIB:.3f} GiB in {len(segments)} segments")
    print(f"allocated {sum(b['size'] for b in blocks) / GIB:.3f} GiB in {len(blocks)} blocks")
    by_place = collections.defaultdict(lambda: [0, 0])
    for b in blocks:
        place = by_place[where(b.get("frames", []))]
        place[0] += b["size"]
        place[1] += 1
    for place, (size, count) in sorted(by_place.items(), key=lambda kv: -kv[1][0])[:groups]:
        print(f"{size / GIB:8.3f} GiB {count:6d}  {place[:330]}")
    print("largest blocks:")
    for b in sorted(blocks, key=lambda b: -b["size"])[:largest]:
        print(f"{b['size'] / 2 ** 20:8.1f} MiB  {where(b.get('frames', []), 6)[:400]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="action", required=True)
    recording = commands.add_parser("record", help="run a command; save a snapshot at its first out-of-memory error")
    recording.add_argument("snapshot")
    recording.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command")
    commands.add_parser("summarize", help="what was allocated, grouped by line").add_argument("snapshot")
    args = parser.parse_args()
    if args.action == "summarize":
        summarize(args.snapshot)
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("record: give the command after --")
    sys.exit(record(args.snapshot, command))


if __name__ == "__main__":
    main()
