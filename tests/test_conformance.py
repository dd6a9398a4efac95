"""Our model and data path against what the official code computed on the conformance fixture. Every id,
size and setting comes from the fixture files, so any fixture of the same schema must pass unchanged."""
import shutil
from pathlib import Path

import pytest
import torch

from finetune.data.collator import collate
from replace_file.image_processing_minicpmv import pack_pixel_strips, slice_plan

from .conftest import conformance_sample_ids

pytestmark = pytest.mark.conformance
SAMPLES = conformance_sample_ids()


def test_fixture_settings_are_the_checkpoints(conformance, model):
    assert model.config.query_num == conformance.expected["query_num"]
    expected = conformance.expected["slice_config"]
    assert {k: model.config.slice_config[k] for k in expected} == expected


def test_slicing_table(conformance):
    for row in conformance.expected["slicing"]:
        plan = slice_plan(tuple(row["size"]), row["max_slice_nums"], row["scale_resolution"])
        got = dict(source_size=list(plan.source_size), grid=list(plan.grid) if plan.grid else None,
                   slice_size=list(plan.slice_size) if plan.grid else None, n_slices=plan.n_slices)
        assert got == {k: row[k] for k in got}, row


@pytest.mark.parametrize("sample_id", SAMPLES)
def test_tokens_labels_and_pixels(sample_id, conformance, encode):
    expected = conformance.expected["samples"][sample_id]
    ex = encode(sample_id)
    assert ex["input_ids"].tolist() == expected["input_ids"]
    # official labels are pre-shifted: labels[i + 1] == target_shifted[i]; nothing else supervised
    shifted = [-100] + expected["target_shifted"][:-1]
    assert ex["labels"].tolist() == shifted and expected["target_shifted"][-1] == -100
    assert ex["image_bound"].tolist() == expected["image_bound"]
    assert ex["tgt_sizes"].tolist() == expected["tgt_sizes"]
    assert [list(p.shape) for p in ex["pixel_values"]] == expected["pixel_shapes"]
    sums = [p.double().sum().item() for p in ex["pixel_values"]]
    abs_sums = [p.double().abs().sum().item() for p in ex["pixel_values"]]
    assert sums == pytest.approx(expected["pixel_sum"], abs=1e-2)
    assert abs_sums == pytest.approx(expected["pixel_abs_sum"], abs=1e-2)
    stored = conformance.tensors.get(f"{sample_id}.pixel_values.0")
    if stored is not None:
        torch.testing.assert_close(ex["pixel_values"][0], stored.float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("sample_id", SAMPLES)
def test_vision_embeddings_and_logits(sample_id, conformance, encode, model):
    expected = conformance.expected["samples"][sample_id]
    ex = encode(sample_id)
    pixels = pack_pixel_strips(ex["pixel_values"])
    with torch.no_grad():
        vision = model.get_vision_embedding(pixels, ex["tgt_sizes"])
        out = model(input_ids=ex["input_ids"][None], pixel_values=pixels, tgt_sizes=ex["tgt_sizes"],
                    image_bound=[ex["image_bound"]], labels=ex["labels"][None], return_logits=True)
    torch.testing.assert_close(vision, conformance.tensors[f"{sample_id}.vision_embeds"], atol=1e-4, rtol=0)
    assert out.loss.item() == pytest.approx(expected["loss"], abs=1e-3)

    logits = out.logits[0]
    positions = expected["supervised_positions"]
    targets = torch.tensor([expected["target_shifted"][p] for p in positions])
    logprob = logits[positions].log_softmax(-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(logprob, torch.tensor(expected["target_logprob"]), atol=1e-3, rtol=0)
    top = logits[positions].topk(5)
    torch.testing.assert_close(top.values, torch.tensor(expected["top5_logits"]), atol=1e-3, rtol=0)
    exp_ids, exp_vals = torch.tensor(expected["top5_ids"]), torch.tensor(expected["top5_logits"])
    gaps = torch.cat([exp_vals[:, :-1] - exp_vals[:, 1:], torch.full((len(positions), 1), 1.0)], 1)
    prev_gaps = torch.cat([torch.full((len(positions), 1), 1.0), gaps[:, :-1]], 1)
    clear = (gaps > 1e-2) & (prev_gaps > 1e-2)  # ids only where neighbouring logits are well separated
    assert clear.any()
    assert torch.equal(top.indices[clear], exp_ids[clear])
    torch.testing.assert_close(logits[expected["probe_positions"]], conformance.tensors[f"{sample_id}.probe_logits"],
                               atol=1e-3, rtol=0)


def test_batches(conformance, encode, model):
    for k, batch_expected in enumerate(conformance.expected["batches"]):
        examples = [encode(i) for i in batch_expected["ids"]]
        batch = collate(examples)
        batch.pop("sample_ids")
        with torch.no_grad():
            out = model(**batch, return_logits=True)
            vision = model.get_vision_embedding(batch["pixel_values"], batch["tgt_sizes"])
        assert out.loss.item() == pytest.approx(batch_expected["loss_mean_over_batch"], abs=1e-3)
        start = 0
        for b, (sample_id, ex) in enumerate(zip(batch_expected["ids"], examples)):
            n = len(ex["tgt_sizes"])
            torch.testing.assert_close(vision[start:start + n], conformance.tensors[f"batch{k}.{sample_id}.vision_embeds"],
                                       atol=1e-4, rtol=0)
            start += n
            supervised = (batch["labels"][b, 1:] != -100).nonzero()[:, 0]
            assert out.logits[b, supervised].argmax(-1).tolist() == batch_expected["per_sample_top1_at_supervised"][b]


def test_chat_generations(conformance, model, tokenizer):
    for case in conformance.cases["generations"]:
        answer = model.chat(conformance.image(case["image"]), case["msgs"], tokenizer, sampling=False,
                            max_new_tokens=case["max_new_tokens"])
        assert answer == conformance.expected["generations"][case["id"]]["chat_sampling_false_answer"]


def test_drop_in_remote_code_route(conformance, ckpt_dir, tmp_path):
    """Our files copied into the checkpoint folder serve transformers' own trust_remote_code loading."""
    from transformers import AutoModel, AutoTokenizer
    folder = tmp_path / "model"
    shutil.copytree(ckpt_dir, folder)
    for f in (Path(__file__).resolve().parents[1] / "replace_file").glob("*.py"):
        if f.name != "__init__.py":
            shutil.copy(f, folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "MiniCPMV" and type(tokenizer).__name__ == "MiniCPMVTokenizerFast"
    assert (tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eot_id, tokenizer.unk_token) == (
        tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("</image>"),
        tokenizer.convert_tokens_to_ids("<|eot_id|>"), "<unk>")
    for case in conformance.cases["generations"]:
        answer = model.chat(conformance.image(case["image"]), case["msgs"], tokenizer, sampling=False,
                            max_new_tokens=case["max_new_tokens"])
        assert answer == conformance.expected["generations"][case["id"]]["chat_sampling_false_answer"]
