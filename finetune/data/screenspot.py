"""`python -m finetune.data convert-screenspot RAW_DIR OUT_DIR`: ScreenSpot, ScreenSpot-v2 or ScreenSpot-Pro, as
downloaded, -> one conversation JSONL that `finetune.predict` and `finetune.evaluate` read.

The release is told by its files (layouts and fields as the releases' own code and documentation read them):
- ScreenSpot (SeeClick): `screenspot_{mobile,desktop,web}.json` + `screenspot_imgs/`. Records: `img_filename`,
  `instruction`, `bbox` [x, y, w, h] in pixels, `data_type` (text/icon), `data_source` (ios, android, macos,
  windows, gitlab, shop, forum, tool); no image size, and the platform is the file's. Sources:
  njucckevin/SeeClick `readme.md` (fields) and `pretrain/screenspot_test.py` (file names, x/y/w/h boxes divided by
  the image's own size, point in box with inclusive edges).
- ScreenSpot-v2 (OS-Atlas, dataset OS-Copilot/ScreenSpot-v2): `screenspot_{mobile,desktop,web}_v2.json` +
  `screenspotv2_image/` (as `screenspotv2_image.zip` unpacks), the same record fields and conventions. Sources:
  OS-Copilot/OS-Atlas `README.md` (the release), harpreetsahota204/screenspotv2_to_fiftyone
  `screenspotv2_to_fiftyone.py` (layout; [x, y, w, h] boxes; size read from the image).
- ScreenSpot-Pro: `annotations/<application>_<platform>.json` + `images/`. Records: `id`, `img_filename` (relative
  to `images/`; its folder is not always the annotation file's name, e.g. `vscode_mac/` for `vscode_macos.json`),
  `instruction` (English; `instruction_cn` beside it), `bbox` [x1, y1, x2, y2] in pixels, `img_size` [w, h],
  `ui_type`, `group`, `platform`, `application`. Sources: likaixin2000/ScreenSpot-Pro-GUI-Grounding
  `eval_screenspot_pro.py` (fields, x1/y1/x2/y2 boxes divided by `img_size`, inclusive point in box) and
  `run_ss_pro.sh` (`images/`, `annotations/`).

Each sample asks in the GUIEnv text2bbox prompt of our GUICourse conversion (so a GUICourse-trained model is asked as
it was trained) with the record's English instruction verbatim; the answer is the gold box in 0-1000 coordinates
(`--coords` as `convert-guicourse`). Its `meta` keeps what scoring needs: `benchmark`, `platform`, `ui_type`, for Pro
`group` and `application`, `source_file`, `source_index`, `bbox_px` [x1, y1, x2, y2] and `image_size` [w, h].
Images are referenced where they are (paths relative to OUT_DIR), not copied.
"""
import json
import os
from collections import Counter

from .guicourse import ENV_PROMPT, ReleaseError, format_coords
from .records import open_image

PLATFORMS = ("mobile", "desktop", "web")
RELEASES = {  # benchmark -> (annotation file of a platform, image folder, output file)
    "screenspot": ("screenspot_{}.json", "screenspot_imgs", "screenspot.jsonl"),
    "screenspot-v2": ("screenspot_{}_v2.json", "screenspotv2_image", "screenspot_v2.jsonl"),
    "screenspot-pro": (None, "images", "screenspot_pro.jsonl"),
}


def detect(raw_dir):
    """Which release RAW_DIR holds, from its files."""
    found = [name for name, (pattern, _, _) in RELEASES.items() if pattern and
             any(os.path.isfile(os.path.join(raw_dir, pattern.format(p))) for p in PLATFORMS)]
    if os.path.isdir(os.path.join(raw_dir, "annotations")):
        found.append("screenspot-pro")
    if len(found) != 1:
        raise ReleaseError(
            f"{raw_dir}: " + (f"holds files of several releases ({', '.join(found)}); give each its own folder" if found
                              else "no ScreenSpot release found: expected screenspot_{mobile,desktop,web}.json "
                                   "(ScreenSpot), screenspot_{mobile,desktop,web}_v2.json (ScreenSpot-v2) or an "
                                   "annotations/ folder (ScreenSpot-Pro)"))
    return found[0]


