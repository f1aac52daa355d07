"""The LoRA weight sync to colocated vLLM under DeepSpeed ZeRO-3, for real: 2 CPU processes (gloo) launched with the
repo's ZeRO-3 accelerate config, the vLLM stand-in as engine (tests/scripts/two_process_vllm_zero3_sync.py).

TRL 1.16's PEFT path gathers the whole model for the whole sync; balcaprl's gathers one LoRA layer (base weight, bias,
adapters) while merging it, and any other parameter alone while it is sent. The engine must get exactly what TRL's
path sends (the adapters merged), the base must not change, and no gather may hold more than one layer.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "vllm_standin"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_zero3_lora_sync_gathers_one_layer_at_a_time(tiny_models, tmp_path, family):
    script = REPO / "tests" / "scripts" / "two_process_vllm_zero3_sync.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml",
        "--num_processes", "2", "--main_process_port", "0",
        str(script), str(tiny_models[family]), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{STANDIN}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in ranks:
        assert report["vllm"] == "0.31.0" and report["zero_stage"] == 3 and report["world_size"] == 2
        assert report["not_partitioned"] == 0 and report["lora_layers"] > 4

        # What the engine got is what TRL's own path sends (the adapters merged), every tensor bit for bit; and it
        # holds it (the engine skips a tied lm_head).
        assert report["received"] == report["reference"]
        held = {name: value for name, value in report["received"].items() if name in report["engine"]}
        assert len(held) >= len(report["received"]) - 1
        assert all(report["engine"][name] == value for name, value in held.items())
        # The merge did change the LoRA layers' weights; the policy's base weights stayed bit-identical.
        base = {
            n.removeprefix("base_model.model.").replace(".base_layer", ""): v for n, v in report["base_before"].items()
        }
        assert all(report["received"][name] != base[name] for name in report["lora_base_names"])
        assert report["base_after"] == report["base_before"]

        # Before: one gather of the whole model. After: each LoRA layer gathered once with its adapters, any other
        # parameter alone; nothing bigger than one LoRA layer or one parameter.
        elements = report["model_elements"]
        assert [calls[0] for calls in report["old_gathers"]] == [elements]
        new = report["new_gathers"]
        layer_gathers = [(size, count) for size, count, adapters in new if adapters]
        assert len(layer_gathers) == report["lora_layers"]
        assert all(count in report["lora_layer_parameters"] for _, count in layer_gathers)
        assert all(size <= report["largest_lora_layer"] for size, _ in layer_gathers)
        assert all(count == 1 for size, count, adapters in new if not adapters)
        largest = max(size for size, _, _ in new)
        assert largest <= max(report["largest_lora_layer"], report["largest_parameter"]) < elements / 4
        layer_peak, seconds = max(size for size, _ in layer_gathers), time.monotonic() - started
        print(
            f"{family}: {len(new)} gathers, at most {largest} elements at once (LoRA layers: at most {layer_peak}); "
            f"TRL's path: {elements}; launch {seconds:.0f} s"
        )
    # Gathering is a collective: both processes made the same calls and sent the same weights.
    assert ranks[0]["new_gathers"] == ranks[1]["new_gathers"]
    assert ranks[0]["received"] == ranks[1]["received"]
