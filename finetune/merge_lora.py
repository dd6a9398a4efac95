"""python -m finetune.merge_lora --adapter PATH --output DIR [--base BASE] [--dtype float16|bfloat16|float32]

Folds a LoRA adapter (and the modules it trained in full) into its base model and writes a full checkpoint in
the official layout, with the adapter's tokenizer files (inference chat template) and our model files. An adapter
trained on 4-bit base weights (--quantization nf4) is folded into the unquantized base as well: the result is the
official weights plus what training learned, with no 4-bit rounding (use --dtype bfloat16).
"""
import argparse
import sys

import torch

from .checkpoint import register_model_files
from .model import load_any


def merge(adapter, output, base=None, dtype=None):
    model, tokenizer = load_any(adapter, base=base, dtype=torch.float32)  # merge in fp32, save in dtype
    merged = model.merge_and_unload()
    dtype = dtype or merged.config.dtype or torch.float16
    register_model_files()
    merged.to(dtype).save_pretrained(output)
    tokenizer.save_pretrained(output)
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--base", help="base model folder (default: the one recorded in adapter_config.json)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="weights on disk (default: the base checkpoint's, float16 for the released model)")
    args = parser.parse_args(argv)
    merge(args.adapter, args.output, args.base, getattr(torch, args.dtype) if args.dtype else None)
    print(f"merged {args.adapter} into a full checkpoint at {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
