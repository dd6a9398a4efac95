"""ScreenSpot, ScreenSpot-v2 and ScreenSpot-Pro scoring as the benchmarks' own scripts score (pure functions, no torch).

A prediction is right when the point it clicks (finetune.metrics.click_point: a <point>, the centre of a <box> in
either coordinate style, or a bare `(x,y)`) lies inside the gold box or on its edge, both in 0-1000 of the image;
the gold box is the sample's `meta.bbox_px` divided by `meta.image_size`, unrounded, as the scripts divide it.
Unparseable, failed and missing predictions are wrong. Reported, in percent:
- ScreenSpot and v2: each platform x ui_type cell, each platform, each ui_type, `micro` (all samples) and `macro`
  (the mean of the platform x ui_type cells: what SeeClick's table calls the average);
- ScreenSpot-Pro: each group x ui_type cell, each group, each ui_type and `micro` (the paper's average).
"""
from collections import defaultdict

from .metrics import click_point, parse_boxes, point_in_box

BENCHMARKS = ("screenspot", "screenspot-v2", "screenspot-pro")
PLATFORM_ORDER = ("mobile", "desktop", "web")
UI_TYPES = ("text", "icon")

# Published accuracies of reference models, in percent, under the keys of `summarise`. ScreenSpot-v2 has none here:
# no figure of its paper (OS-Atlas) could be checked against the paper's own text.
REFERENCES = {
    "screenspot": {
        "source": "SeeClick (Cheng et al., ACL 2024), ScreenSpot results table, as given in github.com/njucckevin/"
                  "SeeClick readme.md; its Average is the mean of the six platform x type cells (macro)",
        "models": {name: dict(zip(("mobile/text", "mobile/icon", "desktop/text", "desktop/icon", "web/text", "web/icon",
                                   "macro"), values)) for name, values in {
            "SeeClick": (78.0, 52.0, 72.2, 30.0, 55.7, 32.5, 53.4),
            "CogAgent": (67.0, 24.0, 74.2, 20.0, 70.4, 28.6, 47.4),
            "GPT-4V": (22.6, 24.5, 20.2, 11.8, 9.2, 8.8, 16.2),
            "Qwen-VL": (9.5, 4.8, 5.7, 5.0, 3.5, 2.4, 5.2)}.items()},
    },
    "screenspot-pro": {
        "source": "ScreenSpot-Pro (Li et al., 2025, arXiv 2504.07981), main results table, average columns (text, "
                  "icon, all samples); the abstract's best model, 18.9 %",
        "models": {name: dict(zip(("text", "icon", "micro"), values)) for name, values in {
            "OS-Atlas-7B": (28.1, 4.0, 18.9),
            "CogAgent-18B": (12.0, 0.8, 7.7),
            "Qwen2-VL-7B": (2.5, 0.2, 1.6),
            "SeeClick": (1.8, 0.0, 1.1)}.items()},
    },
}


def gold_box(meta, gold_text):
    """The gold box in 0-1000 of the image: from the pixel box and image size, else the answer's <box>."""
    if meta and meta.get("bbox_px") and meta.get("image_size"):
        w, h = meta["image_size"]
        return [1000 * v / d for v, d in zip(meta["bbox_px"], (w, h, w, h))]
    return parse_boxes(gold_text)[0]


def hit(prediction, gold_text, meta=None):
    """1.0 when the predicted click lies in the gold box (edges included), else 0.0; raises metrics.Unparseable."""
    return float(point_in_box(click_point(prediction), gold_box(meta, gold_text)))


def summarise(benchmark, rows):
    """rows: (meta, hit) per sample, hit 0.0 for any unscored one -> {"scores": {key: percent}, "references",
    "source"}, keys in reading order (see the module docstring)."""
    by = "group" if benchmark == "screenspot-pro" else "platform"
    cells, totals = defaultdict(list), defaultdict(list)
    for meta, value in rows:
        cells[(meta[by], meta["ui_type"])].append(value)
        totals[meta[by]].append(value)
        totals[meta["ui_type"]].append(value)
    order = [p for p in PLATFORM_ORDER if p in totals] if by == "platform" else []
    order += sorted({key[0] for key in cells} - set(order))
    ui_types = [t for t in UI_TYPES if t in totals] + sorted({key[1] for key in cells} - set(UI_TYPES))
    percent = lambda values: 100 * sum(values) / len(values)  # noqa: E731
    scores = {}
    for name in order:
        scores.update({f"{name}/{t}": percent(cells[(name, t)]) for t in ui_types if (name, t) in cells})
        scores[name] = percent(totals[name])
    scores.update({t: percent(totals[t]) for t in ui_types})
    scores["micro"] = percent([value for _, value in rows]) if rows else 0.0
    if by == "platform":
        scores["macro"] = sum(percent(v) for v in cells.values()) / len(cells) if cells else 0.0
    reference = REFERENCES.get(benchmark, {})
    return {"scores": scores, "references": reference.get("models", {}), "source": reference.get("source")}
