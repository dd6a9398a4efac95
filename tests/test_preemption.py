"""Preemption: a run signalled as a scheduler signals it (its whole process group) saves a complete checkpoint at
the step all its ranks agree on and exits; re-running the same command ends with the uninterrupted run's weights.
Without DeepSpeed, and under ZeRO-2 and ZeRO-3 (2 processes on the CPU); a SIGKILL during a save; the refusal
to continue a run whose data changed; the SLURM script's launch logic."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import is_complete
from finetune.preemption import EXIT_STATUS
from .conftest import REPO, cpu_deepspeed_env, zero3_config


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Eight text samples of different lengths: batches of 4 make 2 steps per epoch, so a run of a few steps
    crosses epochs, each in its own length-grouped order."""
    samples = [{"id": f"count_{i}", "conversations": [
        {"role": "user", "content": "Count to %d." % (3 * i + 1)},
        {"role": "assistant", "content": " ".join(str(j) for j in range(3 * i + 1))}]} for i in range(8)]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(samples))
    return path


class Run:
    """finetune.py in a new session (a process group of its own, as a scheduler's job step), its output collected
    as it comes."""

    def __init__(self, args, nproc=1):
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(28000 + os.getpid() % 500)]
        self.proc = subprocess.Popen(launcher + ["-m", "finetune.finetune"] + args, cwd=REPO, env=cpu_deepspeed_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, ready, timeout=300):
        end = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None or self.reader.is_alive(), f"the run ended first:\n{self.output[-4000:]}"
            assert time.monotonic() < end, f"timed out:\n{self.output[-4000:]}"
            time.sleep(0.002)

    def steps_logged(self):
        return self.output.count("{'loss'")

    def signal(self, sig):
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout=600):
        self.proc.wait(timeout)
        self.reader.join()
        return self.proc.returncode


def run(args, nproc=1):
    job = Run(args, nproc)
    assert job.finish() == 0, job.output[-6000:]
    return job


def stop_after(args, step, nproc=1, again=False):
    """A run signalled (SIGTERM) once it has logged `step` (and `again` while it saves); returns it, finished.
    torchrun forwards the signal to its workers, which run in process groups of their own."""
    job = Run(args, nproc)
    job.wait_for(lambda: job.steps_logged() >= step)
    job.signal(signal.SIGTERM)
    job.signalled_after = job.steps_logged()  # steps done before the signal: at least this many
    if again:
        job.wait_for(lambda: "stopping after step" in job.output)
        job.signal(signal.SIGTERM)
    job.finish()
    return job


def saved_step(job):
    match = re.search(r"saved (\S+)/checkpoint-(\d+) at step (\d+)", job.output)
    assert match, job.output[-6000:]
    return int(match.group(2))


def common_args(ckpt_dir, data, output_dir):
    return ["--model_name_or_path", str(ckpt_dir), "--data_path", str(data), "--output_dir", str(output_dir),
            "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3",
            "--train_sampling_strategy", "group_by_length", "--use_lora", "true", "--lora_r", "4",
            "--lora_dropout", "0.1", "--tune_vision", "false"]


def weights(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_same_weights(folder, reference):
    final, expected = weights(folder), weights(reference)
    assert final.keys() == expected.keys()
    for name in final:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=0, msg=name)


def test_signalled_run_saves_and_the_same_command_continues_it_to_the_same_weights(ckpt_dir, text_data, tmp_path):
    """One process, no DeepSpeed, one data loader worker (which the scheduler signals too): SIGTERM after step 2
    and again during the save; the checkpoint is complete at the step after the signal and the process exits
    with status 75. The re-run is signalled too and SIGKILLed in the middle of its save (its last file blocks on a
    FIFO); the next re-run continues from the complete checkpoint and ends with the weights of a run never
    interrupted."""
    def args(output_dir):
        return common_args(ckpt_dir, text_data, output_dir) + [
            "--per_device_train_batch_size", "4", "--max_steps", "6", "--dataloader_num_workers", "1"]
    reference = tmp_path / "reference"
    run(args(reference))
    out = tmp_path / "out"

    first = stop_after(args(out), step=2, again=True)
    assert first.proc.returncode == EXIT_STATUS, first.output[-6000:]
    step = saved_step(first)
    assert first.signalled_after < step <= first.signalled_after + 1 < 6  # the step during which the signal came
    assert "SIGTERM again: ignored" in first.output
    assert is_complete(out / f"checkpoint-{step}")
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert not (out / "adapter_model.safetensors").exists()  # a stopped run leaves no final folder

    # re-run, signalled after its first step: its save blocks on the FIFO in place of its last file; SIGKILL then
    second = Run(args(out))
    second.wait_for(lambda: second.steps_logged() >= 1)
    assert f"continuing from {out}/checkpoint-{step}" in second.output
    second.signal(signal.SIGTERM)
    second.wait_for(lambda: len(list(out.glob("checkpoint-*/run_fingerprint.json"))) == 2)
    killed = next(folder for folder in out.glob("checkpoint-*") if folder.name != f"checkpoint-{step}")
    os.mkfifo(killed / "rng_state.pth")  # raises if the save got there first
    second.wait_for(lambda: (killed / "optimizer.pt").exists())
    time.sleep(0.5)
    second.signal(signal.SIGKILL)
    second.finish()
    assert not is_complete(killed) and is_complete(out / f"checkpoint-{step}")

    third = run(args(out))
    assert f"{killed} is incomplete" in third.output
    assert f"continuing from {out}/checkpoint-{step}" in third.output
    assert_same_weights(out, reference)



