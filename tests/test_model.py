"""The model's training-side behaviour and its loading errors, on the fixture checkpoint."""
import contextlib
import io
import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from finetune.data.collator import collate
from finetune.model import CheckpointError, load_model
from replace_file.modeling_minicpmv import SDPA_VARLEN


@pytest.fixture()
def batch(encode, conformance):
    batch = collate([encode(i) for i in conformance.expected["batches"][0]["ids"]])
    assert batch.pop("sample_ids") == [None] * 3  # encode() gives no ids; the dataset adds them
    return batch


def test_loss_equals_full_logits_cross_entropy(model, batch):
    with torch.no_grad():
        out = model(**batch, return_logits=True)
        no_logits = model(**batch)
    shifted = batch["labels"][:, 1:]
    reference = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), shifted.reshape(-1))
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert no_logits.logits is None and no_logits.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    # under gradient accumulation the Trainer passes the global count of supervised tokens
    with torch.no_grad():
        scaled = model(**batch, num_items_in_batch=2 * int((shifted != -100).sum()))
    assert scaled.loss.item() == pytest.approx(out.loss.item() / 2, rel=1e-5)


def test_padding_to_a_multiple_changes_no_loss(model, batch, encode, conformance):
    """Token lengths rounded up (fewer attention shapes): padding is right-hand, unsupervised and unseen."""
    padded = collate([encode(i) for i in conformance.expected["batches"][0]["ids"]], pad_to_multiple_of=64)
    padded.pop("sample_ids")
    width = batch["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-width // 64) * 64 > width
    assert torch.equal(padded["input_ids"][:, :width], batch["input_ids"]) and (padded["input_ids"][:, width:] == 0).all()
    assert (padded["labels"][:, width:] == -100).all() and torch.equal(padded["attention_mask"].sum(1), batch["attention_mask"].sum(1))
    with torch.no_grad():
        assert model(**padded).loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)


def _gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _on_gpu(batch):
    from finetune.data.collator import HOST_KEYS
    return {k: v.cuda() if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v for k, v in batch.items()}


def _padding_free(encode, sample_ids):
    packed = collate([encode(i) for i in sample_ids], padding_free=True)
    packed.pop("sample_ids")
    return packed


def test_padding_free_batch_matches_the_padded_batch(ckpt_dir, batch, encode, conformance):
    """Samples concatenated in one row, position ids restarting, each attending only to itself (attention
    "sdpa_varlen"; on the CPU SDPA with transformers' block-causal mask): the padded batch's loss and gradients."""
    packed = _padding_free(encode, conformance.expected["batches"][0]["ids"])
    real = batch["attention_mask"].bool()
    lengths = real.sum(1)
    starts = [0, *lengths.cumsum(0).tolist()]
    assert torch.equal(packed["input_ids"][0], batch["input_ids"][real]) and "attention_mask" not in packed
    assert torch.equal(packed["position_ids"][0], torch.cat([torch.arange(n) for n in lengths.tolist()]))
    assert packed["cu_seq_lens_q"].tolist() == starts and packed["max_length_q"] == lengths.max()
    # each sample's first label is unsupervised (it always is: the prompt), so no loss crosses a boundary
    assert (batch["labels"][:, 0] == -100).all() and torch.equal(packed["labels"][0], batch["labels"][real])
    assert torch.equal(packed["image_bound"][0], torch.cat([b + s for b, s in zip(batch["image_bound"], starts)]))
    model = load_model(ckpt_dir, dtype=torch.float32, attn_implementation=SDPA_VARLEN).train()
    loss, grads = _gradients(model, batch)
    loss_packed, grads_packed = _gradients(model, packed)
    assert loss_packed == pytest.approx(loss, rel=1e-5)
    assert grads_packed.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_packed[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # the boundaries matter: read as one long sequence, the same row gives another loss
    with torch.no_grad():
        one_sequence = model(**dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])).loss
    assert one_sequence.item() != pytest.approx(loss, rel=1e-3)


def test_a_vision_tower_trained_after_inference_on_the_same_image_shapes_still_backpropagates(ckpt_dir, batch):
    """Evaluation during training (and chat) encode images under inference mode; the image position ids cached then
    must still serve the training steps after it, whose trained position embedding saves them for the backward."""
    from replace_file.modeling_minicpmv import _strip_position_ids
    _strip_position_ids.cache_clear()  # as in a fresh process, whatever ran before
    model = load_model(ckpt_dir, dtype=torch.float32, attn_implementation=SDPA_VARLEN).train()
    with torch.inference_mode():
        model.get_vision_embedding(batch["pixel_values"], batch["tgt_sizes"])
    loss, grads = _gradients(model, batch)
    assert "vpm.embeddings.position_embedding.weight" in grads and loss > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's variable-length kernel needs a GPU")
