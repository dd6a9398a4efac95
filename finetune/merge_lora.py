"""python -m finetune.merge_lora --adapter PATH --output DIR [--base BASE] [--dtype float16|bfloat16|float32]

Folds a LoRA adapter (and the modules it trained in full) into its base model and writes a full checkpoint in
the official layout, with the adapter's tokenizer files (inference chat template), the slicing training used
and our model files. An adapter trained on 4-bit base weights (--quantization nf4) is folded into the unquantized
base: the official weights plus what training learned, without the 4-bit rounding (use --dtype bfloat16).
"""
import torch

from .checkpoint import register_model_files
from .cli import Parser, UserError, model_folder, output_folder, run
from .model import is_lora_folder, load_any, read_config
from .model_card import write_merged_card


def merge(adapter, output, base=None, dtype=None):
    model, tokenizer = load_any(adapter, base=base, dtype=torch.float32)  # merge in fp32, save in dtype
    base = model.peft_config["default"].base_model_name_or_path if base is None else base
    dtype = dtype or read_config(base).dtype or torch.float16
    merged = model.merge_and_unload()
    register_model_files()
    merged.to(dtype).save_pretrained(output)
    tokenizer.save_pretrained(output)
    write_merged_card(adapter, output, base, dtype)
    return merged


def main(argv=None):
    parser = Parser(prog="python -m finetune.merge_lora", description=__doc__)
    parser.add_argument("--adapter", required=True, help="LoRA checkpoint folder (adapter_config.json)")
    parser.add_argument("--output", required=True, help="folder for the full checkpoint (created if missing)")
    parser.add_argument("--base", help="base model folder (default: the one recorded in adapter_config.json)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="weights on disk (default: the base checkpoint's, float16 for the released model)")
    args = parser.parse_args(argv)
    model_folder(args.adapter, "--adapter", base=args.base)
    if not is_lora_folder(args.adapter):
        raise UserError(f"--adapter {args.adapter} is a full checkpoint, not a LoRA adapter (no adapter_config.json): "
                        "it needs no merging")
    output_folder(args.output, "--output")
    merge(args.adapter, args.output, args.base, getattr(torch, args.dtype) if args.dtype else None)
    print(f"merged {args.adapter} into a full checkpoint at {args.output}")
    return 0


if __name__ == "__main__":
    run(main)
