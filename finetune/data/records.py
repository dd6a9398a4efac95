"""Reading and validating data files: a JSON list or JSONL of samples in the seed format

    {"id": ..., "image": "a.png" | ["a.png", "b.png"] (optional), "conversations": [{"role", "content"}, ...]}

A file's samples live in one byte buffer with an offset table (numpy), not as one Python object per
sample, so forked dataloader workers share them instead of copying them. Every problem is a SampleError
that names the file, the sample's index and id, and what is wrong.
"""
import json
import os

import numpy as np
from PIL import Image

from ..cli import UserError

ROLES = ("system", "user", "assistant")
IMAGE_TAG = "<image>"
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class SampleError(ValueError, UserError):
    """A problem with one sample (or with the file, when index is None)."""

    def __init__(self, path, index, sample_id, kind, detail):
        self.path, self.index, self.sample_id, self.kind, self.detail = path, index, sample_id, kind, detail
        where = path if index is None else f"{path}: sample {index}"
        where += f" (id {sample_id!r})" if index is not None and sample_id is not None else ""
        super().__init__(f"{where}: {detail}")

    def __reduce__(self):  # picklable, so scan workers can send it back
        return SampleError, (self.path, self.index, self.sample_id, self.kind, self.detail)


class RecordFile:
    """The samples of one data file, parsed lazily from a shared buffer."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.folder = os.path.dirname(self.path)
        if not os.path.isfile(path):
            raise SampleError(path, None, None, "missing_file", "data file not found")
        if path.endswith(".jsonl"):
            self._read_jsonl()
        else:
            self._read_json_list()

    def _read_json_list(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                samples = json.load(f)
        except json.JSONDecodeError as e:
            raise SampleError(self.path, None, None, "invalid_json",
                              f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise SampleError(self.path, None, None, "invalid_json", f"not UTF-8 text: {e}") from None
        if not isinstance(samples, list):
            raise SampleError(self.path, None, None, "invalid_json",
                              f"expected a JSON list of samples (or a .jsonl file), got a {type(samples).__name__}")
        encoded = [json.dumps(s, ensure_ascii=False).encode() for s in samples]
        del samples
        self._set_buffer(encoded, np.arange(1, len(encoded) + 1))

    def _read_jsonl(self):
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        self._set_buffer([line for _, line in numbered], np.array([n for n, _ in numbered]))

    def _set_buffer(self, chunks, line_numbers):
        self.buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self.offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in chunks], out=self.offsets[1:])
        self.line_numbers = line_numbers.astype(np.int64)  # JSONL: line in the file; JSON list: position

    def __len__(self):
        return len(self.offsets) - 1

    def record(self, index):
        """The raw sample (a dict), or SampleError for a line that is not a JSON object."""
        raw = self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes()
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SampleError(self.path, index, None, "invalid_json",
                              f"line {self.line_numbers[index]} is not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise SampleError(self.path, index, None, "invalid_json",
                              f"line {self.line_numbers[index]}: a sample must be a JSON object, got {type(record).__name__}")
        return record

    def image_paths(self, record):
        images = record.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else images
        return [p if os.path.isabs(p) else os.path.join(self.folder, p) for p in images]

    def open_images(self, record, index, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, decode=True):
        """The sample's images (see open_image); a problem is a SampleError naming this file and sample."""
        images = []
        for path in self.image_paths(record):
            try:
                images.append(open_image(path, max_pixels, decode))
            except ValueError as e:
                raise SampleError(self.path, index, record.get("id", index), e.args[0], e.args[1]) from None
        return images


def read_jsonl(path):
    """All rows of a small JSONL file that this toolkit wrote (predictions, candidate elements)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def validate_record(record, path, index):
    """Structure checks of one sample; returns (id, conversations, image paths as given)."""
    sample_id = record.get("id", index)

    def fail(kind, detail):
        raise SampleError(path, index, sample_id, kind, detail)

    images = record.get("image")
    if images is not None:
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            fail("bad_image_field", f"'image' must be a path or a non-empty list of paths, got {record.get('image')!r}")
    images = images or []
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        fail("missing_conversations", "'conversations' is missing or empty")
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            fail("bad_message", f"turn {i} must be an object with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            fail("unknown_role", f"turn {i} has unknown role {message['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            fail("non_string_content", f"turn {i} content must be a string, got {type(message['content']).__name__}")
        if message["role"] == "system" and i != 0:
            fail("misplaced_system", f"turn {i}: a system turn may only come first")
        if message["role"] == "assistant" and not message["content"].strip():
            fail("empty_answer", f"turn {i}: empty assistant answer")
        if message["role"] != "user" and IMAGE_TAG in message["content"]:
            fail("image_tag_mismatch", f"turn {i}: {IMAGE_TAG} tag in a {message['role']} turn")
    first = conversations[1] if conversations[0]["role"] == "system" and len(conversations) > 1 else conversations[0]
    if first["role"] != "user":
        fail("first_turn_not_user", f"the first turn is {first['role']!r}, not 'user'")
    if not any(m["role"] == "assistant" for m in conversations):
        fail("no_assistant_turn", "no assistant turn, so nothing to learn from")
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in conversations)
    if n_tags != len(images) and not (n_tags == 0 and len(images) == 1):
        fail("image_tag_mismatch", f"{n_tags} {IMAGE_TAG} tags for {len(images)} images "
                                   "(one tag per image, in order; a single image may have none)")
    return sample_id, conversations


def open_image(path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, decode=True):
    """The image as RGB (any PIL mode converts as the official code does). Raises ValueError with the kind
    of problem as its first argument. decode=False reads the header only (size), for fast checks."""
    if not os.path.isfile(path):
        raise ValueError("missing_image", f"image not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError("empty_image", f"image file is empty: {path}")
    try:
        image = Image.open(path)
    except Exception as e:  # PIL raises several types for unreadable files
        raise ValueError("unreadable_image", f"cannot read image {path}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError("image_too_large", f"image {path} is {width}x{height} = {width * height} pixels, over the "
                                            f"limit of {max_pixels} (--max_image_pixels)")
    if not decode:
        return image
    try:
        image.load()
    except Exception as e:
        raise ValueError("truncated_image", f"image {path} cannot be decoded (truncated or corrupt): {e}") from None
    return image.convert("RGB")


# Our own pixel limit applies; PIL's decompression-bomb guard would otherwise stop large screenshots first.
Image.MAX_IMAGE_PIXELS = None
