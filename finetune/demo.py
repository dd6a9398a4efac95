"""The embedded demo: what `bash finetune_lora.sh` (or finetune_ds.sh) runs when MODEL and DATA are unset.

It builds, once (cached), a small model in the official MiniCPM-Llama3-V 2.5 format (the real Llama-3 tokenizer
with MiniCPM's special tokens, small dimensions, images scaled to about 112x112 px, unsliced) and synthetic GUI data whose answers are only in
the screenshots; trains it twice through the given launch script, on the screenshots and on blanked ones (the
control), and scores both on held-out screenshots. Images are wired right when the first clearly beats the second.

    python -m finetune.demo --script finetune_lora.sh [extra finetune.py flags]
"""
import json
import os
import subprocess
import time

import torch

from .cli import Parser, output_folder, run
from .data.synth import write_synthetic
from .model_card import add_evaluation
from .official_format import official_config, write_config, write_tokenizer
from .quantization import QUANTIZATIONS

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "minicpmv-finetune", "demo-v7")
DEMO_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, query_num=16,
                   slice_config={"max_slice_nums": 1, "scale_resolution": 112},
                   vision_config={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                  "num_hidden_layers": 2})
N_TRAIN, N_TEST = 3000, 200
# demo hyper-parameters: a randomly initialised tiny model needs a high learning rate to learn in minutes
TRAIN_ARGS = ["--max_steps", "600", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
              "--warmup_steps", "0.05", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0.0",
              "--tune_vision", "true", "--gradient_checkpointing", "false", "--dataloader_num_workers", "2",
              "--save_strategy", "no", "--logging_steps", "25", "--report_to", "none", "--weight_decay", "0.0",
              "--train_sampling_strategy", "random"]


def build_model(folder):
    """Random weights in the official layout (fp16 safetensors, config.json, tokenizer files, our model files)."""
    from replace_file import MiniCPMV, MiniCPMVConfig
    from .checkpoint import register_model_files
    write_config(folder, official_config(**DEMO_CONFIG))
    write_tokenizer(folder)
    torch.manual_seed(0)
    model = MiniCPMV(MiniCPMVConfig.from_pretrained(folder))
    # Scales a pretrained model has and the default init (std 0.02) lacks: LM-head rows large enough for a
    # confident choice among 128k tokens (the normalised hidden state of a tiny model cannot reach that margin
    # through LoRA alone), and vision position embeddings that make patch features say where they are.
    with torch.no_grad():
        model.llm.lm_head.weight.normal_(std=0.3)
        model.vpm.embeddings.position_embedding.weight.normal_(std=0.5)
    register_model_files()
    model.to(torch.float16).save_pretrained(folder)
    return folder


def prepare(cache=CACHE):
    """Model and data, built once. Returns the paths."""
    paths = {"model": os.path.join(cache, "model"), "train": os.path.join(cache, "train", "data.jsonl"),
             "train_blank": os.path.join(cache, "train_blank", "data.jsonl"), "test": os.path.join(cache, "test", "data.jsonl"),
             "test_blank": os.path.join(cache, "test_blank", "data.jsonl")}
    if not os.path.isfile(os.path.join(cache, "done")):
        print(f"building the demo model and synthetic GUI data in {cache} (once)", flush=True)
        build_model(paths["model"])
        for split, n, seed in (("train", N_TRAIN, 1), ("test", N_TEST, 2)):
            write_synthetic(os.path.dirname(paths[split]), n, seed=seed)
            write_synthetic(os.path.dirname(paths[f"{split}_blank"]), n, seed=seed, blank=True)
        open(os.path.join(cache, "done"), "w").close()
    return paths


def evaluate(model_dir, test_file, quantization=None):
    """Greedy predictions on the test file (finetune.predict); exact-match accuracy of the whole answer. With
    `quantization` "nf4", on the base model in 4 bits (what a run with --quantization nf4 trained on)."""
    from .data.records import read_jsonl
    from .model import load_any
    from .predict import predict
    model, tokenizer = load_any(model_dir, dtype=torch.float32, quantization=quantization)
    output = os.path.join(model_dir, "predictions.jsonl")
    if os.path.exists(output):
        os.remove(output)
    predict(model.eval(), tokenizer, test_file, output, batch_size=16, progress=False, max_new_tokens=24)
    rows = read_jsonl(output)
    return sum(r.get("prediction") == r["answer"] for r in rows) / len(rows)


def main(argv=None):
    parser = Parser(prog="python -m finetune.demo", description=__doc__)
    parser.add_argument("--script", default="finetune_lora.sh", choices=["finetune_lora.sh", "finetune_ds.sh"],
                        help="the launch script that trains")
    parser.add_argument("--output", default="output/demo", help="folder for the two trained models and the results")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="nf4: train and evaluate on the LLM's weights in 4 bits (QLoRA)")
    args, extra = parser.parse_known_args(argv)  # the rest are finetune.py flags, for the launch script
    if args.quantization != "none":
        extra += ["--quantization", args.quantization]
    output_folder(args.output, "--output")
    start = time.time()
    paths = prepare()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for variant, train in (("screenshots", paths["train"]), ("blanked screenshots (control)", paths["train_blank"])):
        out = os.path.join(args.output, "images" if train == paths["train"] else "blank")
        env = dict(os.environ, MODEL=paths["model"], DATA=train, OUTPUT_DIR=out, GPUS_PER_NODE=os.environ.get("GPUS_PER_NODE", "1"))
        print(f"\n=== demo: training on {variant} -> {out}", flush=True)
        status = subprocess.run(["bash", os.path.join(repo, args.script)] + TRAIN_ARGS + extra, env=env).returncode
        if status:
            raise SystemExit(status)  # the training run's own message is the last line printed
        test = paths["test"] if train == paths["train"] else paths["test_blank"]
        results[variant] = evaluate(out, test, args.quantization)
        add_evaluation(out, test, [("held-out screenshots", "exact match", 100 * results[variant], N_TEST)])
    summary = {"accuracy_with_screenshots": results["screenshots"],
               "accuracy_blanked_control": results["blanked screenshots (control)"],
               "minutes": round((time.time() - start) / 60, 1), "output": args.output}
    os.makedirs(args.output, exist_ok=True)
    json.dump(summary, open(os.path.join(args.output, "demo_results.json"), "w"), indent=2)
    print(f"""
=== demo finished in {summary['minutes']} min
Held-out accuracy (exact answer; {N_TEST} synthetic screenshots, answers only in the image):
  trained on screenshots:          {summary['accuracy_with_screenshots']:.1%}
  trained on blanked screenshots:  {summary['accuracy_blanked_control']:.1%}   (the control: answer priors only)
Models in {args.output}/images and {args.output}/blank; numbers in {args.output}/demo_results.json.

To finetune the real model: download openbmb/MiniCPM-Llama3-V-2_5, then
  MODEL=/path/to/MiniCPM-Llama3-V-2_5 DATA=train.jsonl [EVAL_DATA=test.jsonl] bash {args.script}
Check data first with: python -m finetune.data check train.jsonl --model /path/to/MiniCPM-Llama3-V-2_5""")
    return summary


if __name__ == "__main__":
    run(main)
