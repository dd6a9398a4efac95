"""Loading MiniCPM-Llama3-V 2.5 checkpoints with our own model files: no remote code, nothing outside the
folder, every tensor accounted for, and a clear error for anything that is not this model."""
import json
import os

import torch

from replace_file import MiniCPMV, MiniCPMVConfig, MiniCPMVTokenizerFast

# MiniCPM's renamed Llama-3 special slots (checkpoint_spec §3.1): a tokenizer without them is not this model's.
SPECIAL_TOKEN_IDS = {"<unk>": 128002, "<image>": 128010, "</image>": 128011, "<slice>": 128020, "</slice>": 128021,
                     "<|eot_id|>": 128009}


class CheckpointError(ValueError):
    pass


def read_config(path):
    """The checkpoint's config, after checking that the folder holds MiniCPM-Llama3-V 2.5."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path}: no config.json, so this is not a model folder")
    try:
        raw = json.load(open(config_file))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON: {e}") from None
    found = f"model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')}"
    if raw.get("model_type") != "minicpmv":
        raise CheckpointError(f"{path} is not a MiniCPM-Llama3-V 2.5 checkpoint: found {found}")
    version = str(raw["version"]) if "version" in raw else None
    if version is None and raw.get("hidden_size") == 2304 and raw.get("query_num") == 64:
        version = "2.0"  # the release without a version key is 2.5; 2.0 has these dimensions
    if version not in (None, "2.5"):
        raise CheckpointError(f"{path} is MiniCPM-V {version} ({found}, hidden_size={raw.get('hidden_size')}), "
                              "not MiniCPM-Llama3-V 2.5: this toolkit and its model files are for 2.5 only")
    return MiniCPMVConfig.from_pretrained(path)


def default_dtype():
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(path, dtype=None, device=None, attn_implementation="sdpa"):
    """The model in `dtype` (default bf16 on a GPU that has it, else fp32), strictly loaded."""
    config = read_config(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                              "weights are loaded)")
    model, info = MiniCPMV.from_pretrained(path, config=config, dtype=dtype or default_dtype(),
                                           attn_implementation=attn_implementation, output_loading_info=True,
                                           use_safetensors=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{path}: weights do not match the model: {problems or info['error_msgs']}")
    return model.to(device) if device is not None else model


def load_tokenizer(path):
    """The checkpoint's tokenizer through our class (the folder's own auto_map target may be absent or old)."""
    tokenizer = MiniCPMVTokenizerFast.from_pretrained(path)
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t, i in SPECIAL_TOKEN_IDS.items()
             if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        raise CheckpointError(f"{path}: tokenizer is not MiniCPM-Llama3-V 2.5's: special tokens at other ids {wrong} "
                              f"(expected {SPECIAL_TOKEN_IDS})")
    return tokenizer
