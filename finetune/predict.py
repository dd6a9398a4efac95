"""python -m finetune.predict --model PATH --data TEST.jsonl[,MORE.jsonl] --output preds.jsonl [generation flags]

Batched generation for a base, full or LoRA checkpoint: greedy by default (what evaluation wants), beams or
sampling on request; bf16 on a GPU, fp32 on CPU (the LLM's linear layers in 4 bits with --quantization nf4).
Writes one JSON object per line, {"id", "source" (its data file), "prediction", "answer" (the sample's last
assistant turn, when it has one), "type"}, flushed as it goes: a rerun skips samples already written. A sample
that cannot be read or generated is written with its "error" and skipped.

How it keeps the GPU busy: images are sliced in DataLoader worker processes, and every 16 samples that arrive go
through the vision tower at once (strips of one width together), so the GPU encodes while the workers slice the rest
of the batch; samples run longest prompt first, and a batch that does not fit in GPU memory is halved (later batches
keep the size that fitted). Greedy answers come from the model's generate_greedy: prompts concatenated without
padding, each sequence decoding from its own slot of the cache, the decoding steps replayed as one CUDA graph. Each
sample's computation is its own (no padding it attends to, no neighbour): its answer does not depend on its batch,
beyond rounding (on a GPU, matrix products pick their kernels by size).
"""
import contextlib
import json
import logging
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from replace_file.image_processing_minicpmv import pack_pixel_strips, slice_plan
from replace_file.modeling_minicpmv import SDPA_VARLEN, decode_answer
from replace_file.tokenization_minicpmv_fast import ASSISTANT_HEADER

from .cli import Parser, input_file, model_folder, output_file, run
from .data.conversation import ImageSettings, encode_conversation
from .data.dataset import placeholder_token_count
from .data.mixing import data_files, source_key
from .data.records import RecordFile, open_image, read_jsonl
from .model import default_dtype, load_any
from .quantization import QUANTIZATIONS

logger = logging.getLogger(__name__)
BATCH_SIZE = 128  # halved automatically where it does not fit
VISION_PATCHES_PER_PASS = 32768  # ~32 strips of a full-size layout: large matrix products, ~3 GB of activations
EMBED_AHEAD = 16  # samples whose images are encoded as soon as they arrive, before the rest of their batch
# Not cuDNN's attention (SDPA's first choice on Hopper): it builds a plan for every new shape, ~40 ms each, and with
# screenshots of assorted sizes nearly every vision pass has a new one (H200, 256 such samples: 25.5 s with cuDNN,
# 15.5 s with these, which need no plan; bench/RESULTS.md)
VISION_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prompt_example(record, index, records, tokenizer, settings):
    """The sample's conversation up to its last user turn, rendered as the inference template renders it."""
    turns = record.get("conversations") or []
    if not turns:
        raise ValueError("no conversations")
    context = turns[:-1] if turns[-1]["role"] == "assistant" else turns
    example = encode_conversation(context, records.open_images(record, index), tokenizer, settings)
    header = torch.tensor(tokenizer(ASSISTANT_HEADER, add_special_tokens=False).input_ids)
    example["input_ids"] = torch.cat([example["input_ids"], header])
    del example["labels"]
    return example


def read_samples(path, skip=frozenset()):
    """(records, source, index, record) of every sample of a data file whose (file name, id) is not in `skip`; a
    line that is not a sample is kept with its "_error"."""
    records, name, items = RecordFile(path), os.path.basename(path), []
    for i in range(len(records)):
        try:
            record = records.record(i)
        except ValueError as e:
            record = {"id": f"line{records.line_numbers[i]}", "_error": str(e)}
        if not skip & {(name, record.get("id", i)), ("", record.get("id", i))}:
            items.append((records, path, i, record))
    return items


