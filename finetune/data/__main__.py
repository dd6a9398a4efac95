"""Data tools: `python -m finetune.data check DATA ...` (more subcommands: see --help)."""
import argparse
import os
import sys

from .records import DEFAULT_MAX_IMAGE_PIXELS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m finetune.data")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate data files and print token statistics")
    check.add_argument("data", nargs="+", help="JSON or JSONL files in the conversation format, each with an optional "
                                               "weight as training takes them (a.jsonl:0.3 b.jsonl:2, or a.jsonl:0.3,"
                                               "b.jsonl:2): the fraction of the file used per epoch")
    check.add_argument("--model", help="model folder (tokenizer and slice settings); default: the released "
                                       "MiniCPM-Llama3-V 2.5 settings with the Llama-3 tokenizer")
    check.add_argument("--model_max_length", type=int, default=2048)
    check.add_argument("--max_slice_nums", type=int, help="override the model's slice_config")
    check.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    check.add_argument("--overlong", choices=["skip", "truncate"], default="skip")
    check.add_argument("--headers_only", action="store_true", help="read image headers only (faster; misses truncation)")
    check.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    synth = sub.add_parser("synth", help="write synthetic GUICourse-style data (answers only in the screenshots)")
    synth.add_argument("out_dir")
    synth.add_argument("--n", type=int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--blank", action="store_true", help="blank screenshots (a control that cannot see the answer)")

    convert = sub.add_parser("convert-guicourse", help="GUICourse release (JSON + parquet) -> conversation JSONL")
    convert.add_argument("raw_dir")
    convert.add_argument("out_dir")
    convert.add_argument("--subsets", default="guienv,guiact-web-single,guiact-web-multi,guiact-smartphone,guichat")
    convert.add_argument("--coords", choices=["paren", "space"], default="paren",
                         help="<box>(x1,y1),(x2,y2)</box> (MiniCPM-V finetune style) or <box>x1 y1 x2 y2</box>")
    convert.add_argument("--split", choices=["train", "test"], default="train")

    spot = sub.add_parser("convert-screenspot", help="ScreenSpot, ScreenSpot-v2 or ScreenSpot-Pro (told by its files) "
                                                     "-> conversation JSONL for predict and evaluate")
    spot.add_argument("raw_dir", help="the release as downloaded (annotation JSON files and the images folder)")
    spot.add_argument("out_dir")
    spot.add_argument("--coords", choices=["paren", "space"], default="paren",
                      help="<box>(x1,y1),(x2,y2)</box> (MiniCPM-V finetune style) or <box>x1 y1 x2 y2</box>")

    args = parser.parse_args(argv)
    if args.command == "check":
        from .check import run_check
        return run_check(args)
    if args.command == "convert-guicourse":
        from .guicourse import SUBSETS, ReleaseError, convert
        subsets = args.subsets.split(",")
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown:
            parser.error(f"unknown subsets {unknown}; choose from {', '.join(SUBSETS)}")
        try:
            report = convert(args.raw_dir, args.out_dir, subsets, args.split, args.coords)
        except ReleaseError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for subset, r in report.items():
            drops = {k: v for k, v in r.items() if k not in ("file", "written", "dropped")}
            print(f"{subset}: {r.get('written', 0)} samples -> {r['file']}" + (f"; dropped {drops}" if drops else ""))
            for uid, why in r["dropped"][:10]:
                print(f"  dropped {uid}: {why}")
        return 0
    if args.command == "convert-screenspot":
        from .guicourse import ReleaseError
        from .screenspot import convert
        try:
            report = convert(args.raw_dir, args.out_dir, args.coords)
        except ReleaseError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        platforms = ", ".join(f"{p} {n}" for p, n in sorted(report["platforms"].items()))
        print(f"{report['benchmark']}: {report['written']} samples ({platforms}) -> {report['file']}"
              + (f"; dropped {len(report['dropped'])}" if report["dropped"] else ""))
        for where, why in report["dropped"][:10]:
            print(f"  dropped {where}: {why}")
        return 0
    if args.command == "synth":
        from .synth import write_synthetic
        print(f"wrote {args.n} samples to {write_synthetic(args.out_dir, args.n, args.seed, args.blank)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
