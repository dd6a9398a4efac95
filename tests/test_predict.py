"""predict's fast path on the conformance checkpoint: the answers of one-by-one generation, whatever the batch."""
import json

import pytest
import torch

from finetune import predict as predict_module
from finetune.data.collator import collate
from finetune.data.conversation import ImageSettings
from finetune.evaluate import main as evaluate_cli
from finetune.predict import Prompts, predict, prompt_embeddings, read_samples


@pytest.fixture(scope="module")
def samples(conformance):
    """The fixture's six samples, images of very different shapes (a 4000x300 banner beside a 1920x1080 page)."""
    return [dict(s, image=str(conformance.dir / "images" / s["image"])) for s in conformance.cases["samples"]]


def rows_of(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def trailing_pad_removed(ids):
    ids = ids.tolist()
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


def test_greedy_generation_without_padding_gives_generates_token_ids(model, tokenizer, samples, tmp_path):
    """generate_greedy on the six prompts at once, in passes of at most 700 prompt tokens, against generate() on each
    prompt alone; an eos that one answer reaches early, so sequences stop at different steps."""
    data = tmp_path / "test.json"
    data.write_text(json.dumps(samples))
    dataset = Prompts(read_samples(str(data)), tokenizer, ImageSettings.from_config(model.config), torch.float32)
    prompts = prompt_embeddings(model, [example for _, example in dataset])
    eos = [int(model.generate(inputs_embeds=prompts[1][None], max_new_tokens=3, tokenizer=tokenizer)[0, 2]),
           tokenizer.eot_id]
    together = model.generate_greedy(prompts, 10, eos, prompt_tokens_per_pass=700)
    alone = [model.generate(inputs_embeds=p[None], max_new_tokens=10, eos_token_id=eos, pad_token_id=0)[0]
             for p in prompts]
    assert [trailing_pad_removed(ids) for ids in together] == [trailing_pad_removed(ids) for ids in alone]
    assert sorted(len(trailing_pad_removed(ids)) for ids in alone)[:2] == [3, 10]  # one stopped at the eos, one ran on
    assert len({len(p) for p in prompts}) == 6 and sum(len(p) for p in prompts) > 2 * 700  # several passes


def test_default_predictions_are_the_one_by_one_answers(model, tokenizer, samples, encode, tmp_path):
    """Also with a second sample on the 1920x1080 page, whose strips go through the vision tower with the first's."""
    data = tmp_path / "test.json"
    page = next(s for s in samples if s["id"] == "guienv_bbox2text")
    second = dict(page, id="guienv_bbox2text_again", conversations=[
        dict(page["conversations"][0], content=page["conversations"][0]["content"].replace("<box>", "<box> ")),
        page["conversations"][1]])
    data.write_text(json.dumps(samples + [second]))
    # the plain path: one sample at a time, in file order, in the main process
    predict(model, tokenizer, str(data), str(tmp_path / "plain.jsonl"), batch_size=1, progress=False, num_workers=0,
            max_new_tokens=8)
    # the defaults (all seven in one batch, longest first), with an image worker
    vision_passes = []
    hook = model.vpm.register_forward_hook(lambda module, args, out: vision_passes.append(len(args[0])))
    try:
        predict(model, tokenizer, str(data), str(tmp_path / "fast.jsonl"), progress=False, num_workers=1,
                max_new_tokens=8)
    finally:
        hook.remove()
    plain, fast = rows_of(tmp_path / "plain.jsonl"), rows_of(tmp_path / "fast.jsonl")
    assert {k: r["prediction"] for k, r in fast.items()} == {k: r["prediction"] for k, r in plain.items()}
    assert len(fast) == 7 and all(r["source"] == str(data) for r in fast.values())
    # 5 vision passes for 7 samples' 40 strips: the two pages' 2 x (1 + 8) together, two others of one width too
    assert sorted(vision_passes) == [1, 1, 8, 12, 18]
    # --max_slice_nums 1: the 1920x1080 page is one unit instead of nine, so its prompt and answer change
    predict(model, tokenizer, str(data), str(tmp_path / "one_slice.jsonl"), progress=False, max_slice_nums=1,
            max_new_tokens=8)
    one_slice = rows_of(tmp_path / "one_slice.jsonl")
    assert one_slice["guienv_bbox2text"]["prediction"] != fast["guienv_bbox2text"]["prediction"]
    # which the batch would change if its images went through the vision tower together: the tower attends to
    # the padding of the strips it is given, so a sample's prompt would depend on its batch mates
    alone = collate([encode("guienv_bbox2text")])
    together = collate([encode("guienv_bbox2text"), encode("banner_extreme_aspect")])
    with torch.no_grad():
        first = model.get_llm_embedding(alone["input_ids"], alone["pixel_values"], alone["tgt_sizes"], alone["image_bound"])
        batched = model.get_llm_embedding(together["input_ids"], together["pixel_values"], together["tgt_sizes"],
                                          together["image_bound"])
    assert (batched[0, :first.shape[1]] - first[0]).abs().max() > 1e-3


def test_a_batch_out_of_gpu_memory_is_halved_and_later_batches_keep_the_size(model, tokenizer, samples, tmp_path,
                                                                            monkeypatch, caplog):
    """Out-of-memory cannot happen on the CPU: generation raises it, as CUDA would, for more than two samples."""
    real = predict_module.generate_answers
    sizes = []

    def limited(model, tokenizer, examples, **kwargs):
        sizes.append(len(examples))
        if len(examples) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, tokenizer, examples, **kwargs)

    monkeypatch.setattr(predict_module, "generate_answers", limited)
    data = tmp_path / "test.json"
    data.write_text(json.dumps(samples))
    predict(model, tokenizer, str(data), str(tmp_path / "p.jsonl"), batch_size=5, progress=False, num_workers=0,
            max_new_tokens=4)
    assert sizes == [5, 2, 2, 1, 1]  # 5 -> 2 + 2 + 1 of the first batch; the next batch (1 sample) as it fits
    rows = rows_of(tmp_path / "p.jsonl")
    assert len(rows) == 6 and all("prediction" in r for r in rows.values())
    assert "out of GPU memory with 5 samples in a batch: continuing with 2" in caplog.text


def test_predict_names_each_rows_source_and_evaluate_reports_each_file(model, tokenizer, samples, tmp_path, capsys):
    first, second = tmp_path / "a" / "env.json", tmp_path / "b" / "act.json"
    for path, part in ((first, samples[:3]), (second, samples[3:])):
        path.parent.mkdir()
        path.write_text(json.dumps(part))
    out = tmp_path / "preds.jsonl"
    assert predict(model, tokenizer, f"{first},{second}", str(out), progress=False, max_new_tokens=4) == 6
    assert predict(model, tokenizer, f"{first},{second}", str(out), progress=False, max_new_tokens=4) == 0  # resumed
    assert {r["source"] for r in rows_of(out).values()} == {str(first), str(second)}
    assert evaluate_cli(["--data", f"{first},{second}", "--predictions", str(out), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["by_source"]) == {"env.json", "act.json"}
    assert sum(r["counts"]["samples"] for r in report["by_source"]["act.json"].values()) == 3
