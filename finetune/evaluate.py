"""python -m finetune.evaluate --data TEST --predictions preds.jsonl [--elements FILE] [--json OUT]

Scores predictions with the GUICourse metrics (finetune.metrics). The task of a sample comes from its `type`
(GUIAct: web-single, web-multi, smartphone), else from `bbox2text` / `text2bbox` in its id (GUIEnv), else it
is free text (EM, F1). The gold answer is the sample's last assistant turn. `--elements` is a JSONL of
{"id", "image_size": [w, h], "elements": [{"id", "box": [x1, y1, x2, y2] pixels}]} per GUIAct sample (written
by the GUICourse conversion); without it, clicks are judged by the box rule in finetune.metrics._box_hit.
"""
import json
from collections import defaultdict

from . import metrics
from .cli import Parser, UserError, input_file, model_folder, output_file, run

# The paper's final MiniCPM-GUI (Table 3, GUIAct; Table 6 last row, GUIEnv), in percent.
PAPER = {"web-single": {"type_em": 91.8, "click_acc": 74.9, "step_sr": 70.6},
         "web-multi": {"type_em": 67.0, "click_acc": 45.4, "step_sr": 47.5},
         "smartphone": {"type_em": 71.7, "click_acc": 44.7, "step_sr": 53.3},
         "bbox2text": {"em": 44.12, "f1": 64.78},
         "text2bbox": {"iou@0.2": 68.02, "iou@0.5": 47.96, "iou@0.7": 23.28}}
CLICK_STEP = {"web-single": ["click"], "web-multi": ["click"], "smartphone": ["tap"]}


def task_of(sample):
    if sample.get("type") in CLICK_STEP:
        return sample["type"]
    sample_id = str(sample.get("id", ""))
    for task in ("bbox2text", "text2bbox"):
        if task in sample_id:
            return task
    return "text"


METRICS = {"bbox2text": ("em", "f1"), "text": ("em", "f1"), "text2bbox": ("iou@0.2", "iou@0.5", "iou@0.7", "iou@0.9"),
           **{t: ("type_em", "step_sr", "action_score") for t in CLICK_STEP}}


def score_sample(task, prediction, gold, elements=None):
    """Metric values of one sample, in [0, 1]; raises metrics.Unparseable."""
    if task in ("bbox2text", "text"):
        return {"em": float(prediction == gold), "f1": metrics.f1(prediction, gold)}
    if task == "text2bbox":
        score = metrics.grounding_score(prediction, gold)
        return {f"iou@{t}": float(score > t) for t in (0.2, 0.5, 0.7, 0.9)}
    step = metrics.score_step(prediction, gold, elements and elements["elements"], elements and elements["image_size"])
    return {"type_em": float(step["type_em"]), "step_sr": float(step["step_success"]),
            "action_score": step["action_score"]}


def evaluate(samples, predictions, elements=None):
    """Per task: each metric's mean in percent (an unscored sample fails every metric), Cli.Acc = StepSR over
    steps whose gold is a single click (web) or tap (smartphone), and the counts of scored, unparseable,
    missing and failed predictions."""
    elements = elements or {}
    sums, counts = defaultdict(lambda: defaultdict(float)), defaultdict(lambda: defaultdict(int))
    for sample in samples:
        task, sample_id = task_of(sample), sample.get("id")
        gold = sample["conversations"][-1]["content"].strip()
        entry, values = predictions.get(sample_id), {}
        counts[task]["samples"] += 1
        if entry is None or "prediction" not in entry:
            counts[task]["missing" if entry is None else "failed"] += 1
        else:
            try:
                values = score_sample(task, entry["prediction"].strip(), gold, elements.get(sample_id))
            except metrics.Unparseable:
                counts[task]["unparseable"] += 1
        for key in METRICS[task]:
            sums[task][key] += values.get(key, 0.0)
        if task in CLICK_STEP and [a[0] for a in metrics.parse_actions(gold)] == CLICK_STEP[task]:
            sums[task]["click_acc"] += values.get("step_sr", 0.0)
            counts[task]["click_steps"] += 1
    report = {}
    for task, task_sums in sums.items():
        c = counts[task]
        scores = {k: 100 * v / (c["click_steps"] if k == "click_acc" else c["samples"]) for k, v in task_sums.items()}
        report[task] = {"scores": scores, "counts": dict(c), "paper": PAPER.get(task)}
    return report


def print_table(report):
    for task, r in sorted(report.items()):
        c = r["counts"]
        print(f"\n{task}: {c['samples']} samples, {c.get('unparseable', 0)} unparseable, "
              f"{c.get('missing', 0)} without prediction, {c.get('failed', 0)} failed to predict")
        print(f"  {'metric':14}{'ours':>8}{'paper':>8}")
        for key, value in r["scores"].items():
            paper = (r["paper"] or {}).get(key)
            print(f"  {key:14}{value:8.2f}{'' if paper is None else f'{paper:8.2f}':>8}")
    step = [r["scores"]["step_sr"] for t, r in report.items() if t in CLICK_STEP]
    if step:
        print(f"\nmean StepSR over GUIAct sets: {sum(step) / len(step):.2f} (paper: MiniCPM-GUI 57.1)")


def record_scores(folder, data, report):
    """The report's scores into the checkpoint's model card (finetune.model_card)."""
    from .model_card import add_evaluation
    rows = [(task, metric, value, r["counts"]["samples"]) for task, r in sorted(report.items())
            for metric, value in r["scores"].items()]
    if not add_evaluation(folder, data, rows):
        raise UserError(f"--model_card {folder}: no model card of this toolkit there (README.md); give a checkpoint "
                        "folder that finetune.py or finetune.merge_lora wrote")
    print(f"scores added to {folder}/README.md")


def main(argv=None):
    parser = Parser(prog="python -m finetune.evaluate", description=__doc__)
    parser.add_argument("--data", required=True, help="the test data the predictions were made for")
    parser.add_argument("--predictions", required=True, help="JSONL written by python -m finetune.predict")
    parser.add_argument("--elements", help="candidate elements per GUIAct sample (JSONL, from convert-guicourse)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--model_card", metavar="CHECKPOINT", help="add the scores to this checkpoint's model card")
    args = parser.parse_args(argv)
    for flag, path in (("--data", args.data), ("--predictions", args.predictions), ("--elements", args.elements)):
        if path:
            input_file(path, flag)
    if args.json:
        output_file(args.json, "--json")
    if args.model_card:
        model_folder(args.model_card, "--model_card")
    from .data.records import RecordFile, read_jsonl
    records = RecordFile(args.data)
    samples = [records.record(i) for i in range(len(records))]
    predictions = {p["id"]: p for p in read_jsonl(args.predictions)}
    elements = {e["id"]: e for e in read_jsonl(args.elements)} if args.elements else None
    report = evaluate(samples, predictions, elements)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.model_card:
        record_scores(args.model_card, args.data, report)
    return 0


if __name__ == "__main__":
    run(main)