def test_padding_free_on_a_gpu_runs_flash_varlen_compiled_without_recompiles(ckpt_dir, batch, encode, conformance):
    """On the GPU (bf16) the concatenated samples go through flash attention's variable-length kernel: the padded
    batch's loss and gradients (to bf16 precision), and compiled blocks take new boundaries without recompiling."""
    import torch._dynamo
    from finetune.execution import compile_blocks

    ids = conformance.expected["batches"][0]["ids"]
    model = load_model(ckpt_dir, dtype=torch.bfloat16, device="cuda", attn_implementation=SDPA_VARLEN).train()
    loss, grads = _gradients(model, _on_gpu(batch))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss_packed, grads_packed = _gradients(model, _on_gpu(_padding_free(encode, ids)))
    ops = {e.name for e in prof.events()}
    assert {"aten::_flash_attention_forward", "aten::_flash_attention_backward"} <= ops, sorted(ops)
    assert loss_packed == pytest.approx(loss, rel=2e-2)
    for name in grads:
        torch.testing.assert_close(grads_packed[name].float(), grads[name].float(), atol=2e-2, rtol=5e-2, msg=name)
    torch._dynamo.reset()
    compile_blocks(model)
    for step, sample_ids in enumerate((ids, ids[:2], ids[1:])):
        with torch.compiler.set_stance("fail_on_recompile" if step > 0 else "default"):
            loss_compiled, _ = _gradients(model, _on_gpu(_padding_free(encode, sample_ids)))
        if step == 0:
            assert loss_compiled == pytest.approx(loss_packed, rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_the_blocks_with_the_uncompiled_loss_and_gradients(ckpt_dir, encode, conformance):
    """--cuda_graphs: the blocks are recorded once per batch shape and then replayed (cudaGraphLaunch), alternating
    between two shapes, with the loss and gradients of the uncompiled model (to bf16 precision)."""
    import torch._dynamo
    import torch._inductor.config
    from finetune.arguments import TuneArguments
    from finetune.execution import compile_blocks
    from finetune.model import configure_trainable
    ids = conformance.expected["batches"][0]["ids"]
    batches = [collate([encode(i) for i in sample_ids], pad_to_multiple_of=64) for sample_ids in (ids[:1], ids[2:])]
    batches = [_on_gpu({k: v for k, v in b.items() if k != "sample_ids"}) for b in batches]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]

    def lora_model():
        model = load_model(ckpt_dir, dtype=torch.bfloat16, device="cuda")
        torch.manual_seed(0)  # the same adapters
        return configure_trainable(model, TuneArguments(use_lora=True, lora_dropout=0.0)).train()

    reference = [_gradients(lora_model(), b) for b in batches]
    torch._dynamo.reset()
    model = lora_model()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    # compile_blocks turns CUDA graphs on for the process: off again for the tests after this one
    with torch._inductor.config.patch({"triton.cudagraphs": False, "triton.slow_path_cudagraph_asserts": True}):
        compile_blocks(model, cuda_graphs=True)
        for step in range(3):  # warm-up, recording, replay
            for b, (loss, grads) in zip(batches, reference):
                torch.compiler.cudagraph_mark_step_begin()
                with torch.profiler.profile(activities=activities) if step == 2 else contextlib.nullcontext() as prof:
                    loss_graphed, grads_graphed = _gradients(model, b)
                assert loss_graphed == pytest.approx(loss, rel=2e-2)
                assert grads_graphed.keys() == grads.keys()
                for name in grads:
                    torch.testing.assert_close(grads_graphed[name].float(), grads[name].float(), atol=2e-2,
                                               rtol=5e-2, msg=name)
    assert "cudaGraphLaunch" in {e.name for e in prof.events()}


