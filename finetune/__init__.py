"""Finetuning toolkit for MiniCPM-Llama3-V 2.5."""
from .quantization import quiet_bitsandbytes

quiet_bitsandbytes()  # before anything imports peft, which imports bitsandbytes


def load(path, **kwargs):
    """(model, tokenizer) for a base, full or LoRA checkpoint folder; see finetune.model.load_any."""
    from .model import load_any
    return load_any(path, **kwargs)