@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_signalled_zero_run_saves_every_rank_and_the_same_command_continues_it(stage, ckpt_dir, text_data, tmp_path):
    """DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes, torchrun signalled after step 2: both ranks stop after step 3,
    every rank's files (optimizer partitions, RNG states) are written before trainer_state.json, and the re-run
    ends with the uninterrupted run's weights."""
    config = str(REPO / "ds_config_zero2.json") if stage == 2 else zero3_config(tmp_path)

    def args(output_dir):
        return common_args(ckpt_dir, text_data, output_dir) + [
            "--deepspeed", config, "--per_device_train_batch_size", "2", "--max_steps", "4",
            "--dataloader_num_workers", "0"]
    reference = tmp_path / "reference"
    run(args(reference), nproc=2)
    out = tmp_path / "out"
    first = stop_after(args(out), step=2, nproc=2)
    step = saved_step(first)
    assert first.signalled_after < step <= first.signalled_after + 1
    folder = out / f"checkpoint-{step}"
    assert is_complete(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in files}
    assert len([p for p in files if "optim_states" in p.name]) == 2
    mark = (folder / "trainer_state.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= mark for p in files)

    second = run(args(out), nproc=2)
    assert f"continuing from {folder}" in second.output
    assert_same_weights(out, reference)


def test_an_error_in_training_ends_the_process_though_its_loader_workers_ignore_sigterm(ckpt_dir, text_data, tmp_path):
    """An error raised in training that no one catches (here the KeyboardInterrupt of `kill -INT` on the main
    process; on a GPU, running out of memory) ends the process. The data loader's workers ignore SIGTERM (a
    scheduler's signal must leave them running); the error's traceback kept them referenced, and the interpreter's
    exit, which ends them with SIGTERM and waits, waited for ever."""
    # A process started in the background ignores SIGINT, and so would the run: with a handler here, it starts with
    # the default (Python's KeyboardInterrupt), whatever started the tests
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job = Run(common_args(ckpt_dir, text_data, tmp_path / "o") + [
            "--max_steps", "500", "--per_device_train_batch_size", "1", "--dataloader_num_workers", "2"])
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        job.wait_for(lambda: job.steps_logged() >= 1)
        os.kill(job.proc.pid, signal.SIGINT)
        assert job.finish(timeout=60) != 0 and "KeyboardInterrupt" in job.output
    finally:
        if job.proc.poll() is None:
            job.signal(signal.SIGKILL)


def test_the_same_command_continues_only_a_checkpoint_of_the_same_run(ckpt_dir, text_data, tmp_path):
    """The checkpoint a command continues from: the newest complete one whose run had the same model, data and
    training flags, whatever its logging, saving or data loader settings; another run's (other flags, a changed
    data file) is refused, saying what differs; a finished run is left as it is; a path is taken as given; false
    starts over. Interrupted saves
    (no trainer_state.json, or one cut short) are removed first: the Trainer's rotation would count them as the
    newest."""
    from finetune.arguments import parse_args
    from finetune.checkpoint import FINGERPRINT, resolve_resume, run_fingerprint
    out, data = tmp_path / "out", tmp_path / "train.json"
    data.write_bytes(text_data.read_bytes())

    def resolve(*flags):
        parsed = parse_args(["--model_name_or_path", str(ckpt_dir), "--data_path", str(data),
                             "--output_dir", str(out), *flags])
        return resolve_resume(parsed[3], run_fingerprint(*parsed)), run_fingerprint(*parsed)

    assert resolve()[0] is None  # nothing saved yet
    fingerprint = resolve()[1]
    for step, state in ((2, {"global_step": 2}), (4, {"global_step": 4}), (6, None), (8, '{"global_step": 8, "lo')):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / FINGERPRINT).write_text(json.dumps(fingerprint))
        if state is not None:
            (folder / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    assert resolve("--logging_steps", "7", "--save_steps", "9", "--dataloader_num_workers", "3")[0] == \
        str(out / "checkpoint-4")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]

    with pytest.raises(SystemExit) as refused:
        resolve("--learning_rate", "2e-5")
    assert "  --learning_rate: 5e-05 then, 2e-05 now" in str(refused.value)
    assert f"--resume_from_checkpoint {out / 'checkpoint-4'}" in str(refused.value)
    data.write_text(json.dumps(json.loads(data.read_text())[:-1]))  # one sample less
    with pytest.raises(SystemExit, match=f"data file {data}: .* bytes, sha256 .* then, .* now"):
        resolve()
    data.write_bytes(text_data.read_bytes())
    (out / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 4}))
    (out / "adapter_config.json").write_text("{}")  # save_final's last file: the run finished
    with pytest.raises(SystemExit) as done:
        resolve()
    assert done.value.code == 0
    picked = str(out / "checkpoint-2")
    assert resolve("--learning_rate", "2e-5", "--resume_from_checkpoint", picked)[0] == picked
    assert resolve("--resume_from_checkpoint", "false")[0] is None and not list(out.glob("checkpoint-*"))


