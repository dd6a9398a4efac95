"""Batching: right padding, labels -100 on padding, every image of every sample in one packed tensor."""
import torch
import torch.nn.functional as F

from replace_file.modeling_minicpmv import pack_pixel_strips

from .conversation import IGNORE_INDEX

# Batch entries the model reads on the host (image spans, patch grids): they stay on the CPU, since reading
# them from the GPU would synchronise it.
HOST_KEYS = ("image_bound", "tgt_sizes")


def collate(examples, pad_token_id=0, pad_to_multiple_of=1):
    """Examples from `encode_conversation` -> model keyword arguments. Images are packed in sample order
    (source then slices), so `image_bound[b]` lines up with them; `pixel_values` is None without images.
    None examples (samples that failed to load, already logged) are dropped; a batch left with none becomes
    one padding token with nothing supervised, so the step still runs on every rank. `pad_to_multiple_of` rounds
    the token length up (padding is never seen by real tokens under the causal mask)."""
    examples = [ex for ex in examples if ex is not None] or [dict(
        input_ids=torch.tensor([pad_token_id]), labels=torch.tensor([IGNORE_INDEX]), pixel_values=[],
        tgt_sizes=torch.zeros(0, 2, dtype=torch.int32), image_bound=torch.zeros(0, 2, dtype=torch.long))]
    strips = [s for ex in examples for s in ex["pixel_values"]]
    lengths = torch.tensor([len(ex["input_ids"]) for ex in examples])
    width = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of

    def pad(key, value):
        return torch.stack([F.pad(ex[key], (0, width - len(ex[key])), value=value) for ex in examples])

    return dict(
        input_ids=pad("input_ids", pad_token_id),
        attention_mask=(torch.arange(width)[None, :] < lengths[:, None]).long(),
        labels=pad("labels", IGNORE_INDEX),
        pixel_values=pack_pixel_strips(strips) if strips else None,
        tgt_sizes=torch.cat([ex["tgt_sizes"] for ex in examples]).to(torch.int32) if strips else None,
        image_bound=[ex["image_bound"] for ex in examples],
        sample_ids=[ex.get("id") for ex in examples],  # for messages only; the Trainer removes it
    )
