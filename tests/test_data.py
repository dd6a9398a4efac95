"""Data path: records, validation (one test per problem kind), scanning, dataset, collator, check CLI."""
import json
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from PIL import Image

from finetune.data.collator import collate
from finetune.data.conversation import ImageSettings
from finetune.data.dataset import ConversationDataset, ScanOptions, placeholder_token_count, scan
from finetune.data.records import RecordFile, SampleError
from replace_file.image_processing_minicpmv import image_placeholder, slice_image, slice_plan


def qa(question="<image>\nWhat is this?", answer="A page."):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (640, 480), "white").save(tmp_path / "ok.png")
    Image.new("RGBA", (300, 200), (10, 20, 30, 128)).save(tmp_path / "rgba.png")
    return tmp_path


@pytest.fixture(scope="module")
def settings(model):
    return ImageSettings.from_config(model.config)


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return str(path)


def scan_one(folder, sample, tokenizer, settings, **options):
    result = scan([write_json(folder / "data.json", [sample])], tokenizer, settings, ScanOptions(**options),
                  progress=False)
    return result


BAD_SAMPLES = {
    "missing_image": {"id": "a", "image": "nope.png", "conversations": qa()},
    "empty_image": {"id": "a", "image": "empty.png", "conversations": qa()},
    "unreadable_image": {"id": "a", "image": "text.png", "conversations": qa()},
    "truncated_image": {"id": "a", "image": "truncated.png", "conversations": qa()},
    "image_too_large": {"id": "a", "image": "big.png", "conversations": qa()},
    "unknown_role": {"id": "a", "conversations": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "first_turn_not_user": {"id": "a", "conversations": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
    "no_assistant_turn": {"id": "a", "conversations": [{"role": "user", "content": "hi"}]},
    "empty_answer": {"id": "a", "conversations": qa("hi", "  ")},
    "non_string_content": {"id": "a", "conversations": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
    "image_tag_mismatch": {"id": "a", "image": ["ok.png", "ok.png"], "conversations": qa()},
    "missing_conversations": {"id": "a", "image": "ok.png"},
}


def make_bad_images(folder):
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.frombytes("RGB", (200, 200), random.Random(0).randbytes(120000)).save(folder / "noisy.png")
    (folder / "truncated.png").write_bytes((folder / "noisy.png").read_bytes()[:20000])
    Image.new("RGB", (4000, 3000)).save(folder / "big.png")


@pytest.mark.parametrize("kind", sorted(BAD_SAMPLES))
def test_each_bad_sample_kind_is_named(kind, folder, tokenizer, settings):
    make_bad_images(folder)
    result = scan_one(folder, BAD_SAMPLES[kind], tokenizer, settings, max_image_pixels=10_000_000, decode_images=True)
    assert len(result.errors) == 1 and len(result.entries) == 0
    error = result.errors[0]
    assert error.kind == kind
    assert str(folder / "data.json") in str(error) and "sample 0" in str(error) and "'a'" in str(error)


def test_invalid_json_names_line_and_column(folder):
    (folder / "bad.json").write_text('[{"id": 1,\n  "conversations": [}]')
    with pytest.raises(SampleError, match=r"bad\.json: invalid JSON at line 2, column \d+"):
        RecordFile(str(folder / "bad.json"))


def test_bad_jsonl_line_names_its_line_number(folder, tokenizer, settings):
    good = json.dumps({"id": "g", "conversations": qa("hi", "ok")})
    (folder / "d.jsonl").write_text(f"{good}\n\n{{broken\n{good}\n")
    result = scan([str(folder / "d.jsonl")], tokenizer, settings, progress=False)
    assert len(result.entries) == 2 and len(result.errors) == 1
    assert result.errors[0].kind == "invalid_json" and "line 3" in str(result.errors[0])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "CMYK"])
def test_any_pil_mode_trains_as_rgb(mode, folder, tokenizer, settings):
    Image.new(mode, (100, 80)).save(folder / "img.tiff")
    result = scan_one(folder, {"image": "img.tiff", "conversations": qa()}, tokenizer, settings, decode_images=True)
    dataset = ConversationDataset(result, tokenizer, settings, ScanOptions())
    example = dataset[0]
    assert example["pixel_values"][0].shape[0] == 3


def test_image_paths_relative_to_the_data_file_and_absolute(folder, tokenizer, settings, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    samples = [{"image": "ok.png", "conversations": qa()}, {"image": str(folder / "rgba.png"), "conversations": qa()}]
    result = scan([write_json(other / "d.json", samples)], tokenizer, settings, progress=False)
    assert [e.kind for e in result.errors] == ["missing_image"]
    result = scan([write_json(folder / "d.json", samples)], tokenizer, settings, progress=False)
    assert not result.errors and len(result.entries) == 2


def test_text_only_and_multi_image_samples(folder, tokenizer, settings):
    samples = [
        {"id": "text", "conversations": qa("Say hi.", "Hi.")},
        {"id": "two", "image": ["ok.png", "rgba.png"],
         "conversations": [{"role": "user", "content": "First <image> then <image>: same?"},
                           {"role": "assistant", "content": "No."}]},
        {"id": "system", "image": "ok.png", "conversations": [{"role": "system", "content": "Be brief."}] + qa()},
    ]
    result = scan([write_json(folder / "d.json", samples)], tokenizer, settings, progress=False)
    assert not result.errors
    dataset = ConversationDataset(result, tokenizer, settings, ScanOptions())
    text, two, system = dataset[0], dataset[1], dataset[2]
    assert text["pixel_values"] == [] and (text["labels"] != -100).any()
    plans = [slice_plan(s, settings.max_slice_nums, settings.scale_resolution) for s in ((640, 480), (300, 200))]
    assert len(two["pixel_values"]) == sum(1 + p.n_slices for p in plans) == len(two["image_bound"])
    # the scan's token count is the encoded length
    assert list(dataset.lengths) == [len(dataset[i]["input_ids"]) for i in range(3)]
    assert result.entries["image_tokens"][1] == sum(placeholder_token_count(p, settings.query_num) for p in plans)
    first = two["input_ids"].tolist().index(tokenizer.im_start_id)
    assert tokenizer.decode(two["input_ids"][first - 3:first]).endswith("First ")
    batch = collate([text, two, system])
    assert batch["pixel_values"].shape[0] == len(batch["tgt_sizes"]) == sum(len(b) for b in batch["image_bound"])
    assert batch["labels"].shape == batch["input_ids"].shape and batch["attention_mask"].sum() == sum(
        len(dataset[i]["input_ids"]) for i in range(3))


def test_batch_shapes_from_the_scan_are_the_collated_shapes(folder, tokenizer, settings):
    """What --cuda_graphs records before training: the scan's shape of each sample's one-sample batch (tokens
    padded to the multiple, image units, widest unit) is the collated batch's, and equal shapes are grouped."""
    Image.new("RGB", (1280, 720), "white").save(folder / "wide.png")
    samples = [{"id": "text", "conversations": qa("Say hi.", "Hi.")},
               {"id": "text2", "conversations": qa("Say hello.", "Hello.")},
               {"id": "ok", "image": "ok.png", "conversations": qa()},
               {"id": "ok2", "image": "ok.png", "conversations": qa("<image>\nWhat is it?", "A page again.")},
               {"id": "wide", "image": "wide.png", "conversations": qa()},
               {"id": "two", "image": ["ok.png", "rgba.png"],
                "conversations": qa("First <image> then <image>: same?", "No.")}]
    result = scan([write_json(folder / "d.json", samples)], tokenizer, settings, progress=False)
    dataset = ConversationDataset(result, tokenizer, settings, ScanOptions())
    shapes = dataset.batch_shapes(pad_to_multiple_of=64)
    assert sorted(i for _, indices in shapes for i in indices) == list(range(len(samples)))
    assert [len(indices) for _, indices in shapes] == [2, 2, 1, 1]  # most common first
    assert len({shape for shape, _ in shapes}) == len(shapes)
    for (tokens, units, widest), indices in shapes:
        for i in indices:
            batch = collate([dataset[i]], pad_to_multiple_of=64)
            assert batch["input_ids"].shape == (1, tokens)
            if units:
                assert batch["pixel_values"].shape == (units, 3, settings.patch_size, widest * settings.patch_size)
            else:
                assert batch["pixel_values"] is None and widest == 0


def test_overlong_samples_are_skipped_by_default_and_named(folder, tokenizer, settings):
    long = {"id": "long", "image": "ok.png", "conversations": qa() + qa("more?", "word " * 300)}
    result = scan_one(folder, long, tokenizer, settings, model_max_length=300)
    assert len(result.entries) == 0 and result.overlong[0][2] == "long" and result.overlong[0][3] > 300


def test_overlong_samples_can_be_truncated_at_a_turn_boundary(folder, tokenizer, settings):
    long = {"id": "long", "image": "ok.png", "conversations": qa() + qa("more?", "word " * 300)}
    result = scan_one(folder, long, tokenizer, settings, model_max_length=600, overlong="truncate")
    assert result.truncated == 1 and result.entries["n_turns"][0] == 2
    example = ConversationDataset(result, tokenizer, settings, ScanOptions())[0]
    assert len(example["input_ids"]) == result.entries["length"][0] <= 600
    assert tokenizer.decode(example["input_ids"]).endswith("A page.<|eot_id|>")
    # no answer survives: skipped, not cut inside the image placeholder
    result = scan_one(folder, long, tokenizer, settings, model_max_length=200, overlong="truncate")
    assert len(result.entries) == 0 and len(result.overlong) == 1


def test_a_sample_that_breaks_after_the_scan_is_dropped_loudly(folder, tokenizer, settings, caplog):
    Image.new("RGB", (50, 50)).save(folder / "later.png")
    result = scan_one(folder, {"id": "x", "image": "later.png", "conversations": qa()}, tokenizer, settings)
    (folder / "later.png").write_bytes(b"")
    dataset = ConversationDataset(result, tokenizer, settings, ScanOptions())
    assert dataset[0] is None and "'x'" in caplog.text and "empty" in caplog.text
    batch = collate([None])
    assert (batch["labels"] == -100).all() and batch["pixel_values"] is None


def test_records_are_not_python_objects_per_sample(folder):
    path = write_json(folder / "d.json", [{"id": i, "conversations": qa("q", "a")} for i in range(1000)])
    rf = RecordFile(path)
    assert len(rf) == 1000 and rf.record(999)["id"] == 999
    assert {type(v).__name__ for v in vars(rf).values()} <= {"str", "ndarray"}


def test_check_cli_names_every_bad_sample_and_accepts_a_clean_file(folder, ckpt_dir):
    make_bad_images(folder)
    good = [{"id": f"good{i}", "image": "ok.png", "conversations": qa()} for i in range(3)]
    bad = [dict(sample, id=f"bad_{kind}") for kind, sample in sorted(BAD_SAMPLES.items())]
    mixed = write_json(folder / "mixed.json", good + bad)
    cmd = [sys.executable, "-m", "finetune.data", "check", mixed, "--model", str(ckpt_dir), "--workers", "2",
           "--max_image_pixels", "10000000"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    named = {item["id"]: kind for kind, items in report["problems"].items() for item in items}
    assert named == {f"bad_{kind}": kind for kind in BAD_SAMPLES}
    assert report["valid"] == 3 and report["tokens"]["total"]["count"] == 3
    clean = subprocess.run(cmd[:4] + [write_json(folder / "clean.json", good)] + cmd[5:], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    assert "recommendation: --model_max_length" in clean.stdout and "p99" in clean.stdout


@hsettings(max_examples=300, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(1, 12), st.sampled_from([224, 336, 448]))
def test_slicing_properties(width, height, max_slices, scale):
    plan = slice_plan((width, height), max_slices, scale)
    assert plan.n_slices <= max_slices and plan.n_slices != 1
    assert len(plan.tgt_sizes(14)) == 1 + plan.n_slices
    for w, h in [plan.source_size] + ([plan.slice_size] if plan.grid else []):
        assert w % 14 == 0 and h % 14 == 0 and w >= 14 and h >= 14
    if plan.grid:  # the slices tile the refined image exactly
        cols, rows = plan.grid
        assert (plan.slice_size[0] * cols, plan.slice_size[1] * rows) == plan.refine_size
    assert image_placeholder(plan, 4).count("<image>") == 1 + plan.n_slices


def test_sliced_images_match_the_plan():
    image = Image.new("RGB", (1920, 1080))
    plan = slice_plan(image.size)
    pieces = slice_image(image, plan)
    assert [p.size for p in pieces] == [plan.source_size] + [plan.slice_size] * plan.n_slices
