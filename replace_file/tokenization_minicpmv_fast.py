"""The MiniCPM-Llama3-V 2.5 tokenizer: Llama-3 BPE with MiniCPM's renamed special tokens.

The official `tokenizer_config.json` names the class `PreTrainedTokenizerFastWrapper` and auto-maps it into
`modeling_minicpmv.py`; that module re-exports this class under both names.
"""
from transformers import PreTrainedTokenizerFast


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
