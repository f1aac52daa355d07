"""The two stages through the `balcaprl` console script, as a user types them, on both tiny families."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BALCAPRL = str(Path(sys.executable).parent / "balcaprl")


def run_cli(*args, cwd=REPO, timeout=600, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [BALCAPRL, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def world_jsonl(tmp_path_factory):
    from balcaprl.world.splits import make_split, write_jsonl

    folder = tmp_path_factory.mktemp("world") / "train"
    write_jsonl(make_split("train", 24, seed=0), folder)
    return folder / "data.jsonl"


def trainer_state(output_dir: Path) -> dict:
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"))
    return json.loads(states[-1].read_text())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_sft_then_balcaprl_via_the_cli(tmp_path, world_jsonl, family):
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
    run_cli(
        "sft", f"recipes/demo/{family}_sft.yaml",
        "--dataset", world_jsonl, "--output_dir", sft_dir, "--max_steps", 3, "--per_device_train_batch_size", 4,
        "--model_name_or_path", f"tiny:{family}",
    )  # fmt: skip
    assert (sft_dir / "config.json").is_file() and (sft_dir / "processor_config.json").is_file()
    result = run_cli(
        "train", f"recipes/demo/{family}_balcaprl.yaml",
        "--dataset", world_jsonl, "--model_name_or_path", sft_dir, "--output_dir", rl_dir,
        "--max_steps", 2, "--logging_steps", 1, "--save_strategy", "steps", "--save_steps", 2,
    )  # fmt: skip
    assert "Trainable parameters" in result.stdout and "lora" in result.stdout
    state = trainer_state(rl_dir)
    logs = [log for log in state["log_history"] if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert {"rewards/world_precision/mean", "length/masked_frac", "advantages/distinct_per_group"} <= set(log)
    assert (rl_dir / "adapter_model.safetensors").is_file()  # LoRA recipe: the adapter is saved


def test_bad_key_fails_before_loading_anything(tmp_path, world_jsonl):
    result = run_cli(
        "train", "recipes/demo/qwen2_5_vl_balcaprl.yaml", "--dataset", world_jsonl, "--output_dir", tmp_path,
        "--num_generation", 4, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "num_generation" in result.stderr
    assert "Loading weights" not in result.stderr and not any(tmp_path.iterdir())


def test_unknown_reward_fails_with_the_known_ones(tmp_path, world_jsonl):
    result = run_cli(
        "train", "recipes/demo/qwen2_5_vl_balcaprl.yaml", "--dataset", world_jsonl, "--output_dir", tmp_path,
        "--model_name_or_path", "tiny:qwen2_5_vl", "--reward_funcs", "world_precision", "bleu", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Unknown reward 'bleu'" in result.stderr and "world_recall" in result.stderr
    assert "Loading weights" not in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_names_the_file(tmp_path):
    result = run_cli(
        "train", "recipes/demo/qwen2_5_vl_balcaprl.yaml", "--dataset", tmp_path / "none.jsonl",
        "--output_dir", tmp_path / "out", "--model_name_or_path", "tiny:qwen2_5_vl", check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "none.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_resuming_into_another_run_is_refused_before_any_weights_load(tmp_path, world_jsonl):
    """A checkpoint belongs to its run: another model, LoRA rank or reward set in the same output_dir is one error
    naming what differs (no silent resume of a Qwen checkpoint into LLaVA, no 64-line size-mismatch traceback)."""
    recipe = ["train", "recipes/demo/qwen2_5_vl_balcaprl.yaml", "--dataset", world_jsonl, "--output_dir", tmp_path]
    steps = ["--max_steps", 1, "--save_strategy", "steps", "--save_steps", 1]
    run_cli(*recipe, "--model_name_or_path", "tiny:qwen2_5_vl", *steps)
    assert json.loads((tmp_path / "balcaprl_run.json").read_text())["model_name_or_path"] == "tiny:qwen2_5_vl"

    for change, named in [
        (["--model_name_or_path", "tiny:llava"], "model_name_or_path: 'tiny:qwen2_5_vl' -> 'tiny:llava'"),
        (["--model_name_or_path", "tiny:qwen2_5_vl", "--lora_r", 16], "lora_r: 8 -> 16"),
    ]:
        result = run_cli(*recipe, *change, "--max_steps", 2, check=False)
        assert result.returncode != 0
        [error] = [line for line in result.stderr.splitlines() if line.startswith("balcaprl train: error:")]
        assert "holds checkpoints of another run" in error and named in error, error
        assert "--output_dir" in error and "--resume_from_checkpoint" in error
        assert "Trainable parameters" not in result.stdout  # refused before the model was built

    # the same run resumes; an explicit resume_from_checkpoint is the user's choice (the differences are logged)
    rewards = ["--reward_funcs", "world_precision", "world_recall", "world_linguistic", "length_penalty"]
    resumed = run_cli(*recipe, "--model_name_or_path", "tiny:qwen2_5_vl", "--max_steps", 2, *rewards,
                      "--resume_from_checkpoint", tmp_path / "checkpoint-1")  # fmt: skip
    assert "from another run's identity: reward_funcs" in resumed.stderr
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 2


def test_a_judged_run_is_quiet_at_the_default_log_level(tmp_path, world_jsonl, scripted_server):
    """6 steps with the three judge rewards: no line per judge request, no FutureWarning (saves included)."""
    result = run_cli(
        "train", "recipes/demo/qwen2_5_vl_balcaprl.yaml", "--dataset", world_jsonl, "--output_dir", tmp_path,
        "--model_name_or_path", "tiny:qwen2_5_vl", "--max_steps", 6, "--save_strategy", "steps", "--save_steps", 3,
        "--reward_funcs", "precision", "recall", "linguistic", "--length_mask_rewards", "linguistic",
        "--judge_base_url", scripted_server.base_url, "--judge_model", "scripted",
    )  # fmt: skip
    assert scripted_server.request_count > 6 * 8  # the judges were called for every caption of every step
    output = result.stdout + result.stderr
    assert "HTTP Request" not in output
    assert "FutureWarning" not in output and "DeprecationWarning" not in output, [
        line for line in output.splitlines() if "Warning" in line
    ]
    assert (tmp_path / "checkpoint-6" / "trainer_state.json").is_file()


def test_too_little_data_for_one_step_is_an_error_not_an_untrained_model(tmp_path):
    from balcaprl.world.splits import make_split, write_jsonl

    one_row = write_jsonl(make_split("train", 1, seed=0), tmp_path / "data")
    result = run_cli(
        "train", "recipes/demo/qwen2_5_vl_balcaprl.yaml", "--dataset", one_row, "--output_dir", tmp_path / "run",
        "--model_name_or_path", "tiny:qwen2_5_vl", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    [error] = [line for line in result.stderr.splitlines() if line.startswith("balcaprl train: error:")]
    assert "has 1 usable row(s), fewer than the 2 prompts of one generation batch" in error
    assert "Trainable parameters" not in result.stdout  # refused before the model was built
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
