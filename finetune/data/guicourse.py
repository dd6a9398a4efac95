"""`python -m finetune.data convert-guicourse RAW_DIR OUT_DIR`: the GUICourse release -> training/test files.

Reads the release as published (guicourse.md section 1): per subset a `*_data.json` of annotations and one
`*_images.parquet` whose rows are screenshots keyed by image id (column `base64`: base64 JPEG, raw bytes for
GUIChat; GUIAct adds the candidate `elements`). Parquets are streamed row group by row group, so memory stays
flat on the 20 GB files; images are written once as PNG (`images/<subset>/chunk_<k>/<image_id>.png`, 999 per
folder; existing ones are kept, so a rerun resumes). Writes `<subset>_<split>.jsonl` in the conversation format
with the GUICourse prompts and 0-1000 coordinates, and for GUIAct test sets `<subset>_test_elements.jsonl` for
`finetune.evaluate --elements`. Fixes the release scripts' bugs: scroll "right" copied from "down", the GUIChat
image id leaking into the user text; samples dropped for coordinates outside the image are counted and named.
"""
import base64
import io
import json
import os
import re
from collections import Counter

from PIL import Image
from tqdm import tqdm

from ..cli import UserError

ENV_PROMPT = ("<image>\n## Your Task\nIf the input is a string, please give me the element regions including this string. "
              "Else if the input is a region, please give me the string (text) in this region.## Input\n{}\n## Output\n")
SUBSETS = {  # name -> (annotation file, image parquet), {split} in the names
    "guienv": ("ocr_grounding_{split}_data.json", "ocr_grounding_{split}_images.parquet"),
    "guiact-web-single": ("web-single_{split}_data.json", "web-single_{split}_images.parquet"),
    "guiact-web-multi": ("web-multi_{split}_data.json", "web-multi_{split}_images.parquet"),
    "guiact-smartphone": ("smartphone_{split}_data.json", "smartphone_{split}_images.parquet"),
    "guichat": ("guichat_data.json", "guichat_images.parquet"),
}
GUICHAT_IMAGE = re.compile(r"<image>(.*?)</image>")  # GUIChat's image reference, an id inside the tag
RELEASE_SPLIT = {"guienv": {"train": "train_stage2", "test": "test"}}  # SFT used GUIEnv's stage-2 part
CHUNK = 999


class ReleaseError(ValueError, UserError):
    """A release folder that lacks a file or column the conversion needs (reported as one line)."""


class OutOfBounds(ValueError):
    pass


def coords(related, style):
    """'0.481, 0.565, 0.506, 0.592' (0-1) -> 0-1000 ints (truncated, as the release) in the chosen style."""
    text = related.replace("<box>", "").replace("</box>", "").replace("<point>", "").replace("</point>", "")
    values = [float(v) for v in text.replace(",", " ").split()]
    if any(v < 0 or v > 1 for v in values):
        raise OutOfBounds(f"coordinates outside the image: {related}")
    return format_coords([int(v * 1000) for v in values], style)


def format_coords(ints, style):
    """Four 0-1000 ints as a <box>, two as a <point>: `(x1,y1),(x2,y2)` (paren) or `x1 y1 x2 y2` (space)."""
    if len(ints) == 4:
        return f"<box>({ints[0]},{ints[1]}),({ints[2]},{ints[3]})</box>" if style == "paren" else \
            "<box>{} {} {} {}</box>".format(*ints)
    return f"<point>({ints[0]},{ints[1]})</point>" if style == "paren" else "<point>{} {}</point>".format(*ints)


def guienv_sample(raw, style):
    if raw["task_type"] == "bbox2text":
        question, answer = coords(raw["question"]["related"], style), raw["answer"]
    else:
        question, answer = raw["question"], "\n".join(coords(b, style) for b in raw["answer"]["related"])
    return {"id": raw["uid"], "conversations": [{"role": "user", "content": ENV_PROMPT.format(question)},
                                                {"role": "assistant", "content": answer}]}


def action_line(action, style):
    name = {"copy_text": "copy"}.get(action["name"], action["name"])
    if name in ("click", "hover"):
        return f"{name}, {coords(action['element']['related'], style)}"
    if name == "select":
        return f"select, {coords(action['element']['related'], style)}, {action['text']}"
    if name == "tap":
        return f"tap, {coords(action['point']['related'], style)}"
    if name in ("select_text", "swipe"):
        dual = action["dual_point"]["related"]
        return f"{name}, from {coords(dual['from'], style)} to {coords(dual['to'], style)}"
    if name == "scroll":  # the release's converter took "right" from "down"; both from their own fields here
        related = action["scroll"]["related"]
        return f"scroll, down {int(float(related['down']) * 1000)} right {int(float(related['right']) * 1000)}"
    if name in ("input", "answer"):
        return f"{name}, {action['text']}"
    return name  # enter, copy


def guiact_sample(raw, style, subset):
    prompt = ""
    if raw.get("actions_history"):
        prompt += f"Actions History\n{raw['actions_history']}\n"
    if raw.get("logs"):
        prompt += f"Informations\n{raw['logs']}\n"
    prompt += f"Your Task\n{raw['question']}\nGenerate next actions to do this task."
    actions = raw["actions_label"] if isinstance(raw["actions_label"], list) else [raw["actions_label"]]
    label = (f"thoughts: {raw['thoughts']}\n" if raw.get("thoughts") else "") + "actions:\n" + \
        "\n".join(action_line(a, style) for a in actions)
    return {"id": raw["uid"], "type": subset.removeprefix("guiact-"),
            "conversations": [{"role": "user", "content": "<image>\n" + prompt}, {"role": "assistant", "content": label}]}


