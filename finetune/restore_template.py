"""python -m finetune.restore_template CKPT [CKPT ...]: give checkpoints back the inference chat template."""
import sys

from .checkpoint import restore_template

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for folder in sys.argv[1:]:
        print(restore_template(folder))
