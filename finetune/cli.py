"""The command line of every entry point, in one place: help that shows each flag's default and the command a
user types, and mistakes (a path, a flag, the machine) reported as one line, `error: ...` with exit status 2,
before anything heavy starts. DEBUG=1 shows the traceback instead.

    if __name__ == "__main__":
        run(main)          # main(argv) parses with cli.Parser and calls the checks below

Under the launch scripts (finetune.launch runs torchrun), the line goes to the file named by FINETUNE_ERROR_FILE;
the launcher prints it after torchrun's own report, so the run's message is the last thing printed.
This module imports nothing heavy: the data tools use it too."""
import argparse
import difflib
import json
import os
import sys

ERROR_FILE = "FINETUNE_ERROR_FILE"
RELEASE = "openbmb/MiniCPM-Llama3-V-2_5"
# CUDA's caching allocator as the launch scripts set it (scripts/launch_env.sh), for every entry point: shapes vary
# by batch, and expandable segments keep that memory from fragmenting (predict on an H200: 20.7 -> 21.0 samples/s).
# CUDA reads it at its first allocation, so setting it before main is early enough.
CUDA_ALLOC_CONF = "expandable_segments:True"


class UserError(Exception):
    """A mistake the user can fix, with the fix in its message: reported as one line, without a traceback."""


def debug():
    return os.environ.get("DEBUG", "") not in ("", "0", "false")


def report(message):
    """Print `error: message` (to the launcher's error file when there is one: it prints it last)."""
    line = f"error: {message}"
    path = os.environ.get(ERROR_FILE)
    if path:
        with open(path, "a", encoding="utf-8") as f:  # one short append per rank: whole lines, in any order
            f.write(json.dumps(line) + "\n")
    else:
        print(line, file=sys.stderr, flush=True)