def guichat_sample(raw, style):
    """ShareGPT turns; `<image>ID</image>` becomes our `<image>` tag (the id does not leak into the text)."""
    turns = []
    for turn in raw["text"]:
        text = GUICHAT_IMAGE.sub("<image>", turn["value"])
        text = re.sub(r"<box>\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*</box>",
                      lambda m: format_coords(m.groups(), style), text)
        turns.append({"role": "user" if turn["from"] == "human" else "assistant", "content": text})
    return {"id": raw["uid"], "conversations": turns}


def element_boxes(elements):
    """Candidate elements -> [{"id", "box": [x1, y1, x2, y2] pixels}] (web: uid + rect; phone: id + position)."""
    if isinstance(elements, (str, bytes)):
        elements = json.loads(elements)
    out = []
    for e in elements or []:
        rect = e.get("rect") or e.get("position")
        out.append({"id": e.get("uid", e.get("id")),
                    "box": [rect["x"], rect["y"], rect["x"] + rect["width"], rect["y"] + rect["height"]]})
    return out


def index_column(parquet_file):
    """The column holding image ids: pandas' stored index, else `image_id`."""
    meta = parquet_file.schema_arrow.metadata or {}
    names = parquet_file.schema_arrow.names
    if b"pandas" in meta:
        index = json.loads(meta[b"pandas"])["index_columns"]
        if index and isinstance(index[0], str) and index[0] in names:
            return index[0]
    for name in ("image_id", "__index_level_0__"):
        if name in names:
            return name
    raise ReleaseError(f"{parquet_file.metadata} has no image id column (columns: {names})")


def write_images(parquet_path, wanted, out_folder, raw_bytes, keep_elements, progress=True):
    """Stream the parquet; write the wanted images as PNG. Returns ({id: png path}, {id: elements})."""
    import pyarrow.parquet as pq
    if not os.path.isfile(parquet_path):
        raise ReleaseError(f"missing {parquet_path}")
    pf = pq.ParquetFile(parquet_path)
    id_column = index_column(pf)
    columns = [id_column, "base64"] + (["elements"] if keep_elements else [])
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise ReleaseError(f"{parquet_path}: expected columns {missing} (has {pf.schema_arrow.names})")
    paths, elements = {}, {}
    bar = tqdm(total=pf.metadata.num_rows, desc=os.path.basename(parquet_path), unit="image", disable=not progress)
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=columns).to_pydict()
        for k, image_id in enumerate(table[id_column]):
            if image_id not in wanted:
                continue
            chunk = os.path.join(out_folder, f"chunk_{len(paths) // CHUNK}")
            path = os.path.join(chunk, f"{image_id}.png")
            if not os.path.exists(path):  # written on an earlier run: resume
                data = table["base64"][k]
                data = data if raw_bytes else base64.b64decode(data)
                os.makedirs(chunk, exist_ok=True)
                Image.open(io.BytesIO(data)).convert("RGB").save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
            paths[image_id] = path
            if keep_elements:
                elements[image_id] = element_boxes(table["elements"][k])
        bar.update(len(table[id_column]))
    bar.close()
    return paths, elements


def convert(raw_dir, out_dir, subsets, split="train", style="paren", progress=True):
    """Convert the given subsets of one split; returns a report {subset: counts}."""
    report = {}
    for subset in subsets:
        if subset == "guichat" and split == "test":
            continue  # GUIChat has no test split
        data_name, parquet_name = (n.format(split=RELEASE_SPLIT.get(subset, {}).get(split, split)) for n in SUBSETS[subset])
        data_path = os.path.join(raw_dir, data_name)
        if not os.path.isfile(data_path):
            raise ReleaseError(f"missing {data_path} (subset {subset}, split {split})")
        raws = json.load(open(data_path, encoding="utf-8"))
        wanted = {r["image_id"] for r in raws} if subset != "guichat" else \
            {GUICHAT_IMAGE.search(t["value"]).group(1) for r in raws for t in r["text"] if "<image>" in t["value"]}
        paths, elements = write_images(os.path.join(raw_dir, parquet_name), wanted,
                                       os.path.join(out_dir, "images", subset), subset == "guichat",
                                       subset.startswith("guiact") and split == "test", progress)
        counts, dropped = Counter(), []
        out_path = os.path.join(out_dir, f"{subset}_{split}.jsonl")
        with open(out_path + ".tmp", "w", encoding="utf-8") as out:
            for raw in raws:
                image_id = raw.get("image_id") or _guichat_image(raw)
                if image_id not in paths:
                    counts["image missing from the parquet"] += 1
                    dropped.append((raw["uid"], "image missing from the parquet"))
                    continue
                try:
                    sample = guienv_sample(raw, style) if subset == "guienv" else guichat_sample(raw, style) \
                        if subset == "guichat" else guiact_sample(raw, style, subset)
                except OutOfBounds as e:
                    counts["coordinates outside the image"] += 1
                    dropped.append((raw["uid"], str(e)))
                    continue
                sample["image"] = os.path.relpath(paths[image_id], out_dir)
                out.write(json.dumps(sample, ensure_ascii=False) + "\n")
                counts["written"] += 1
        os.replace(out_path + ".tmp", out_path)
        if elements:
            with open(os.path.join(out_dir, f"{subset}_test_elements.jsonl"), "w") as out:
                for raw in raws:
                    if raw["image_id"] in elements:
                        size = raw["image_size"]
                        out.write(json.dumps({"id": raw["uid"], "image_size": [size["width"], size["height"]],
                                              "elements": elements[raw["image_id"]]}) + "\n")
        report[subset] = {"file": out_path, **counts, "dropped": dropped}
    return report


def _guichat_image(raw):
    for turn in raw.get("text", []):
        match = GUICHAT_IMAGE.search(turn["value"])
        if match:
            return match.group(1)
    return None

