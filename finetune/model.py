"""Loading MiniCPM-Llama3-V 2.5 checkpoints with our own model files: no remote code, nothing outside the
folder, every tensor accounted for, and a clear error for anything that is not this model."""
import json
import os

import torch

from replace_file import MiniCPMV, MiniCPMVConfig, MiniCPMVTokenizerFast
from replace_file.modeling_minicpmv import SDPA_VARLEN
from replace_file.tokenization_minicpmv_fast import SPECIAL_TOKENS

from .cli import UserError
from .quantization import bitsandbytes_config


class CheckpointError(ValueError, UserError):
    """A folder that is not a loadable MiniCPM-Llama3-V 2.5 checkpoint (entry points report it as one line)."""


def read_config(path):
    """The checkpoint's config, after checking that the folder holds MiniCPM-Llama3-V 2.5."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path}: no config.json, so this is not a model folder; give the folder of "
                              "MiniCPM-Llama3-V 2.5 (config.json, *.safetensors, tokenizer files)")
    try:
        raw = json.load(open(config_file))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON: {e}") from None
    found = f"model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')}"
    if raw.get("model_type") != "minicpmv":
        raise CheckpointError(f"{path} is not a MiniCPM-Llama3-V 2.5 checkpoint: found {found}; give a folder of "
                              "MiniCPM-Llama3-V 2.5 (openbmb/MiniCPM-Llama3-V-2_5) or of a finetune of it")
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


def load_model(path, dtype=None, device=None, attn_implementation=SDPA_VARLEN, config=None, quantization=None):
    """The model in `dtype` (default bf16 on a GPU that has it, else fp32), strictly loaded; `config` (default:
    the folder's) replaces the folder's config. `quantization` "nf4": the LLM's linear layers quantized to 4 bits
    as they load (finetune.quantization), computing in `dtype`; such a model is placed as it loads, on `device`
    (default: this process's accelerator), as it cannot be moved after."""
    config = config or read_config(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                              "weights are loaded)")
    dtype = dtype or default_dtype()
    placement = {}
    quantization_config = bitsandbytes_config(quantization, dtype)
    if quantization_config is not None:
        from accelerate import PartialState
        from transformers.integrations import is_deepspeed_zero3_enabled
        placement = dict(quantization_config=quantization_config)
        if not is_deepspeed_zero3_enabled():  # ZeRO-3 places (and partitions) the model itself
            device = torch.device(device) if device is not None else PartialState().device
            if device.type == "cuda" and device.index is None:  # the Trainer compares it with its own "cuda:N"
                device = torch.device("cuda", torch.cuda.current_device())
            placement["device_map"] = {"": device}
    model, info = MiniCPMV.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn_implementation,
                                           output_loading_info=True, use_safetensors=True, **placement)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{path}: weights do not match the model: {problems or info['error_msgs']}")
    return model.to(device) if device is not None and not placement else model


def load_tokenizer(path):
    """The checkpoint's tokenizer through our class (the folder's own auto_map target may be absent or old)."""
    tokenizer = MiniCPMVTokenizerFast.from_pretrained(path)
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for i, t in SPECIAL_TOKENS.items()
             if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        raise CheckpointError(f"{path}: tokenizer is not MiniCPM-Llama3-V 2.5's: special tokens at other ids {wrong} "
                              f"(expected {SPECIAL_TOKENS})")
    return tokenizer


def is_lora_folder(path):
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_any(path, base=None, dtype=None, device=None, attn_implementation=SDPA_VARLEN, quantization=None):
    """A base or full checkpoint, or a LoRA adapter folder on its base (`base`, else the path recorded in
    adapter_config.json), the base's LLM in 4 bits with `quantization="nf4"`. Returns (model, tokenizer); the
    tokenizer and the config (the slicing training used) come from the adapter folder when it has them."""
    if not is_lora_folder(path):
        return load_model(path, dtype, device, attn_implementation, quantization=quantization), load_tokenizer(path)
    from peft import PeftModel
    base = base or json.load(open(os.path.join(path, "adapter_config.json")))["base_model_name_or_path"]
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{path} is a LoRA adapter whose base model folder {base!r} is not here; pass the base")
    has = {name: os.path.isfile(os.path.join(path, name)) for name in ("config.json", "tokenizer.json")}
    config = read_config(path if has["config.json"] else base)
    quantized = quantization not in (None, "none")  # placed as it loads: it cannot be moved after
    model = load_model(base, dtype, device if quantized else None, attn_implementation, config, quantization)
    model = PeftModel.from_pretrained(model, path)
    model = model.to(device) if device is not None and not quantized else model
    return model, load_tokenizer(path if has["tokenizer.json"] else base)


def configure_trainable(model, tune):
    """Full finetuning: the chosen modules train in full. LoRA: adapters on the LLM modules matching
    `tune.lora_target_modules`, plus in full the resampler / vision tower / embed_tokens when asked (as peft
    `modules_to_save`, so they are saved in the adapter folder)."""
    if not tune.use_lora:
        model.llm.requires_grad_(tune.tune_llm)
        model.vpm.requires_grad_(tune.tune_vision)
        model.resampler.requires_grad_(tune.tune_resampler)
        return model
    from peft import LoraConfig

    from .checkpoint import LoraFolderModel
    in_full = [name for name, wanted in (("resampler", tune.tune_resampler), ("vpm", tune.tune_vision),
                                         ("embed_tokens", tune.tune_embed_tokens)) if wanted]
    config = LoraConfig(r=tune.lora_r, lora_alpha=tune.lora_alpha, lora_dropout=tune.lora_dropout,
                        target_modules=tune.lora_target_modules, modules_to_save=in_full or None,
                        base_model_name_or_path=model.name_or_path)
    model.requires_grad_(False)
    # adapters in the model's dtype: precision of the update is the optimizer's business (fp32 masters)
    model = LoraFolderModel(model, config, autocast_adapter_dtype=False)
    release_frozen_originals(model, keep=("embed_tokens",))
    keep_4bit_training_layout(model)
    return model


def keep_4bit_training_layout(model):
    """bitsandbytes (0.50) repacks a 4-bit layer's weights in place for CPU inference at its first forward in eval
    mode without gradients (an evaluation during training) on CPUs with AVX512-BF16; its matmul then passes no
    gradient back to the layer's input, silently. Layers being trained keep the layout that has a backward."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def release_frozen_originals(model, keep=()):
    """peft's `modules_to_save` keeps a frozen original beside each module trained in full, used only with
    the adapters disabled; training never does. Free the vision tower's and resampler's (0.9 GB in bf16).
    Not under ZeRO-3, which owns the storage of every parameter it partitioned."""
    from peft.utils.other import ModulesToSaveWrapper
    from transformers.integrations import is_deepspeed_zero3_enabled
    if is_deepspeed_zero3_enabled():
        return
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name.rsplit(".", 1)[-1] not in keep:
            for param in module.original_module.parameters():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def trainable_summary(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f} %)"
