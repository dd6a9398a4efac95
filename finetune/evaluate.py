"""python -m finetune.evaluate --data TEST[,MORE] --predictions preds.jsonl [--elements FILE] [--json OUT] [--report PAGE.html]

Scores predictions as each benchmark does. The task of a sample comes from its `meta.benchmark` (ScreenSpot,
ScreenSpot-v2, ScreenSpot-Pro from `python -m finetune.data convert-screenspot`: finetune.screenspot_metrics), else
its `type` (GUIAct: web-single, web-multi, smartphone), else `bbox2text` / `text2bbox` in its id (GUIEnv), else it
is free text (EM, F1); GUICourse tasks use finetune.metrics. The gold answer is the sample's last assistant turn.
With several data files, predictions are matched by their `source` file's name and id, and the report repeats per
file. `--elements` is a JSONL of {"id", "image_size": [w, h], "elements": [{"id", "box": [x1, y1, x2, y2] pixels}]}
per GUIAct sample (written by the GUICourse conversion); without it, clicks are judged by the box rule in
finetune.metrics._box_hit.
"""
import json
import os
from collections import defaultdict

from . import metrics, screenspot_metrics
from .cli import Parser, UserError, input_file, model_folder, output_file, run

# The paper's final MiniCPM-GUI (Table 3, GUIAct; Table 6 last row, GUIEnv), in percent.
PAPER = {"web-single": {"type_em": 91.8, "click_acc": 74.9, "step_sr": 70.6},
         "web-multi": {"type_em": 67.0, "click_acc": 45.4, "step_sr": 47.5},
         "smartphone": {"type_em": 71.7, "click_acc": 44.7, "step_sr": 53.3},
         "bbox2text": {"em": 44.12, "f1": 64.78},
         "text2bbox": {"iou@0.2": 68.02, "iou@0.5": 47.96, "iou@0.7": 23.28}}
CLICK_STEP = {"web-single": ["click"], "web-multi": ["click"], "smartphone": ["tap"]}


def task_of(sample):
    benchmark = (sample.get("meta") or {}).get("benchmark")
    if benchmark in screenspot_metrics.BENCHMARKS:
        return benchmark
    if sample.get("type") in CLICK_STEP:
        return sample["type"]
    sample_id = str(sample.get("id", ""))
    for task in ("bbox2text", "text2bbox"):
        if task in sample_id:
            return task
    return "text"


METRICS = {"bbox2text": ("em", "f1"), "text": ("em", "f1"), "text2bbox": ("iou@0.2", "iou@0.5", "iou@0.7", "iou@0.9"),
           **{t: ("type_em", "step_sr", "action_score") for t in CLICK_STEP}}


def score_sample(task, prediction, gold, elements=None, meta=None):
    """Metric values of one sample, in [0, 1]; raises metrics.Unparseable."""
    if task in screenspot_metrics.BENCHMARKS:
        return {"hit": screenspot_metrics.hit(prediction, gold, meta)}
    if task in ("bbox2text", "text"):
        return {"em": float(prediction == gold), "f1": metrics.f1(prediction, gold)}
    if task == "text2bbox":
        score = metrics.grounding_score(prediction, gold)
        return {f"iou@{t}": float(score > t) for t in (0.2, 0.5, 0.7, 0.9)}
    step = metrics.score_step(prediction, gold, elements and elements["elements"], elements and elements["image_size"])
    return {"type_em": float(step["type_em"]), "step_sr": float(step["step_success"]),
            "action_score": step["action_score"]}


def evaluate(samples, predictions, elements=None, per_sample=None):
    """`score` of the samples with their predictions ({id: prediction row})."""
    return score([(sample, predictions.get(sample.get("id"))) for sample in samples], elements, per_sample)


def score(pairs, elements=None, per_sample=None):
    """(sample, prediction row or None) pairs -> per task: each metric's mean in percent (an unscored sample fails
    every metric), Cli.Acc = StepSR over steps whose gold is a single click (web) or tap (smartphone), the ScreenSpot
    breakdowns (finetune.screenspot_metrics), and the counts of scored, unparseable, missing and failed predictions.
    `per_sample`, a list, receives each sample's scoring (for the report page)."""
    elements = elements or {}
    sums, counts = defaultdict(lambda: defaultdict(float)), defaultdict(lambda: defaultdict(int))
    grounding = defaultdict(list)  # ScreenSpot benchmark -> (meta, hit) per sample
    for sample, entry in pairs:
        task, sample_id = task_of(sample), sample.get("id")
        gold = sample["conversations"][-1]["content"].strip()
        values, status = {}, "scored"
        counts[task]["samples"] += 1
        if entry is None or "prediction" not in entry:
            status = "missing" if entry is None else "failed"
            counts[task][status] += 1
        else:
            try:
                values = score_sample(task, entry["prediction"].strip(), gold, elements.get(sample_id),
                                      sample.get("meta"))
            except metrics.Unparseable as e:
                counts[task]["unparseable"] += 1
                status = f"unparseable: {e}"
        if per_sample is not None:
            per_sample.append({"sample": sample, "task": task, "values": values, "status": status, "entry": entry})
        if task in screenspot_metrics.BENCHMARKS:
            grounding[task].append((sample["meta"], values.get("hit", 0.0)))
            continue
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
    for benchmark, rows in grounding.items():
        report[benchmark] = dict(screenspot_metrics.summarise(benchmark, rows), counts=dict(counts[benchmark]))
    return report