def annotation_files(raw_dir, benchmark):
    """[(annotation path, platform or None)] of the release, in a fixed order."""
    pattern = RELEASES[benchmark][0]
    if pattern is None:
        folder = os.path.join(raw_dir, "annotations")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
        if not files:
            raise ReleaseError(f"{folder}: no annotation .json files")
        return [(os.path.join(folder, f), None) for f in files]
    return [(os.path.join(raw_dir, pattern.format(p)), p) for p in PLATFORMS
            if os.path.isfile(os.path.join(raw_dir, pattern.format(p)))]


def pixel_box(record, benchmark):
    """The record's box as [x1, y1, x2, y2] pixels: ScreenSpot and v2 store [x, y, w, h], Pro the corners."""
    box = record["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise ValueError(f"bbox must be 4 numbers, got {box!r}")
    if benchmark == "screenspot-pro":
        return list(box)
    x, y, w, h = box
    return [x, y, x + w, y + h]


def thousandths(box, size):
    """Pixel corners -> 0-1000 ints of the image, rounded and kept inside it."""
    w, h = size
    return [min(1000, max(0, round(1000 * v / d))) for v, d in zip(box, (w, h, w, h))]


def convert_record(record, index, source, platform, benchmark, image_folder, out_dir, style):
    """One release record -> a sample; raises ValueError (why it cannot be used)."""
    missing = [k for k in ("img_filename", "instruction", "bbox") if k not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    image_path = os.path.join(image_folder, record["img_filename"])
    try:
        size = open_image(image_path, decode=False).size
    except ValueError as e:
        raise ValueError(e.args[1]) from None
    box = pixel_box(record, benchmark)
    meta = {"benchmark": benchmark}
    if benchmark == "screenspot-pro":
        if list(record.get("img_size", size)) != list(size):
            raise ValueError(f"img_size {record['img_size']} is not the image's size {list(size)}")
        meta.update(platform=record["platform"], ui_type=record["ui_type"], group=record["group"],
                    application=record["application"])
        sample_id = record.get("id", f"{os.path.splitext(os.path.basename(source))[0]}_{index}")
    else:
        meta.update(platform=platform, ui_type=record["data_type"], data_source=record.get("data_source"))
        sample_id = f"{benchmark}_{platform}_{index}"
    meta.update(source_file=source, source_index=index, bbox_px=box, image_size=list(size))
    try:
        image = os.path.relpath(image_path, out_dir)
    except ValueError:  # another drive (Windows)
        image = os.path.abspath(image_path)
    return {"id": sample_id, "image": image,
            "conversations": [{"role": "user", "content": ENV_PROMPT.format(record["instruction"])},
                              {"role": "assistant", "content": format_coords(thousandths(box, size), style)}],
            "meta": meta}


def convert(raw_dir, out_dir, style="paren"):
    """Detect and convert the release; returns a report (benchmark, file, counts, dropped [(where, why)])."""
    benchmark = detect(raw_dir)
    _, image_dir, out_name = RELEASES[benchmark]
    image_folder = os.path.join(raw_dir, image_dir)
    if not os.path.isdir(image_folder):
        zipped = os.path.isfile(image_folder + ".zip")
        raise ReleaseError(f"{image_folder}: the images folder is missing" + (f" (unpack {image_dir}.zip here)" if zipped else ""))
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, out_name)
    counts, dropped = Counter(), []
    with open(out_path + ".tmp", "w", encoding="utf-8") as out:
        for path, platform in annotation_files(raw_dir, benchmark):
            source = os.path.relpath(path, raw_dir)
            try:
                records = json.load(open(path, encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ReleaseError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            for index, record in enumerate(records):
                try:
                    sample = convert_record(record, index, source, platform, benchmark, image_folder, out_dir, style)
                except (ValueError, KeyError, TypeError) as e:
                    why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                    dropped.append((f"{source}[{index}]", why))
                    continue
                out.write(json.dumps(sample, ensure_ascii=False) + "\n")
                counts[sample["meta"]["platform"]] += 1
    os.replace(out_path + ".tmp", out_path)
    return {"benchmark": benchmark, "file": out_path, "written": sum(counts.values()), "platforms": dict(counts),
            "dropped": dropped}