class Prompts(torch.utils.data.Dataset):
    """Samples to predict -> (row, example or None), encoded in DataLoader workers: token ids ending in the
    assistant header, the sample's image strips packed together in the model's dtype, patch grids, image spans."""

    def __init__(self, items, tokenizer, settings, dtype):
        self.items, self.tokenizer, self.settings, self.dtype = items, tokenizer, settings, dtype

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        records, source, index, record = self.items[k]
        row = {"id": record.get("id", index), "type": record.get("type"), "source": source}
        turns = record.get("conversations") or []
        if turns and turns[-1].get("role") == "assistant":
            row["answer"] = turns[-1].get("content")
        try:
            if "_error" in record:
                raise ValueError(record["_error"])
            example = prompt_example(record, index, records, self.tokenizer, self.settings)
        except Exception as e:  # one bad sample never stops the run
            return dict(row, error=f"{type(e).__name__}: {e}"), None
        strips = example.pop("pixel_values")
        example["pixel_values"] = pack_pixel_strips(strips, self.dtype) if strips else None
        return row, example


def prompt_length(item, settings):
    """About how many tokens a sample's prompt has (image placeholders from the image headers, text at four
    characters a token), to order samples by; 0 for one that cannot be read (it fails later, with its error)."""
    records, _, index, record = item
    try:
        sizes = [open_image(p, decode=False).size for p in records.image_paths(record)]
        text = sum(len(m["content"]) for m in record["conversations"])
    except (ValueError, KeyError, TypeError):
        return 0
    plans = [slice_plan(size, settings.max_slice_nums, settings.scale_resolution, settings.patch_size) for size in sizes]
    return sum(placeholder_token_count(plan, settings.query_num) for plan in plans) + text // 4


@torch.inference_mode()
def prompt_embeddings(model, examples, patches_per_pass=VISION_PATCHES_PER_PASS):
    """Each example's prompt as embeddings [T, hidden]. The vision tower attends to the padding of the strips it is
    given up to the widest, so each sample's strips (padded to its own widest, as chat() encodes them) go through it
    only with strips of that same width: other samples' images of the same layout, a pass at most
    `patches_per_pass` patches (at least one sample): the batch a sample is in changes its answer by rounding at most."""
    device = model.device
    features = [None] * len(examples)
    by_width = {}
    for k, ex in enumerate(examples):
        if ex["pixel_values"] is not None:
            by_width.setdefault(ex["pixel_values"].shape[-1], []).append(k)
    for width, members in by_width.items():
        patches = width // model.config.patch_size
        while members:
            taken = 1
            while taken < len(members) and \
                    sum(len(examples[k]["pixel_values"]) for k in members[:taken + 1]) * patches <= patches_per_pass:
                taken += 1
            group, members = members[:taken], members[taken:]
            # each sample's pinned strips copied on their own: a copy of one concatenation on the host would come
            # from unpinned memory, and wait for the GPU to finish what is queued before it
            pixels = torch.cat([examples[k]["pixel_values"].to(device, non_blocking=True) for k in group])
            with sdpa_kernel(VISION_ATTENTION):
                out = model.get_vision_embedding(pixels, torch.cat([examples[k]["tgt_sizes"] for k in group]))
            for k, part in zip(group, out.split([len(examples[k]["pixel_values"]) for k in group])):
                features[k] = part
    embed = model.get_input_embeddings()
    prompts = []
    for ex, feature in zip(examples, features):
        tokens = embed(ex["input_ids"][None].to(device, non_blocking=True))
        prompts.append((tokens if feature is None else model.place_image_features(tokens, feature, [ex["image_bound"]]))[0])
    return prompts


def is_greedy(generate_kwargs):
    """Settings that mean plain greedy decoding of at most max_new_tokens: what generate_greedy does."""
    plain = {"max_new_tokens": None, "num_beams": 1, "do_sample": False, "repetition_penalty": 1.0}
    return "max_new_tokens" in generate_kwargs and generate_kwargs.keys() <= plain.keys() and \
        all(generate_kwargs.get(k, v) == v for k, v in plain.items() if v is not None)


