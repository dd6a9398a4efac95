"""torchrun for the launch scripts (finetune_lora.sh, finetune_ds.sh), and their --help.

    python -m finetune.launch --script finetune_lora.sh TORCHRUN_ARGS -m finetune.finetune FLAGS
    python -m finetune.launch --script finetune_lora.sh --help TORCHRUN_ARGS -m finetune.finetune FLAGS

A run ends with its own message as the last line: a process that stops on a mistake writes it to
FINETUNE_ERROR_FILE (finetune.cli.report), printed here after torchrun is done, in place of torchrun's
child-failure report (DEBUG=1: tracebacks and that report as well). With --help: what the script does (its
header comment), its environment, and finetune.py's flags with the values the script gives them as defaults.
"""
import argparse
import json
import os
import sys
import tempfile

from .cli import ERROR_FILE, debug

ENTRY = ["-m", "finetune.finetune"]


def split_command(argv):
    """torchrun's arguments and finetune.py's, around `-m finetune.finetune`."""
    for i in range(len(argv) - 1):
        if argv[i:i + 2] == ENTRY:
            return argv[:i], argv[i + 2:]
    raise SystemExit(f"finetune.launch: expected torchrun arguments, then {' '.join(ENTRY)} and its flags")


def script_header(script):
    """The script's opening comment (after the shebang): what it does and its environment."""
    lines = []
    with open(script, encoding="utf-8") as f:
        for line in f.read().splitlines()[1:]:
            if not line.startswith("#"):
                break
            lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines)


def script_help(script, flags):
    """--help of a launch script: finetune.py's parser with the script's values as the defaults. Of transformers'
    TrainingArguments, only the flags the script sets are listed (finetune.py --help lists them all)."""
    import dataclasses

    from .arguments import DataArguments, ModelArguments, TuneArguments, build_parser
    flags = [f for f in flags if f not in ("-h", "--help")]
    parser = build_parser(prog=f"bash {script}", description=script_header(script))
    parser.usage = "MODEL=FOLDER DATA=FILE[,FILE] [VARIABLE=VALUE ...] %(prog)s [--flag VALUE ...]"
    parser.epilog = ("Any flag overrides the script's value, shown as its default. Every transformers\n"
                     "TrainingArguments flag works too: python finetune/finetune.py --help lists them all.\n"
                     "With MODEL and DATA unset the script runs the embedded demo (python -m finetune.demo --help).")
    values, _ = parser.parse_known_args(flags)
    given = {f.split("=")[0] for f in flags if f.startswith("--")}
    ours = {f.name for cls in (ModelArguments, DataArguments, TuneArguments) for f in dataclasses.fields(cls)}
    for action in parser._actions:
        if action.const is False or not (action.dest in ours or given & set(action.option_strings)):
            action.help = argparse.SUPPRESS  # a --no_X twin, or a TrainingArguments flag the script leaves alone
    parser.set_defaults(**vars(values))
    parser.print_help()


def main(argv=None):
    argv, script = list(sys.argv[1:] if argv is None else argv), None
    if argv[:1] == ["--script"]:
        script, argv = argv[1], argv[2:]
    if argv[:1] == ["--help"]:
        return script_help(script, split_command(argv[1:])[1])
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    if script:
        os.environ["FINETUNE_PROG"] = f"bash {script}"  # what the run's messages tell the user to type
    with tempfile.NamedTemporaryFile("r", prefix="finetune-error-", suffix=".jsonl") as errors:
        os.environ[ERROR_FILE] = errors.name
        try:
            run(parse_args(argv))
        except ChildFailedError as e:
            if debug():
                raise
            lines = list(dict.fromkeys(json.loads(line) for line in errors if line.strip()))  # once, not per rank
            rank, failure = e.get_first_failure()
            how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else \
                f"stopped with exit code {failure.exitcode}"
            print("\n".join(lines) or f"error: rank {rank} {how}; its output above says why (DEBUG=1 adds "
                  "torchrun's report)", file=sys.stderr, flush=True)
            return 2 if lines else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
