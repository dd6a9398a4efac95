"""First contact: every entry point answers --help with its flags and defaults under the command a user types,
and every mistake a newcomer makes ends with one line naming the problem and the fix, without a traceback,
before anything loads (finetune.cli, finetune.launch)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import chat, demo, evaluate, merge_lora, predict, restore_template
from finetune.arguments import parse_args
from finetune.cli import UserError, finetune_inputs
from finetune.data.__main__ import main as data_main
from finetune.official_format import official_config, write_config

REPO = Path(__file__).resolve().parents[1]


def command(args, **env):
    """Run a command in the repository; stdout and stderr as one stream, so "last line" means last printed."""
    return subprocess.run(args, cwd=REPO, env={**os.environ, "COLUMNS": "1000", **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def assert_one_line(out, expected):
    """Exit status 2, the last line printed is `error: ...` starting with `expected`, and no traceback."""
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert out.returncode == 2, out.stdout[-3000:]
    assert lines[-1].startswith(f"error: {expected}"), out.stdout[-3000:]
    assert "Traceback" not in out.stdout and "ChildFailedError" not in out.stdout, out.stdout[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def data(conformance, tmp_path_factory):
    """Two samples with images (absolute paths) and two text-only ones."""
    folder = tmp_path_factory.mktemp("data")
    samples = [dict(s, image=str(conformance.dir / "images" / s["image"])) for s in conformance.cases["samples"][:2]]
    samples += [{"id": f"text{i}", "conversations": [{"role": "user", "content": "Say OK."},
                                                     {"role": "assistant", "content": "OK."}]} for i in range(2)]
    (folder / "train.json").write_text(json.dumps(samples))
    return folder / "train.json"


def test_a_missing_model_folder_under_the_launch_script_ends_with_the_runs_own_line(data):
    """The README's command with a wrong MODEL: torchrun's child-failure report used to end it, after a 67-line
    traceback about Hub repo ids. Now the run's own line comes last, and DEBUG=1 brings the traceback back."""
    out = command(["bash", "finetune_lora.sh", "--report_to", "none"], MODEL="/nonexistent", DATA=str(data),
                  DS_CONFIG="none", GPUS_PER_NODE="1", MASTER_PORT=str(29700 + os.getpid() % 200))
    line = assert_one_line(out, "--model_name_or_path /nonexistent: no such folder")
    assert "download openbmb/MiniCPM-Llama3-V-2_5" in line
    out = command([sys.executable, "-m", "finetune.data", "check", "missing.jsonl"], DEBUG="1")
    assert out.returncode != 0 and "Traceback" in out.stdout and "finetune.cli.UserError" in out.stdout


