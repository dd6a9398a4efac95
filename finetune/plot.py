"""python -m finetune.plot OUTPUT_DIR [--smoothing W]

A run's training curves as PNG files in OUTPUT_DIR/plots/: training loss, learning rate, gradient norm,
evaluation loss and every other evaluation metric the run logged (eval_*), each raw and smoothed (the
exponential moving average TensorBoard draws, debiased). They are read from the Trainer's own log,
trainer_state.json in OUTPUT_DIR or in its newest checkpoint, whichever is further. finetune.finetune writes
them at the end of every run.
"""
import argparse
import json
import math
import os
import re
import sys

from .checkpoint import TRAINER_STATE, latest_complete_checkpoint

TITLES = {"loss": "training loss", "learning_rate": "learning rate", "grad_norm": "gradient norm",
          "eval_loss": "evaluation loss"}
NOT_CURVES = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_gen_seconds"}  # speed, not learning
UNSMOOTHED = {"learning_rate"}  # a schedule, not a measurement


def read_log_history(output_dir):
    """(path, log_history) of the trainer state in output_dir or its newest complete checkpoint, whichever
    has the higher global step."""
    candidates = [os.path.join(output_dir, TRAINER_STATE)]
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint:
        candidates.append(os.path.join(checkpoint, TRAINER_STATE))
    states = []
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                states.append((json.load(f), path))
    if not states:
        raise FileNotFoundError(f"no {TRAINER_STATE} in {output_dir} or its checkpoints: is it a training run's "
                                f"output folder?")
    state, path = max(states, key=lambda s: s[0].get("global_step", 0))
    return path, state.get("log_history", [])


def curves(log_history):
    """{key: (steps, values)} of every curve worth drawing, in the order first logged."""
    found = {}
    for entry in log_history:
        for key, value in entry.items():
            if (key in TITLES or key.startswith("eval_")) and key not in NOT_CURVES and \
                    isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = found.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(value)
    return found


def smooth(values, weight):
    """TensorBoard's smoothing: an exponential moving average, debiased so that it starts at the first value."""
    smoothed, last, total = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last, total = last * weight + (1 - weight) * value, total * weight + (1 - weight)
        smoothed.append(last / total if total else value)
    return smoothed


def default_smoothing(n):
    """Averages over about 4 % of the run (TensorBoard's 0.6 at least)."""
    return max(0.6, 1 - 25 / n)


def write_plots(output_dir, smoothing=None):
    """One PNG per curve in output_dir/plots/. Returns {file name: {"raw": points, "smoothed": points}}, counted
    from the drawn lines, or None (after one notice) when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("training curves not drawn: matplotlib is missing (pip install matplotlib, then "
              f"python -m finetune.plot {output_dir})")
        return None
    source, log_history = read_log_history(output_dir)
    folder = os.path.join(output_dir, "plots")
    os.makedirs(folder, exist_ok=True)
    drawn = {}
    for key, (steps, values) in curves(log_history).items():
        figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
        axes = figure.subplots()
        raw, = axes.plot(steps, values, color="C0", alpha=0.35 if key not in UNSMOOTHED else 1.0, linewidth=1,
                         marker="o" if len(steps) <= 50 else None, markersize=3, label="raw")
        counts = {"raw": len(raw.get_xdata())}
        if key not in UNSMOOTHED:
            weight = default_smoothing(len(values)) if smoothing is None else smoothing
            line, = axes.plot(steps, smooth(values, weight), color="C0", linewidth=2,
                              label=f"smoothed (moving average, {weight:.2f})")
            counts["smoothed"] = len(line.get_xdata())
            axes.legend()
        axes.set(title=TITLES.get(key, key), xlabel="step", ylabel=key)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        figure.text(0.01, 0.005, os.path.relpath(source, output_dir), fontsize=7, color="grey")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"
        figure.savefig(os.path.join(folder, name))
        drawn[name] = counts
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a training run's output folder (--output_dir)")
    parser.add_argument("--smoothing", type=float, help="TensorBoard's smoothing weight in [0, 1) (default: "
                                                        "about 4 %% of the run, at least 0.6)")
    args = parser.parse_args(argv)
    if args.smoothing is not None and not 0 <= args.smoothing < 1:
        parser.error("--smoothing must be in [0, 1)")
    try:
        drawn = write_plots(args.output_dir, args.smoothing)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if drawn is None:
        return 1
    folder = os.path.join(args.output_dir, "plots")
    print(f"{len(drawn)} plots in {folder}:")
    for name, counts in drawn.items():
        print(f"  {name} ({counts['raw']} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
