"""GUICourse metrics as pure functions over strings (no torch): GUIEnv OCR / grounding and GUIAct actions,
as the official scorer defines them (research notes: guicourse.md section 2). Coordinates are 0-1000 and
parse in both styles: `<box>(x1,y1),(x2,y2)</box>` / `<point>(x,y)</point>` and `<box>x1 y1 x2 y2</box>` /
`<point>x y</point>`.
"""
import collections
import math
import re
import string

BOX_RE = re.compile(r"<box>(.*?)</box>", re.S)
POINT_RE = re.compile(r"<point>(.*?)</point>", re.S)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
BARE_PAIR_RE = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
ACTIONS = ("click", "hover", "input", "enter", "scroll", "select_text", "copy", "answer", "select", "tap", "swipe")
TAP_THRESHOLD = 0.14  # normalised distance (AITW's)


class Unparseable(ValueError):
    pass


# ---- text -----------------------------------------------------------------------------------------------
def normalize_answer(text):
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction, gold):
    """SQuAD token F1."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- geometry ---------------------------------------------------------------------------------------------
def _numbers(inner, count, what):
    values = [float(v) for v in NUMBER_RE.findall(inner)]
    if len(values) != count:
        raise Unparseable(f"{what} needs {count} numbers: {inner!r}")
    return values


def parse_boxes(text):
    """Every <box> in the text as (x1, y1, x2, y2), 0-1000."""
    return [tuple(_numbers(inner, 4, "<box>")) for inner in BOX_RE.findall(text)]


def parse_points(text):
    return [tuple(_numbers(inner, 2, "<point>")) for inner in POINT_RE.findall(text)]


def iou(a, b):
    """Intersection over union of two (x1, y1, x2, y2) boxes (corner order not assumed)."""
    ax1, ax2, ay1, ay2 = min(a[0], a[2]), max(a[0], a[2]), min(a[1], a[3]), max(a[1], a[3])
    bx1, bx2, by1, by2 = min(b[0], b[2]), max(b[0], b[2]), min(b[1], b[3]), max(b[1], b[3])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def grounding_score(prediction, gold):
    """text2bbox item score: mean over predicted boxes of the best IoU with a gold box (0 without boxes)."""
    predicted, golds = parse_boxes(prediction), parse_boxes(gold)
    if not predicted:
        raise Unparseable("no <box> in the prediction")
    return sum(max((iou(p, g) for g in golds), default=0.0) for p in predicted) / len(predicted)


# ---- GUIAct actions ---------------------------------------------------------------------------------------
def parse_actions(text):
    """[(name, argument text)] from the lines after 'actions:'; a line with no known action is an answer."""
    body = text.split("actions:", 1)[1] if "actions:" in text else text
    actions = []
    for line in body.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        name, _, argument = line.partition(",")
        name = name.strip().lower()
        if name in ACTIONS:
            actions.append((name, argument.strip()))
        else:
            actions.append(("answer", line))
    return actions


def snap_to_element(box, elements, image_size):
    """The candidate element for a 0-1000 box: highest IoU if above 0.1, else the one nearest the centre."""
    w, h = image_size
    pixels = (box[0] * w / 1000, box[1] * h / 1000, box[2] * w / 1000, box[3] * h / 1000)
    best = max(elements, key=lambda e: iou(pixels, e["box"]))
    if iou(pixels, best["box"]) > 0.1:
        return best["id"]
    cx, cy = (pixels[0] + pixels[2]) / 2, (pixels[1] + pixels[3]) / 2

    def distance(e):
        x1, y1, x2, y2 = e["box"]
        return math.hypot(max(x1 - cx, 0, cx - x2), max(y1 - cy, 0, cy - y2))
    return min(elements, key=distance)["id"]


def _box_hit(pred_box, gold_box, elements, image_size):
    """Click/hover/select target: the same candidate element when elements are given, otherwise the
    predicted box's centre inside the gold box."""
    if elements:
        return snap_to_element(pred_box, elements, image_size) == snap_to_element(gold_box, elements, image_size)
    return point_in_box(box_centre(pred_box), gold_box)


def box_centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def point_in_box(point, box):
    """The grounding benchmarks' hit rule: inside the box or on its edge (corner order not assumed)."""
    return min(box[0], box[2]) <= point[0] <= max(box[0], box[2]) and min(box[1], box[3]) <= point[1] <= max(box[1], box[3])


def bare_shape(text):
    """An answer without tags: a bare `(x,y)` as ("point", [x, y]), `(x1,y1),(x2,y2)` as ("box", [x1, y1, x2, y2]);
    None for anything else."""
    pairs = BARE_PAIR_RE.findall(text)
    if len(pairs) not in (1, 2):
        return None
    return "point" if len(pairs) == 1 else "box", [float(v) for pair in pairs for v in pair]


