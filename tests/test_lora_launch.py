"""LoRA end to end on 2 CPU processes, launched (not parsed) with the repo's accelerate configs: DDP, ZeRO-2 and
ZeRO-3, both families under ZeRO-3. One launch per case runs stage 1 → RL → a resumed RL (tests/scripts)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# Every LoRA target of the `language_model` preset (balcaprl.models.LANGUAGE_MODEL_LORA_TARGETS).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def world_jsonl(tmp_path_factory):
    from balcaprl.world.splits import make_split, write_jsonl

    folder = tmp_path_factory.mktemp("world") / "train"
    write_jsonl(make_split("train", 16, seed=0), folder)
    return folder / "data.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize(
    "accelerate_config, family, estimator",
    [
        ("ddp.yaml", "qwen2_5_vl", "c_gdpo"),
        ("zero2.yaml", "llava", "scst"),
        ("zero3.yaml", "qwen2_5_vl", "c_gdpo"),
        ("zero3.yaml", "llava", "scst"),
    ],
)
def test_lora_stage1_then_rl_then_resume(tmp_path, world_jsonl, accelerate_config, family, estimator):
    precision = [] if accelerate_config.startswith("zero") else ["--mixed_precision", "no"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{accelerate_config}",
        "--num_processes", "2", "--main_process_port", "0", *precision,
        str(REPO / "tests" / "scripts" / "two_process_lora.py"), family, accelerate_config, str(world_jsonl),
        str(tmp_path), estimator,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"{accelerate_config} {family}: launch {elapsed:.0f} s, stages {report['timings']}")
    assert report["world_size"] == 2
    assert report["zero_stage"] == {"ddp.yaml": 0, "zero2.yaml": 2, "zero3.yaml": 3}[accelerate_config]

    # Stage 1: a merged full checkpoint (no adapter_config.json at its root), the adapter beside it; the merge changed
    # exactly the LoRA-targeted language-model projections, never the vision tower, projector or embeddings.
    assert report["sft_is_full_checkpoint"] and report["sft_steps"] == 3
    assert report["sft_adapter_keys"] and all("lora_" in key for key in report["sft_adapter_keys"])
    assert report["sft_lora_b_norm"] > 0
    assert report["sft_changed"], "the merged checkpoint equals the model stage 1 started from"
    for key in report["sft_changed"]:
        assert key.rsplit(".", 2)[-2] in TARGETS and "language_model" in key, key
    assert report["sft_compared"] > len(report["sft_changed"])

    # RL: the adapter trained (lora_B moved off zero), the base (the merged stage-1 checkpoint) is bit-identical, the
    # output folder is an adapter, and a second launch of the same command resumed from checkpoint-2.
    assert "adapter_config.json" in report["rl_adapter_files"] and "checkpoint-2" in report["rl_adapter_files"]
    assert report["rl_lora_b_norm"] > 0
    for name in ("rl_base", "resumed_base"):
        assert report[name]["compared"] > 10 and report[name]["changed"] == [], report[name]
    assert report["rl_steps"] == 2 and report["resumed_steps"] == 3
    assert report["resumed_logged_steps"] == [1, 2, 3]  # the first two restored from checkpoint-2, one new step
    assert report["resumed_adapter_moved"]
    assert f"Resuming from {tmp_path / 'rl' / 'checkpoint-2'}" in result.stderr
