"""Scanning data files before training and serving encoded samples during it.

`scan` checks every sample in parallel (structure, image headers, pixel limit; optionally a full image
decode) and computes its exact token counts from image sizes alone (the slicing plan gives the placeholder),
so bad samples are all reported before the first step and over-long ones are known up front.
"""
import logging
import multiprocessing
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from replace_file.image_processing_minicpmv import image_placeholder, slice_plan
from replace_file.tokenization_minicpmv_fast import IGNORE_INDEX

from .collator import padded_length
from .conversation import encode_conversation, tokenize_conversation
from .records import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_TAG, RecordFile, SampleError, validate_record

logger = logging.getLogger(__name__)

# one row per usable sample: which file, which sample, how many turns to keep, token counts, and the image
# tensor's shape (image units: sources and slices; patches of the widest unit, which the others are padded to)
ENTRY = np.dtype([("file", np.int32), ("index", np.int64), ("n_turns", np.int32), ("length", np.int32),
                  ("image_tokens", np.int32), ("supervised", np.int32), ("image_units", np.int32),
                  ("widest_unit", np.int32)])


@dataclass
class ScanOptions:
    model_max_length: int = 2048
    overlong: str = "skip"  # or "truncate": drop trailing turns while an answer and every image survive
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    decode_images: bool = False  # full decode catches truncated files; headers alone are much faster
    workers: int = 1


@dataclass
class ScanResult:
    files: list
    entries: np.ndarray
    errors: list = field(default_factory=list)      # SampleError, one per bad sample
    overlong: list = field(default_factory=list)    # (path, index, id, length) skipped for length
    truncated: int = 0
    token_stats: list = field(default_factory=list)  # (total, image, supervised) of every valid sample, untruncated


def placeholder_token_count(plan, query_num):
    """Tokens of one image's placeholder: (<image> + unk*q + </image>) per unit, plus <slice>, </slice> and
    the row separators when sliced."""
    units = 1 + plan.n_slices
    return units * (query_num + 2) + (plan.grid[1] + 1 if plan.grid else 0)


class _Scanner:
    """Per-process state for scanning (inherited by forked workers, not pickled)."""

    def __init__(self, files, tokenizer, settings, options):
        self.files, self.tokenizer, self.settings, self.options = files, tokenizer, settings, options

    def scan(self, file_index, index):
        """('ok', entry tuple, stats) | ('overlong', (path, index, id, length), stats) | ('error', SampleError, None)
        where stats = (total, image, supervised) tokens of the whole sample."""
        rf = self.files[file_index]
        try:
            record = rf.record(index)
            sample_id, conversations = validate_record(record, rf.path, index)
            sizes = [image.size for image in
                     rf.open_images(record, index, self.options.max_image_pixels, self.options.decode_images)]
        except SampleError as e:
            return "error", e, None
        s = self.settings
        plans = [slice_plan(size, s.max_slice_nums, s.scale_resolution, s.patch_size) for size in sizes]
        placeholders = [image_placeholder(p, s.query_num) for p in plans]
        image_tokens = sum(placeholder_token_count(p, s.query_num) for p in plans)
        units = [rows * cols for p in plans for rows, cols in p.tgt_sizes(s.patch_size)]
        n_turns, (ids, labels) = len(conversations), tokenize_conversation(conversations, placeholders, self.tokenizer)
        full_length = len(ids)
        stats = (full_length, image_tokens, int((labels != IGNORE_INDEX).sum()))
        limit = self.options.model_max_length
        if full_length > limit and self.options.overlong == "truncate":
            n_turns, ids, labels = self._truncate(conversations, placeholders, limit)
        if len(ids) > limit:
            return "overlong", (rf.path, index, sample_id, full_length), stats
        supervised = int((labels != IGNORE_INDEX).sum())
        row = (file_index, index, n_turns, len(ids), image_tokens, supervised, len(units), max(units, default=0))
        return "ok", row, stats

    def _truncate(self, conversations, placeholders, limit):
        """Longest prefix that ends with an answer, keeps every image and fits; else the whole sample."""
        n_tags = sum(m["content"].count(IMAGE_TAG) for m in conversations)
        for n in range(len(conversations) - 1, 0, -1):
            prefix = conversations[:n]
            if prefix[-1]["role"] != "assistant" or sum(m["content"].count(IMAGE_TAG) for m in prefix) != n_tags:
                continue
            ids, labels = tokenize_conversation(prefix, placeholders, self.tokenizer)
            if len(ids) <= limit:
                return n, ids, labels
        return len(conversations), *tokenize_conversation(conversations, placeholders, self.tokenizer)


