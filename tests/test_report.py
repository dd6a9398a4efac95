"""The evaluation report page, opened in a real headless Chromium, and the training curves of a real run."""
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.data.synth import cell_box, write_synthetic
from finetune.report import GOLD, PREDICTED, shapes
from .conftest import torchrun

REPO = Path(__file__).resolve().parents[1]
WINDOW = (1280, 2400)
# Run by the test on a copy of the page, after it loaded: what the browser shows, written into the DOM.
PROBE = """<script>
window.addEventListener("load", () => {
  const visible = Array.from(document.querySelectorAll(".card")).filter(card => !card.hidden);
  const image = visible[0].querySelector("img"), box = image.getBoundingClientRect();
  const probe = {images: document.images.length,
                 loaded: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,
                 visible: visible.map(card => [card.dataset.id, card.dataset.result]),
                 shown: document.getElementById("shown").textContent,
                 filters: ["task-filter", "result-filter"].map(id => document.getElementById(id).value),
                 first: {id: visible[0].dataset.id, left: box.left + scrollX, top: box.top + scrollY,
                         width: box.width, height: box.height}};
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(probe);
  document.body.append(pre);
});
</script>"""


@pytest.fixture(scope="session")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "the report page test needs Chromium on PATH: apt-get install chromium (Debian; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    def run(url, *args):
        out = subprocess.run([path, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                              "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout
    return run


def hand_made_predictions(samples):
    """Per task, the first prediction wrong, the second right, and so on; on phones also an unparseable one, a
    missing one and a failed one. Returns (prediction rows, ids expected right)."""
    rows, right, seen = [], set(), {}
    for sample in samples:
        task = sample.get("type") or sample["id"].rsplit("_", 1)[1]
        n = seen[task] = seen.get(task, -1) + 1
        gold = sample["conversations"][-1]["content"]
        numbers = [int(v) for v in re.findall(r"\d+", gold)]
        cell = next((c for c in range(4) if list(cell_box(c)) == numbers), None)
        ok = n % 2 == 1
        if task == "text2bbox":  # the wrong box: the opposite cell, in the other coordinate style
            prediction = gold if ok else "<box>{} {} {} {}</box>".format(*cell_box(3 - cell))
        elif task == "bbox2text":
            prediction = gold if ok else "purple"
        elif task == "web-single":
            x1, y1, x2, y2 = cell_box(cell if ok else 3 - cell)
            prediction = f"actions:\nclick, <box>{x1 + 20} {y1 + 20} {x2 - 20} {y2 - 20}</box>"
        else:
            x, y = numbers
            prediction = f"actions:\ntap, <point>({x + 30},{y - 30})</point>" if ok else \
                f"actions:\ntap, <point>({1000 - x},{1000 - y})</point>"
            if n in (2, 4, 6):  # unparseable, missing, failed: all wrong
                prediction = {2: "actions:\ntap, somewhere", 4: None, 6: "error"}[n]
                ok = False
        if prediction is None:
            continue
        rows.append({"id": sample["id"], "error": "RuntimeError: out of memory"} if prediction == "error"
                    else {"id": sample["id"], "prediction": prediction})
        if ok:
            right.add(sample["id"])
    return rows, right


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """The demo's synthetic screenshots with hand-made predictions, evaluated with --json and --report. The first
    sample is a wrong text2bbox one on a button that is not green (the gold colour)."""
    folder = tmp_path_factory.mktemp("evaluation")
    data = Path(write_synthetic(str(folder), 28, seed=3))
    samples = [json.loads(line) for line in data.read_text().splitlines()]
    first = next(s for s in samples
                 if s["id"].endswith("text2bbox") and "green" not in s["conversations"][0]["content"])
    samples.remove(first)
    samples.insert(0, first)
    for s in samples:
        s["meta"] = {"platform": "mobile" if s.get("type") == "smartphone" else "web", "source_file": "synth.jsonl"}
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    rows, right = hand_made_predictions(samples)
    predictions = folder / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = folder / "report.html"
    out = subprocess.run([sys.executable, "-m", "finetune.evaluate", "--data", str(data), "--predictions",
                          str(predictions), "--json", str(folder / "report.json"), "--report", str(report)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    probed = folder / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    return {"samples": samples, "right": right, "json": json.loads((folder / "report.json").read_text()),
            "page": report, "probed": probed, "folder": folder, "predictions": {r["id"]: r for r in rows}}


def probe(chromium, page, fragment=""):
    dom = chromium(page.as_uri() + fragment, "--dump-dom")
    return dom, json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))


def test_every_thumbnail_loads_and_the_page_shows_evaluates_counts(chromium, evaluation):
    dom, seen = probe(chromium, evaluation["probed"])
    samples, report = evaluation["samples"], evaluation["json"]
    assert seen["images"] == seen["loaded"] == len(samples)  # every sample has its screenshot, all decoded
    assert not re.search(r'(src|href)="(?!data:)', evaluation["page"].read_text())  # nothing fetched at view time
    assert len(seen["visible"]) == int(seen["shown"]) == len(samples)
    assert {"text2bbox", "bbox2text", "web-single", "smartphone"} <= set(report)
    for task, r in report.items():  # each task's counts and scores, as evaluate's JSON has them
        table = re.search(rf'<table class="metrics" data-task="{task}">(.*?)</table>', dom, re.S).group(1)
        assert dict(re.findall(r'data-count="([^"]+)">(\d+)<', table)) == {k: str(v) for k, v in r["counts"].items()}
        assert dict(re.findall(r'data-metric="([^"]+)">([\d.]+)<', table)) == \
            {k: f"{v:.2f}" for k, v in r["scores"].items()}
    assert report["smartphone"]["counts"]["unparseable"] == report["smartphone"]["counts"]["missing"] == 1
    # the breakdown by platform: every phone sample is "mobile"; source_file has one value for all: no table
    mobile = re.search(r'<table class="breakdown" data-key="platform" data-task="smartphone">.*?'
                       r'<tr data-value="mobile"><td>mobile</td><td class="num">(\d+)<', dom, re.S)
    assert int(mobile.group(1)) == report["smartphone"]["counts"]["samples"]
    assert 'data-key="source_file"' not in dom
    # right and wrong as the hand-made predictions were meant, wrong ones first
    results = dict(seen["visible"])
    assert {i for i, r in results.items() if r == "right"} == evaluation["right"]
    assert [r for _, r in seen["visible"]] == sorted(results.values(), key=lambda r: r == "right")
    counts = {k: int(re.search(rf'<span id="{k}">(\d+)<', dom).group(1)) for k in ("n-wrong", "n-right")}
    assert counts == {"n-right": len(evaluation["right"]), "n-wrong": len(samples) - len(evaluation["right"])}


@pytest.mark.parametrize("fragment,task,result", [("#result=wrong", None, "wrong"),
                                                  ("#task=smartphone&result=right", "smartphone", "right")])
def test_the_filter_shows_only_the_chosen_task_and_result(chromium, evaluation, fragment, task, result):
    _, seen = probe(chromium, evaluation["probed"], fragment)
    expected = [s["id"] for s in evaluation["samples"] if (task is None or s.get("type") == task)
                and (s["id"] in evaluation["right"]) == (result == "right")]
    assert sorted(i for i, _ in seen["visible"]) == sorted(expected) and expected
    assert int(seen["shown"]) == len(expected) and seen["filters"] == [task or "all", result]


def test_a_picture_of_the_page_shows_the_boxes_where_the_answers_put_them(chromium, evaluation):
    _, seen = probe(chromium, evaluation["probed"])
    first = seen["first"]
    sample = evaluation["samples"][0]
    assert first["id"] == sample["id"] and first["top"] + first["height"] < WINDOW[1]
    screenshot = evaluation["folder"] / "page.png"
    chromium(evaluation["probed"].as_uri(), f"--screenshot={screenshot}")
    pixels = Image.open(screenshot).convert("RGB")

    def colour_near(x, y):
        """The colours within a pixel of a 0-1000 position on the first thumbnail."""
        px, py = first["left"] + x * first["width"] / 1000, first["top"] + y * first["height"] / 1000
        return {pixels.getpixel((round(px) + dx, round(py) + dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}

    def rgb(colour):
        return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))

    def shows(colour, x, y):
        return any(max(abs(a - b) for a, b in zip(c, rgb(colour))) <= 12 for c in colour_near(x, y))

    gold = [int(v) for v in re.findall(r"\d+", sample["conversations"][-1]["content"])]
    predicted = [int(v) for v in re.findall(r"\d+", evaluation["predictions"][sample["id"]]["prediction"])]
    for box, colour, other in ((gold, GOLD, PREDICTED), (predicted, PREDICTED, GOLD)):
        x1, y1, x2, y2 = box
        for x, y in ((x1, y1), (x2, y1), (x1, y2), (x2, y2)):
            assert shows(colour, x, y) and not shows(other, x, y), (colour, x, y, colour_near(x, y))
    # inside the boxes, away from their edges: the screenshot, not the boxes' colours
    for x1, y1, x2, y2 in (gold, predicted):
        assert not shows(GOLD, (x1 + x2) / 2, (y1 + y2) / 2) and not shows(PREDICTED, (x1 + x2) / 2, (y1 + y2) / 2)


def test_bare_points_and_boxes_are_drawn_as_the_grounding_scorers_read_them():
    assert shapes("(512, 300)", "predicted") == [{"shape": "point", "kind": "predicted", "xy": [512.0, 300.0]}]
    assert shapes("(10,20),(30,40)", "gold") == [{"shape": "box", "kind": "gold", "xy": [10.0, 20.0, 30.0, 40.0]}]
    tagged = shapes("<point>(1,2)</point> or (5,6)", "predicted")  # tags win over bare pairs, as in scoring
    assert tagged == [{"shape": "point", "kind": "predicted", "xy": [1.0, 2.0]}]
    assert shapes("(1,2),(3,4),(5,6)", "predicted") == [] and shapes("no idea", "predicted") == []


def test_training_writes_its_curves_with_one_point_per_logged_step(train_data, ckpt_dir, tmp_path):  # noqa: F811
    from finetune.plot import write_plots
    out = tmp_path / "run"
    torchrun(["--data_path", str(train_data / "train.json"), "--eval_data_path", str(train_data / "eval.json"),
              "--use_lora", "true", "--lora_r", "4", "--max_steps", "4", "--eval_strategy", "steps",
              "--eval_steps", "2", "--save_strategy", "no", "--output_dir", str(out)], ckpt_dir, nproc=1)
    written = {p.name for p in (out / "plots").iterdir()}
    # the generation metrics logged at each evaluation (finetune.generation_eval) are curves too
    assert written == {"loss.png", "learning_rate.png", "grad_norm.png", "eval_loss.png", "eval_gen_bbox2text_em.png",
                       "eval_gen_bbox2text_f1.png"}
    for name in written:
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG" and image.size == (800, 450)
            image.verify()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    drawn = write_plots(str(out))
    for name, counts in drawn.items():
        logged = [h["step"] for h in history if name.removesuffix(".png") in h]
        assert counts == ({"raw": len(logged)} if name == "learning_rate.png" else
                          {"raw": len(logged), "smoothed": len(logged)}), name
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]
    # a run still going has its log in its newest checkpoint only
    (out / "checkpoint-4").mkdir()
    (out / "trainer_state.json").rename(out / "checkpoint-4" / "trainer_state.json")
    assert write_plots(str(out)) == drawn
    run = subprocess.run([sys.executable, "-m", "finetune.plot", str(tmp_path / "nothing")], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "no trainer_state.json in" in run.stderr


def test_a_run_without_matplotlib_gives_one_notice(tmp_path, monkeypatch, capsys):
    from finetune.plot import write_plots
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert write_plots(str(tmp_path)) is None
    assert "matplotlib is missing" in capsys.readouterr().out and not (tmp_path / "plots").exists()


def test_smoothing_is_tensorboards_debiased_moving_average():
    from finetune.plot import smooth
    # weight 0.5: sums 0.5, 1.25, 2.125 over weights 0.5, 0.75, 0.875; a non-finite value is skipped
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    assert smooth([1.0, float("nan"), 3.0], 0.5)[2] == pytest.approx(1.75 / 0.75)