def add_prompt_embeddings(model, examples):
    """Gives each example without one its prompt embeddings ("prompt")."""
    missing = [ex for ex in examples if "prompt" not in ex]
    for ex, prompt in zip(missing, prompt_embeddings(model, missing)):
        ex["prompt"] = prompt


@torch.inference_mode()
def generate_answers(model, tokenizer, examples, **generate_kwargs):
    """Answers for a batch: greedy ones through the model's padding-free generate_greedy; beams and sampling through
    generate(), the prompts left-padded."""
    add_prompt_embeddings(model, examples)
    prompts = [ex.pop("prompt") for ex in examples]  # held no longer than this batch (or a halved retry) needs
    eos = [tokenizer.eos_token_id, tokenizer.eot_id]
    if is_greedy(generate_kwargs) and model.config._attn_implementation == SDPA_VARLEN:
        outputs = model.generate_greedy(prompts, generate_kwargs["max_new_tokens"], eos)
    else:
        width = max(len(p) for p in prompts)
        inputs = prompts[0].new_zeros(len(prompts), width, prompts[0].shape[-1])
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=model.device)
        for b, p in enumerate(prompts):
            inputs[b, width - len(p):], mask[b, width - len(p):] = p, 1
        outputs = model.generate(inputs_embeds=inputs, attention_mask=mask, tokenizer=tokenizer, **generate_kwargs)
    return [decode_answer(ids, tokenizer) for ids in outputs.cpu()]


def generate_rows(model, tokenizer, ready, generate_kwargs, fits):
    """Rows with predictions for (row, example) pairs, at most fits[0] at a time. A chunk that runs out of GPU memory
    is halved, and fits[0] with it; after any other failure its samples go one by one, so only the culprit gets an
    error."""
    out = []
    while ready:
        chunk, out_of_memory = ready[:fits[0]], False
        try:
            answers = generate_answers(model, tokenizer, [ex for _, ex in chunk], **generate_kwargs)
            out += [dict(row, prediction=answer) for (row, _), answer in zip(chunk, answers)]
        except torch.cuda.OutOfMemoryError as e:
            out_of_memory = len(chunk) > 1
            if not out_of_memory:
                out.append(dict(chunk[0][0], error=f"{type(e).__name__}: {e}"))
        except Exception as e:
            out += [dict(chunk[0][0], error=f"{type(e).__name__}: {e}")] if len(chunk) == 1 else \
                [r for item in chunk for r in generate_rows(model, tokenizer, [item], generate_kwargs, [1])]
        if out_of_memory:  # outside the handler, so that the failed batch's tensors are gone
            torch.cuda.empty_cache()
            fits[0] = len(chunk) // 2
            logger.warning("out of GPU memory with %d samples in a batch: continuing with %d", len(chunk), fits[0])
            continue
        ready = ready[len(chunk):]
    return out


