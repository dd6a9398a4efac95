"""Data tools for MiniCPM-Llama3-V 2.5 finetuning: check data files before training, write synthetic GUI data,
convert the GUICourse release. `python -m finetune.data COMMAND --help` describes each command."""
import os

from ..cli import Parser, UserError, input_file, model_folder, output_folder, run
from .records import DEFAULT_MAX_IMAGE_PIXELS


def main(argv=None):
    parser = Parser(prog="python -m finetune.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate data files and print token statistics", description=(
        "Validate data files as training would (every sample: structure, images, lengths) and print the problems\n"
        "by kind, token statistics and a --model_max_length recommendation. Exit status 1 when a sample is bad."))
    check.add_argument("data", nargs="+", help="JSON or JSONL files in the conversation format, each with an optional "
                                               "weight as training takes them (a.jsonl:0.3 b.jsonl:2, or a.jsonl:0.3,"
                                               "b.jsonl:2): the fraction of the file used per epoch")
    check.add_argument("--model", help="model folder (tokenizer and slice settings); default: the released "
                                       "MiniCPM-Llama3-V 2.5 settings with the Llama-3 tokenizer")
    check.add_argument("--model_max_length", type=int, default=2048, help="samples longer than this (in tokens, "
                                                                         "image tokens included) are skipped")
    check.add_argument("--max_slice_nums", type=int, help="override the model's slice_config")
    check.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="larger images are bad samples")
    check.add_argument("--overlong", choices=["skip", "truncate"], default="skip",
                       help="what training does with samples over --model_max_length")
    check.add_argument("--headers_only", action="store_true", help="read image headers only (faster; misses truncation)")
    check.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes")
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    synth = sub.add_parser("synth", help="write synthetic GUICourse-style data (answers only in the screenshots)",
                           description="Write synthetic GUI screenshots and questions whose answers are only in the\n"
                                       "images (OUT_DIR/data.jsonl and the PNGs): a smoke test for training.")
    synth.add_argument("out_dir", help="folder to write (created if missing)")
    synth.add_argument("--n", type=int, default=1000, help="samples")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument("--blank", action="store_true", help="blank screenshots (a control that cannot see the answer)")

    convert = sub.add_parser("convert-guicourse", help="GUICourse release (JSON + parquet) -> conversation JSONL",
                             description="Convert the GUICourse release as downloaded (*_data.json + "
                                         "*_images.parquet in RAW_DIR)\ninto conversation JSONL files and PNG images "
                                         "in OUT_DIR; a rerun resumes.")
    convert.add_argument("raw_dir", help="folder with the release files")
    convert.add_argument("out_dir", help="folder to write (created if missing)")
    convert.add_argument("--subsets", default="guienv,guiact-web-single,guiact-web-multi,guiact-smartphone,guichat",
                         help="comma-separated")
    convert.add_argument("--coords", choices=["paren", "space"], default="paren",
                         help="<box>(x1,y1),(x2,y2)</box> (MiniCPM-V finetune style) or <box>x1 y1 x2 y2</box>")
    convert.add_argument("--split", choices=["train", "test"], default="train", help="which part of the release")

    spot = sub.add_parser("convert-screenspot", help="ScreenSpot, ScreenSpot-v2 or ScreenSpot-Pro (told by its files) "
                                                     "-> conversation JSONL for predict and evaluate")
    spot.add_argument("raw_dir", help="the release as downloaded (annotation JSON files and the images folder)")
    spot.add_argument("out_dir", help="folder to write the benchmark's JSONL to")
    spot.add_argument("--coords", choices=["paren", "space"], default="paren",
                      help="<box>(x1,y1),(x2,y2)</box> (MiniCPM-V finetune style) or <box>x1 y1 x2 y2</box>")

    args = parser.parse_args(argv)
    if args.command == "check":
        from .mixing import parse_sources
        try:
            sources = [s for arg in args.data for s in parse_sources(arg)]
        except ValueError as e:
            raise UserError(str(e)) from None
        for source in sources:
            input_file(source.path, "data file")
        if args.model:
            model_folder(args.model, "--model", adapters=False)
        from .check import run_check
        return run_check(args)
    if args.command == "convert-guicourse":
        from .guicourse import SUBSETS, convert
        subsets = args.subsets.split(",")
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown:
            parser.error(f"unknown subsets {unknown}; choose from {', '.join(SUBSETS)}")
        if not os.path.isdir(args.raw_dir):
            parser.error(f"{args.raw_dir}: no such folder; give the folder holding the GUICourse release files")
        output_folder(args.out_dir, "OUT_DIR")
        report = convert(args.raw_dir, args.out_dir, subsets, args.split, args.coords)
        for subset, r in report.items():
            drops = {k: v for k, v in r.items() if k not in ("file", "written", "dropped")}
            print(f"{subset}: {r.get('written', 0)} samples -> {r['file']}" + (f"; dropped {drops}" if drops else ""))
            for uid, why in r["dropped"][:10]:
                print(f"  dropped {uid}: {why}")
        return 0
    if args.command == "convert-screenspot":
        from .screenspot import convert
        report = convert(args.raw_dir, args.out_dir, args.coords)  # a ReleaseError ends as one line (finetune.cli)
        platforms = ", ".join(f"{p} {n}" for p, n in sorted(report["platforms"].items()))
        print(f"{report['benchmark']}: {report['written']} samples ({platforms}) -> {report['file']}"
              + (f"; dropped {len(report['dropped'])}" if report["dropped"] else ""))
        for where, why in report["dropped"][:10]:
            print(f"  dropped {where}: {why}")
        return 0
    if args.command == "synth":
        from .synth import write_synthetic
        output_folder(args.out_dir, "OUT_DIR")
        print(f"wrote {args.n} samples to {write_synthetic(args.out_dir, args.n, args.seed, args.blank)}")
        return 0


if __name__ == "__main__":
    run(main)