@pytest.mark.parametrize("modules,every_n", [("all", 1), ("vision", 2), ("resampler", 1)])
def test_checkpointing_choices_recompute_the_chosen_blocks_with_same_gradients(ckpt_dir, batch, modules, every_n):
    from transformers.modeling_layers import GradientCheckpointingLayer
    from finetune.execution import apply_recompute
    _, reference = _gradients(load_model(ckpt_dir, dtype=torch.float32).train(), batch)
    model = load_model(ckpt_dir, dtype=torch.float32).train()
    apply_recompute(model, modules, every_n)
    on = {n.split(".")[0] + ("" if n == "resampler" else f".{n.rsplit('.', 1)[-1]}")
          for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing}
    n_llm, n_vision = model.config.num_hidden_layers, model.config.vision_config.num_hidden_layers
    expected = {"all": {f"llm.{i}" for i in range(n_llm)} | {f"vpm.{i}" for i in range(n_vision)} | {"resampler"},
                "vision": {f"vpm.{i}" for i in range(0, n_vision, 2)} | {"resampler"}, "resampler": {"resampler"}}
    assert on == expected[modules]
    _, grads = _gradients(model, batch)
    assert grads.keys() == reference.keys()
    assert any(n.startswith("vpm.") for n in grads) and any(n.startswith("resampler.") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_blocks_match_eager_without_graph_breaks_or_recompiles(ckpt_dir, batch, encode, conformance):
    """LoRA + vision tower trained + every other vision block recomputed, compiled by inductor: the same loss
    and gradients as eager, in one graph per block kind however the batch shape changes."""
    import torch._dynamo
    from finetune.arguments import TuneArguments
    from finetune.execution import apply_recompute, compile_blocks
    from finetune.model import configure_trainable
    tune = TuneArguments(use_lora=True, lora_dropout=0.0)
    smaller = collate([encode(i) for i in conformance.expected["batches"][0]["ids"][:2]])
    smaller.pop("sample_ids")
    batches = [batch, smaller]
    results = []
    for compiled in (False, True):
        model = load_model(ckpt_dir, dtype=torch.float32)
        apply_recompute(model, "vision", 2)
        torch.manual_seed(0)  # the same LoRA initialisation
        model = configure_trainable(model, tune).train()
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compile_blocks(model)
        results.append([_gradients(model, b) for b in batches + batches[:1]])
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] <= 4, dict(counters)
    for (loss, grads), (loss_c, grads_c) in zip(*results):
        assert loss_c == pytest.approx(loss, rel=1e-5)
        assert grads.keys() == grads_c.keys() and any(".lora_A." in n for n in grads)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_text_only_batch_trains_and_touches_the_vision_path(ckpt_dir, tokenizer):
    from finetune.data.conversation import encode_conversation, ImageSettings
    model = load_model(ckpt_dir, dtype=torch.float32).train()
    ex = encode_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], [],
                             tokenizer, ImageSettings.from_config(model.config))
    batch = collate([ex])
    batch.pop("sample_ids")
    assert batch["pixel_values"] is None
    loss = model(**batch).loss
    loss.backward()
    # every vision parameter took part (zero gradient), so no rank waits on another under DeepSpeed
    assert all(p.grad is not None for p in model.vpm.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in model.resampler.parameters())
    assert model.llm.lm_head.weight.grad.abs().sum() > 0


def test_lora_with_frozen_embeddings_and_checkpointing(ckpt_dir, batch):
    from peft import LoraConfig, get_peft_model
    model = load_model(ckpt_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
                      modules_to_save=["resampler"])
    peft_model = get_peft_model(model, lora).train()
    peft_model(**batch).loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("lora_A" in n for n in trained) and any("resampler" in n for n in trained)
    assert not model.llm.model.embed_tokens.weight.requires_grad


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_for_other_minicpm_versions(ckpt_dir, tmp_path):
    folder = _copy_checkpoint(ckpt_dir, tmp_path / "v26")
    config = json.loads((folder / "config.json").read_text())
    config.update(version=2.6, hidden_size=3584)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"MiniCPM-V 2\.6.*hidden_size=3584"):
        load_model(folder)
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="found model_type='qwen2'"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_strict_loading_names_missing_and_unexpected_tensors(ckpt_dir, tmp_path):
    folder = _copy_checkpoint(ckpt_dir, tmp_path / "ckpt")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["resampler.query"]
    tensors = load_file(shard)
    tensors["resampler.extra"] = tensors.pop("resampler.query")
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["resampler.extra"] = index["weight_map"].pop("resampler.query")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"resampler\.query.*resampler\.extra|resampler\.extra.*resampler\.query"):
        load_model(folder)


def test_tokenizer_attributes(tokenizer):
    assert tokenizer.unk_token == "<unk>" and tokenizer.im_start == "<image>" and tokenizer.slice_end == "</slice>"
    ids = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eot_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id}
    assert ids == {tokenizer.convert_tokens_to_ids(t) for t in
                   ("<image>", "</image>", "<|eot_id|>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>")}
    assert not hasattr(tokenizer, "slice_start_id")  # vLLM tells 2.5 from 2.6 by its absence
    # the official decode applies clean_up_tokenization_spaces
    assert tokenizer.decode(tokenizer("Press Login .", add_special_tokens=False).input_ids) == "Press Login."


