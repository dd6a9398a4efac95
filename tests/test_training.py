"""finetune.py end to end on the fixture checkpoint: DeepSpeed ZeRO-1/2/3 with torchrun on 2 CPU processes,
full and LoRA, resume, the launch script, and the checks that stop a run before it starts."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.arguments import parse_args, translate_legacy_flags
from finetune.checkpoint import latest_complete_checkpoint, restore_template
from finetune.model import load_any, load_model
from replace_file.tokenization_minicpmv_fast import INFERENCE_CHAT_TEMPLATE, TRAIN_CHAT_TEMPLATE

from .conftest import DEEPSPEED_ARGS, REPO, one_process_env, torchrun, zero3_config


@pytest.fixture
def entry(monkeypatch):
    """finetune.finetune, for tests that run its main() in this process: what main() sets for the whole process is
    undone after the test (DeepSpeed's accelerator on a machine without a GPU, the collector's frozen objects)."""
    import gc

    import finetune.finetune
    monkeypatch.setenv("DS_ACCELERATOR", "")  # records whether it was set; the delenv leaves it unset for the run
    monkeypatch.delenv("DS_ACCELERATOR")
    yield finetune.finetune
    gc.unfreeze()


def changed_parameters(folder, ckpt_dir):
    trained, base = load_model(folder, dtype=torch.float32), load_model(ckpt_dir, dtype=torch.float32)
    base_params = dict(base.named_parameters())
    return {n for n, p in trained.named_parameters() if not torch.equal(p, base_params[n])}


def batch_for(samples, ckpt_dir, conformance):
    """The fixture's first samples as one batch, for comparing models."""
    from finetune.data.collator import collate
    from finetune.data.conversation import ImageSettings, encode_conversation
    from finetune.model import load_tokenizer, read_config
    tokenizer, settings = load_tokenizer(ckpt_dir), ImageSettings.from_config(read_config(ckpt_dir))
    batch = collate([encode_conversation(s["conversations"], [conformance.image(s["image"])], tokenizer, settings)
                     for s in samples])
    batch.pop("sample_ids")
    return batch


