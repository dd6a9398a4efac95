"""The evaluation report page: one self-contained HTML file (`python -m finetune.evaluate ... --report FILE`).

It shows what finetune.evaluate computed, nothing scored a second way: the metric tables of every task, the
same tables per value of each field of the samples' `meta` (benchmark, platform, ui_type, source file, ...),
and a gallery of failures and a sample of successes, each with its screenshot scaled down (JPEG embedded as
base64) under the gold (green) and predicted (magenta) boxes and points, drawn as SVG over the thumbnail.
"""
import base64
import io
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import jinja2
from PIL import Image

from . import metrics
from .data.records import IMAGE_TAG
from .evaluate import CLICK_STEP, score

GOLD, PREDICTED = "#00c853", "#ff00ff"
THUMBNAIL = 320  # px, the longer side
# The metric that makes a sample right or wrong in the gallery; another task: its first metric.
PRIMARY = {"text2bbox": "iou@0.5", "bbox2text": "em", "text": "em", **{t: "step_sr" for t in CLICK_STEP}}
MAX_GROUPS = 50  # a meta field with more distinct values (ids, boxes) is not a grouping


def primary_metric(row):
    return PRIMARY.get(row["task"], next(iter(row["values"]), None))


def is_right(row):
    """Whether the gallery counts the sample as right: its primary metric is met."""
    return bool(row["values"].get(primary_metric(row), 0.0) >= 1.0)


def breakdowns(scored, elements):
    """{meta field: {task: {"groups": {value: score()'s report of the task on the samples with that value},
    "columns": its metrics}}} for each field whose values are scalars with at most MAX_GROUPS distinct values
    (a single value only when some samples lack it)."""
    groups = defaultdict(lambda: defaultdict(list))
    for row in scored:
        for key, value in (row["sample"].get("meta") or {}).items():
            if isinstance(value, (str, int, bool)):
                groups[key][value].append((row["sample"], row["entry"]))
    result = {}
    for key, by_value in sorted(groups.items()):
        if len(by_value) > MAX_GROUPS or [len(v) for v in by_value.values()] == [len(scored)]:
            continue  # ids and boxes group nothing; one value shared by every sample adds nothing to the totals
        tables = defaultdict(lambda: {"columns": [], "groups": {}})
        for value in sorted(by_value, key=str):
            for task, task_report in score(by_value[value], elements).items():
                table = tables[task]
                table["groups"][str(value)] = task_report
                table["columns"] += [m for m in task_report["scores"] if m not in table["columns"]]
        result[key] = dict(sorted(tables.items()))
    return result


def evenly(items, n):
    """At most n of the items, evenly spaced, in their order (the first always included)."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)] if n > 0 else []


def thumbnail(path):
    """(base64 JPEG, width, height) of the image scaled to THUMBNAIL px on its longer side, or the error text."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at a reduced scale
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
    except (OSError, ValueError) as e:
        return f"cannot read image {path}: {e}"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), image.width, image.height


def thumbnails(paths):
    """{path: thumbnail(path)}, decoded on all cores when there are many (large PNG screenshots: ~20 ms each)."""
    paths = sorted(set(paths))
    workers = min(os.cpu_count() or 1, 16, len(paths) // 32)
    if workers < 2:
        return {p: thumbnail(p) for p in paths}
    with ProcessPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(thumbnail, paths, chunksize=16)))


def shapes(text, kind):
    """Boxes and points of a text as drawing instructions (0-1000 coordinates); malformed ones are left out. A text
    without tags may be a bare point or box, as the grounding benchmarks' answers often are."""
    found = []
    for parse, shape in ((metrics.parse_boxes, "box"), (metrics.parse_points, "point")):
        try:
            found += [{"shape": shape, "kind": kind, "xy": list(v)} for v in parse(text)]
        except metrics.Unparseable:
            pass
    bare = None if found else metrics.bare_shape(text)
    if bare:
        found = [{"shape": bare[0], "kind": kind, "xy": bare[1]}]
    return found


