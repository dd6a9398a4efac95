"""The text side of MiniCPM-Llama3-V 2.5: the tokenizer (Llama-3 BPE with MiniCPM's renamed special tokens), its
chat templates, and the label of positions the loss ignores.

The official `tokenizer_config.json` names the class `PreTrainedTokenizerFastWrapper` and auto-maps it into
`modeling_minicpmv.py`; that module re-exports this class under both names.
"""
import logging

from transformers import PreTrainedTokenizerFast

# Llama-3's special slots as this model uses them: 13 reserved ones renamed by MiniCPM (checkpoint_spec §3.1),
# and the end of turn that closes every message of the chat template.
SPECIAL_TOKENS = {128002: "<unk>", 128009: "<|eot_id|>", 128010: "<image>", 128011: "</image>", 128012: "<ref>",
                  128013: "</ref>", 128014: "<box>", 128015: "</box>", 128016: "<quad>", 128017: "</quad>",
                  128018: "<point>", 128019: "</point>", 128020: "<slice>", 128021: "</slice>"}
# The label of positions the loss ignores (Hugging Face's convention).
IGNORE_INDEX = -100
# The checkpoint's inference template without the trailing assistant header (the official training template).
TRAIN_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}")
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# What the released tokenizer_config.json holds; `chat()` relies on it ending with the assistant header.
INFERENCE_CHAT_TEMPLATE = TRAIN_CHAT_TEMPLATE + "{{ '" + ASSISTANT_HEADER + "' }}"



class _NotMistralsRegex(logging.Filter):
    """transformers 5.17-5.22 warn "The tokenizer you are loading ... with an incorrect regex pattern ... This will
    lead to incorrect tokenization" for any tokenizer whose folder's config.json lacks `transformers_version` (as
    the folders finetune.official_format writes do), taking it for Mistral's. This tokenizer's regex is Llama-3's
    own: its ids equal the official code's, and the `fix_mistral_regex=True` the warning suggests would split
    numbers into single digits. So that one warning is dropped (later transformers no longer emit it here)."""

    def filter(self, record):
        return "with an incorrect regex pattern" not in record.getMessage()


logging.getLogger("transformers.tokenization_utils_tokenizers").addFilter(_NotMistralsRegex())


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    eot_token = "<|eot_id|>"
    im_start, im_end = "<image>", "</image>"
    ref_start, ref_end = "<ref>", "</ref>"
    box_start, box_end = "<box>", "</box>"
    quad_start, quad_end = "<quad>", "</quad>"
    point_start, point_end = "<point>", "</point>"
    slice_start, slice_end = "<slice>", "</slice>"

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        # transformers 5 skips `clean_up_tokenization_spaces` for BPE tokenizers; the official model (4.40)
        # applied it (the checkpoint sets it), so answers only match the official ones with it applied.
        text = super()._decode(token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False,
                               **kwargs)
        cleanup = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if cleanup else text

    def save_pretrained(self, *args, **kwargs):
        # keep the chat template inside tokenizer_config.json, where older transformers and the official code read it
        kwargs.setdefault("save_jinja_files", False)
        return super().save_pretrained(*args, **kwargs)

    @property
    def eos_id(self):
        return self.eos_token_id

    @property
    def bos_id(self):
        return self.bos_token_id

    @property
    def unk_id(self):
        return self.unk_token_id

    @property
    def eot_id(self):
        return self.convert_tokens_to_ids(self.eot_token)

    @property
    def im_start_id(self):
        return self.convert_tokens_to_ids(self.im_start)

    @property
    def im_end_id(self):
        return self.convert_tokens_to_ids(self.im_end)

    @staticmethod
    def escape(text):
        return text

    @staticmethod
    def unescape(text):
        return text


PreTrainedTokenizerFastWrapper = MiniCPMVTokenizerFast
