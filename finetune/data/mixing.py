"""Several data files with a weight each: `guienv.jsonl:0.3,guiact.jsonl:1,guichat.jsonl:2`.

A weight is the fraction of a file's usable samples (those the data check keeps) used per epoch: 0.3 uses 30 % of
them, 2 uses each twice, 2.5 each twice and half of them a third time. The fractional part is drawn without
replacement from the run's seed, the same samples in every epoch; no weight means 1. Only a trailing `:number` is a
weight, so Windows paths (`C:\\data\\a.jsonl:0.5`) keep their drive; a path that exists as written is never split.
"""
import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

WEIGHT_RE = re.compile(r"^(?P<path>.+):(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class DataSource:
    path: str
    weight: float = 1.0
    weighted: bool = False  # the weight was written, not the default


def parse_sources(spec):
    """'a.jsonl:0.3,b.jsonl' (or a list of such strings) -> [DataSource]; raises ValueError for a bad weight."""
    sources = []
    for item in [spec] if isinstance(spec, str) else spec:
        for part in filter(None, (p.strip() for p in item.split(","))):
            match = WEIGHT_RE.match(part)
            if not match or os.path.exists(part):
                sources.append(DataSource(part))
                continue
            weight = float(match["weight"])
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"{part}: a data file's weight must be a number >= 0 (the fraction of it used per epoch)")
            sources.append(DataSource(match["path"], weight, True))
    return sources


def per_epoch(valid, weight):
    """Samples of a file used per epoch: its usable samples times its weight, rounded half up."""
    return int(math.floor(valid * weight + 0.5))


def source_counts(entries, sources):
    """[{"file", "weight", "usable", "per_epoch"}] per source, for the scan's entries (their `file` indexes sources)."""
    valid = np.bincount(entries["file"], minlength=len(sources)) if len(entries) else np.zeros(len(sources), int)
    return [{"file": s.path, "weight": s.weight, "usable": int(n), "per_epoch": per_epoch(int(n), s.weight)}
            for s, n in zip(sources, valid)]


def mix(entries, sources, seed):
    """The scan's entries -> one epoch's: each file's repeated whole times, plus the fraction drawn from the seed
    (each file from its own stream, so one file's weight never changes which samples another file contributes)."""
    parts = []
    for f, counts in enumerate(source_counts(entries, sources)):
        indices = np.flatnonzero(entries["file"] == f)
        whole, rest = divmod(counts["per_epoch"], counts["usable"]) if counts["usable"] else (0, 0)
        drawn = np.random.default_rng([seed, f]).choice(indices, rest, replace=False) if rest else indices[:0]
        parts += [indices] * whole + [np.sort(drawn)]
    return entries[np.concatenate(parts)] if parts else entries


def describe(rows, name="data"):
    """The table of `source_counts` rows that the check and the training log print."""
    width = max([len(os.path.basename(r["file"])) for r in rows] + [5])
    lines = [f"{name} per epoch (usable samples x weight):"]
    for r in rows:
        lines.append(f"  {os.path.basename(r['file']):{width}}  {r['usable']:>9} x {r['weight']:<6g} = {r['per_epoch']:>9}")
    total = sum(r["usable"] for r in rows), sum(r["per_epoch"] for r in rows)
    lines.append(f"  {'total':{width}}  {total[0]:>9}{'':12}{total[1]:>9}")
    return "\n".join(lines)


def apply_weights(result, sources, seed, name):
    """Mix a scan's entries in place for training and log each source's samples per epoch (several files or a
    weight given)."""
    rows = source_counts(result.entries, sources)
    result.entries = mix(result.entries, sources, seed)
    if len(sources) > 1 or any(s.weighted for s in sources):
        logger.warning(describe(rows, name))
    return rows


def data_files(spec):
    """The files of predict's and evaluate's `--data` (several separated by commas): weights are refused, and so are
    two files of one name (a prediction names its file by its name)."""
    sources = parse_sources(spec)
    if any(s.weighted for s in sources):
        raise ValueError(f"{spec}: weights choose a share of training data; predict and evaluate read every sample")
    names = [os.path.basename(s.path) for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"{spec}: two data files with the same name (predictions name their file by its name)")
    return [s.path for s in sources]


def source_key(row):
    """What identifies a prediction row's sample: (its data file's name, or "" in rows written without one; its id)."""
    return os.path.basename(row.get("source") or ""), row["id"]
