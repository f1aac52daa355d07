"""Multi-process launches with the repo's accelerate configs, and resuming a killed run (CPU, gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balcaprl.checkpoints import checkpoint_problem

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
DEMO = "recipes/demo/qwen2_5_vl_balcaprl.yaml"


@pytest.fixture(scope="module")
def world_jsonl(tmp_path_factory):
    from balcaprl.world.splits import make_split, write_jsonl

    folder = tmp_path_factory.mktemp("world") / "train"
    write_jsonl(make_split("train", 24, seed=0), folder)
    return folder / "data.jsonl"


def log_history(output_dir: Path, step: int) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [log for log in state["log_history"] if "loss" in log]


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["zero2.yaml", "ddp.yaml"])
def test_two_process_launch(tmp_path, world_jsonl, accelerate_config):
    # The repo's configs are for 8 GPUs; on CPU: 2 processes, no mixed precision, and the recipe's use_cpu -> gloo.
    precision = [] if accelerate_config.startswith("zero") else ["--mixed_precision", "no"]
    command = [
        str(BIN / "accelerate"), "launch", "--config_file", f"recipes/accelerate/{accelerate_config}",
        "--num_processes", "2", "--main_process_port", "0", *precision,
        "-m", "balcaprl.train", "--config", DEMO, "--dataset", str(world_jsonl),
        "--model_name_or_path", "tiny:qwen2_5_vl", "--output_dir", str(tmp_path),
        "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("Trainable parameters") == 1  # printed by the main process only
    logs = log_history(tmp_path, 2)
    assert len(logs) == 2 and all("length/masked_frac" in log for log in logs)
    if accelerate_config.startswith("zero"):
        assert "DeepSpeed" in result.stdout + result.stderr


def resumable_run_args(world_jsonl: Path) -> list[str]:
    """`balcaprl train` arguments of a 6-step run saving every 2 steps (after the console script / module)."""
    # Rewards that give a signal to an untrained model, so that losses, gradients and optimizer state matter.
    return [
        DEMO, "--dataset", str(world_jsonl), "--model_name_or_path", "tiny:qwen2_5_vl",
        "--reward_funcs", "length_penalty", "world_linguistic", "--max_steps", "6", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_run(world_jsonl, tmp_path_factory) -> Path:
    """The output folder of the 6-step run, never interrupted: what a resumed run must reproduce."""
    full = tmp_path_factory.mktemp("uninterrupted")
    command = [str(BIN / "balcaprl"), "train", *resumable_run_args(world_jsonl), "--output_dir", str(full)]
    subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, timeout=600, check=True)
    return full


def assert_continues_like(full: Path, resumed: Path, from_step: int) -> None:
    """The steps after ``from_step`` of ``resumed`` log what the uninterrupted run logged."""
    reference, after = log_history(full, 6), log_history(resumed, 6)
    assert [log["step"] for log in after] == list(range(1, 7))
    for expected, got in zip(reference[from_step:], after[from_step:]):  # the steps after the resume
        assert got["step"] == expected["step"]
        for key in ("loss", "grad_norm", "rewards/length_penalty/mean", "completions/mean_length"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), (got["step"], key)
    assert any(abs(log["grad_norm"]) > 0 for log in after[from_step:])  # not a comparison of two idle runs


@pytest.mark.slow
def test_run_killed_inside_a_save_resumes_from_the_newest_complete_one(tmp_path, world_jsonl, uninterrupted_run):
    killed = tmp_path / "killed"
    args = [*resumable_run_args(world_jsonl), "--output_dir", str(killed)]
    script = [sys.executable, "tests/scripts/train_killed_inside_save.py", "4", *args]
    died = subprocess.run(script, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert list((killed / "checkpoint-4").glob("*.safetensors"))  # half-written: weights, no trainer state
    assert not (killed / "checkpoint-4" / "trainer_state.json").exists()

    preflight = subprocess.run([str(BIN / "balcaprl"), "preflight", *args, "--gpus", "1", "--gpu-memory", "80"],
                               cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "skips incomplete checkpoint-4: no trainer_state.json" in preflight.stdout, preflight.stdout[-3000:]
    assert f"resumes from {killed / 'checkpoint-2'}" in preflight.stdout

    resumed = subprocess.run([str(BIN / "balcaprl"), "train", *args], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Not resuming from {killed / 'checkpoint-4'}: no trainer_state.json" in resumed.stderr
    assert f"Resuming from {killed / 'checkpoint-2'}" in resumed.stderr
    assert_continues_like(uninterrupted_run, killed, from_step=2)


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(tmp_path, world_jsonl, uninterrupted_run):
    args = [str(BIN / "balcaprl"), "train", *resumable_run_args(world_jsonl)]
    killed = tmp_path / "killed"

    process = subprocess.Popen([*args, "--output_dir", str(killed)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (killed / "checkpoint-2" / "trainer_state.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # the newest complete checkpoint (the kill may land inside the next save)
    k = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*") if checkpoint_problem(p) is None)
    assert k < 6, "the run finished before it could be killed; nothing was resumed"

    resumed = subprocess.run([*args, "--output_dir", str(killed)], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Resuming from {killed / f'checkpoint-{k}'}" in resumed.stderr
    assert_continues_like(uninterrupted_run, killed, from_step=k)
