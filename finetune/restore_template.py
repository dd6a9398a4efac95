"""Give checkpoints saved by the official scripts of May-June 2024 (training chat template in
tokenizer_config.json, which makes chat() answer empty) the inference chat template back."""
from .checkpoint import restore_template
from .cli import Parser, run


def main(argv=None):
    parser = Parser(prog="python -m finetune.restore_template", description=__doc__)
    parser.add_argument("folders", nargs="+", metavar="CKPT", help="checkpoint folders (tokenizer_config.json)")
    for folder in parser.parse_args(argv).folders:
        print(restore_template(folder))
    return 0


if __name__ == "__main__":
    run(main)
