"""One conversation -> token ids, labels and image tensors, exactly as the official finetune code.

Labels follow the Hugging Face convention (`labels[i]` is what position i-1 predicts; -100 elsewhere).
Supervised: every assistant answer through its `<|eot_id|>`. Kept official quirk: the token after a
non-final answer's `<|eot_id|>` is labelled `<|eot_id|>` (the eot position learns to predict eot again).
"""
from dataclasses import dataclass

import torch

from replace_file.image_processing_minicpmv import image_bounds, process_image
from replace_file.tokenization_minicpmv_fast import IGNORE_INDEX, TRAIN_CHAT_TEMPLATE

from .records import IMAGE_TAG


@dataclass(frozen=True)
class ImageSettings:
    query_num: int
    max_slice_nums: int
    scale_resolution: int
    patch_size: int

    @classmethod
    def from_config(cls, config, max_slice_nums=None):
        slicing = config.slice_config
        return cls(config.query_num, max_slice_nums or slicing["max_slice_nums"], slicing["scale_resolution"],
                   config.patch_size)


def insert_image_placeholders(conversations, placeholders):
    """Replace each `<image>` tag (in order) by its image's placeholder; a single image without a tag goes
    before the first user turn's text, followed by '\\n'. Returns new messages."""
    messages = [dict(m) for m in conversations]
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if n_tags == 0 and len(placeholders) == 1:
        messages[0]["content"] = placeholders[0] + "\n" + messages[0]["content"]
        return messages
    if n_tags != len(placeholders):
        raise ValueError(f"{n_tags} {IMAGE_TAG} tags for {len(placeholders)} images")
    remaining = iter(placeholders)
    for m in messages:
        pieces = m["content"].split(IMAGE_TAG)
        m["content"] = pieces[0] + "".join(next(remaining) + piece for piece in pieces[1:])
    return messages


def supervised_labels(input_ids, tokenizer):
    """Labels for an id tensor rendered with the chat template (see module docstring)."""
    start_header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    end_header = tokenizer.convert_tokens_to_ids("<|end_header_id|>")
    assistant = tokenizer.convert_tokens_to_ids("assistant")
    eot = tokenizer.eot_id
    ids = input_ids.tolist()
    in_answer = [False] * len(ids)
    for i in range(1, len(ids) - 1):
        if ids[i] == assistant and ids[i - 1] == start_header and ids[i + 1] == end_header:
            start = i + 3  # skip "assistant", <|end_header_id|>, "\n\n"
            end = next((j for j in range(start + 1, len(ids)) if ids[j] == eot), None)
            if end is not None:
                in_answer[start:end + 1] = [True] * (end + 1 - start)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i in range(1, len(ids)):
        if in_answer[i]:
            labels[i] = ids[i]
        elif in_answer[i - 1]:
            labels[i] = eot
    return labels


def tokenize_conversation(conversations, placeholders, tokenizer):
    """Messages + one placeholder text per image -> (input_ids, labels), with the training chat template."""
    messages = insert_image_placeholders(conversations, placeholders)
    text = tokenizer.apply_chat_template(messages, chat_template=TRAIN_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=False)
    input_ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    return input_ids, supervised_labels(input_ids, tokenizer)


def encode_conversation(conversations, images, tokenizer, settings):
    """Messages ({role, content}) + RGB PIL images -> dict of input_ids, labels, pixel_values (list of
    strips), tgt_sizes [n, 2] and image_bound [n, 2]."""
    processed = [process_image(img, settings.query_num, settings.max_slice_nums, settings.scale_resolution,
                               settings.patch_size) for img in images]
    input_ids, labels = tokenize_conversation(conversations, [p.placeholder for p in processed], tokenizer)
    return dict(input_ids=input_ids, labels=labels,
                pixel_values=[s for p in processed for s in p.pixel_values],
                tgt_sizes=torch.cat([p.tgt_sizes for p in processed]) if processed else torch.zeros(0, 2, dtype=torch.int32),
                image_bound=image_bounds(input_ids, tokenizer.im_start_id, tokenizer.im_end_id))
