"""python -m finetune.predict --model PATH --data TEST.json|jsonl --output preds.jsonl [generation flags]

Batched generation for a base, full or LoRA checkpoint: greedy by default (what evaluation wants), beams or
sampling on request; bf16 on a GPU, fp32 on CPU, the LLM's linear layers in 4 bits with --quantization nf4
(for a LoRA adapter trained that way: what it trained with). Writes one JSON object per line, {"id", "prediction",
"answer" (the sample's last assistant turn, when it has one), "type"}, flushed as it goes: a rerun skips ids
already written. A sample that cannot be read or generated is written with its "error" and skipped.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from .data.collator import HOST_KEYS, collate
from .data.conversation import ASSISTANT_HEADER, ImageSettings, encode_conversation
from .data.records import RecordFile, read_jsonl
from .model import default_dtype, load_any
from .quantization import QUANTIZATIONS
from replace_file.modeling_minicpmv import decode_answer


def prompt_example(record, index, records, tokenizer, settings):
    """The sample's conversation up to its last user turn, rendered as the inference template renders it."""
    turns = record.get("conversations") or []
    if not turns:
        raise ValueError("no conversations")
    context = turns[:-1] if turns[-1]["role"] == "assistant" else turns
    example = encode_conversation(context, records.open_images(record, index), tokenizer, settings)
    header = torch.tensor(tokenizer(ASSISTANT_HEADER, add_special_tokens=False).input_ids)
    example["input_ids"] = torch.cat([example["input_ids"], header])
    example["labels"] = torch.full_like(example["input_ids"], -100)
    return example


def left_pad(batch, pad_token_id):
    """Right-padded collator output -> left padding for generation; image bounds move with the tokens."""
    lengths = batch["attention_mask"].sum(1).tolist()
    width = batch["input_ids"].shape[1]
    ids = torch.full_like(batch["input_ids"], pad_token_id)
    mask = torch.zeros_like(batch["attention_mask"])
    for b, n in enumerate(lengths):
        ids[b, width - n:] = batch["input_ids"][b, :n]
        mask[b, width - n:] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], tgt_sizes=batch["tgt_sizes"],
                image_bound=[bounds + (width - n) for bounds, n in zip(batch["image_bound"], lengths)])


def generate_answers(model, tokenizer, examples, **generate_kwargs):
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    batch = {k: v.to(model.device) if torch.is_tensor(v) and k not in HOST_KEYS else v
             for k, v in left_pad(batch, tokenizer.pad_token_id).items()}
    outputs = model.generate(**batch, tokenizer=tokenizer, **generate_kwargs)
    return [decode_answer(ids, tokenizer) for ids in outputs]


def predict(model, tokenizer, data_path, output_path, batch_size=8, progress=True, **generate_kwargs):
    """Predictions for every sample of data_path not yet in output_path; returns how many were written."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = ImageSettings.from_config(base.config)
    records = RecordFile(data_path)
    done = {row["id"] for row in read_jsonl(output_path)} if os.path.exists(output_path) else set()
    todo = []
    for i in range(len(records)):
        try:
            record = records.record(i)
        except ValueError as e:
            record = {"id": f"line{records.line_numbers[i]}", "_error": str(e)}
        if record.get("id", i) not in done:
            todo.append((i, record))
    written = 0
    with open(output_path, "a", encoding="utf-8") as out, \
            tqdm(total=len(todo), unit="sample", desc="predicting", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            rows, ready = [], []
            for i, record in todo[start:start + batch_size]:
                row = {"id": record.get("id", i), "type": record.get("type")}
                turns = record.get("conversations") or []
                if turns and turns[-1].get("role") == "assistant":
                    row["answer"] = turns[-1].get("content")
                try:
                    if "_error" in record:
                        raise ValueError(record["_error"])
                    ready.append((row, prompt_example(record, i, records, tokenizer, settings)))
                except Exception as e:  # one bad sample never stops the run
                    row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
            rows += generate_rows(base, tokenizer, ready, generate_kwargs)
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            written += len(rows)
            bar.update(len(rows))
    return written


def generate_rows(model, tokenizer, ready, generate_kwargs):
    """Generate for a batch; if the batch fails, sample by sample, so only the culprit gets an error."""
    if not ready:
        return []
    try:
        answers = generate_answers(model, tokenizer, [ex for _, ex in ready], **generate_kwargs)
        return [dict(row, prediction=answer) for (row, _), answer in zip(ready, answers)]
    except Exception as e:
        if len(ready) == 1:
            return [dict(ready[0][0], error=f"{type(e).__name__}: {e}")]
        return [r for item in ready for r in generate_rows(model, tokenizer, [item], generate_kwargs)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base, full or LoRA checkpoint folder")
    parser.add_argument("--base", help="base model folder for a LoRA adapter (default: the one it records)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=100)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="nf4: the LLM's linear layers in 4 bits (the weights in ~6 GiB instead of 16)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_any(args.model, base=args.base, dtype=default_dtype(), device=device,
                                quantization=args.quantization)
    model.eval()
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                           repetition_penalty=args.repetition_penalty)
    if args.do_sample:
        generate_kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    written = predict(model, tokenizer, args.data, args.output, args.batch_size, **generate_kwargs)
    print(f"wrote {written} predictions to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
