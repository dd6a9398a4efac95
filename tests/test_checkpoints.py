"""What a trained folder carries: the slicing training used (full, LoRA and merged checkpoints), so that predict and
chat slice images as training did; and a LoRA folder loads with the official readme's peft snippet, as written."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

import finetune
from finetune.merge_lora import merge
from finetune.predict import predict

from .conftest import REPO

SQUARE = 1344  # a screenshot of 3 x 3 times 448 x 448 pixels: 3 x 3 slices by default, 2 x 2 with at most 4
QUESTION = [{"role": "user", "content": "What is on this page?"}]


@pytest.fixture(scope="module")
def base_folder(ckpt_dir, tmp_path_factory):
    """The conformance checkpoint prepared as the README says: our model files copied beside its config.json."""
    folder = tmp_path_factory.mktemp("base")
    for file in ckpt_dir.iterdir():
        (folder / file.name).symlink_to(file)
    for file in (REPO / "replace_file").glob("*.py"):
        if file.name != "__init__.py":
            shutil.copy(file, folder)
    return folder


def train(base_folder, train_data, output_dir, *flags):
    run = subprocess.run([sys.executable, "-m", "finetune.finetune", "--model_name_or_path", str(base_folder),
                          "--data_path", str(train_data / "train.json"), "--output_dir", str(output_dir),
                          "--max_slice_nums", "4", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
                          "--dataloader_num_workers", "0", *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def lora_folder(base_folder, train_data, tmp_path_factory):
    return train(base_folder, train_data, tmp_path_factory.mktemp("lora"), "--use_lora", "true", "--lora_r", "2")


def vision_units(model, run):
    """Images (whole image and slices) the vision tower receives, per call, while `run()` runs."""
    seen = []
    hook = model.vpm.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        run()
    finally:
        hook.remove()
    return seen


@pytest.fixture(scope="module")
def screenshot(conformance, tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "screen.png"
    conformance.image("web_1920x1080.png").resize((SQUARE, SQUARE)).save(path)
    return path


def units_in_predict_and_chat(folder, screenshot, tmp_path):
    model, tokenizer = finetune.load(str(folder), dtype=torch.float32)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    data = tmp_path / f"{folder.name}.jsonl"
    data.write_text(json.dumps({"id": "screen", "image": str(screenshot),
                                "conversations": [{"role": "user", "content": "<image>What is on this page?"}]}))
    predicted = vision_units(model, lambda: predict(model, tokenizer, str(data), str(tmp_path / f"{folder.name}.out"),
                                                    progress=False, max_new_tokens=1))
    chatted = vision_units(model, lambda: model.chat(Image.open(screenshot), QUESTION, tokenizer, sampling=False,
                                                     max_new_tokens=1))
    return predicted + chatted


def test_predict_and_chat_slice_as_training_did_in_lora_merged_and_full_checkpoints(
        base_folder, lora_folder, train_data, screenshot, tmp_path):
    """Trained with --max_slice_nums 4: predict and chat cut a large screenshot into 4 slices (plus the whole
    image) on the LoRA folder and on the model merged from it (saved in the base's float16), whose config says so
    as a full checkpoint's does; into 9 on the base model."""
    merged = tmp_path / "merged"
    merge(str(lora_folder), str(merged))
    full = train(base_folder, train_data, tmp_path / "full", "--tune_llm", "false", "--tune_vision", "false")
    for folder in (lora_folder, merged, full):
        assert json.loads((folder / "config.json").read_text())["slice_config"]["max_slice_nums"] == 4
    assert {w.dtype for w in load_file(merged / "model.safetensors").values()} == {torch.float16}  # the base's
    for folder in (lora_folder, merged):
        assert units_in_predict_and_chat(folder, screenshot, tmp_path) == [1 + 4, 1 + 4], folder
    assert units_in_predict_and_chat(base_folder, screenshot, tmp_path) == [1 + 9, 1 + 9]


def test_the_official_readmes_peft_snippet_loads_our_lora_folder(lora_folder, screenshot):
    """`AutoPeftModel.from_pretrained(path_to_adapter, device_map="auto", trust_remote_code=True)`, verbatim: the
    base comes from the base folder's own model files (through transformers' AutoModel), with the trained adapters
    and fully trained modules of the folder; chat answers."""
    from peft import AutoPeftModel
    path_to_adapter = str(lora_folder)
    model = AutoPeftModel.from_pretrained(path_to_adapter, device_map="auto", trust_remote_code=True)
    ours, tokenizer = finetune.load(path_to_adapter, dtype=model.dtype)
    expected = dict(ours.named_parameters())
    loaded = dict(model.named_parameters())
    assert loaded.keys() == expected.keys() and any("lora_B" in name for name in loaded)
    assert all(torch.equal(loaded[name], expected[name]) for name in loaded)
    answer = model.chat(Image.open(screenshot), QUESTION, tokenizer, sampling=False, max_new_tokens=2)
    assert isinstance(answer, str)
