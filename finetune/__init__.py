"""Finetuning toolkit for MiniCPM-Llama3-V 2.5. `finetune.load(path)` returns (model, tokenizer) for a base,
full or LoRA checkpoint folder."""
from .model import load_any as load

__all__ = ["load"]