def run(main, argv=None):
    """Run an entry point and exit with its status; a UserError, or a SystemExit carrying a message (the
    checks of finetune.arguments), ends it with one line and status 2."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    try:
        status = main(argv)
    except (UserError, SystemExit) as e:
        message = str(e) if isinstance(e, UserError) else e.code
        if not isinstance(message, str) or debug():
            raise
        report(message)
        status = 2
    sys.exit(status if isinstance(status, int) else 0)  # some mains return a result to Python callers


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every flag's default after its help (unless it has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or (action.nargs == 0 and action.const is False)):  # store_false: its default says nothing
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter, whose mistakes are UserErrors: an unknown flag names the nearest known one.
    Mixed into transformers' HfArgumentParser by finetune.arguments (parse_args_into_dataclasses)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        for action in self._actions:  # HfArgumentParser's --no_X copies --X's help, which then says the opposite
            if action.option_strings and action.option_strings[0].startswith("--no_") and action.const is False:
                action.help = f"same as --{action.dest} false"

    def error(self, message):
        raise UserError(f"{message} (`{self.prog} --help` lists the flags)")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        try:
            namespace, unknown = self.parse_known_args(args, namespace)
        except UserError:  # a misspelt flag can make a required one look missing: name the misspelling first
            options = self.all_options()
            self.reject_unknown([a for a in args if a.startswith("--")
                                 and not any(o.startswith(a.split("=")[0]) for o in options)])
            raise
        self.reject_unknown(unknown)
        return namespace

    def parse_args_into_dataclasses(self, args=None, **kwargs):
        """HfArgumentParser's, with unknown flags and the dataclasses' own checks (transformers'
        TrainingArguments raises ValueError for inconsistent flags) reported as UserErrors."""
        try:
            *outputs, unknown = super().parse_args_into_dataclasses(args=args, return_remaining_strings=True,
                                                                     **kwargs)
        except ValueError as e:
            raise UserError(str(e)) from e
        self.reject_unknown(unknown)
        return tuple(outputs)

    def all_options(self):
        """Every flag of this parser and of its subcommands."""
        names = set()
        for action in self._actions:
            names.update(action.option_strings)
            for sub in action.choices.values() if isinstance(action.choices, dict) else ():  # subcommands
                names.update(sub.all_options() if isinstance(sub, Parser) else ())
        return names

    def reject_unknown(self, unknown):
        if not unknown:
            return
        flag = next((a.split("=")[0] for a in unknown if a.startswith("-")), None)
        if flag is None:
            self.error(f"unexpected argument {unknown[0]!r}")
        names = self.all_options()  # suggested in underscore spelling (HfArgumentParser adds dashed twins)
        names = sorted(n for n in names if "-" not in n[2:] or "--" + n[2:].replace("-", "_") not in names)
        near = OTHER_TOOLS_NAMES.get(flag)
        if near not in names:
            near = max(names, key=lambda name: likeness(flag, name), default=None)
            near = near if near and likeness(flag, near) > 0.6 else None
        self.error(f"unknown flag {flag}" + (f"; did you mean {near}?" if near else ""))


# what other training tools call some of transformers' flags
OTHER_TOOLS_NAMES = {"--lr": "--learning_rate", "--epochs": "--num_train_epochs",
                     "--batch_size": "--per_device_train_batch_size",
                     "--train_batch_size": "--per_device_train_batch_size"}


def likeness(typed, name):
    """How close a mistyped flag is to a real one: difflib's ratio, and more when one begins the other
    (--lora_rank is --lora_r said longer, not --local_rank misspelt)."""
    prefix = len(name) > 4 and len(typed) > 4 and (typed.startswith(name) or name.startswith(typed))
    return difflib.SequenceMatcher(None, typed, name).ratio() + 0.2 * prefix


def shown(path):
    """A path as given, and where it leads when relative (the launch scripts run from their own folder)."""
    return path if os.path.isabs(path) else f"{path} ({os.path.abspath(path)})"


# The checks every entry point makes before loading anything. `what` names the flag (or variable) in messages.

def model_folder(path, what="--model", base=None, adapters=True):
    """A folder of MiniCPM-Llama3-V 2.5: the release, a full finetune, or (with `adapters`) a LoRA adapter with
    its base (`base`, or the one it records). What a folder holds is judged by finetune.model.read_config."""
    from .model import is_lora_folder, read_config
    if not path:
        raise UserError(f"{what} is required: a MiniCPM-Llama3-V 2.5 folder (download {RELEASE})")
    if not os.path.exists(path):
        raise UserError(f"{what} {shown(path)}: no such folder; give the folder of "
                        f"MiniCPM-Llama3-V 2.5 (download {RELEASE} from the Hugging Face Hub) or of a checkpoint "
                        "trained from it")
    if not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file; give the model's folder (the one holding config.json)")
    if is_lora_folder(path) and not adapters:
        raise UserError(f"{what} {path} is a LoRA adapter; merge it into a full checkpoint first "
                        f"(python -m finetune.merge_lora --adapter {path} --output FOLDER) and give that folder")
    if is_lora_folder(path):
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            recorded = json.load(f).get("base_model_name_or_path")
        if not base and not (recorded and os.path.isdir(recorded)):
            raise UserError(f"{what} {path} is a LoRA adapter whose base model folder {recorded!r} is not on this "
                            "machine; pass the base model's folder with --base")
        model_folder(base or recorded, f"the base model of {path}" if not base else "--base")
        return
    read_config(path)


def input_file(path, what):
    """A file to read (data, predictions): it must exist. Relative paths are shown resolved, because the launch
    scripts run from their own folder."""
    if not os.path.exists(path):
        raise UserError(f"{what} {shown(path)}: no such file; check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; give the file")


def image_file(path, what="--image"):
    """An image that opens (its header is read here; finetune.data.records.open_image decodes it later)."""
    from .data.records import open_image
    input_file(path, what)
    try:
        open_image(path, decode=False)
    except ValueError as e:
        raise UserError(f"{what}: {e.args[1]}; give a PNG or JPEG screenshot") from None


def output_folder(path, what):
    """A folder to write into: created later if missing, but it must not be a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a folder; give a folder (it is created if missing)")


def output_file(path, what):
    """A file to write: not a folder, and in a folder that exists."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; give a file name, e.g. {os.path.join(path, 'out.jsonl')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{what} {path}: the folder {folder} does not exist; create it or write elsewhere")


def gpu(what, instead):
    """Stop when `what` needs a CUDA GPU and none is visible; `instead` says what to do on this machine."""
    import torch
    if not torch.cuda.is_available():
        raise UserError(f"{what} needs a CUDA GPU, and this machine shows none (torch {torch.__version__}); "
                        f"{instead}")


def finetune_inputs(model_args, data_args, training_args):
    """finetune.py's paths and machine, checked after its flags are parsed and before anything loads."""
    model_folder(model_args.model_name_or_path, "--model_name_or_path", adapters=False)
    from .data.mixing import parse_sources
    for flag, paths in (("--data_path", data_args.data_path), ("--eval_data_path", data_args.eval_data_path)):
        for source in parse_sources(paths) if paths else ():
            input_file(source.path, flag)
    output_folder(training_args.output_dir, "--output_dir")
    if model_args.attn_implementation == "flash_attention_2":
        gpu("--attn_implementation flash_attention_2", "leave --attn_implementation at sdpa on this machine")
    from .model import read_config
    if read_config(model_args.model_name_or_path).hidden_size >= 4096 and not training_args.use_cpu:
        gpu("Training the full-size MiniCPM-Llama3-V 2.5 (8B parameters)", "on a CPU try the embedded demo "
            "(bash finetune_lora.sh with MODEL and DATA unset), or add --use_cpu true to train here anyway, very "
            "slowly")
