"""Generation metrics during training: a CPU run on the conformance checkpoint (ZeRO-2 on 2 processes, each decoding
its share) logs eval_gen_* beside the eval loss; weighted data mixing states its counts in the same run's log."""
import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.arguments import parse_args
from finetune.generation_eval import generation_samples
from .conftest import DEEPSPEED_ARGS, REPO, one_process_env, torchrun
from .conftest import zero3_config


@pytest.fixture(scope="module")
def data(conformance, tmp_path_factory):
    """Training: the fixture's samples. Evaluation: two GUIEnv samples, a smartphone step and a ScreenSpot one."""
    folder = tmp_path_factory.mktemp("gen")
    samples = [dict(s, image=str(conformance.dir / "images" / s["image"])) for s in conformance.cases["samples"]]
    by_id = {s["id"]: s for s in samples}
    screenspot = {"id": "screenspot_web_0", "image": by_id["guienv_bbox2text"]["image"],
                  "conversations": [by_id["guienv_bbox2text"]["conversations"][0],
                                    {"role": "assistant", "content": "<box>(400,900),(500,980)</box>"}],
                  "meta": {"benchmark": "screenspot", "platform": "web", "ui_type": "text",
                           "bbox_px": [768, 972, 960, 1058], "image_size": [1920, 1080]}}
    (folder / "train.json").write_text(json.dumps(samples))
    (folder / "more.json").write_text(json.dumps(samples[:2]))
    (folder / "eval.json").write_text(json.dumps([by_id["guienv_bbox2text"], by_id["guienv_text2bbox_two_boxes"],
                                                  dict(by_id["guiact_smartphone_tap"], type="smartphone"), screenspot]))
    return folder


def test_generation_metrics_are_logged_beside_the_eval_loss(data, ckpt_dir, tmp_path):
    out = tmp_path / "run"
    run = torchrun(["--data_path", f"{data / 'train.json'}:0.5,{data / 'more.json'}:2", "--eval_data_path",
                    str(data / "eval.json"), "--output_dir", str(out), "--use_lora", "true", "--lora_r", "2",
                    "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no",
                    "--per_device_eval_batch_size", "2", "--report_to", "tensorboard",
                    "--deepspeed", str(REPO / "ds_config_zero2.json")], ckpt_dir, nproc=2)
    log = run.stdout + run.stderr
    # weighted mixing: 6 fixture samples x 0.5 and 2 x 2, stated in the run's log
    assert "train.json          6 x 0.5    =         3" in log and "more.json           2 x 2      =         4" in log
    assert "generation metrics: 4 eval samples decoded at each evaluation" in log
    events = EventAccumulator(str(next(out.glob("**/events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"eval/gen_bbox2text_em", "eval/gen_bbox2text_f1", "eval/gen_text2bbox_iou@0.5",
                "eval/gen_smartphone_step_sr", "eval/gen_screenspot_micro", "eval/gen_screenspot_macro"}
    assert expected <= tags and "eval/loss" in tags
    assert [e.step for e in events.Scalars("eval/gen_screenspot_micro")] == [e.step for e in events.Scalars("eval/loss")] == [2]
    assert all(0 <= events.Scalars(tag)[0].value <= 100 for tag in expected)
    assert "'eval_gen_screenspot_micro'" in log  # the console log


def test_generation_metrics_default_on_when_evaluating_and_refused_under_zero3_only_when_asked(data, ckpt_dir, tmp_path):
    base = ["--model_name_or_path", str(ckpt_dir), "--data_path", str(data / "train.json"), "--output_dir", str(tmp_path)]
    evaluating = base + ["--eval_data_path", str(data / "eval.json"), "--eval_strategy", "steps"]
    assert generation_samples(*parse_args(evaluating)[1::2]) == 32
    assert generation_samples(*parse_args(evaluating + ["--eval_generate_samples", "0"])[1::2]) == 0
    assert generation_samples(*parse_args(base)[1::2]) == 0  # no evaluation, nothing to decode
    # ZeRO-3: the default stands down, an explicit N is refused (a process of its own: DeepSpeed's state is global)
    script = ("import sys\n" + DEEPSPEED_ARGS +
              "from finetune.generation_eval import generation_samples\n"
              "for extra in ([], ['--eval_generate_samples', '8']):\n"
              "    data, args = deepspeed_args(sys.argv[1:] + extra)\n"
              "    try:\n"
              "        print('samples:', generation_samples(data, args))\n"
              "    except SystemExit as e:\n"
              "        print('refused:', e)\n")
    env = one_process_env(29800)
    run = subprocess.run([sys.executable, "-c", script] + evaluating + ["--deepspeed", zero3_config(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "samples: 0\nrefused: --eval_generate_samples does not run under DeepSpeed ZeRO-3" in run.stdout, \
        run.stderr[-2000:]
