"""Every checkpoint a run writes carries a model card (README.md, Hugging Face format) with the run's figures;
evaluation adds its scores, merging keeps the card (finetune.model_card)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from finetune import evaluate
from finetune.merge_lora import merge

REPO = Path(__file__).resolve().parents[1]


def read_card(folder):
    """(YAML metadata, text) of a folder's README.md; the metadata must parse as YAML."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_checkpoints_carry_a_model_card_with_the_runs_figures(ckpt_dir, conformance, tmp_path):
    """A LoRA run through `python finetune/finetune.py` (the script route), saving after each of 2 steps; then
    evaluation scores are added to the final card, and the merged checkpoint gets a card of its own."""
    samples = [dict(s, image=str(conformance.dir / "images" / s["image"])) for s in conformance.cases["samples"][:3]]
    (tmp_path / "train.json").write_text(json.dumps(samples + [{"id": "bad", "conversations": []}]))
    (tmp_path / "eval.json").write_text(json.dumps(samples[:2]))
    out = tmp_path / "lora"
    run = subprocess.run([sys.executable, "finetune/finetune.py", "--model_name_or_path", str(ckpt_dir),
                          "--data_path", str(tmp_path / "train.json"), "--eval_data_path", str(tmp_path / "eval.json"),
                          "--on_bad_sample", "skip", "--eval_strategy", "steps", "--eval_steps", "2",
                          "--output_dir", str(out), "--use_lora", "true", "--lora_r", "4", "--tune_vision", "false",
                          "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "1",
                          "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0"],
                         cwd=REPO, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    loss = [h["loss"] for h in history if "loss" in h]
    eval_loss = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
    for folder, step in ((out / "checkpoint-1", 1), (out / "checkpoint-2", 2), (out, 2)):
        epoch = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["epoch"]
        meta, body = read_card(folder)
        assert meta["base_model"] == "openbmb/MiniCPM-Llama3-V-2_5"  # the fixture's config names the release
        assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
        assert {"lora", "minicpm-v", "minicpmv-finetune"} <= set(meta["tags"])
        assert "Model Card for Model ID" not in body  # peft's placeholder, replaced
        assert f"- Base model: `{ckpt_dir}` (openbmb/MiniCPM-Llama3-V-2_5)" in body
        assert "LoRA adapters (r=4, alpha=64, dropout 0.05)" in body and "in full: the resampler\n" in body
        assert "- Images: sliced into up to 9 slices of 448 px" in body
        assert f"- Steps: {step} of 2 ({epoch:.2f} epochs)" in body
        assert "- Global batch: 2 samples per optimizer step (2 per process x 1 accumulated x 1 processes)" in body
        assert f"| train | `{tmp_path / 'train.json'}` | 4 | 3 |" in body  # 4 samples in the file, 3 good
        assert f"| eval | `{tmp_path / 'eval.json'}` | 2 | 2 |" in body
        assert f"| training loss (last logged) | {loss[step - 1]:.4g} | {step} |" in body
    assert f"| evaluation loss (last) | {eval_loss:.4g} | 2 |" in body and "mean training loss over the run" in body

    # evaluation scores into the card: one prediction right, one wrong
    (tmp_path / "preds.jsonl").write_text("\n".join(json.dumps({"id": s["id"], "prediction": p}) for s, p in zip(
        samples[:2], [samples[0]["conversations"][-1]["content"], "wrong"])))
    evaluate.main(["--data", str(tmp_path / "eval.json"), "--predictions", str(tmp_path / "preds.jsonl"),
                   "--model_card", str(out)])
    report = evaluate.evaluate(samples[:2], {s["id"]: {"prediction": p} for s, p in zip(
        samples[:2], [samples[0]["conversations"][-1]["content"], "wrong"])})
    task, scores = next(iter(report.items()))
    metric, value = next(iter(scores["scores"].items()))
    row = f"| `{tmp_path / 'eval.json'}` | {task} | {metric} | {value:.2f} | {scores['counts']['samples']} |"
    assert row in read_card(out)[1]

    merge(str(out), str(tmp_path / "merged"))
    meta, body = read_card(tmp_path / "merged")
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "finetune"
    assert "merged-lora" in meta["tags"] and f"the LoRA adapter `{out}` merged into its base `{ckpt_dir}`" in body
    assert "LoRA adapters (r=4" in body and row in body  # what was trained and how it scored, carried over
    assert "AutoModel.from_pretrained(FOLDER, trust_remote_code=True)" in body
