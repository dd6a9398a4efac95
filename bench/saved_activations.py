"""Bytes one full-size Llama-3-8B block with LoRA (r=64 on every projection, as finetune_lora.sh) saves for its
backward pass, per token, eager against compiled: what the planner's per-block activation figures stand for. Runs on
the CPU (no weights needed; bf16, random init) or a GPU.

    python bench/saved_activations.py [--tokens 512] [--lora_dropout 0.05] [--device cpu]

Counts the storages that autograd keeps (saved-tensor hooks), without the block's parameters and its input.
"""
import argparse
import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

CONFIG = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              num_hidden_layers=1, rms_norm_eps=1e-5, rope_theta=500000.0)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer, self.rope = LlamaDecoderLayer(config, 0), LlamaRotaryEmbedding(config)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None]
        out = self.layer(x, position_embeddings=self.rope(x, positions), position_ids=positions)
        return out[0] if isinstance(out, tuple) else out


def saved_bytes(block, x):
    """Bytes of the distinct storages autograd saves in one forward, parameters and the input left out."""
    sizes = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    left_out = {p.untyped_storage().data_ptr() for p in block.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(size for ptr, size in sizes.items() if ptr not in left_out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = Block(config).to(args.device, torch.bfloat16)
    block = get_peft_model(block, LoraConfig(r=64, lora_alpha=16, lora_dropout=args.lora_dropout,
                                             target_modules=PROJECTIONS)).train()
    x = torch.randn(1, args.tokens, config.hidden_size, dtype=torch.bfloat16, device=args.device, requires_grad=True)
    compiled = torch.compile(block)
    compiled(x).sum().backward()  # compiled once, outside the count
    result = dict(device=args.device, tokens=args.tokens, lora_dropout=args.lora_dropout,
                  torch=torch.__version__, **{f"{name}_bytes_per_token": round(saved_bytes(b, x) / args.tokens)
                                              for name, b in (("eager", block), ("compiled", compiled))})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