_SCANNER = None


def _scan_chunk(chunk):
    return [_SCANNER.scan(f, i) for f, i in chunk]


def scan(paths, tokenizer, settings, options=None, progress=True):
    """Check every sample of the data files; see ScanResult."""
    global _SCANNER
    options = options or ScanOptions()
    files = [RecordFile(p) for p in paths]
    jobs = [(f, i) for f, rf in enumerate(files) for i in range(len(rf))]
    chunks = [jobs[i:i + 256] for i in range(0, len(jobs), 256)]
    _SCANNER = _Scanner(files, tokenizer, settings, options)
    bar = tqdm(total=len(jobs), desc="checking samples", unit="sample", disable=not progress)
    result = ScanResult(files, np.zeros(0, ENTRY))
    rows = []
    try:
        if options.workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # fork after the tokenizer ran: keep it single-threaded
            with multiprocessing.get_context("fork").Pool(options.workers) as pool:
                outcomes = pool.imap(_scan_chunk, chunks)
                for out in outcomes:
                    _collect(out, rows, result)
                    bar.update(len(out))
        else:
            for chunk in chunks:
                _collect(_scan_chunk(chunk), rows, result)
                bar.update(len(chunk))
    finally:
        bar.close()
        _SCANNER = None
    result.entries = np.array(rows, dtype=ENTRY)
    return result


def _collect(outcomes, rows, result):
    for status, value, stats in outcomes:
        if status == "error":
            result.errors.append(value)
            continue
        result.token_stats.append(stats)
        if status == "overlong":
            result.overlong.append(value)
        else:
            rows.append(value)
            result.truncated += value[3] < stats[0]


class ConversationDataset:
    """Encoded samples for training: a torch map-style dataset over the scan's entries (numpy only).

    A sample that fails when loaded although it passed the scan (say, an image file changed or is truncated
    and only the header was checked) is logged with its file, index and id and returned as None; the collator
    drops it. It is never replaced by another sample."""

    def __init__(self, scan_result, tokenizer, settings, options):
        self.files, self.entries = scan_result.files, scan_result.entries
        self.tokenizer, self.settings, self.options = tokenizer, settings, options

    def __len__(self):
        return len(self.entries)

    @property
    def lengths(self):
        return self.entries["length"]

    def batch_shapes(self, pad_to_multiple_of=1):
        """The distinct shapes of one-sample batches, most common first: [((tokens after padding, image units,
        patches of the widest unit), indices of the samples that have it)]."""
        tokens = padded_length(self.entries["length"], pad_to_multiple_of)
        keys = np.stack([tokens, self.entries["image_units"], self.entries["widest_unit"]], axis=1)
        shapes, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return [(tuple(int(v) for v in shapes[k]), np.flatnonzero(inverse.ravel() == k)) for k in order]

    def __getitem__(self, i):
        entry = self.entries[i]
        rf = self.files[entry["file"]]
        index = int(entry["index"])
        record = rf.record(index)
        sample_id = record.get("id", index)
        try:
            images = rf.open_images(record, index, self.options.max_image_pixels)
            conversations = record["conversations"][:entry["n_turns"]]
            return dict(encode_conversation(conversations, images, self.tokenizer, self.settings), id=sample_id)
        except SampleError as e:
            logger.error("skipping a sample that failed to load: %s", e)
            return None
