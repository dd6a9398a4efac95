"""Our MiniCPM-Llama3-V 2.5 model files. Self-contained: copy them into a Hugging Face model folder
(beside config.json) to use them through `AutoModel` / `AutoTokenizer` with `trust_remote_code=True`.
The classes import on first use, so that code needing only the image or text side does not load the model."""
from importlib import import_module

_MODULES = {"MiniCPMVConfig": "configuration_minicpm", "MiniCPMV": "modeling_minicpmv",
            "MiniCPMVTokenizerFast": "tokenization_minicpmv_fast"}
__all__ = list(_MODULES)


def __getattr__(name):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_MODULES[name]}", __name__), name)