def question_of(sample):
    """The last user turn, without the image tag."""
    turns = sample["conversations"]
    return next((t["content"] for t in reversed(turns[:-1]) if t["role"] == "user"), "").replace(IMAGE_TAG, "").strip()


def template_around(texts):
    """(prefix, suffix) lengths that all texts share, cut at line breaks: the prompt template around what
    varies (the instruction). Nothing when the texts do not vary."""
    if len(set(texts)) < 2:
        return 0, 0
    prefix = os.path.commonprefix(texts)
    suffix = os.path.commonprefix([t[::-1] for t in texts])[::-1]
    prefix, suffix = prefix[:prefix.rfind("\n") + 1], suffix[suffix.find("\n"):] if "\n" in suffix else ""
    return len(prefix), len(suffix)


def card(row, image_paths, images, template):
    """What the gallery shows of one scored sample; `images`: {path: thumbnail}; `template`: the (prefix,
    suffix) lengths of its task's prompts, left out of the instruction shown."""
    sample, entry = row["sample"], row["entry"] or {}
    question = question_of(sample)
    start, end = template if sum(template) <= len(question) else (0, 0)
    gold, prediction = sample["conversations"][-1]["content"].strip(), entry.get("prediction")
    drawn = shapes(question, "asked") + shapes(gold, "gold") + shapes(prediction or "", "predicted")
    result = {"id": str(sample.get("id")), "task": row["task"], "right": is_right(row), "status": row["status"],
              "question": question, "instruction": question[start:len(question) - end].strip(), "gold": gold,
              "prediction": prediction if prediction is not None else entry.get("error", "(no prediction)"),
              "values": row["values"], "meta": sample.get("meta") or {}}
    if row["task"] in CLICK_STEP:
        result["actions"] = {"gold": metrics.parse_actions(gold), "predicted": metrics.parse_actions(prediction or "")}
    paths = image_paths(sample)
    if paths:
        shown = images[paths[-1]]  # the screen the answer refers to: the current (last) one
        if isinstance(shown, str):
            result["image_error"] = shown
        else:
            data, w, h = shown
            result.update(image=data, width=w, height=h, svg=[scale(d, w, h) for d in drawn])
    return result


def scale(drawing, w, h):
    """0-1000 coordinates to thumbnail pixels."""
    xy = [v * (w if i % 2 == 0 else h) / 1000 for i, v in enumerate(drawing["xy"])]
    if drawing["shape"] == "box":
        x1, y1, x2, y2 = xy
        xy = [min(x1, x2), min(y1, y2), abs(x2 - x1), abs(y2 - y1)]
    return dict(drawing, xy=[round(v, 1) for v in xy])


def write_report(path, report, scored, image_paths, elements, gallery, sources=()):
    """Render the page. `report` and `scored` are score()'s report and per-sample list;
    `image_paths(sample)` gives a sample's image files; at most `gallery` failures and gallery // 4 successes
    are shown (evenly spread over the data)."""
    wrong = [r for r in scored if not is_right(r)]
    right = [r for r in scored if is_right(r)]
    shown_wrong, shown_right = evenly(wrong, gallery), evenly(right, gallery // 4)
    questions = defaultdict(list)
    for row in scored:
        questions[row["task"]].append(question_of(row["sample"]))
    templates = {task: template_around(texts) for task, texts in questions.items()}
    shown = shown_wrong + shown_right
    images = thumbnails(paths[-1] for paths in map(image_paths, (r["sample"] for r in shown)) if paths)
    cards = [card(r, image_paths, images, templates[r["task"]]) for r in shown]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("report.html").render(
        report=report, breakdowns=breakdowns(scored, elements), cards=cards, primary=PRIMARY,
        n_wrong=len(wrong), n_right=len(right), shown_wrong=len(shown_wrong), shown_right=len(shown_right),
        gallery=gallery, gold_colour=GOLD, predicted_colour=PREDICTED, sources=sources, tasks=sorted(report))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(html)
    os.replace(tmp, path)