def test_a_folder_of_another_model_stops_finetune_py_run_as_a_script(data, tmp_path):
    write_config(tmp_path / "qwen", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    out = command([sys.executable, "finetune/finetune.py", "--model_name_or_path", str(tmp_path / "qwen"),
                   "--data_path", str(data), "--output_dir", str(tmp_path / "o")])
    line = assert_one_line(out, f"{tmp_path / 'qwen'} is not a MiniCPM-Llama3-V 2.5 checkpoint: found "
                                "model_type='qwen2'")
    assert line.endswith("give a folder of MiniCPM-Llama3-V 2.5 (openbmb/MiniCPM-Llama3-V-2_5) or of a finetune of it")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_flash_attention_without_a_gpu_is_refused_before_loading(ckpt_dir, data, tmp_path):
    out = command([sys.executable, "-m", "finetune.finetune", "--model_name_or_path", str(ckpt_dir), "--data_path",
                   str(data), "--output_dir", str(tmp_path / "o"), "--attn_implementation", "flash_attention_2"])
    assert_one_line(out, "--attn_implementation flash_attention_2 needs a CUDA GPU, and this machine shows none")
    assert "Loading weights" not in out.stdout


def test_chat_names_a_missing_image_before_loading_the_model(ckpt_dir):
    out = command([sys.executable, "-m", "finetune.chat", "--model", str(ckpt_dir), "--image", "/nonexistent.png"])
    assert_one_line(out, "--image /nonexistent.png: no such file")
    assert "Loading weights" not in out.stdout


def test_data_tools_name_a_missing_file_an_output_that_is_a_file_a_misspelt_flag_and_bad_json(tmp_path, ckpt_dir):
    out = command([sys.executable, "-m", "finetune.data", "check", "missing.jsonl"])
    assert_one_line(out, f"data file missing.jsonl ({REPO / 'missing.jsonl'}): no such file")
    (tmp_path / "taken").write_text("")
    out = command([sys.executable, "-m", "finetune.data", "synth", str(tmp_path / "taken"), "--n", "1"])
    assert_one_line(out, f"OUT_DIR {tmp_path / 'taken'} is a file, not a folder")
    out = command([sys.executable, "-m", "finetune.data", "check", "x.jsonl", "--model_max_lenght", "4096"])
    assert_one_line(out, "unknown flag --model_max_lenght; did you mean --model_max_length? (`python -m "
                         "finetune.data --help` lists the flags)")
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    out = command([sys.executable, "-m", "finetune.data", "check", str(tmp_path / "broken.json"), "--model",
                   str(ckpt_dir)])
    assert_one_line(out, f"{tmp_path / 'broken.json'}: invalid JSON at line 1, column 11")


def test_the_check_report_names_a_line_without_an_id_by_its_index(tmp_path, tokenizer, ckpt_dir, capsys):
    """A JSONL line that is not JSON has no id: the report used to say `invalid_json (1): None` and `(id None)`."""
    from finetune.data.check import print_report, summarise
    from finetune.data.conversation import ImageSettings
    from finetune.data.dataset import scan
    from finetune.model import read_config
    (tmp_path / "lines.jsonl").write_text('{"id": "a", "conversations": []}\nnot json\n')
    result = scan([str(tmp_path / "lines.jsonl")], tokenizer, ImageSettings.from_config(read_config(ckpt_dir)),
                  progress=False)
    print_report(summarise(result, 2048, 0.0))
    text = capsys.readouterr().out
    assert "invalid_json (1): sample 1\n" in text and "missing_conversations (1): a\n" in text and "None" not in text
    assert f"{tmp_path / 'lines.jsonl'}: sample 1: line 2 is not valid JSON" in text


def test_finetune_checks_paths_flags_and_the_machine_before_loading(ckpt_dir, data, tmp_path):
    """The checks finetune.py makes after parsing its flags (each a UserError, reported as one line)."""
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(ckpt_dir)}))
    (tmp_path / "file").write_text("")
    write_config(tmp_path / "release", official_config())  # the full-size model's config

    def check(*flags):
        args = parse_args(["--model_name_or_path", str(ckpt_dir), "--data_path", str(data),
                           "--output_dir", str(tmp_path / "o"), *flags])
        finetune_inputs(args[0], args[1], args[3])

    check()  # all well
    for flags, message in [
        (["--lora_rank", "8"], "unknown flag --lora_rank; did you mean --lora_r?"),
        (["--data_path", "nope.json"], f"--data_path nope.json ({REPO / 'nope.json'}): no such file"),
        (["--eval_data_path", f"{data},/nonexistent.json"], "--eval_data_path /nonexistent.json: no such file"),
        (["--output_dir", str(tmp_path / "file")], f"--output_dir {tmp_path / 'file'} is a file, not a folder"),
        (["--model_name_or_path", str(lora)], f"--model_name_or_path {lora} is a LoRA adapter; merge it"),
        (["--model_name_or_path", str(tmp_path / "file")], f"--model_name_or_path {tmp_path / 'file'} is a file"),
    ] + ([] if torch.cuda.is_available() else [
        (["--model_name_or_path", str(tmp_path / "release")], "Training the full-size MiniCPM-Llama3-V 2.5 (8B "
                                                              "parameters) needs a CUDA GPU"),
    ]):
        with pytest.raises(UserError, match=re.escape(message)):
            check(*flags)
    if not torch.cuda.is_available():
        check("--model_name_or_path", str(tmp_path / "release"), "--use_cpu", "true")  # asked for: allowed


