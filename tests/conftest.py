"""Shared fixtures and the tiny-training helpers. The conformance fixture (what the official code computed on a tiny checkpoint in the
official format) comes from CONFORMANCE_DIR (default ../shared/conformance); its checkpoint from
CONFORMANCE_CKPT, or is built once by the fixture's own make_checkpoint.py into .cache/."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE_DIR = Path(os.environ.get("CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))


def build_conformance_checkpoint(fixture_dir=CONFORMANCE_DIR):
    """The checkpoint folder: CONFORMANCE_CKPT, or built (once per generator version) into .cache/."""
    if os.environ.get("CONFORMANCE_CKPT"):
        return Path(os.environ["CONFORMANCE_CKPT"])
    generator = fixture_dir / "make_checkpoint.py"
    key = hashlib.sha256(generator.read_bytes() + (fixture_dir / "checkpoint.sha256").read_bytes()).hexdigest()[:12]
    out = REPO / ".cache" / f"conformance-{key}"
    if not (out / "done").exists():
        subprocess.run([sys.executable, str(generator), str(out)], check=True)
        (out / "done").touch()
    return out


class Conformance:
    def __init__(self, fixture_dir):
        self.dir = fixture_dir
        self.cases = json.loads((fixture_dir / "cases.json").read_text())
        self.expected = json.loads((fixture_dir / "expected.json").read_text())
        self.tensors = load_file(fixture_dir / "expected.safetensors")
        self.samples = {s["id"]: s for s in self.cases["samples"]}

    def image(self, name):
        from PIL import Image
        return Image.open(self.dir / "images" / name).convert("RGB")


def conformance_sample_ids():
    return [s["id"] for s in json.loads((CONFORMANCE_DIR / "cases.json").read_text())["samples"]]


@pytest.fixture(scope="session")
def conformance():
    return Conformance(CONFORMANCE_DIR)


@pytest.fixture(scope="session")
def ckpt_dir():
    return build_conformance_checkpoint()


@pytest.fixture(scope="session")
def tokenizer(ckpt_dir):
    from finetune.model import load_tokenizer
    return load_tokenizer(ckpt_dir)


@pytest.fixture(scope="session")
def model(ckpt_dir):
    """The fixture model in fp32 (as the expected values were computed), eval mode. Do not modify."""
    from finetune.model import load_model
    return load_model(ckpt_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def encode(conformance, tokenizer, model):
    """Sample id -> encoded example, with the model's slice settings."""
    from finetune.data.conversation import ImageSettings, encode_conversation
    settings = ImageSettings.from_config(model.config)

    def _encode(sample_id):
        sample = conformance.samples[sample_id]
        return encode_conversation(sample["conversations"], [conformance.image(sample["image"])], tokenizer, settings)
    return _encode


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """`pytest -q` shows nothing while a test runs: name each slow test as it starts, and its time as it ends."""
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if not (item.get_closest_marker("slow") and reporter and item.config.get_verbosity() <= 0):
        return (yield)
    own_line(reporter, f"{item.nodeid}: slow test running ...")
    start = time.monotonic()
    try:
        return (yield)
    finally:
        own_line(reporter, f"{item.nodeid}: done in {time.monotonic() - start:.0f} s")


def own_line(reporter, text):
    reporter.ensure_newline()  # after a file's name (pytest without -q)
    if reporter._tw.width_of_current_line:  # after -q's dots
        reporter._tw.line()
    reporter.write_line(text)
@pytest.fixture(scope="session")
def train_data(conformance, tmp_path_factory):
    """The fixture's samples with absolute image paths, interleaved with text-only ones: with sequential
    sampling on 2 ranks, rank 1 sees only text, so a rank that skipped the vision tower would hang ZeRO-3."""
    folder = tmp_path_factory.mktemp("data")
    samples = []
    for s in conformance.cases["samples"][:4]:
        samples.append(dict(s, image=str(conformance.dir / "images" / s["image"])))
        samples.append({"id": f"text_{s['id']}", "conversations": [{"role": "user", "content": "Say OK."},
                                                                   {"role": "assistant", "content": "OK."}]})
    (folder / "train.json").write_text(json.dumps(samples))
    (folder / "eval.json").write_text(json.dumps(samples[:2]))
    return folder


# For a one-process script: a DeepSpeed run's arguments, set up as finetune.main sets them up once it has a plan
DEEPSPEED_ARGS = ("from types import SimpleNamespace\n"
                  "from finetune.arguments import parse_args\n"
                  "from finetune.distributed import apply_plan, prepare\n"
                  "def deepspeed_args(argv, compile_blocks=False):\n"
                  "    _, data, tune, args = parse_args(argv + prepare(argv))\n"
                  "    plan = SimpleNamespace(micro_batch_size=1, gradient_accumulation_steps=1, bf16=False)\n"
                  "    return data, apply_plan(args, plan, args.deepspeed, compile_blocks)\n")


def zero3_config(folder):
    """The shipped ZeRO-3 config with every parameter partitioned: its persistence threshold is sized for the 8B
    model, and would keep each of the fixture model's small parameters whole on every rank."""
    config = json.loads((REPO / "ds_config_zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = folder / "ds_config_zero3.json"
    path.write_text(json.dumps(config))
    return str(path)


def one_process_env(port):
    """The environment of a one-process run that starts its own process group (DeepSpeed on the CPU)."""
    return cpu_deepspeed_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port + os.getpid() % 90))


def cpu_deepspeed_env(**extra):
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)  # any host


def torchrun(args, ckpt_dir, timeout=600, nproc=2):
    """finetune.finetune under torchrun on CPU processes (DeepSpeed on the CPU when the args name a config)."""
    env = cpu_deepspeed_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29600 + os.getpid() % 300), "-m", "finetune.finetune", "--model_name_or_path", str(ckpt_dir),
           "--report_to", "none", "--per_device_train_batch_size", "1", "--logging_steps", "1",
           "--train_sampling_strategy", "sequential", "--dataloader_num_workers", "0"] + args
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out
