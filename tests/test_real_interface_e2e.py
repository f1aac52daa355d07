"""The GPU recipes' path on the real model interfaces, on CPU: SFT → RL (each estimator, TRL's vLLM path) → evaluate.

Models: tiny-depth llava-1.5-7b-hf and Qwen2.5-VL-7B-Instruct with their real vocabularies, special tokens, chat
templates and image processing (`balcaprl.models.reference.build_reference_interface_model`). Every stage runs through
the
console script, as a user runs it; RL samples with ``use_vllm: true`` (colocate), where the vLLM engine is the CPU
stand-in of tests/vllm_standin (vLLM itself needs a GPU). Data: JSONL with images of several sizes and aspect ratios,
so that Qwen2.5-VL prompts differ in length within a batch. c-GDPO scores with the three BalCapRL judge rewards against
a real loopback judge server, linguistic masked by length, as the BalCapRL recipes do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
BALCAPRL = str(Path(sys.executable).parent / "balcaprl")
STANDIN = REPO / "tests" / "vllm_standin"
# (width, height) of the images: COCO-like landscape and portrait, square, a wide strip.
SIZES = [(640, 480), (480, 640), (500, 500), (900, 300)]
COLOURS = ["red", "green", "blue", "yellow"]

pytestmark = pytest.mark.slow


def run_cli(*args, vllm: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    path = [str(STANDIN), str(REPO)] if vllm else [str(REPO)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run([BALCAPRL, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def write_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, ((width, height), colour) in enumerate(zip(SIZES * 2, COLOURS * 2)):
        image = Image.new("RGB", (width, height), (122, 116, 104))
        ImageDraw.Draw(image).ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=colour)
        image.save(folder / f"{index}.jpg")
        references = [f"a {colour} circle on a gray background.", f"There is a large {colour} circle."]
        lines.append(json.dumps({"image": f"{index}.jpg", "references": references}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def write_recipe(path: Path, **keys) -> Path:
    common = {
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "instruction": "Describe this image in one sentence.",
    }
    path.write_text(yaml.safe_dump({**common, **keys}))
    return path


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def judge_url():
    """A real loopback judge answering the BalCapRL rewards' prompts (validating image parts)."""
    from tests.judge_servers import FaultInjectingServer, ScriptedJudge

    with FaultInjectingServer(ScriptedJudge(), validate_images=True) as server:
        yield server.base_url


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_sft_then_rl_with_vllm_then_evaluate(reference_models, judge_url, tmp_path, family):
    data = write_data(tmp_path / "data")
    pixels = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16} if family == "qwen2_5_vl" else {}

    # Stage 1 (cross-entropy), full fine-tuning of the language model.
    sft_dir = tmp_path / "sft"
    sft = write_recipe(
        tmp_path / "sft.yaml",
        model_name_or_path=str(reference_models[family]),
        dataset=str(data),
        output_dir=str(sft_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        **pixels,
    )
    run_cli("sft", sft)
    assert (sft_dir / "config.json").is_file()

    # Stage 2 with TRL's vLLM path, one run per estimator; c-GDPO with the judge rewards and the length mask.
    judge = {"judge_base_url": judge_url, "judge_model": "loopback", "judge_max_retries": 1}
    estimators = {
        "c_gdpo": {
            "reward_funcs": ["precision", "recall", "linguistic"],
            "length_mask_rewards": ["linguistic"],
            **judge,
        },
        # a user's own reward by dotted path beside a built-in (the LoRA user flow of the issues)
        "grpo": {"reward_funcs": ["cider_d", "tests.helpers:mentions_colour"], "length_mask_rewards": []},
        "scst": {"reward_funcs": ["cider_d"], "length_mask_rewards": [], "loss_type": "dr_grpo"},
    }
    for estimator, keys in estimators.items():
        rl_dir = tmp_path / estimator
        recipe = write_recipe(
            tmp_path / f"{estimator}.yaml",
            model_name_or_path=str(sft_dir),
            dataset=str(data),
            output_dir=str(rl_dir),
            advantage_estimator=estimator,
            use_vllm=True,
            vllm_mode="colocate",
            vllm_max_model_length=1024,
            use_peft=True,
            lora_r=4,
            lora_alpha=8,
            max_steps=2 if estimator == "c_gdpo" else 1,  # two steps where the mask and judge metrics are checked
            num_generations=2,
            per_device_train_batch_size=4,
            max_completion_length=8,
            learning_rate=1e-4,
            **pixels,
            **keys,
        )
        run_cli("train", recipe, vllm=True)
        steps = [log for log in log_history(rl_dir) if "loss" in log]
        assert len(steps) == (2 if estimator == "c_gdpo" else 1), estimator
        assert all("advantages/distinct_per_group" in log for log in steps)
        if estimator == "c_gdpo":
            assert all(log["judge/failures"] == 0 and log["judge/requests"] > 0 for log in steps)
            assert all("length/masked_frac" in log for log in steps)
        if estimator == "scst":
            assert all("scst/baseline_reward" in log for log in steps)

    # Evaluation of the GRPO run's output (a LoRA adapter folder), greedy captions, classic metrics.
    assert (tmp_path / "grpo" / "adapter_config.json").is_file()
    assert any("rewards/mentions_colour/mean" in log for log in log_history(tmp_path / "grpo"))
    evaluation = tmp_path / "evaluation"
    run_cli(
        "evaluate", "--model", tmp_path / "grpo", "--data", data, "--output-dir", evaluation, "--no-balcap",
        "--max-new-tokens", 8, "--device", "cpu", "--no-plots",
    )  # fmt: skip
    captions = [json.loads(line) for line in (evaluation / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == len(SIZES) * 2
    report = json.loads((evaluation / "report.json").read_text())
    assert report["num_captions"] == len(captions)