def click_point(text):
    """Where a grounding answer clicks: its first <point>, else the centre of its first <box> (either style), else
    its bare point or the centre of its bare box. Raises Unparseable."""
    if BOX_RE.search(text) or POINT_RE.search(text):
        return _target_point(text)
    bare = bare_shape(text)
    if bare is None:
        raise Unparseable(f"no <point>, <box> or (x,y) in {text!r:.200}")
    shape, values = bare
    return tuple(values) if shape == "point" else box_centre(values)


def _direction(dx, dy):
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy >= 0 else "up"


def _scroll_direction(argument):
    values = dict(re.findall(r"(down|right)\s*(-?\d+(?:\.\d+)?)", argument))
    if not values:
        raise Unparseable(f"scroll without amounts: {argument!r}")
    return _direction(float(values.get("right", 0)), float(values.get("down", 0)))


def action_result(pred, gold, elements=None, image_size=None):
    """(score, success) of one predicted action against one gold action."""
    name, argument = gold
    if pred[0] != name:
        return 0.0, False
    p_arg = pred[1]
    if name in ("click", "hover") and not parse_boxes(argument):  # a click given as a point: as a tap
        return _tap_result(_first(parse_points(argument), "<point> in the gold"), _target_point(p_arg))
    if name in ("click", "hover"):
        g, p = parse_boxes(argument)[0], _first(parse_boxes(p_arg), "<box>")
        return iou(p, g), _box_hit(p, g, elements, image_size)
    if name == "select":
        g, p = parse_boxes(argument)[0], _first(parse_boxes(p_arg), "<box>")
        g_value, p_value = BOX_RE.sub("", argument).strip(" ,"), BOX_RE.sub("", p_arg).strip(" ,")
        value_f1 = f1(p_value, g_value)
        return (value_f1 + iou(p, g)) / 2, value_f1 > 0.5 and _box_hit(p, g, elements, image_size)
    if name == "tap":
        return _tap_result(parse_points(argument)[0], _first(parse_points(p_arg), "<point>"))
    if name in ("input", "answer"):
        score = f1(p_arg, argument)
        return score, score > 0.5
    if name == "select_text":
        g, p = parse_points(argument), parse_points(p_arg)
        if len(p) != 2:
            raise Unparseable(f"select_text needs two points: {p_arg!r}")
        score = iou((*g[0], *g[1]), (*p[0], *p[1]))
        return score, score > 0.5
    if name == "scroll":
        ok = _scroll_direction(p_arg) == _scroll_direction(argument)
        return float(ok), ok
    if name == "swipe":
        g, p = parse_points(argument), parse_points(p_arg)
        if len(p) != 2:
            raise Unparseable(f"swipe needs two points: {p_arg!r}")
        ok = _direction(p[1][0] - p[0][0], p[1][1] - p[0][1]) == _direction(g[1][0] - g[0][0], g[1][1] - g[0][1])
        return float(ok), ok
    return 1.0, True  # enter, copy: the name is the action


def _tap_result(gold, pred):
    """Score 1 - d / 0.14 and success d <= 0.14, d the distance in normalised (0-1) coordinates."""
    d = math.hypot((gold[0] - pred[0]) / 1000, (gold[1] - pred[1]) / 1000)
    return max(0.0, 1 - d / TAP_THRESHOLD), d <= TAP_THRESHOLD


def _target_point(text):
    """A predicted click target as a point: its <point>, else the centre of its <box>."""
    points, boxes = parse_points(text), parse_boxes(text)
    if points:
        return points[0]
    if boxes:
        return box_centre(boxes[0])
    raise Unparseable(f"no <point> or <box> in the predicted action: {text!r}")


def _first(values, what):
    if not values:
        raise Unparseable(f"no {what} in the predicted action")
    return values[0]


def score_step(prediction, gold, elements=None, image_size=None):
    """One GUIAct step: type EM, step success, mean action score. The i-th predicted action is compared with
    the i-th gold one; missing predictions fail, extra ones are ignored. Raises Unparseable."""
    gold_actions, pred_actions = parse_actions(gold), parse_actions(prediction)
    if not pred_actions:
        raise Unparseable("no action in the prediction")
    results = []
    for i, g in enumerate(gold_actions):
        results.append(action_result(pred_actions[i], g, elements, image_size) if i < len(pred_actions) else (0.0, False))
    return {"type_em": [a[0] for a in pred_actions] == [a[0] for a in gold_actions],
            "step_success": all(ok for _, ok in results),
            "action_score": sum(s for s, _ in results) / len(results)}
