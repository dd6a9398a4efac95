"""GUICourse conversion on a miniature release in the exact release format, written here: annotation JSON
plus image parquets (base64 JPEG; raw bytes for GUIChat; GUIAct candidate elements), then check and evaluate."""
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def jpeg(size, colour):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_parquet(path, rows, raw_bytes=False, elements=None):
    """As pandas writes a frame indexed by image id: the index stored as a column named in the metadata."""
    columns = {"base64": [r[1] if raw_bytes else base64.b64encode(r[1]).decode() for r in rows],
               "__index_level_0__": [r[0] for r in rows]}
    if elements is not None:
        columns["elements"] = [json.dumps(elements[r[0]]) for r in rows]
    table = pa.table(columns)
    meta = {b"pandas": json.dumps({"index_columns": ["__index_level_0__"], "columns": []}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=2)


@pytest.fixture()
def release(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    size = {"width": 1000, "height": 500}
    guienv = [
        {"uid": "uid_img_page1_bbox2text_00", "image_id": "page1", "image_size": size, "task_type": "bbox2text",
         "question": {"absolute": "<box>100, 50, 300, 100</box>", "related": "<box>0.1, 0.1, 0.3, 0.2</box>"},
         "answer": "Sign up"},
        {"uid": "uid_img_page1_text2bbox_00", "image_id": "page1", "image_size": size, "task_type": "text2bbox",
         "question": "Home", "answer": {"absolute": [], "related": ["<box>0.5, 0.5, 0.6, 0.6</box>",
                                                                    "<box>0.7, 0.1, 0.8, 0.2</box>"]}},
        {"uid": "uid_img_page2_text2bbox_00", "image_id": "page2", "image_size": size, "task_type": "text2bbox",
         "question": "Out", "answer": {"absolute": [], "related": ["<box>0.5, 0.5, 1.2, 0.6</box>"]}},
    ]
    (raw / "ocr_grounding_test_data.json").write_text(json.dumps(guienv))
    write_parquet(raw / "ocr_grounding_test_images.parquet",
                  [("page1", jpeg((1000, 500), "white")), ("page2", jpeg((1000, 500), "grey")), ("unused", jpeg((8, 8), "red"))])
    web = [{"uid": "uid_image_a_qa_01", "image_id": "a", "image_size": size, "question": "Sign up", "actions_history": "",
            "logs": "", "thoughts": "Find the button.",
            "actions_label": [{"name": "click", "element": {"related": "<box>0.1, 0.1, 0.3, 0.2</box>", "id": "e1"}},
                              {"name": "input", "text": "alice"},
                              {"name": "scroll", "scroll": {"related": {"down": "0", "right": "0.4"}}}]}]
    (raw / "web-single_test_data.json").write_text(json.dumps(web))
    write_parquet(raw / "web-single_test_images.parquet", [("a", jpeg((1000, 500), "blue"))],
                  elements={"a": [{"uid": "e1", "rect": {"x": 100, "y": 50, "width": 200, "height": 50}, "text": "Sign up"},
                                  {"uid": "e2", "rect": {"x": 600, "y": 300, "width": 100, "height": 50}, "text": "Log in"}]})
    phone = [{"uid": "uid_episode_1_step_00", "image_id": "uid_episode_1_step_00", "image_size": {"width": 720, "height": 1440},
              "question": "What is the capital of Brazil?", "actions_history": "", "logs": "", "thoughts": "",
              "actions_label": {"name": "tap", "point": {"related": "<point>0.503, 0.981</point>"}}}]
    (raw / "smartphone_test_data.json").write_text(json.dumps(phone))
    write_parquet(raw / "smartphone_test_images.parquet", [("uid_episode_1_step_00", jpeg((72, 144), "green"))],
                  elements={"uid_episode_1_step_00": [{"id": 3, "position": {"x": 300, "y": 1400, "width": 100, "height": 30}}]})
    chat = [{"uid": "chat1", "image_id": "shot", "text": [
        {"from": "human", "value": "<image>shot</image>What is at the top? (answer with grounding)"},
        {"from": "gpt", "value": "A header <box>0 0 999 83</box>."}]}]
    (raw / "guichat_data.json").write_text(json.dumps(chat))
    png = io.BytesIO()
    Image.new("RGBA", (300, 200), (10, 20, 30, 255)).save(png, format="PNG")
    write_parquet(raw / "guichat_images.parquet", [("shot", png.getvalue())], raw_bytes=True)
    return raw


def convert(raw, out, split, subsets, *extra):
    return subprocess.run([sys.executable, "-m", "finetune.data", "convert-guicourse", str(raw), str(out), "--split", split,
                           "--subsets", subsets] + list(extra), cwd=REPO, capture_output=True, text=True)


def test_convert_check_and_evaluate(release, tmp_path, ckpt_dir):
    out = tmp_path / "out"
    run = convert(release, out, "test", "guienv,guiact-web-single,guiact-smartphone")
    assert run.returncode == 0, run.stderr
    assert "dropped uid_img_page2_text2bbox_00: coordinates outside the image" in run.stdout  # reported, not silent
    env = [json.loads(x) for x in (out / "guienv_test.jsonl").read_text().splitlines()]
    assert [s["conversations"][1]["content"] for s in env] == ["Sign up", "<box>(500,500),(600,600)</box>\n<box>(700,100),(800,200)</box>"]
    assert "<box>(100,100),(300,200)</box>" in env[0]["conversations"][0]["content"]
    web = json.loads((out / "guiact-web-single_test.jsonl").read_text())
    assert web["type"] == "web-single"
    assert web["conversations"][1]["content"] == ("thoughts: Find the button.\nactions:\nclick, <box>(100,100),(300,200)</box>\n"
                                                  "input, alice\nscroll, down 0 right 400")  # right from "right"
    assert Image.open(out / web["image"]).size == (1000, 500)
    elements = json.loads((out / "guiact-web-single_test_elements.jsonl").read_text())
    assert elements["elements"][0] == {"id": "e1", "box": [100, 50, 300, 100]} and elements["image_size"] == [1000, 500]

    files = [str(out / f"{s}_test.jsonl") for s in ("guienv", "guiact-web-single", "guiact-smartphone")]
    check = subprocess.run([sys.executable, "-m", "finetune.data", "check", *files, "--model", str(ckpt_dir), "--workers", "1"],
                           cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # the gold answers score 100 with the elements
    merged = tmp_path / "test.jsonl"
    merged.write_text("".join(Path(f).read_text() for f in files).replace('"image": "', f'"image": "{out}/'))
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": s["id"], "prediction": s["conversations"][-1]["content"]}) + "\n"
                             for s in map(json.loads, merged.read_text().splitlines())))
    report_file = tmp_path / "report.json"
    all_elements = tmp_path / "elements.jsonl"
    all_elements.write_text((out / "guiact-web-single_test_elements.jsonl").read_text() +
                            (out / "guiact-smartphone_test_elements.jsonl").read_text())
    run = subprocess.run([sys.executable, "-m", "finetune.evaluate", "--data", str(merged), "--predictions", str(preds),
                          "--elements", str(all_elements), "--json", str(report_file)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(report_file.read_text())
    assert report["web-single"]["scores"]["step_sr"] == 100.0 and report["smartphone"]["scores"]["step_sr"] == 100.0
    assert report["bbox2text"]["scores"]["em"] == 100.0 and report["text2bbox"]["scores"]["iou@0.7"] == 100.0


def test_guichat_space_style_and_resume(release, tmp_path):
    out = tmp_path / "out"
    run = convert(release, out, "train", "guichat", "--coords", "space")
    assert run.returncode == 0, run.stderr
    sample = json.loads((out / "guichat_train.jsonl").read_text())
    user, answer = sample["conversations"][0]["content"], sample["conversations"][1]["content"]
    assert user == "<image>What is at the top? (answer with grounding)" and "shot" not in user  # no id leak
    assert answer == "A header <box>0 0 999 83</box>."
    png = out / sample["image"]
    stamp = png.stat().st_mtime_ns
    assert convert(release, out, "train", "guichat", "--coords", "space").returncode == 0
    assert png.stat().st_mtime_ns == stamp  # resumed: the image was not rewritten


def test_missing_files_and_columns_are_named(release, tmp_path):
    run = convert(release, tmp_path / "o", "train", "guiact-web-multi")
    assert run.returncode == 2 and "missing" in run.stderr and "web-multi_train_data.json" in run.stderr
    pq.write_table(pa.table({"image_id": ["page1"], "pixels": ["x"]}), release / "ocr_grounding_test_images.parquet")
    run = convert(release, tmp_path / "o", "test", "guienv")
    assert run.returncode == 2 and "expected columns ['base64']" in run.stderr