SHIMS = {  # what SLURM and the GPU would answer, for the launch logic of scripts/slurm.sbatch on one node
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done     # one task, on node 0, in a process group of its own
SLURM_NODEID=0 setsid "$@" &
task=$!
trap 'kill -TERM -- -$task' TERM             # srun passes signals on to every process of the step
wait $task; status=$?
while kill -0 $task 2>/dev/null; do wait $task; status=$?; done
kill -KILL -- -$task 2>/dev/null             # the step's processes left once its task ended
exit $status
""",
    "scontrol": """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo "$3" | tr ',' '\\n';;
  *) echo "scontrol $*" >> "$SHIM_LOG";;
esac
""",
    "torchrun": f"""#!{sys.executable}
import os, signal, sys, time
log = os.environ["SHIM_LOG"]
open(log + ".args", "w").write("\\n".join(sys.argv[1:]))
open(log, "a").write("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=%s\\n" % os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
if os.environ.get("RUN_UNTIL_SIGNALLED"):
    def stop(signum, frame):  # as torchrun: a handler of its own, whatever its shell ignores
        time.sleep(1)
        open(log, "a").write("torchrun saved after SIGTERM\\n")
        sys.exit(1)
    signal.signal(signal.SIGTERM, stop)
    open(log, "a").write("started\\n")
    time.sleep(60)
""",
    # the launch scripts' torchrun (python3 -m finetune.launch --script NAME, then torchrun's arguments) goes to the
    # torchrun shim; the GPU probes of scripts/launch_env.sh answer as a GPU without bf16
    "python3": '#!/bin/bash\nif [ "$1 $2" = "-m finetune.launch" ]; then shift 4; exec torchrun "$@"; fi\nexit 1\n',
}


def sbatch(tmp_path, args, **env):
    for name, text in SHIMS.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "GPUS_PER_NODE"))}
    environ.update(PATH=f"{tmp_path}:{os.environ['PATH']}", SHIM_LOG=str(tmp_path / "log"), SLURM_JOB_ID="4242",
                   SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu-node-7", SLURM_GPUS_ON_NODE="2",
                   SLURM_SUBMIT_DIR=str(REPO), MODEL="/models/minicpmv", DATA="/data/train.jsonl", **env)
    return subprocess.Popen(["bash", str(REPO / "scripts" / "slurm.sbatch")] + args, cwd=tmp_path, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_slurm_script_launches_torchrun_with_the_nodes_address_and_gpus(tmp_path):
    job = sbatch(tmp_path, ["finetune_lora.sh", "--max_steps", "3"])
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 0, output
    args = (tmp_path / "log.args").read_text().split("\n")
    launch = args[:args.index("-m")]
    assert launch == ["--nproc_per_node", "2", "--nnodes", "1", "--node_rank", "0", "--master_addr", "gpu-node-7",
                      "--master_port", "24242"]
    assert args[args.index("-m") + 1] == "finetune.finetune" and args[-2:] == ["--max_steps", "3"]
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("warning,requeued", [("SIGUSR1", True), ("SIGTERM", False)])
def test_slurm_script_stops_the_run_and_requeues_before_the_time_limit(tmp_path, warning, requeued):
    """SLURM signals the batch script: USR1 ahead of the time limit (--signal=B:USR1@600), TERM on preemption or
    cancellation. Either way the run gets a SIGTERM; only the time limit makes the script requeue the job (SLURM
    requeues a preempted one itself)."""
    job = sbatch(tmp_path, ["finetune_ds.sh"], RUN_UNTIL_SIGNALLED="1")
    log = tmp_path / "log"
    end = time.monotonic() + 120
    while not (log.exists() and "started" in log.read_text()):
        assert job.poll() is None and time.monotonic() < end, job.communicate()[0]
        time.sleep(0.05)
    job.send_signal(getattr(signal, warning))
    output = job.communicate(timeout=60)[0]
    assert "torchrun saved after SIGTERM" in log.read_text()  # not killed with the step: its shell outlived it
    assert ("scontrol requeue 4242" in log.read_text()) == requeued, output
    assert job.returncode == 1  # the run's status