def losses(folder, checkpoint=3):
    """Logged training loss per step, from a checkpoint's trainer state."""
    state = json.loads((folder / f"checkpoint-{checkpoint}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def logits_and_loss(model, batch):
    with torch.no_grad():
        out = model.eval()(**batch, return_logits=True)
    return out.logits, out.loss.item()


@pytest.mark.slow
def test_zero3_full_finetune_saves_reloads_and_resumes_exactly(train_data, ckpt_dir, tmp_path, conformance):
    common = ["--data_path", str(train_data / "train.json"), "--eval_data_path", str(train_data / "eval.json"),
              "--deepspeed", zero3_config(tmp_path), "--learning_rate", "1e-3",
              "--gradient_checkpointing", "true", "--save_steps", "2", "--evaluation_strategy", "steps", "--eval_steps", "2"]
    full = tmp_path / "full"
    torchrun(common + ["--output_dir", str(full), "--max_steps", "3"], ckpt_dir)
    # a complete folder in the official layout: gathered from the partitions, official names, our model files
    assert {"config.json", "model.safetensors", "modeling_minicpmv.py", "tokenizer.json", "generation_config.json"} \
        <= set(os.listdir(full))
    assert json.loads((full / "tokenizer_config.json").read_text())["chat_template"] == INFERENCE_CHAT_TEMPLATE
    assert json.loads((full / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_minicpmv.MiniCPMV"
    changed = changed_parameters(full, ckpt_dir)
    assert {n.split(".")[0] for n in changed} == {"llm", "vpm", "resampler"}

    # the loss on the training samples went down; our loader and transformers' remote-code route agree
    from transformers import AutoModel
    batch = batch_for(conformance.cases["samples"][:4], ckpt_dir, conformance)
    trained_logits, trained_loss = logits_and_loss(load_model(full, dtype=torch.float32), batch)
    assert trained_loss < logits_and_loss(load_model(ckpt_dir, dtype=torch.float32), batch)[1]
    remote = AutoModel.from_pretrained(full, trust_remote_code=True, dtype=torch.float32)
    assert torch.equal(logits_and_loss(remote, batch)[0], trained_logits)

    # resume: from the step-2 checkpoint of the same run, skipping an interrupted later save
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "checkpoint-9").mkdir()  # an interrupted save: no trainer_state.json
    assert latest_complete_checkpoint(str(resumed)) == str(resumed / "checkpoint-2")
    run = torchrun(common + ["--output_dir", str(resumed), "--max_steps", "3", "--resume_from_checkpoint", "true"],
                   ckpt_dir)
    assert "checkpoint-9 is incomplete" in run.stdout + run.stderr

    assert losses(resumed)[3] == pytest.approx(losses(full)[3], rel=1e-4)
    torch.testing.assert_close(logits_and_loss(load_model(resumed, dtype=torch.float32), batch)[0], trained_logits,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_zero3_compiled_blocks_leave_deepspeeds_hooks_untraced(train_data, ckpt_dir, tmp_path, monkeypatch):
    """Under ZeRO-3, compiled blocks gather their parameters as one unit and only their forward is compiled:
    dynamo never traces DeepSpeed's parameter hooks (which broke graphs and recompiled until dynamo gave up and ran
    them eagerly), and the run logs the eager run's losses."""
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks,recompiles")
    common = ["--data_path", str(train_data / "train.json"), "--deepspeed", zero3_config(tmp_path),
              "--learning_rate", "1e-3", "--gradient_checkpointing", "true", "--max_steps", "2", "--save_steps", "2"]
    torchrun(common + ["--output_dir", str(tmp_path / "eager")], ckpt_dir)
    run = torchrun(common + ["--output_dir", str(tmp_path / "compiled"), "--compile_blocks", "true"], ckpt_dir)
    log = run.stdout + run.stderr
    assert "Recompiling function forward" in log  # the blocks were compiled (one graph per block kind)
    assert "recompile_limit" not in log
    assert not [line for line in log.splitlines() if "deepspeed" in line and ("graph_breaks" in line or "recompiles" in line)]
    compiled, eager = losses(tmp_path / "compiled", checkpoint=2), losses(tmp_path / "eager", checkpoint=2)
    assert compiled.keys() == {1, 2} and compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_zero3_keeps_torchs_linear_for_compiled_blocks(ckpt_dir, train_data, tmp_path):
    """ZeRO-3 replaces torch's linear by its own autograd function (DeepSpeed's memory_efficient_linear), on which
    dynamo (torch 2.11) guards each weight's ZeRO id: every block recompiled until dynamo gave up and ran the
    rest eagerly (seen on GPUs). With --compile_blocks the run's DeepSpeed config keeps torch's linear; without,
    DeepSpeed's default stands."""
    script = ("import sys, torch\n" + DEEPSPEED_ARGS +
              "from finetune.model import load_model\n"
              "args = deepspeed_args(sys.argv[2:], '--compile_blocks=true' in sys.argv)  # held: transformers keeps it weakly\n"
              "load_model(sys.argv[1], dtype=torch.float32)\n"
              "print('torch linear:', torch.nn.functional.linear is torch._C._nn.linear)\n")
    env = one_process_env(29900)
    config = zero3_config(tmp_path)
    for compile_blocks, kept in (("true", True), ("false", False)):
        args = ["--model_name_or_path", str(ckpt_dir), "--data_path", str(train_data / "train.json"),
                "--output_dir", str(tmp_path), "--deepspeed", config, f"--compile_blocks={compile_blocks}"]
        run = subprocess.run([sys.executable, "-c", script, str(ckpt_dir)] + args, cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"torch linear: {kept}" in run.stdout


@pytest.mark.slow
def test_zero1_accumulates_like_zero2_and_resumes_exactly(train_data, ckpt_dir, tmp_path):
    """ZeRO-1 reduces gradients once per optimizer step, ZeRO-2 after every micro-step: over 2 accumulation
    steps both must apply the same updates. ZeRO-1 checkpoints are complete folders and resume exactly."""
    common = ["--data_path", str(train_data / "train.json"), "--learning_rate", "1e-3",
              "--gradient_accumulation_steps", "2", "--max_steps", "3", "--save_steps", "2"]
    zero1, zero2 = tmp_path / "zero1", tmp_path / "zero2"
    torchrun(common + ["--deepspeed", str(REPO / "ds_config_zero1.json"), "--output_dir", str(zero1)], ckpt_dir)
    torchrun(common + ["--deepspeed", str(REPO / "ds_config_zero2.json"), "--output_dir", str(zero2)], ckpt_dir)
    assert losses(zero1) == pytest.approx(losses(zero2), rel=1e-5)  # steps 2 and 3 follow the first updates
    trained = load_file(zero1 / "model.safetensors")
    for name, weight in load_file(zero2 / "model.safetensors").items():
        torch.testing.assert_close(trained[name], weight, atol=1e-5, rtol=1e-4)
    assert changed_parameters(zero1, ckpt_dir)
    card = (zero1 / "README.md").read_text()  # a full finetune's model card (finetune.model_card), from 2 processes
    assert "library_name: transformers" in card
    assert "- Trained: in full: the LLM, the vision tower, the resampler\n" in card
    assert "- Global batch: 4 samples per optimizer step (1 per process x 2 accumulated x 2 processes)" in card

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(zero1 / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(common + ["--deepspeed", str(REPO / "ds_config_zero1.json"), "--output_dir", str(resumed),
                       "--resume_from_checkpoint", "true"], ckpt_dir)
    assert losses(resumed)[3] == pytest.approx(losses(zero1)[3], rel=1e-5)
    final = load_file(resumed / "model.safetensors")
    assert all(torch.equal(final[name], weight) for name, weight in trained.items())


@pytest.mark.slow
def test_two_processes_without_a_deepspeed_config_train_under_the_planned_zero_stage(train_data, ckpt_dir, tmp_path):
    """Full finetuning on 2 processes with no --deepspeed: the plan picks the ZeRO stage (everything fits on this
    machine: ZeRO-1, the least communication), prints it before the first step, and the run trains under it."""
    out = torchrun(["--data_path", str(train_data / "train.json"), "--output_dir", str(tmp_path), "--max_steps", "2",
                    "--save_steps", "2", "--learning_rate", "1e-3"], ckpt_dir)
    assert "plan for 2 x CPU" in out.stderr and "zero: ZeRO-1: the fastest stage that fits" in out.stderr
    assert list((tmp_path / "checkpoint-2").glob("global_step2/*optim_states.pt"))  # DeepSpeed's optimizer shards
    assert changed_parameters(tmp_path, ckpt_dir)


@pytest.mark.slow
def test_zero2_lora_trains_adapters_and_resampler_only(train_data, ckpt_dir, tmp_path, conformance):
    out_dir = tmp_path / "lora"
    torchrun(["--data_path", str(train_data / "train.json"), "--output_dir", str(out_dir), "--max_steps", "2",
              "--deepspeed", str(REPO / "ds_config_zero2.json"), "--use_lora", "true", "--lora_r", "4",
              "--tune_vision", "false", "--learning_rate", "1e-2", "--gradient_checkpointing", "true"], ckpt_dir)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["resampler"] and config["base_model_name_or_path"] == str(ckpt_dir)
    model, tokenizer = load_any(str(out_dir), dtype=torch.float32)
    assert tokenizer.chat_template == INFERENCE_CHAT_TEMPLATE
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: these trained
    from peft import PeftModel
    batch = batch_for(conformance.cases["samples"][:2], ckpt_dir, conformance)
    through_peft = PeftModel.from_pretrained(load_model(ckpt_dir, dtype=torch.float32), str(out_dir))
    logits = logits_and_loss(model, batch)[0]
    assert torch.equal(logits_and_loss(through_peft, batch)[0], logits)
    merged = model.merge_and_unload()
    base = load_model(ckpt_dir, dtype=torch.float32)
    assert torch.equal(merged.llm.model.embed_tokens.weight, base.llm.model.embed_tokens.weight)
    assert torch.equal(merged.vpm.post_layernorm.weight, base.vpm.post_layernorm.weight)
    assert not torch.equal(merged.resampler.query, base.resampler.query)


@pytest.mark.slow
def test_bf16_lora_without_deepspeed_keeps_bf16_moments_and_resumes(train_data, ckpt_dir, tmp_path):
    """One process, no DeepSpeed, bf16 (the single-GPU recipe, here on the CPU): AdamW on fp32 masters with bf16
    moments; the checkpoint holds both, and a resumed run ends with exactly the uninterrupted run's weights."""
    common = ["--data_path", str(train_data / "train.json"), "--use_cpu", "true", "--bf16", "true",
              "--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0", "--tune_vision", "true",
              "--optimizer_moments_dtype", "bfloat16",
              "--learning_rate", "1e-3", "--save_steps", "2", "--max_steps", "3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(common + ["--output_dir", str(full)], ckpt_dir, nproc=1)
    state = torch.load(full / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 and s["master"].dtype == torch.float32
               and s["step"] == 2 for s in state.values())
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "true"], ckpt_dir, nproc=1)
    assert losses(resumed)[3] == losses(full)[3]
    # step 3 from the restored masters and moments: the same weights as the uninterrupted run
    final, again = (load_file(folder / "adapter_model.safetensors") for folder in (full, resumed))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


def test_bf16_run_without_deepspeed_computes_in_bf16_without_autocast(train_data, ckpt_dir, tmp_path, monkeypatch,
                                                                      entry):
    """bf16 without DeepSpeed: the model is bf16 and the optimizer keeps fp32 masters, so nothing autocasts (autocast
    would keep layer norms' outputs, the resampler's largest activations among them, in fp32)."""
    seen = []

    class ProbedTrainer(entry.MiniCPMVTrainer):  # the Trainer's accelerator would autocast inside the model's forward
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model.get_input_embeddings().register_forward_pre_hook(
                lambda module, inputs: seen.append((module.weight.dtype, torch.is_autocast_enabled("cpu"))))

    monkeypatch.setattr(entry, "MiniCPMVTrainer", ProbedTrainer)
    entry.main(["--model_name_or_path", str(ckpt_dir), "--data_path", str(train_data / "train.json"),
                "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--use_cpu", "true", "--bf16", "true",
                "--use_lora", "true", "--lora_r", "2", "--max_steps", "1", "--dataloader_num_workers", "0",
                "--save_strategy", "no"])
    assert seen and set(seen) == {(torch.bfloat16, False)}


def test_same_seed_same_lora_run(train_data, ckpt_dir, tmp_path):
    """The adapters' random initialisation follows --seed, so two runs with the same flags end identical."""
    args = ["--data_path", str(train_data / "train.json"), "--use_lora", "true", "--lora_r", "4", "--max_steps", "1",
            "--save_strategy", "no"]
    for name in ("a", "b"):
        torchrun(args + ["--output_dir", str(tmp_path / name)], ckpt_dir, nproc=1)
    first, second = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_padding_free_run_logs_the_padded_runs_losses(train_data, ckpt_dir, tmp_path):
    """Three samples per step, text-only ones between those with images (so image spans move in the row),
    concatenated instead of padded: the padded run's losses and adapters."""
    args = ["--data_path", str(train_data / "train.json"), "--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0",
            "--tune_vision", "true", "--per_device_train_batch_size", "3", "--learning_rate", "1e-3", "--max_steps", "2",
            "--save_steps", "2"]
    for name, extra in (("padded", []), ("padding_free", ["--padding_free", "true"])):
        torchrun(args + extra + ["--output_dir", str(tmp_path / name)], ckpt_dir, nproc=1)
    padded, packed = (losses(tmp_path / name, checkpoint=2) for name in ("padded", "padding_free"))
    assert padded.keys() == {1, 2} and packed == pytest.approx(padded, rel=1e-5)
    padded, packed = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("padded", "padding_free"))
    assert padded.keys() == packed.keys()
    for key in padded:  # within 1 % of the two steps' movement (2e-3): Adam scales up fp32 summation-order noise
        torch.testing.assert_close(packed[key], padded[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_are_recorded_before_the_first_step(train_data, ckpt_dir, tmp_path, monkeypatch, entry):
    """--cuda_graphs, one sample per step: every batch shape of the data is recorded before the first step, with
    the weights left as they were and no gradient kept, so that the steps only replay graphs."""
    import torch._dynamo
    import torch._inductor.config
    from transformers import TrainerCallback

    events, enter = [], torch.cuda.graph.__enter__

    def capture(graph):  # inductor records every CUDA graph inside `with torch.cuda.graph(...)`
        events.append("capture")
        return enter(graph)

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if "step" not in events:
                assert all(p.grad is None and torch.equal(p, self.weights[n]) for n, p in model.named_parameters())
            events.append("step")

    class ProbedTrainer(entry.MiniCPMVTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Probe())

    monkeypatch.setattr(torch.cuda.graph, "__enter__", capture)
    monkeypatch.setattr(entry, "MiniCPMVTrainer", ProbedTrainer)
    torch._dynamo.reset()
    # compile_blocks turns CUDA graphs on for the process: off again for the tests after this one
    with torch._inductor.config.patch({"triton.cudagraphs": False, "triton.slow_path_cudagraph_asserts": True}):
        entry.main(["--model_name_or_path", str(ckpt_dir), "--data_path", str(train_data / "train.json"),
                    "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--bf16", "true",
                    "--use_lora", "true", "--lora_r", "4", "--compile_blocks", "true", "--cuda_graphs", "true",
                    "--per_device_train_batch_size", "1", "--max_steps", "8", "--train_sampling_strategy", "sequential",
                    "--dataloader_num_workers", "0", "--save_strategy", "no"])
    first_step = events.index("step")
    assert events.count("step") == 8 and "capture" in events[:first_step] and "capture" not in events[first_step:]


@pytest.mark.slow
def test_launch_script_passes_environment_and_arguments(train_data, ckpt_dir, tmp_path):
    env = dict(os.environ, MODEL=str(ckpt_dir), DATA=str(train_data / "train.json"), OUTPUT_DIR=str(tmp_path / "o"),
               GPUS_PER_NODE="1", NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29950 + os.getpid() % 40), DS_CONFIG="ds_config_zero2.json")
    out = subprocess.run(["bash", "finetune_lora.sh", "--max_steps", "1", "--report_to", "none", "--lora_r", "2",
                          "--dataloader_num_workers", "0", "--save_strategy", "no"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 2


def test_launch_scripts_hold_no_speed_logic():
    """Every speed decision is the plan's (finetune.plan): the scripts only turn the environment into torchrun
    arguments, so they name none of the flags the plan sets."""
    from finetune.plan import SPEED_FLAGS
    for script in ("finetune_lora.sh", "finetune_ds.sh", "scripts/launch_env.sh"):
        text = (REPO / script).read_text()
        assert not [flag for flag in SPEED_FLAGS + ("--bf16",) if flag in text.replace('--deepspeed "$DS_CONFIG"', "")], script


def run_finetune(args):
    return subprocess.run([sys.executable, "-m", "finetune.finetune", "--report_to", "none"] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_bad_data_stops_before_training_with_the_full_list(ckpt_dir, train_data, tmp_path):
    samples = json.loads((train_data / "train.json").read_text())
    bad = [{"id": "no_image", "image": "missing.png", "conversations": samples[1]["conversations"]},
           {"id": "no_answer", "conversations": [{"role": "user", "content": "hi"}]}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(samples[:2] + bad))
    args = ["--model_name_or_path", str(ckpt_dir), "--data_path", str(path), "--output_dir", str(tmp_path / "o"),
            "--max_steps", "1", "--use_lora", "true", "--lora_r", "2"]
    out = run_finetune(args)
    assert out.returncode != 0
    assert "2 bad samples" in out.stderr and "'no_image'" in out.stderr and "'no_answer'" in out.stderr
    assert "Loading weights" not in out.stderr  # stopped before the model was loaded
    out = run_finetune(args + ["--on_bad_sample", "skip"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train: 2 samples to use; skipped 2 bad" in out.stdout


def test_non_finite_loss_stops_with_step_and_samples(ckpt_dir, train_data, tmp_path):
    out = run_finetune(["--model_name_or_path", str(ckpt_dir), "--data_path", str(train_data / "train.json"),
                        "--output_dir", str(tmp_path / "o"), "--max_steps", "4", "--learning_rate", "1e30",
                        "--tune_vision", "false", "--train_sampling_strategy", "sequential", "--save_steps", "1",
                        "--max_grad_norm", "0", "--per_device_train_batch_size", "1"])
    assert out.returncode != 0 and "non-finite loss" in out.stderr
    assert "at step 2 on samples ['text_guienv_bbox2text']" in out.stderr
    assert (tmp_path / "o" / "checkpoint-1" / "trainer_state.json").exists()


def test_a_run_that_fails_mid_training_ends_on_sigterm_again(ckpt_dir, train_data, tmp_path, entry):
    """While training, SIGTERM asks for a save at the step's end (finetune.preemption); after an error in training
    the default handlers are back, so that a process stuck on its way out still ends on torchrun's SIGTERM."""
    import signal

    from finetune.trainer import NonFiniteLossError
    with pytest.raises(NonFiniteLossError):
        entry.main(["--model_name_or_path", str(ckpt_dir), "--data_path", str(train_data / "train.json"),
                    "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--max_steps", "4",
                    "--learning_rate", "1e30", "--max_grad_norm", "0", "--tune_vision", "false",
                    "--per_device_train_batch_size", "1", "--save_strategy", "no"])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_wrong_llm_type_bf16_moments_without_bf16_and_padding_flags_are_refused(ckpt_dir, train_data):
    base = ["--model_name_or_path", str(ckpt_dir), "--data_path", str(train_data / "train.json")]
    out = run_finetune(base + ["--llm_type", "minicpm"])
    assert out.returncode != 0 and "only 'llama3' is valid" in out.stderr
    out = run_finetune(base + ["--optimizer_moments_dtype", "bfloat16"])  # an fp32 run on this CPU
    assert out.returncode != 0 and "--optimizer_moments_dtype bfloat16 needs bf16" in out.stderr
    with pytest.raises(SystemExit, match="--pad_to_multiple_of must be >= 1"):
        parse_args(base + ["--output_dir", "unused", "--pad_to_multiple_of", "0"])
    with pytest.raises(SystemExit, match="--pad_to_multiple_of pads batches, which --padding_free true does not"):
        parse_args(base + ["--output_dir", "unused", "--padding_free", "true", "--pad_to_multiple_of", "16"])


@pytest.mark.parametrize("flags,problem", [
    (["--compile_blocks", "false"], "needs compiled blocks"),
    (["--compile_blocks", "true", "--padding_free", "true"], "needs padded batches"),
    (["--compile_blocks", "true", "--gradient_checkpointing", "true", "--checkpointing_modules", "resampler"],
     "does not take recomputation"),
    (["--compile_blocks", "true", "--deepspeed", "ds_config_zero2.json"], "does not run under --deepspeed"),
    (["--compile_blocks", "true"], "needs a CUDA GPU" if not torch.cuda.is_available() else None),
])
def test_cuda_graphs_are_refused_where_untested(ckpt_dir, train_data, flags, problem):
    """The CUDA-graph combinations that would record a graph per batch, or that nothing tested, stop at parse
    time."""
    argv = ["--model_name_or_path", str(ckpt_dir), "--data_path", str(train_data / "train.json"),
            "--output_dir", "unused", "--cuda_graphs", "true"] + flags
    if problem is None:
        parse_args(argv)
    else:
        with pytest.raises(SystemExit, match=f"--cuda_graphs {problem}"):
            parse_args(argv)


def test_image_metadata_passes_device_placement_on_the_host(encode, conformance):
    """accelerate moves every batch tensor to the GPU before the Trainer sees it; the image spans and patch
    grids must stay on the CPU, where the model reads them without synchronising the GPU."""
    from accelerate.utils import send_to_device
    from finetune.data.collator import HOST_KEYS, collate
    from finetune.trainer import HostEntriesCollator
    batch = HostEntriesCollator(collate)([encode(i) for i in conformance.expected["batches"][0]["ids"]])
    placed = send_to_device(batch, "meta")  # what the prepared dataloader does, to a device with no data
    assert placed["input_ids"].is_meta and placed["pixel_values"].is_meta
    on_host = {k: placed.pop(k).value for k in HOST_KEYS}
    assert on_host["tgt_sizes"].device.type == "cpu" and all(b.device.type == "cpu" for b in on_host["image_bound"])


def test_legacy_flags_are_translated(monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")  # restored after the test: the runs of later tests must not
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")      # see what translating --logging_dir sets
    argv = ["--evaluation_strategy", "steps", "--warmup_ratio=0.01", "--group_by_length", "true",
            "--logging_dir", "runs/x", "--learning_rate", "1e-4"]
    assert translate_legacy_flags(argv) == ["--eval_strategy", "steps", "--warmup_steps", "0.01",
                                            "--train_sampling_strategy", "group_by_length", "--learning_rate", "1e-4"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "runs/x"


def test_restore_template(ckpt_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TRAIN_CHAT_TEMPLATE  # what the official scripts saved in May-June 2024
    config_path.write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "finetune.restore_template", str(folder)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "restored" in out.stdout
    assert json.loads(config_path.read_text())["chat_template"] == INFERENCE_CHAT_TEMPLATE
    assert "already" in restore_template(str(folder))
