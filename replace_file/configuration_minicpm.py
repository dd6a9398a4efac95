"""Configuration of MiniCPM-Llama3-V 2.5: a Llama-3 config plus the vision tower, resampler and slicing.

Reads the official `config.json` unchanged. `rope_theta` / `rope_scaling` at the top level are turned
into transformers 5.x `rope_parameters` by `LlamaConfig` itself.
"""
from transformers import LlamaConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

# SigLIP-so400m as used by the real checkpoint; the official class default when `vision_config` is absent.
DEFAULT_VISION_CONFIG = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                         "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
# The official `MiniCPMVSliceConfig` defaults; the released config.json omits `scale_resolution`.
DEFAULT_SLICE_CONFIG = {"patch_size": 14, "max_slice_nums": 9, "scale_resolution": 448}


class MiniCPMVConfig(LlamaConfig):
    model_type = "minicpmv"

    def __init__(self, query_num=64, image_size=448, drop_vision_last_layer=True, batch_vision_input=True,
                 slice_config=None, vision_config=None, version=None, **kwargs):
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.version = version
        # The official class ignores `slice_mode` from the JSON and always slices.
        kwargs.pop("slice_mode", None)
        self.slice_mode = True
        self.slice_config = {**DEFAULT_SLICE_CONFIG, **(slice_config or {})}
        self.slice_config.pop("model_type", None)
        if isinstance(vision_config, Idefics2VisionConfig):
            self.vision_config = vision_config
        else:
            vision = dict(DEFAULT_VISION_CONFIG if vision_config is None else vision_config)
            vision.pop("model_type", None)
            self.vision_config = Idefics2VisionConfig(**vision)
        self.patch_size = self.vision_config.patch_size
        kwargs.pop("patch_size", None)
        super().__init__(**kwargs)
