"""`make gpu-smoke` (balcaprl.experiments.gpu_smoke) as far as a machine without a GPU can check it: the no-CUDA exit,
the
argument parsing, and a plan whose every stage is a recipe the real parsers accept, launched with ZeRO-2 and vLLM."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from balcaprl.experiments import gpu_smoke
from balcaprl.runtime import RL_CONFIG_TYPES, SFT_CONFIG_TYPES, parse_config

REPO = Path(__file__).resolve().parents[1]


def make_plan(tmp_path, *argv):
    args = gpu_smoke.build_parser().parse_args([*argv, "--output-dir", str(tmp_path / "smoke")])
    return args, gpu_smoke.plan(args, num_processes=8)


def test_without_cuda_it_says_so_and_exits_0():
    assert gpu_smoke.cuda_devices() == 0  # this machine has no GPU; the test is about that case
    result = subprocess.run(
        [sys.executable, "-m", "balcaprl.experiments.gpu_smoke"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device" in result.stdout and 'pip install "balcaprl[gpu]"' in result.stdout


def test_arguments_are_parsed_and_checked():
    args = gpu_smoke.build_parser().parse_args(["--families", "llava", "--estimators", "scst", "grpo", "--steps", "3"])
    assert args.families == ["llava"] and args.estimators == ["scst", "grpo"] and args.steps == 3
    assert args.accelerate_config == "recipes/accelerate/zero2.yaml" and args.judge_url is None
    for bad in (["--estimators", "ppo"], ["--families", "blip"], ["--steps", "two"]):
        with pytest.raises(SystemExit):
            gpu_smoke.build_parser().parse_args(bad)


def test_dry_run_prints_the_plan(tmp_path):
    command = [sys.executable, "-m", "balcaprl.experiments.gpu_smoke", "--dry-run", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8 launches, 2 steps each" in result.stdout
    for family in gpu_smoke.FAMILIES:
        for stage in ("sft", *gpu_smoke.ESTIMATORS):
            assert f"[{family} {stage}]" in result.stdout
    assert result.stdout.count("accelerate launch --config_file recipes/accelerate/zero2.yaml") == 8
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_plan_sft_then_each_estimator_with_vllm_and_zero2(tmp_path):
    args, stages = make_plan(tmp_path)
    assert [stage.name for stage in stages] == [
        f"{family} {stage}" for family in gpu_smoke.FAMILIES for stage in ("sft", "scst", "grpo", "c_gdpo")
    ]
    accelerate = yaml.safe_load((REPO / args.accelerate_config).read_text())
    deepspeed = json.loads((REPO / accelerate["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED" and deepspeed["zero_optimization"]["stage"] == 2
    for stage in stages:
        recipe, family = stage.recipe, stage.name.split()[0]
        assert stage.command[:4] == ["accelerate", "launch", "--config_file", args.accelerate_config]
        assert stage.command[4:6] == ["--num_processes", "8"]
        assert recipe["use_cpu"] is False and recipe["bf16"] is True and recipe["max_steps"] == 2
        if stage.module == "balcaprl.sft":
            assert "use_vllm" not in recipe
            continue
        sft_output = next(s for s in stages if s.name == f"{family} sft").output_dir
        assert recipe["model_name_or_path"] == str(sft_output)  # RL starts from this family's stage 1
        assert recipe["use_vllm"] is True and recipe["vllm_mode"] == "colocate"
        estimator = recipe["advantage_estimator"]
        if estimator == "c_gdpo":
            assert recipe["reward_funcs"] == gpu_smoke.WORLD_REWARDS  # no judge needed by default
            assert recipe["length_mask_rewards"] == ["world_linguistic"]
        else:
            assert recipe["reward_funcs"] == ["cider_d"] and recipe["length_mask_rewards"] == []
        # the vLLM context holds the largest image, the prompt and the completion
        image_tokens = recipe["max_pixels"] // (28 * 28) if family == "qwen2_5_vl" else 576
        assert image_tokens + 64 + recipe["max_completion_length"] <= recipe["vllm_max_model_length"]


def test_judge_url_switches_c_gdpo_to_the_judge_rewards(tmp_path):
    _, stages = make_plan(tmp_path, "--estimators", "c_gdpo", "--judge-url", "http://judge:8000/v1")
    for stage in (s for s in stages if s.module == "balcaprl.train"):
        assert stage.recipe["reward_funcs"] == ["precision", "recall", "linguistic"]
        assert stage.recipe["length_mask_rewards"] == ["linguistic"]
        assert stage.recipe["judge_base_url"] == "http://judge:8000/v1"


def test_model_option_runs_one_family_from_that_checkpoint(tmp_path, tiny_models):
    _, stages = make_plan(tmp_path, "--model", str(tiny_models["llava"]), "--estimators", "grpo")
    assert [stage.name for stage in stages] == ["llava sft", "llava grpo"]  # the family read from the checkpoint
    assert stages[0].recipe["model_name_or_path"] == str(tiny_models["llava"])


def test_every_stage_recipe_parses_with_the_real_parsers(tmp_path):
    _, stages = make_plan(tmp_path, "--judge-url", "http://judge:8000/v1")
    gpu_smoke.write_recipes(stages)
    for stage in stages:
        text = stage.recipe_path.read_text()
        assert text.startswith("# gpu-smoke stage") and "accelerate launch" in text
        types = SFT_CONFIG_TYPES if stage.module == "balcaprl.sft" else RL_CONFIG_TYPES
        # bf16 needs a GPU; on this machine the rest parses exactly as the launched process would parse it
        configs = parse_config(types, ["--config", str(stage.recipe_path), "--bf16", "false", "--use_cpu", "true"])
        training_args = configs[-2]
        assert training_args.max_steps == 2 and training_args.output_dir == str(stage.output_dir)
        if stage.module == "balcaprl.train":
            assert training_args.use_vllm and training_args.vllm_max_model_length == gpu_smoke.VLLM_MAX_MODEL_LENGTH