def flags_without_help(text):
    """The options of an argparse help text that have no help string."""
    lines, missing = text.splitlines() + [""], []
    for line, after in zip(lines, lines[1:]):
        invocation = re.match(r"^  (-\S.*?)(\s{2,}\S.*)?$", line)
        if invocation and not invocation.group(2) and not re.match(r"^ {10,}\S", after):
            missing.append(invocation.group(1))
    return missing


@pytest.mark.parametrize("main,argv,prog,flags", [
    (chat.main, [], "python -m finetune.chat", ["--image IMAGE", "--prompt PROMPT", "--greedy",
                                                 "longest answer, in tokens (default: 512)"]),
    (predict.main, [], "python -m finetune.predict", ["--data DATA", "--output OUTPUT", "(default: 128)",
                                                       "--max_slice_nums", "--repetition_penalty"]),
    (evaluate.main, [], "python -m finetune.evaluate", ["--predictions PREDICTIONS", "--elements", "--model_card"]),
    (merge_lora.main, [], "python -m finetune.merge_lora", ["--adapter ADAPTER", "--output OUTPUT", "--dtype"]),
    (restore_template.main, [], "python -m finetune.restore_template", ["CKPT"]),
    (demo.main, [], "python -m finetune.demo", ["--script", "the launch script that trains (default: finetune_lora.sh)",
                                                 "--output"]),
    (data_main, [], "python -m finetune.data", ["check", "synth", "convert-guicourse", "convert-screenspot"]),
    (data_main, ["check"], "python -m finetune.data check", ["--model MODEL", "(default: 2048)", "--headers_only"]),
    (data_main, ["synth"], "python -m finetune.data synth", ["out_dir", "--n N", "(default: 1000)", "--blank"]),
    (data_main, ["convert-guicourse"], "python -m finetune.data convert-guicourse", ["raw_dir", "--coords"]),
    (data_main, ["convert-screenspot"], "python -m finetune.data convert-screenspot", ["raw_dir", "--coords"]),
])
def test_every_tool_explains_itself_under_the_command_a_user_types(main, argv, prog, flags, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: one line per flag
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and text.startswith(f"usage: {prog} ")
    assert all(flag in text for flag in flags), text
    assert not flags_without_help(text)
    description = text.split("\n\n")[1]
    assert len(description) > 50  # its own purpose, not only the usage line


def test_finetune_py_run_as_a_script_and_the_launch_scripts_explain_themselves():
    out = command([sys.executable, "finetune/finetune.py", "--help"])
    assert out.returncode == 0, out.stdout[-3000:]
    text = out.stdout[out.stdout.index("usage:"):]
    assert text.startswith("usage: python finetune/finetune.py --model_name_or_path FOLDER --data_path FILE")
    for section in ("model:", "data:", "what is trained, and how:", "training (transformers TrainingArguments):"):
        assert f"\n{section}\n" in text
    assert "train the vision tower in full (default: True)" in text and "same as --tune_vision false" in text
    assert "LoRA rank (default: 64)" in text and "--adam_epsilon" in text
    assert not flags_without_help(text)
    for script, values in (("finetune_lora.sh", ["LoRA rank (default: 64)", "(default: 0.0001)", "(default: $MODEL)",
                                                 "(default: output/lora)"]),
                           ("finetune_ds.sh", ["(default: 1e-05)", "--tune_llm",
                                               "(default: output/full)"])):
        out = command(["bash", script, "--help"])
        assert out.returncode == 0, out.stdout[-3000:]
        text = out.stdout[out.stdout.index("usage:"):]
        assert text.startswith(f"usage: MODEL=FOLDER DATA=FILE[,FILE] [VARIABLE=VALUE ...] bash {script} ")
        assert "Environment: MODEL, DATA, EVAL_DATA" in text and "python finetune/finetune.py --help" in text
        assert all(value in text for value in values), text
        assert "--learning_rate" in text and "--adam_epsilon" not in text  # the flags the script sets, not all
        assert "--no_tune_vision" not in text and not flags_without_help(text)
