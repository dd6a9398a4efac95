"""bench/launch_script_rate.py: the training rate read back from a real run's TensorBoard events."""
import pytest

from .conftest import torchrun


def test_launch_rate_counts_each_epochs_shorter_last_step(train_data, ckpt_dir, tmp_path):
    """bench/launch_script_rate.py on a real run's TensorBoard events: 8 samples in batches of 3 with 2
    accumulation steps make an epoch of 2 steps, the second of one micro-batch; steps 2-4 are 4/3 epochs,
    not 3 full steps."""
    from bench.launch_script_rate import data_stats, rate
    torchrun(["--data_path", str(train_data / "train.json"), "--use_lora", "true", "--lora_r", "4",
              "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2", "--max_steps", "4",
              "--save_strategy", "no", "--report_to", "tensorboard", "--output_dir", str(tmp_path)], ckpt_dir, nproc=1)
    samples_per_epoch, flops_per_sample = data_stats(str(train_data / "train.json"))
    result = rate(tmp_path, from_step=1, samples_per_epoch=samples_per_epoch)
    assert samples_per_epoch == 8 and flops_per_sample > 0
    assert result["steps"] == 3 and result["samples"] == pytest.approx(8 * 4 / 3)
