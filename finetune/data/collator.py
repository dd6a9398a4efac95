"""Batching: right padding (or none: samples concatenated in one row), labels -100 on padding, every image of
every sample in one packed tensor."""
import torch
import torch.nn.functional as F

from replace_file.image_processing_minicpmv import pack_pixel_strips
from replace_file.tokenization_minicpmv_fast import IGNORE_INDEX

# Batch entries the model reads on the host (image spans, patch grids): they stay on the CPU, since reading
# them from the GPU would synchronise it.
HOST_KEYS = ("image_bound", "tgt_sizes")


def padded_length(length, pad_to_multiple_of):
    """A padded batch's token width: its longest sample's, rounded up to the multiple (ints or numpy arrays)."""
    return -(-length // pad_to_multiple_of) * pad_to_multiple_of


def collate(examples, pad_token_id=0, pad_to_multiple_of=1, padding_free=False):
    """Examples from `encode_conversation` -> model keyword arguments. Images are packed in sample order
    (source then slices), so `image_bound[b]` lines up with them; `pixel_values` is None without images.
    None examples (samples that failed to load, already logged) are dropped; a batch left with none becomes
    one padding token with nothing supervised, so the step still runs on every rank. `pad_to_multiple_of` rounds
    the token length up (padding is never seen by real tokens under the causal mask). `padding_free`: the samples
    concatenated in one row instead, position ids restarting per sample, boundaries in transformers'
    `cu_seq_lens_*`/`max_length_*` keywords (`pad_to_multiple_of` does not apply)."""
    examples = [ex for ex in examples if ex is not None] or [dict(
        input_ids=torch.tensor([pad_token_id]), labels=torch.tensor([IGNORE_INDEX]), pixel_values=[],
        tgt_sizes=torch.zeros(0, 2, dtype=torch.int32), image_bound=torch.zeros(0, 2, dtype=torch.long))]
    strips = [s for ex in examples for s in ex["pixel_values"]]
    images = dict(pixel_values=pack_pixel_strips(strips) if strips else None,
                  tgt_sizes=torch.cat([ex["tgt_sizes"] for ex in examples]).to(torch.int32) if strips else None,
                  sample_ids=[ex.get("id") for ex in examples])  # for messages only; the Trainer removes it
    lengths = torch.tensor([len(ex["input_ids"]) for ex in examples])
    if padding_free:
        return dict(images, **concatenate(examples, lengths))
    width = padded_length(int(lengths.max()), pad_to_multiple_of)

    def pad(key, value):
        return torch.stack([F.pad(ex[key], (0, width - len(ex[key])), value=value) for ex in examples])

    return dict(
        input_ids=pad("input_ids", pad_token_id),
        attention_mask=(torch.arange(width)[None, :] < lengths[:, None]).long(),
        labels=pad("labels", IGNORE_INDEX),
        image_bound=[ex["image_bound"] for ex in examples],
        **images,
    )


def concatenate(examples, lengths):
    """One row [1, total]: each sample's first label is unsupervised, so no sample is scored on predicting the
    next one's first token (the shifted loss would otherwise cross the boundary)."""
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    labels = torch.cat([ex["labels"] for ex in examples])
    labels[starts[:-1]] = IGNORE_INDEX
    boundaries, longest = starts.to(torch.int32), int(lengths.max())
    return dict(
        input_ids=torch.cat([ex["input_ids"] for ex in examples])[None],
        labels=labels[None],
        position_ids=torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
        image_bound=[torch.cat([ex["image_bound"] + start for ex, start in zip(examples, starts.tolist())])],
        cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries,
        max_length_q=longest, max_length_k=longest,
    )
