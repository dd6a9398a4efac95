"""`python -m finetune.data check`: validate data files, report problems by kind and token statistics."""
import json
import sys
import time
from collections import defaultdict

import numpy as np

from .mixing import describe, parse_sources, source_counts

CANDIDATE_LENGTHS = (1024, 2048, 3072, 4096, 6144, 8192)


def percentiles(values):
    if not len(values):
        return {}
    v = np.asarray(values)
    return {"count": int(len(v)), "min": int(v.min()), "p50": int(np.percentile(v, 50)), "p90": int(np.percentile(v, 90)),
            "p99": int(np.percentile(v, 99)), "max": int(v.max())}


def summarise(result, model_max_length, seconds, sources=None):
    stats = np.array(result.token_stats, dtype=np.int64).reshape(-1, 3)
    problems = defaultdict(list)
    for e in result.errors:
        problems[e.kind].append({"file": e.path, "index": e.index, "id": e.sample_id, "problem": str(e)})
    total = stats[:, 0]
    over = {n: round(float((total > n).mean()) * 100, 2) if len(total) else 0.0 for n in CANDIDATE_LENGTHS}
    fitting = [n for n in CANDIDATE_LENGTHS if over[n] <= 0.5]
    return {
        "files": [rf.path for rf in result.files], "samples": int(sum(len(rf) for rf in result.files)),
        "valid": int(len(stats)), "bad": len(result.errors), "seconds": round(seconds, 1),
        "model_max_length": model_max_length, "over_model_max_length": len(result.overlong),
        "truncated": int(result.truncated),
        "problems": dict(problems),
        "tokens": {"total": percentiles(total), "image": percentiles(stats[:, 1]), "supervised": percentiles(stats[:, 2])},
        "percent_over_length": over,
        "recommended_model_max_length": fitting[0] if fitting else None,
        "sources": source_counts(result.entries, sources or []),
    }


def sample_label(item):
    """A problem's sample as the report names it: its id, else its index (a line that is not JSON has no id)."""
    return str(item["id"]) if item["id"] is not None else f"sample {item['index']}"


def print_report(summary):
    s = summary
    print(f"\nchecked {s['samples']} samples in {len(s['files'])} file(s) in {s['seconds']} s: {s['valid']} valid, "
          f"{s['bad']} bad, {s['over_model_max_length']} over model_max_length {s['model_max_length']}"
          + (f", {s['truncated']} truncated at a turn boundary" if s["truncated"] else ""))
    if len(s["sources"]) > 1 or any(src["weight"] != 1 for src in s["sources"]):
        print("\n" + describe(s["sources"], "samples"))
    if s["problems"]:
        print("\nproblems:")
        for kind, items in sorted(s["problems"].items()):
            ids = ", ".join(sample_label(i) for i in items[:20]) + (" ..." if len(items) > 20 else "")
            print(f"  {kind} ({len(items)}): {ids}")
            for item in items[:3]:
                print(f"    {item['problem']}")
    print("\ntokens per sample (image tokens included)")
    print(f"  {'':12}{'count':>8}{'min':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for name, p in s["tokens"].items():
        if p:
            print(f"  {name:12}" + "".join(f"{p[k]:>8}" for k in ("count", "min", "p50", "p90", "p99", "max")))
    print("\nmodel_max_length  samples that would be skipped")
    for n, pct in s["percent_over_length"].items():
        print(f"  {n:>15}  {pct:6.2f} %")
    if s["recommended_model_max_length"]:
        print(f"\nrecommendation: --model_max_length {s['recommended_model_max_length']} "
              f"(the smallest that keeps at least 99.5 % of samples; memory grows with it)")


def run_check(args):
    from ..model import load_tokenizer, read_config
    from ..official_format import reference_model_dir
    from .conversation import ImageSettings
    from .dataset import ScanOptions, scan

    model_dir = args.model or reference_model_dir()
    tokenizer, config = load_tokenizer(model_dir), read_config(model_dir)
    settings = ImageSettings.from_config(config, args.max_slice_nums)
    options = ScanOptions(model_max_length=args.model_max_length, overlong=args.overlong,
                          max_image_pixels=args.max_image_pixels, decode_images=not args.headers_only,
                          workers=args.workers)
    try:
        sources = parse_sources(args.data)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    result = scan([s.path for s in sources], tokenizer, settings, options, progress=not args.json)
    summary = summarise(result, args.model_max_length, time.time() - start, sources)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_report(summary)
    return 1 if result.errors else 0
