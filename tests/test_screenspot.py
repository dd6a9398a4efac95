"""ScreenSpot, ScreenSpot-v2 and ScreenSpot-Pro: miniature releases written here in each release's documented layout
(annotation JSON + real PNG screenshots), converted, then scored by finetune.evaluate on hand-computed predictions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune import metrics
from finetune.data.guicourse import ENV_PROMPT
from finetune.data.screenspot import convert
from finetune.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]

# ScreenSpot and v2 records: bbox [x, y, w, h] pixels, data_type, data_source; the platform is the file's.
SEECLICK_RECORDS = {
    "mobile": [{"img_filename": "ios_1.png", "instruction": "open settings", "bbox": [10, 20, 30, 40],
                "data_type": "icon", "data_source": "ios"},
               {"img_filename": "ios_1.png", "instruction": "tap \"Wi-Fi\"", "bbox": [100, 300, 200, 50],
                "data_type": "text", "data_source": "ios"}],
    "desktop": [{"img_filename": "mac_1.png", "instruction": "close the window", "bbox": [0, 0, 16, 16],
                 "data_type": "icon", "data_source": "macos"}],
    "web": [{"img_filename": "shop_1.png", "instruction": "search", "bbox": [600, 10, 90, 30],
             "data_type": "text", "data_source": "shop"},
            {"img_filename": "missing.png", "instruction": "gone", "bbox": [1, 1, 2, 2],
             "data_type": "text", "data_source": "shop"}],
}
SIZES = {"ios_1.png": (360, 780), "mac_1.png": (1440, 900), "shop_1.png": (1280, 720)}
# Pro records: bbox [x1, y1, x2, y2] pixels, img_size; image folders named unlike the annotation files.
PRO_RECORDS = {
    "vscode_macos.json": [
        {"id": "vscode_macos_0", "img_filename": "vscode_mac/screenshot_1.png", "instruction": "run the file",
         "instruction_cn": "运行文件", "bbox": [3000, 40, 3040, 80], "img_size": [3840, 2160], "ui_type": "icon",
         "group": "Dev", "platform": "macos", "application": "vscode"},
        {"id": "vscode_macos_1", "img_filename": "vscode_mac/screenshot_1.png", "instruction": "open Terminal menu",
         "bbox": [400, 0, 520, 30], "img_size": [3840, 2160], "ui_type": "text", "group": "Dev",
         "platform": "macos", "application": "vscode"}],
    "origin_windows.json": [
        {"id": "origin_windows_0", "img_filename": "origin_windows/screenshot_2.png",
         "instruction": "plot a candlestick chart", "bbox": [300, 2077, 324, 2100], "img_size": [3840, 2160],
         "ui_type": "icon", "group": "Scientific", "platform": "windows", "application": "origin"}],
}


def png(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 210, 220)).save(path)


@pytest.fixture()
def seeclick_release(tmp_path):
    def make(v2):
        raw = tmp_path / ("v2" if v2 else "v1")
        for platform, records in SEECLICK_RECORDS.items():
            (raw / f"screenspot_{platform}{'_v2' if v2 else ''}.json").parent.mkdir(parents=True, exist_ok=True)
            (raw / f"screenspot_{platform}{'_v2' if v2 else ''}.json").write_text(json.dumps(records))
        for name, size in SIZES.items():
            png(raw / ("screenspotv2_image" if v2 else "screenspot_imgs") / name, size)
        return raw
    return make


@pytest.fixture()
def pro_release(tmp_path):
    raw = tmp_path / "pro"
    (raw / "annotations").mkdir(parents=True)
    for name, records in PRO_RECORDS.items():
        (raw / "annotations" / name).write_text(json.dumps(records, ensure_ascii=False))
    png(raw / "images" / "vscode_mac" / "screenshot_1.png", (3840, 2160))
    png(raw / "images" / "origin_windows" / "screenshot_2.png", (3840, 2160))
    return raw


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def to_pixels(answer, size):
    (box,) = metrics.parse_boxes(answer)
    w, h = size
    return [v * d / 1000 for v, d in zip(box, (w, h, w, h))]


@pytest.mark.parametrize("v2", [False, True])
def test_screenspot_release_converts_with_boxes_that_round_trip_to_pixels(seeclick_release, tmp_path, v2):
    raw = seeclick_release(v2)
    report = convert(str(raw), str(tmp_path / "out"))
    benchmark = "screenspot-v2" if v2 else "screenspot"
    assert report["benchmark"] == benchmark
    assert report["platforms"] == {"mobile": 2, "desktop": 1, "web": 1}
    assert report["dropped"] == [(f"screenspot_web{'_v2' if v2 else ''}.json[1]", f"image not found: "
                                  f"{raw / ('screenspotv2_image' if v2 else 'screenspot_imgs') / 'missing.png'}")]
    samples = read(report["file"])
    assert Path(report["file"]).name == ("screenspot_v2.jsonl" if v2 else "screenspot.jsonl")
    wifi = next(s for s in samples if s["meta"]["source_index"] == 1 and s["meta"]["platform"] == "mobile")
    assert wifi["conversations"][0]["content"] == ENV_PROMPT.format('tap "Wi-Fi"')
    assert wifi["meta"] == {"benchmark": benchmark, "platform": "mobile", "ui_type": "text", "data_source": "ios",
                            "source_file": f"screenspot_mobile{'_v2' if v2 else ''}.json", "source_index": 1,
                            "bbox_px": [100, 300, 300, 350], "image_size": [360, 780]}
    for s in samples:  # [x, y, w, h] -> corners, within half a thousandth of the image
        record = SEECLICK_RECORDS[s["meta"]["platform"]][s["meta"]["source_index"]]
        x, y, w, h = record["bbox"]
        size = SIZES[record["img_filename"]]
        assert Image.open(tmp_path / "out" / s["image"]).size == size
        got = to_pixels(s["conversations"][1]["content"], size)
        assert all(abs(a - b) <= 0.5 * d / 1000 for a, b, d in zip(got, (x, y, x + w, y + h), size * 2))


def test_screenspot_pro_converts_with_its_own_fields_and_space_coordinates(pro_release, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "finetune.data", "convert-screenspot", str(pro_release), str(out),
                          "--coords", "space"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "screenspot-pro: 3 samples (macos 2, windows 1)" in run.stdout
    samples = {s["id"]: s for s in read(out / "screenspot_pro.jsonl")}
    run_file = samples["vscode_macos_0"]
    assert run_file["conversations"][1]["content"] == "<box>781 19 792 37</box>"
    assert run_file["conversations"][0]["content"] == ENV_PROMPT.format("run the file")  # English, verbatim
    assert run_file["meta"] == {"benchmark": "screenspot-pro", "platform": "macos", "ui_type": "icon", "group": "Dev",
                                "application": "vscode", "source_file": "annotations/vscode_macos.json",
                                "source_index": 0, "bbox_px": [3000, 40, 3040, 80], "image_size": [3840, 2160]}
    for s in samples.values():
        record = next(r for rs in PRO_RECORDS.values() for r in rs if r["id"] == s["id"])
        got = to_pixels(s["conversations"][1]["content"], (3840, 2160))
        assert all(abs(a - b) <= 0.5 * d / 1000 for a, b, d in zip(got, record["bbox"], (3840, 2160) * 2))
        assert (out / s["image"]).resolve() == (pro_release / "images" / record["img_filename"]).resolve()


def test_a_folder_with_no_or_two_releases_is_refused(seeclick_release, tmp_path):
    run = subprocess.run([sys.executable, "-m", "finetune.data", "convert-screenspot", str(tmp_path), str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "no ScreenSpot release found" in run.stderr
    raw = seeclick_release(False)
    (raw / "screenspot_web_v2.json").write_text("[]")
    run = subprocess.run([sys.executable, "-m", "finetune.data", "convert-screenspot", str(raw), str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "several releases (screenspot, screenspot-v2)" in run.stderr


def spot_sample(i, platform, ui_type, bbox_px, size=(1000, 500)):
    return {"id": f"s{i}", "conversations": [{"role": "user", "content": "<image>\nq"},
                                             {"role": "assistant", "content": "<box>(0,0),(1,1)</box>"}],
            "meta": {"benchmark": "screenspot", "platform": platform, "ui_type": ui_type, "bbox_px": bbox_px,
                     "image_size": list(size)}}


def test_screenspot_accuracy_by_hand_for_boxes_points_edges_and_unparseable_output():
    gold = [100, 50, 300, 100]  # pixels of a 1000x500 image: (100,100)-(300,200) in 0-1000
    samples = [spot_sample(0, "mobile", "text", gold), spot_sample(1, "mobile", "text", gold),
               spot_sample(2, "mobile", "icon", gold), spot_sample(3, "desktop", "text", gold),
               spot_sample(4, "desktop", "icon", gold), spot_sample(5, "web", "icon", gold),
               spot_sample(6, "web", "text", gold), spot_sample(7, "web", "text", gold)]
    predictions = {
        "s0": "<box>(150,120),(250,180)</box>",  # centre (200,150): inside
        "s1": "<point>300 200</point>",          # the gold box's corner: edges count
        "s2": "<box>0 0 100 100</box>",          # centre (50,50): outside
        "s3": "(200,150)",                       # a bare point
        "s4": "I cannot find it",                # unparseable: wrong
        # s5: no prediction: wrong
        "s6": "<box>(250,100),(350,200)</box>",  # a box across the gold edge whose centre (300,150) lies on it
        "s7": "<box>(300,100),(400,200)</box>",  # touching the gold box, centre (350,150) outside
    }
    report = evaluate(samples, {k: {"prediction": v} for k, v in predictions.items()})["screenspot"]
    assert report["counts"] == {"samples": 8, "unparseable": 1, "missing": 1}
    scores = report["scores"]
    assert list(scores) == ["mobile/text", "mobile/icon", "mobile", "desktop/text", "desktop/icon", "desktop",
                            "web/text", "web/icon", "web", "text", "icon", "micro", "macro"]
    assert scores == pytest.approx({"mobile/text": 100, "mobile/icon": 0, "mobile": 200 / 3, "desktop/text": 100,
                                    "desktop/icon": 0, "desktop": 50, "web/text": 50, "web/icon": 0, "web": 100 / 3,
                                    "text": 80, "icon": 0, "micro": 50, "macro": 250 / 6})
    assert report["references"]["SeeClick"]["macro"] == 53.4


def test_screenspot_pro_scored_against_the_unrounded_pixel_box_by_group_and_type(pro_release, tmp_path):
    out = tmp_path / "out"
    convert(str(pro_release), str(out))
    predictions = [  # vscode_macos_0: gold x from 781.25; 781 is inside the rounded answer box, outside the real one
        {"id": "vscode_macos_0", "prediction": "<point>(781,30)</point>"},
        {"id": "vscode_macos_1", "prediction": "<box>110 2 130 12</box>"},
        {"id": "origin_windows_0", "prediction": "<point>80 965</point>"}]
    (tmp_path / "preds.jsonl").write_text("\n".join(json.dumps(p) for p in predictions))
    run = subprocess.run([sys.executable, "-m", "finetune.evaluate", "--data", str(out / "screenspot_pro.jsonl"),
                          "--predictions", str(tmp_path / "preds.jsonl"), "--json", str(tmp_path / "r.json")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())["screenspot-pro"]
    assert report["scores"] == pytest.approx({"Dev/text": 100, "Dev/icon": 0, "Dev": 50, "Scientific/icon": 100,
                                              "Scientific": 100, "text": 100, "icon": 50, "micro": 200 / 3})
    assert "OS-Atlas-7B" in run.stdout and "arXiv 2504.07981" in run.stdout
