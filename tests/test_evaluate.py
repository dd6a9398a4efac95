"""GUICourse metrics on hand-computed cases, and predict -> evaluate, merge_lora and chat end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import metrics
from finetune.evaluate import evaluate, score_sample

REPO = Path(__file__).resolve().parents[1]


def test_text_metrics():
    assert score_sample("bbox2text", "Green Flash", "Green Flash") == {"em": 1.0, "f1": 1.0}
    assert score_sample("bbox2text", "green flash", "Green Flash")["em"] == 0.0  # EM is raw equality
    assert score_sample("bbox2text", "green flash.", "Green Flash")["f1"] == 1.0  # F1 normalises
    assert metrics.f1("the sign up button", "Sign up") == pytest.approx(2 * (2 / 3 * 1) / (2 / 3 + 1))


@pytest.mark.parametrize("style", ["<box>({},{}),({},{})</box>", "<box>{} {} {} {}</box>"])
def test_grounding_both_styles_and_strict_thresholds(style):
    gold = style.format(0, 0, 100, 100)
    # IoU exactly 0.5 (a half-overlapping box of the same size has 1/3; this one is the gold's left half)
    half = style.format(0, 0, 50, 100)
    assert metrics.grounding_score(half, gold) == pytest.approx(0.5)
    scores = score_sample("text2bbox", half, gold)
    assert scores["iou@0.2"] == 1.0 and scores["iou@0.5"] == 0.0  # strictly greater than
    # mean over predicted boxes of the best IoU with any gold box; missing gold boxes do not count
    two_gold = gold + "\n" + style.format(500, 500, 600, 600)
    assert metrics.grounding_score(gold + style.format(900, 900, 950, 950), two_gold) == pytest.approx(0.5)
    assert metrics.grounding_score(gold, two_gold) == 1.0
    with pytest.raises(metrics.Unparseable):
        metrics.grounding_score("no box here", gold)


def test_guiact_actions():
    gold = "actions:\nclick, <box>(100,100),(300,200)</box>\ninput, hello world"
    ok = "thoughts: type it\nactions:\nclick, <box>150 120 250 180</box>\ninput, Hello world!"
    step = metrics.score_step(ok, gold)
    assert step["type_em"] and step["step_success"]  # centre inside the gold box, F1 1.0 > 0.5
    wrong_order = "actions:\ninput, hello world\nclick, <box>150 120 250 180</box>"
    step = metrics.score_step(wrong_order, gold)
    assert not step["type_em"] and not step["step_success"] and step["action_score"] == 0.0
    missing = metrics.score_step("actions:\nclick, <box>(150,120),(250,180)</box>", gold)
    assert not missing["step_success"] and not missing["type_em"]
    extra = metrics.score_step(ok + "\nenter", gold)  # extra predictions are ignored for success
    assert extra["step_success"] and not extra["type_em"]
    # element snapping: the predicted box overlaps element 2 more than element 1
    elements = [{"id": 1, "box": [100, 100, 300, 200]}, {"id": 2, "box": [300, 100, 500, 200]}]
    pred = "actions:\nclick, <box>(260,100),(480,200)</box>"
    assert not metrics.score_step(pred, "actions:\nclick, <box>(100,100),(300,200)</box>", elements, (1000, 1000))["step_success"]
    assert metrics.score_step(pred, "actions:\nclick, <box>(300,100),(500,200)</box>", elements, (1000, 1000))["step_success"]


def test_tap_scroll_swipe_select_text_and_answers():
    tap = "actions:\ntap, <point>(500,500)</point>"
    assert metrics.score_step("actions:\ntap, <point>590 590</point>", tap)["step_success"]  # d = 0.127
    assert not metrics.score_step("actions:\ntap, <point>(600,600)</point>", tap)["step_success"]  # d = 0.141
    assert metrics.score_step("actions:\nscroll, down 300 right 100", "actions:\nscroll, down 650 right 0")["step_success"]
    assert not metrics.score_step("actions:\nscroll, down 100 right 300", "actions:\nscroll, down 650 right 0")["step_success"]
    swipe = "actions:\nswipe, from <point>(500,800)</point> to <point>(500,200)</point>"
    assert metrics.score_step("actions:\nswipe, from <point>(400,900)</point> to <point>(450,100)</point>", swipe)["step_success"]
    select = "actions:\nselect_text, from <point>(100,100)</point> to <point>(300,300)</point>"
    assert metrics.score_step("actions:\nselect_text, from <point>(100,100)</point> to <point>(300,250)</point>", select)["step_success"]
    assert metrics.score_step("actions:\nanswer, Brasilia", "actions:\nanswer, Brasília is the capital")["step_success"] is False
    assert metrics.score_step("I think it is Paris", "actions:\nanswer, Paris")["step_success"] is False  # F1 0.4
    assert metrics.score_step("actions:\nenter", "actions:\nenter")["step_success"]
    with pytest.raises(metrics.Unparseable):
        metrics.score_step("actions:\ntap, somewhere", tap)


def test_evaluate_counts_unparseable_and_missing_as_failures():
    samples = [{"id": f"s{i}_text2bbox", "conversations": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "<box>0 0 100 100</box>"}]}
               for i in range(4)]
    samples.append({"id": "a", "type": "smartphone", "conversations": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "actions:\ntap, <point>(500,500)</point>"}]})
    predictions = {"s0_text2bbox": {"prediction": "<box>(0,0),(100,100)</box>"}, "s1_text2bbox": {"prediction": "none"},
                   "s2_text2bbox": {"error": "boom"}, "a": {"prediction": "actions:\ntap, <point>(510,490)</point>"}}
    report = evaluate(samples, predictions)
    grounding = report["text2bbox"]
    assert grounding["scores"]["iou@0.5"] == 25.0
    assert grounding["counts"] == {"samples": 4, "unparseable": 1, "failed": 1, "missing": 1}
    assert report["smartphone"]["scores"]["click_acc"] == 100.0 and report["smartphone"]["paper"]["step_sr"] == 53.3


def test_predict_resume_and_evaluate_end_to_end(ckpt_dir, conformance, tmp_path):
    samples = [dict(s, image=str(conformance.dir / "images" / s["image"])) for s in conformance.cases["samples"][:3]]
    samples.append({"id": "broken", "image": str(tmp_path / "missing.png"), "conversations": samples[0]["conversations"]})
    data = tmp_path / "test.json"
    data.write_text(json.dumps(samples))
    out = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "finetune.predict", "--model", str(ckpt_dir), "--data", str(data), "--output", str(out),
           "--batch_size", "2", "--max_new_tokens", "6"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows if "prediction" in r) == sorted(s["id"] for s in samples[:3])  # longest first
    assert "image not found" in next(r for r in rows if r["id"] == "broken")["error"]
    # greedy batched predictions equal one-by-one generation
    from finetune.model import load_model, load_tokenizer
    from finetune.predict import predict
    single = tmp_path / "single.jsonl"
    predict(load_model(ckpt_dir, dtype=torch.float32), load_tokenizer(ckpt_dir), str(data), str(single),
            batch_size=1, progress=False, max_new_tokens=6)
    by_id = {r["id"]: r.get("prediction") for r in map(json.loads, single.read_text().splitlines())}
    assert by_id == {r["id"]: r.get("prediction") for r in rows}
    # resume: nothing new to do
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert "wrote 0 predictions" in run.stdout and len(out.read_text().splitlines()) == 4
    report_file = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "finetune.evaluate", "--data", str(data), "--predictions", str(out),
                          "--json", str(report_file)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["bbox2text"]["counts"] == {"samples": 1} and report["text"]["counts"] == {"samples": 2, "failed": 1}
    assert "iou@0.5" in report["text2bbox"]["scores"] and "paper" in run.stdout


def test_merge_lora_keeps_the_adapter_models_logits(ckpt_dir, conformance, encode, tmp_path):
    from finetune.arguments import TuneArguments
    from finetune.data.collator import collate
    from finetune.merge_lora import merge
    from finetune.model import configure_trainable, load_any, load_model, load_tokenizer
    model = configure_trainable(load_model(ckpt_dir, dtype=torch.float32), TuneArguments(use_lora=True, lora_r=4))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: non-zero B, changed resampler
        for name, p in model.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and ("resampler" in name or "vpm" in name)):
                p.add_(0.05 * torch.randn_like(p))
    # peft's frozen originals of the fully trained modules were released; the trained copies are what counts
    originals = [p for n, p in model.named_parameters() if ".original_module." in n]
    assert originals and all(p.numel() == 0 for p in originals)
    model.save_pretrained(tmp_path / "adapter")
    load_tokenizer(ckpt_dir).save_pretrained(tmp_path / "adapter")
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype=torch.float32)
    batch = collate([encode(i) for i in conformance.expected["batches"][0]["ids"]])
    batch.pop("sample_ids")
    adapter_model, _ = load_any(str(tmp_path / "adapter"), dtype=torch.float32)
    merged = load_model(tmp_path / "merged", dtype=torch.float32)
    base = load_model(ckpt_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = adapter_model.eval()(**batch, return_logits=True).logits
        in_memory = model.eval()(**batch, return_logits=True).logits
        got = merged.eval()(**batch, return_logits=True).logits
        original = base.eval()(**batch, return_logits=True).logits
    torch.testing.assert_close(expected, in_memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - original).abs().max() > 1e-2  # not the base model
    assert (tmp_path / "merged" / "modeling_minicpmv.py").exists()


def test_chat_cli_one_shot(ckpt_dir, conformance):
    image = conformance.dir / "images" / conformance.cases["generations"][0]["image"]
    case = conformance.cases["generations"][0]
    run = subprocess.run([sys.executable, "-m", "finetune.chat", "--model", str(ckpt_dir), "--image", str(image),
                          "--prompt", case["msgs"][0]["content"], "--greedy", "--max_new_tokens",
                          str(case["max_new_tokens"])], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert conformance.expected["generations"][case["id"]]["chat_sampling_false_answer"] in run.stdout