def default_workers(device):
    """Image workers: on a GPU the CPU cores less one (at most 8); none for a model on the CPU, whose cores compute."""
    return max(1, min(8, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def predict_rows(model, tokenizer, items, batch_size=BATCH_SIZE, num_workers=None, max_slice_nums=None,
                 **generate_kwargs):
    """Prediction rows for (records, source, index, record) items, yielded a batch at a time, longest prompt first;
    images sliced as the model's config says, or into at most `max_slice_nums` slices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = ImageSettings.from_config(base.config, max_slice_nums)
    items = sorted(items, key=lambda item: -prompt_length(item, settings))
    workers = default_workers(base.device) if num_workers is None else num_workers
    if workers:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers fork after the tokenizer ran
    dataset = Prompts(items, tokenizer, settings, base.vpm.embeddings.patch_embedding.weight.dtype)
    # one sample per worker task, enough of them in flight that a whole batch waits when the GPU is done
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=-(-batch_size // workers) + 1 if workers else None,
                                         pin_memory=base.device.type == "cuda")
    fits, batch, unembedded = [batch_size], [], []
    for k, (row, example) in enumerate(loader, 1):
        batch.append((row, example))
        if example is not None:
            unembedded.append(example)
        last = len(batch) == batch_size or k == len(dataset)
        if len(unembedded) == EMBED_AHEAD or last:
            # the GPU encodes these images while the workers slice the next ones (the calls return before the GPU
            # is done); a failure is met again in generate_rows, which finds the sample that causes it
            with contextlib.suppress(Exception):
                add_prompt_embeddings(base, unembedded)
            unembedded = []
        if last:
            ready = [(row, ex) for row, ex in batch if ex is not None]
            yield [row for row, ex in batch if ex is None] + generate_rows(base, tokenizer, ready, generate_kwargs, fits)
            batch = []


def predict(model, tokenizer, data_path, output_path, batch_size=BATCH_SIZE, progress=True, num_workers=None,
            max_slice_nums=None, **generate_kwargs):
    """Predictions for every sample of the data files (`a.jsonl,b.jsonl`) not yet in output_path; returns how many
    were written."""
    done = {source_key(row) for row in read_jsonl(output_path)} if os.path.exists(output_path) else set()
    items = [item for path in data_files(data_path) for item in read_samples(path, done)]
    written = 0
    with open(output_path, "a", encoding="utf-8") as out, \
            tqdm(total=len(items), unit="sample", desc="predicting", disable=not progress) as bar:
        for rows in predict_rows(model, tokenizer, items, batch_size, num_workers, max_slice_nums, **generate_kwargs):
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            written += len(rows)
            bar.update(len(rows))
    return written


def main(argv=None):
    parser = Parser(prog="python -m finetune.predict", description=__doc__)
    parser.add_argument("--model", required=True, help="base, full or LoRA checkpoint folder")
    parser.add_argument("--base", help="base model folder for a LoRA adapter (default: the one it records)")
    parser.add_argument("--data", required=True, help="test data: JSON/JSONL in the conversation format, several "
                                                      "files separated by commas")
    parser.add_argument("--output", required=True, help="predictions, JSONL (appended to: a rerun resumes)")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                        help="samples generated together (halved automatically where they do not fit)")
    parser.add_argument("--num_workers", type=int, help="processes that read and slice images (default on a GPU: "
                                                         "the CPU cores less one, at most 8; on the CPU: 0, the main "
                                                         "process)")
    parser.add_argument("--max_slice_nums", type=int, help="slice images into at most this many parts instead of the "
                                                            "model's slice_config (e.g. more for 4K screenshots)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of the most likely tokens")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --do_sample")
    parser.add_argument("--top_p", type=float, default=0.8, help="with --do_sample")
    parser.add_argument("--top_k", type=int, default=100, help="with --do_sample")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="above 1: fewer repeated tokens")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="nf4: the LLM's linear layers in 4 bits (the weights in ~6 GiB instead of 16); for a "
                             "LoRA adapter trained with --quantization nf4, what it trained on")
    args = parser.parse_args(argv)
    model_folder(args.model, "--model", base=args.base)
    try:
        for path in data_files(args.data):
            input_file(path, "--data")
    except ValueError as e:
        parser.error(str(e))
    output_file(args.output, "--output")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_any(args.model, base=args.base, dtype=default_dtype(), device=device,
                                quantization=args.quantization)
    model.eval()
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                           repetition_penalty=args.repetition_penalty)
    if args.do_sample:
        generate_kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    written = predict(model, tokenizer, args.data, args.output, args.batch_size, num_workers=args.num_workers,
                      max_slice_nums=args.max_slice_nums, **generate_kwargs)
    print(f"wrote {written} predictions to {args.output}")
    return 0


if __name__ == "__main__":
    run(main)
