"""Our MiniCPM-Llama3-V 2.5 model files. Self-contained: copy them into a Hugging Face model folder
(beside config.json) to use them through `AutoModel` / `AutoTokenizer` with `trust_remote_code=True`."""
from .configuration_minicpm import MiniCPMVConfig
from .modeling_minicpmv import MiniCPMV
from .tokenization_minicpmv_fast import MiniCPMVTokenizerFast

__all__ = ["MiniCPMVConfig", "MiniCPMV", "MiniCPMVTokenizerFast"]