def test_dtype_conversion(ckpt_dir):
    model = load_model(ckpt_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_vision_tower_refuses_a_patch_mask(model, batch):
    """The released model's vision tower ran with an all-true mask (no mask at all): a caller that passes one
    expects masking the model never had."""
    pixels = batch["pixel_values"][:1]
    with pytest.raises(ValueError, match="all-true patch mask"):
        model.vpm(pixels, patch_attention_mask=torch.ones(1, 1, pixels.shape[-1] // 14, dtype=torch.bool))


def test_patch_embedding_as_a_matrix_product_equals_the_checkpoints_convolution(model, batch):
    """The checkpoint's patch convolution, run as a matrix product, gives the convolution's patches in row-major
    order: on the batch's strips and on a grid of several patch rows."""
    patch = model.vpm.embeddings.patch_embedding
    pixels = batch["pixel_values"][:2]
    grid = torch.randn(2, 3, 3 * 14, 5 * 14)
    for x in (pixels, grid):
        expected = F.conv2d(x, patch.weight, patch.bias, stride=14).flatten(2).transpose(1, 2)
        torch.testing.assert_close(patch(x), expected, rtol=1e-5, atol=1e-5)


def test_llm_norms_run_fused_with_llamas_math(model):
    """Llama's RMSNorm through torch's fused rms_norm: the same values in fp32; a weight in another dtype than the
    hidden states (norms kept in fp32 under bf16 autocast) gets Llama's own math and result dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norms = [m for m in model.llm.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == model.config.num_hidden_layers * 2 + 1 and all(type(m) is not LlamaRMSNorm for m in norms)
    norm = norms[0]
    reference = LlamaRMSNorm(norm.weight.shape[0], norm.variance_epsilon)
    reference.weight.data.copy_(torch.rand_like(norm.weight) + 0.5)
    norm = type(norm)(norm.weight.shape[0], norm.variance_epsilon)
    norm.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, norm.weight.shape[0]) * 4
    torch.testing.assert_close(norm(x), reference(x), rtol=1e-6, atol=1e-6)
    mixed = norm(x.bfloat16())
    assert mixed.dtype == torch.float32 and torch.equal(mixed, reference(x.bfloat16()))


def test_tokenizer_loads_without_the_false_mistral_regex_warning_and_encodes_as_official(conformance, tmp_path):
    """transformers 5.17-5.22 warn of "an incorrect regex pattern" that "will lead to incorrect tokenization" for
    a tokenizer whose config.json has no transformers_version, as the folders official_format writes: false for
    Llama-3's regex. Loaded from such a folder, the tokenizer logs no such warning and gives the official ids;
    the warning's text, sent where transformers sends it, is dropped while that module's other warnings pass."""
    from finetune.model import load_tokenizer
    from finetune.official_format import official_config, write_config, write_tokenizer
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    logging.getLogger("transformers").addHandler(handler)  # what transformers' own handler would print
    try:
        write_config(tmp_path, official_config())
        write_tokenizer(tmp_path)
        tokenizer = load_tokenizer(tmp_path)
        logger = logging.getLogger("transformers.tokenization_utils_tokenizers")
        logger.warning(f"The tokenizer you are loading from '{tmp_path}' with an incorrect regex pattern: "
                       "https://hf.co/x. This will lead to incorrect tokenization.")
        logger.warning("another tokenizer warning")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "incorrect regex pattern" not in logged.getvalue() and "another tokenizer warning" in logged.getvalue()
    for sample in conformance.expected["samples"].values():
        assert tokenizer(sample["text"], add_special_tokens=False).input_ids == sample["input_ids"]


def test_a_graph_break_in_a_compiled_block_is_reported_once_with_its_reason(caplog):
    """Where dynamo cannot trace a piece of a compiled block, that piece runs eagerly and the run says so (after
    the first step), naming the reason; a break already reported is not repeated."""
    import torch._dynamo
    from finetune.execution import GraphBreakReport

    def block(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x + 1

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    report = GraphBreakReport()
    assert report.report() == {}
    torch.testing.assert_close(torch.compile(block, backend="eager")(torch.ones(3)), torch.full((3,), 3.0))
    with caplog.at_level("WARNING", logger="finetune.execution"):
        new = report.report()
        assert report.report() == {}
    reason = next(iter(new))
    assert sum(new.values()) == 1 and "torch._dynamo.graph_break()" in reason
    assert "1 graph break(s); these parts run eagerly:\n  1 x " + reason.splitlines()[0] in caplog.text
    torch._dynamo.utils.counters.clear()
