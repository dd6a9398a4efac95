"""4-bit base weights (QLoRA) and 8-bit optimizer states (finetune.quantization, finetune.optimizer_8bit) on the
fixture checkpoint, with bitsandbytes' CPU backend."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.arguments import parse_args
from finetune.data.collator import collate
from finetune.model import configure_trainable, keep_4bit_training_layout, load_any, load_model
from finetune.quantization import NF4_BLOCK_SIZE

REPO = Path(__file__).resolve().parents[1]
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture()
def batch(encode, conformance):
    batch = collate([encode(i) for i in conformance.expected["batches"][0]["ids"]])
    batch.pop("sample_ids")
    return batch


def relative_rms(x, reference):
    return float((x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def test_4bit_model_is_the_model_with_its_llm_weights_rounded_to_nf4(ckpt_dir, model, batch):
    """Loaded with --quantization nf4, exactly the LLM's 14 projections are 4-bit (the vision tower, resampler,
    embeddings, LM head and norms keep the fp32 weights), and the model computes what the fp32 model computes
    with those weights rounded to NF4. The rounding is within the format's bound, element by element: half the
    widest gap between neighbouring NF4 levels times the block's absmax, plus the rounding of that absmax itself
    (double quantization stores it in 8 bits). The logits then differ from the fp32 model's by the stated 4-bit
    tolerance: each projection's output moves by its weights' relative error eps (~0.09 for NF4; 0.0039 for
    bf16, 1/256), independent errors of k projections add in quadrature, so the relative RMS deviation of the
    logits is at most sqrt(k) * eps (measured on this model: 0.13, under the bound of 0.35)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise
    quantized = load_model(ckpt_dir, dtype=torch.float32, quantization="nf4").eval()
    keep_4bit_training_layout(quantized)  # the dequantize-and-matmul path on every CPU, as on GPUs
    rounded = load_model(ckpt_dir, dtype=torch.float32).eval()
    originals, rounded_modules = dict(model.named_modules()), dict(rounded.named_modules())
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(layers) == sorted(f"llm.model.layers.{i}.{part}.{p}" for i in range(model.config.num_hidden_layers)
                                    for part, projections in (("self_attn", LLM_PROJECTIONS[:4]), ("mlp", LLM_PROJECTIONS[4:]))
                                    for p in projections)
    for name, param in quantized.named_parameters():
        if not any(name.startswith(f"{layer}.") for layer in layers):
            assert param.dtype == torch.float32 and torch.equal(param, model.get_parameter(name)), name
    errors = []
    for name, layer in layers.items():
        state, original = layer.weight.quant_state, originals[name].weight.detach()
        assert state.quant_type == "nf4" and state.nested and state.blocksize == NF4_BLOCK_SIZE
        weights = dequantize_4bit(layer.weight.data, state)
        blocks = original.reshape(-1, NF4_BLOCK_SIZE)
        absmax = blocks.abs().amax(1, keepdim=True)
        stored_absmax = (dequantize_blockwise(state.absmax, state.state2) + state.offset)[:, None]
        half_gap = state.code.sort().values.diff().max() / 2
        assert ((weights.reshape(blocks.shape) - blocks).abs() <= half_gap * absmax + (stored_absmax - absmax).abs()
                + 1e-7).all(), name
        errors.append(float((weights - original).norm() / original.norm()))
        rounded_modules[name].weight.data.copy_(weights)
    with torch.no_grad():
        logits, rounded_logits, reference = (m(**batch, return_logits=True).logits[batch["attention_mask"].bool()]
                                             for m in (quantized, rounded, model))
    # the same matmuls on the same weights: fp32 summation-order noise at most
    torch.testing.assert_close(logits, rounded_logits, rtol=1e-5, atol=1e-5)
    eps = max(errors)
    assert 0.05 < eps < 0.12  # NF4 on normally distributed weights: 0.092
    assert 0 < relative_rms(logits, reference) <= len(layers) ** 0.5 * eps


def test_qlora_step_changes_only_the_adapters_and_the_modules_trained_in_full(ckpt_dir, batch):
    """One step of QLoRA with the vision tower and resampler trained (bf16, fp32 masters, 8-bit moments), after an
    evaluation: the adapters (in bf16, like the model) and the vision tower and resampler change (gradients reach
    them through the 4-bit layers); the 4-bit weights, their quantization statistics, the embeddings, LM head and
    norms do not, and receive no gradient."""
    from finetune.arguments import TuneArguments
    from finetune.optimizer import master_weight_optimizer
    model = load_model(ckpt_dir, dtype=torch.bfloat16, quantization="nf4")
    model = configure_trainable(model, TuneArguments(use_lora=True, lora_r=4, lora_dropout=0.0, tune_vision=True))
    before = {name: t.clone() for name, t in model.state_dict().items()}  # 4-bit weights and their statistics too
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.bfloat16}
    model.train()(**batch).loss.backward()
    gradients = {name: p.grad for name, p in trainable.items()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # an evaluation: on CPUs with AVX512-BF16 bitsandbytes would repack the 4-bit weights
        model.eval()(**batch)  # for inference, after which they pass no gradient to their inputs
    model.train()(**batch).loss.backward()
    assert all(torch.equal(p.grad, gradients[name]) for name, p in trainable.items())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer = master_weight_optimizer("adamw_bnb_8bit", [{"params": list(trainable.values()), "weight_decay": 0.0}],
                                        lr=1e-2)
    optimizer.step()
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    adapters = {name for name in before if ".lora_A." in name or ".lora_B." in name}
    assert {name for name in changed if name not in adapters} and changed <= adapters | {
        name for name in before if ".modules_to_save." in name}
    assert {name.split(".")[2] for name in changed - adapters} == {"vpm", "resampler"}
    assert any(".lora_B." in name for name in changed)  # B starts at zero: a step moves it
    frozen_4bit = [name for name in before if name.endswith((".weight.absmax", ".weight.quant_map", ".base_layer.weight"))]
    assert frozen_4bit and not changed & set(frozen_4bit)