def print_table(report):
    for task, r in sorted(report.items()):
        c = r["counts"]
        print(f"\n{task}: {c['samples']} samples, {c.get('unparseable', 0)} unparseable, "
              f"{c.get('missing', 0)} without prediction, {c.get('failed', 0)} failed to predict")
        columns = r.get("references") or {"paper": r.get("paper") or {}}  # GUICourse: the paper's MiniCPM-GUI
        width = max([14] + [len(k) + 2 for k in r["scores"]])
        widths = {name: max(8, len(name) + 2) for name in columns}
        print(f"  {'metric':{width}}{'ours':>8}" + "".join(f"{name:>{widths[name]}}" for name in columns))
        for key, value in r["scores"].items():
            cells = "".join(f"{'' if (v := columns[n].get(key)) is None else f'{v:.2f}':>{widths[n]}}" for n in columns)
            print(f"  {key:{width}}{value:8.2f}{cells}".rstrip())
        if r.get("source"):
            print(f"  references: {r['source']}")
    step = [r["scores"]["step_sr"] for t, r in report.items() if t in CLICK_STEP]
    if step:
        print(f"\nmean StepSR over GUIAct sets: {sum(step) / len(step):.2f} (paper: MiniCPM-GUI 57.1)")


def pairs_by_source(files, prediction_rows):
    """{data file name: [(sample, its prediction row or None)]}; a row is matched by its `source` file's name and
    its id (rows written without a source match by id)."""
    from .data.mixing import source_key
    from .data.records import RecordFile
    predictions = {source_key(row): row for row in prediction_rows}
    out = {}
    for path in files:
        name, records = os.path.basename(path), RecordFile(path)
        samples = [records.record(i) for i in range(len(records))]
        out[name] = [(s, predictions.get((name, s.get("id", i)), predictions.get(("", s.get("id", i)))))
                     for i, s in enumerate(samples)]
    return out


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
    parser.add_argument("--data", required=True, help="the test data the predictions were made for, several files "
                                                      "separated by commas")
    parser.add_argument("--predictions", required=True, help="JSONL written by python -m finetune.predict")
    parser.add_argument("--elements", help="candidate elements per GUIAct sample (JSONL, from convert-guicourse)")
    parser.add_argument("--json", help="write the report here (with several data files, also each one's under "
                                       "\"by_source\")")
    parser.add_argument("--report", help="write the report page here (HTML: tables, screenshots with the boxes)")
    parser.add_argument("--report_gallery", type=int, default=500,
                        help="the page shows at most this many wrong samples and a quarter as many right ones")
    parser.add_argument("--model_card", metavar="CHECKPOINT", help="add the scores to this checkpoint's model card")
    args = parser.parse_args(argv)
    from .data.mixing import data_files
    from .data.records import read_jsonl
    try:
        files = data_files(args.data)
    except ValueError as e:
        raise UserError(f"--data: {e}") from None
    for flag, paths in (("--data", files), ("--predictions", [args.predictions]), ("--elements", [args.elements])):
        for path in paths:
            if path:
                input_file(path, flag)
    if args.json:
        output_file(args.json, "--json")
    if args.model_card:
        model_folder(args.model_card, "--model_card")
    by_source = pairs_by_source(files, read_jsonl(args.predictions))
    elements = {e["id"]: e for e in read_jsonl(args.elements)} if args.elements else None
    scored = [] if args.report else None
    report = score([pair for pairs in by_source.values() for pair in pairs], elements, per_sample=scored)
    print_table(report)
    if len(by_source) > 1:
        report["by_source"] = {name: score(pairs, elements) for name, pairs in by_source.items()}
        for name, source_report in report["by_source"].items():
            print(f"\n=== {name}")
            print_table(source_report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.report:
        from .report import write_report
        from .data.records import RecordFile
        owner = {id(sample): records for records, pairs in zip(map(RecordFile, files), by_source.values())
                 for sample, _ in pairs}
        write_report(args.report, report, scored, lambda sample: owner[id(sample)].image_paths(sample), elements,
                     args.report_gallery, sources=[os.path.abspath(f) for f in files] + [os.path.abspath(args.predictions)])
        print(f"\nreport page: {args.report}")
    if args.model_card:
        record_scores(args.model_card, args.data, report)
    return 0


if __name__ == "__main__":
    run(main)
