"""Generation metrics during training: at every evaluation, held-out samples greedily decoded and scored with the
task metrics (finetune.evaluate: GUICourse tasks, ScreenSpot family), logged beside the eval loss as
`eval_gen_<task>_<metric>` in percent (console, TensorBoard, trainer_state.json) and usable as
--metric_for_best_model.

--eval_generate_samples N (default 32 whenever the run evaluates; 0: off): a falling eval loss does not say that
grounding improved, and 32 samples cost seconds per evaluation. The same N samples every time (spread evenly over
the eval data), so the curve compares like with like; each rank decodes its share in batches of
--per_device_eval_batch_size through predict's path (`finetune.predict.predict_rows`, the code of `python -m
finetune.predict`), at most as many new tokens as the longest gold answer needs plus 16; the rows are gathered so
that every rank holds the same metrics. Compiled blocks run eagerly meanwhile (decoding shapes would recompile them).
Not under DeepSpeed ZeRO-3, where every rank must run the same forward passes in step while each decodes samples of
its own.
"""
import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from .evaluate import score
from .screenspot_metrics import BENCHMARKS
from .predict import predict_rows

logger = logging.getLogger(__name__)
DEFAULT_SAMPLES = 32
EXTRA_TOKENS = 16


def generation_samples(data_args, training_args):
    """How many samples to decode at each evaluation (0: none); refuses an explicit N under ZeRO-3."""
    n = data_args.eval_generate_samples
    evaluates = bool(data_args.eval_data_path) and training_args.eval_strategy != "no"
    if n is not None and n < 0:
        raise SystemExit(f"--eval_generate_samples must be >= 0, got {n}")
    if not evaluates or n == 0:
        return 0
    if is_deepspeed_zero3_enabled():
        if n is not None:
            raise SystemExit("--eval_generate_samples does not run under DeepSpeed ZeRO-3: generation there needs every "
                             "rank to run the same forward passes in step, while each decodes samples of its own. Use "
                             "ZeRO-2 (or no DeepSpeed) for generation metrics, or run python -m finetune.predict and "
                             "finetune.evaluate on a saved checkpoint")
        logger.warning("generation metrics are off under ZeRO-3 (every rank would have to decode in step); eval "
                       "loss only")
        return 0
    return DEFAULT_SAMPLES if n is None else n


class GenerationMetrics(TrainerCallback):
    """Decodes and scores `n` fixed eval samples after each evaluation; adds the metrics to the evaluation's and logs
    them."""

    def __init__(self, trainer, n):
        self.trainer = trainer
        dataset = trainer.eval_dataset
        pairs = np.unique(np.stack([dataset.entries["file"], dataset.entries["index"]], axis=1), axis=0)
        chosen = pairs[np.unique(np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int))]
        self.items = [(dataset.files[f], dataset.files[f].path, int(i), dataset.files[f].record(int(i)))
                      for f, i in chosen.tolist()]
        tokenizer = trainer.processing_class
        longest = max((len(tokenizer(record["conversations"][-1]["content"], add_special_tokens=False).input_ids)
                       for *_, record in self.items), default=0)
        self.max_new_tokens = longest + EXTRA_TOKENS
        logger.info("generation metrics: %d eval samples decoded at each evaluation (at most %d new tokens)",
                    len(self.items), self.max_new_tokens)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.items:  # no usable eval sample
            return
        start = time.perf_counter()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        mine = self.items[rank::world]
        was_training = model.training
        model.eval()
        try:
            with torch.compiler.set_stance("force_eager"):
                rows = [row for batch in predict_rows(model, self.trainer.processing_class, mine,
                                                      args.per_device_eval_batch_size, args.dataloader_num_workers,
                                                      max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
                        for row in batch]
        finally:
            model.train(was_training)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        by_key = {(row["source"], row["id"]): row for row in rows}
        pairs = [(record, by_key.get((source, record.get("id", index)))) for _, source, index, record in self.items]
        results = flatten(score(pairs))
        results["eval_gen_seconds"] = round(time.perf_counter() - start, 2)
        metrics.update(results)
        self.trainer.log(dict(results))


def flatten(report):
    """evaluate's report -> {eval_gen_<task>_<metric>: percent}: every GUICourse metric; for ScreenSpot benchmarks
    the accuracy over all samples (micro) and, where defined, the mean of the platform x type cells (macro)."""
    out = {}
    for task, r in sorted(report.items()):
        keys = [k for k in ("micro", "macro") if k in r["scores"]] if task in BENCHMARKS else list(r["scores"])
        out.update({f"eval_gen_{task}_{key}": round(r["scores"][key], 2) for key in keys})
    return out
