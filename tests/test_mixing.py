"""Weighted data mixing: the `file:weight` syntax, the counts each weight gives, and the check that states them."""
import json

import numpy as np
import pytest
from PIL import Image

from finetune.cli import UserError
from finetune.data.conversation import ImageSettings
from finetune.data.dataset import ScanOptions, scan
from finetune.data.mixing import DataSource, data_files, mix, parse_sources, source_counts


def test_only_a_trailing_number_is_a_weight(tmp_path):
    assert parse_sources("a.jsonl:0.3,b.jsonl:1, c.jsonl:2,d.jsonl") == [
        DataSource("a.jsonl", 0.3, True), DataSource("b.jsonl", 1.0, True), DataSource("c.jsonl", 2.0, True),
        DataSource("d.jsonl")]
    assert parse_sources(["C:\\data\\a.jsonl:0.5", r"C:\data\b.jsonl", "D:/x/c.json:.25"]) == [
        DataSource("C:\\data\\a.jsonl", 0.5, True), DataSource(r"C:\data\b.jsonl"), DataSource("D:/x/c.json", 0.25, True)]
    odd = tmp_path / "run:2"  # a file whose own name ends in ':2' is a file, not a weight
    odd.write_text("[]")
    assert parse_sources(str(odd)) == [DataSource(str(odd))]
    for bad in ("a.jsonl:-1", "a.jsonl:1e999"):
        with pytest.raises(ValueError, match="weight must be a number >= 0"):
            parse_sources(bad)
    with pytest.raises(ValueError, match="predict and evaluate read every sample"):
        data_files("a.jsonl:0.5,b.jsonl")
    with pytest.raises(ValueError, match="same name"):
        data_files("x/a.jsonl,y/a.jsonl")


def entries_of(counts):
    """Scan-like entries: `counts[f]` samples of file f."""
    from finetune.data.dataset import ENTRY
    entries = np.zeros(sum(counts), ENTRY)
    entries["file"] = np.repeat(np.arange(len(counts)), counts)
    entries["index"] = np.concatenate([np.arange(n) for n in counts])
    return entries


def test_weights_give_the_stated_counts_with_the_fraction_drawn_from_the_seed():
    sources = parse_sources("a.jsonl:0.3,b.jsonl:2.5,c.jsonl,d.jsonl:0")
    entries = entries_of([10, 4, 3, 5])
    assert [(r["file"], r["usable"], r["per_epoch"]) for r in source_counts(entries, sources)] == [
        ("a.jsonl", 10, 3), ("b.jsonl", 4, 10), ("c.jsonl", 3, 3), ("d.jsonl", 5, 0)]
    mixed = mix(entries, sources, seed=42)
    per_file = [mixed["index"][mixed["file"] == f] for f in range(4)]
    assert [len(p) for p in per_file] == [3, 10, 3, 0]
    assert len(set(per_file[0])) == 3  # a fraction is drawn without replacement
    b = np.bincount(per_file[1], minlength=4)
    assert sorted(b) == [2, 2, 3, 3]  # each twice, half of them a third time
    assert np.array_equal(mix(entries, sources, seed=42), mixed)  # the same seed, the same samples
    draws = {tuple(mix(entries, sources, seed=s)["index"][:3]) for s in range(20)}
    assert len(draws) > 1  # the seed chooses them
    # another file's weight does not change which samples a file contributes
    other = mix(entries, parse_sources("a.jsonl:0.3,b.jsonl:0.5,c.jsonl,d.jsonl:3"), seed=42)
    assert np.array_equal(other["index"][other["file"] == 0], per_file[0])


def test_check_states_each_sources_samples_per_epoch(tmp_path, ckpt_dir, tokenizer, model, capsys):
    from finetune.data.__main__ import main as data_cli
    Image.new("RGB", (64, 48), "white").save(tmp_path / "ok.png")
    sample = {"image": "ok.png", "conversations": [{"role": "user", "content": "<image>\nWhat?"},
                                                   {"role": "assistant", "content": "A page."}]}
    for name, n in (("env.json", 10), ("act.json", 4)):
        (tmp_path / name).write_text(json.dumps([dict(sample, id=f"{name}{i}") for i in range(n)]))
    env, act = tmp_path / "env.json", tmp_path / "act.json"
    assert data_cli(["check", f"{env}:0.3", f"{act}:2", "--model", str(ckpt_dir), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples per epoch (usable samples x weight):" in out
    assert "env.json         10 x 0.3    =         3" in out
    assert "act.json          4 x 2      =         8" in out
    assert "total            14                   11" in out
    assert data_cli(["check", f"{env}:0.3,{act}:2", "--model", str(ckpt_dir), "--workers", "1", "--json"]) == 0
    assert [(s["usable"], s["per_epoch"]) for s in json.loads(capsys.readouterr().out)["sources"]] == [(10, 3), (4, 8)]
    with pytest.raises(UserError, match="weight must be a number >= 0"):  # one line, exit 2 (finetune.cli.run)
        data_cli(["check", f"{env}:-2", "--model", str(ckpt_dir)])
    # the training side mixes the scan's entries: the same counts
    result = scan([str(env), str(act)], tokenizer, ImageSettings.from_config(model.config), ScanOptions(), progress=False)
    assert len(mix(result.entries, parse_sources(f"{env}:0.3,{act}:2"), 0)) == 11


def test_evaluate_breaks_the_report_down_by_each_predictions_source_file(tmp_path, capsys):
    from finetune.evaluate import main as evaluate_cli

    def grounding(i):
        return {"id": f"{i}_text2bbox", "conversations": [{"role": "user", "content": "where?"},
                                                          {"role": "assistant", "content": "<box>(0,0),(100,100)</box>"}]}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    (tmp_path / "a" / "env.jsonl").write_text("\n".join(json.dumps(grounding(i)) for i in range(2)))
    (tmp_path / "b" / "act.jsonl").write_text("\n".join(json.dumps(grounding(i)) for i in range(2)))  # the same ids
    right, wrong = "<box>(0,0),(100,100)</box>", "<box>(500,500),(600,600)</box>"
    rows = [{"id": "0_text2bbox", "source": str(tmp_path / "a" / "env.jsonl"), "prediction": right},
            {"id": "1_text2bbox", "source": "elsewhere/env.jsonl", "prediction": right},  # matched by file name
            {"id": "0_text2bbox", "source": str(tmp_path / "b" / "act.jsonl"), "prediction": wrong}]
    (tmp_path / "preds.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = f"{tmp_path / 'a' / 'env.jsonl'},{tmp_path / 'b' / 'act.jsonl'}"
    assert evaluate_cli(["--data", data, "--predictions", str(tmp_path / "preds.jsonl"),
                         "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["text2bbox"]["scores"]["iou@0.5"] == 50.0 and report["text2bbox"]["counts"]["missing"] == 1
    assert report["by_source"]["env.jsonl"]["text2bbox"]["scores"]["iou@0.5"] == 100.0
    assert report["by_source"]["act.jsonl"]["text2bbox"]["scores"]["iou@0.5"] == 0.0
    assert "=== act.jsonl" in capsys.readouterr().out
