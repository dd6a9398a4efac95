"""python -m finetune.chat --model PATH --image IMG [--prompt TEXT] [--greedy]

One question (--prompt), or an interactive conversation about the image (empty line or Ctrl-D to quit).
Answers stream as they are generated with the official sampling settings; --greedy uses the official
3-beam search instead (printed when complete).
"""
import torch
from PIL import Image

from .cli import Parser, image_file, model_folder, run
from .model import default_dtype, load_any
from .quantization import QUANTIZATIONS


def answer(model, tokenizer, image, messages, greedy, max_new_tokens):
    """Print the answer (streamed when sampling) and return it."""
    if greedy:
        text = model.chat(image, messages, tokenizer, sampling=False, max_new_tokens=max_new_tokens)
        print(text, flush=True)
        return text
    pieces = []
    for piece in model.chat(image, messages, tokenizer, sampling=True, stream=True, max_new_tokens=max_new_tokens):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces).strip()


def main(argv=None):
    parser = Parser(prog="python -m finetune.chat", description=__doc__)
    parser.add_argument("--model", required=True, help="base, full or LoRA checkpoint folder")
    parser.add_argument("--base", help="base model folder for a LoRA adapter (default: the one it records)")
    parser.add_argument("--image", required=True, help="the screenshot (or any image) to talk about")
    parser.add_argument("--prompt", help="ask this one question and exit (default: an interactive conversation)")
    parser.add_argument("--greedy", action="store_true", help="the official 3-beam search instead of sampling")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="longest answer, in tokens")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="nf4: the LLM's linear layers in 4 bits (the weights in ~6 GiB instead of 16)")
    args = parser.parse_args(argv)
    model_folder(args.model, "--model", base=args.base)
    image_file(args.image, "--image")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_any(args.model, base=args.base, dtype=default_dtype(), device=device,
                                quantization=args.quantization)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    image = Image.open(args.image).convert("RGB")
    messages = []
    prompts = [args.prompt] if args.prompt else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            question = prompts.pop()
        else:
            try:
                question = input("you> ").strip()
            except EOFError:
                return 0
            if not question:
                return 0
            print("model> ", end="", flush=True)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer(model.eval(), tokenizer, image, messages, args.greedy,
                                                                args.max_new_tokens)})


if __name__ == "__main__":
    run(main)
