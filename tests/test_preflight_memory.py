"""Preflight's memory model against what the code allocates: the weight-sync peak, one verdict that no line under it
contradicts (every shipped GPU recipe on three GPU sizes), DeepSpeed's own estimators, tied weights counted once, the
device's capacity and the recipes' process counts.
"""

import re
from pathlib import Path

import pytest
import yaml

from balcaprl.preflight.hardware import Hardware, model_shape, resolve_hardware
from balcaprl.preflight.memory import gpu_capacity
from balcaprl.preflight.report import GIB
from balcaprl.preflight.run import preflight
from tests.judge_servers import free_port
from tests.paths import REFERENCE_MODELS

REPO = Path(__file__).resolve().parents[1]
LLAVA = REFERENCE_MODELS / "llava-1.5-7b-hf"
QWEN_7B = REFERENCE_MODELS / "qwen2_5_vl_7b_instruct"
GPU_RECIPES = sorted(p for p in (REPO / "recipes").glob("[lq]*/*.yaml"))
LORA_7B = REPO / "recipes" / "qwen2_5_vl_7b" / "grpo_cider_lora.yaml"


def config_for(path: Path, qwen_3b_config: Path) -> str:
    return str({"llava_1_5_7b": LLAVA, "qwen2_5_vl_3b": qwen_3b_config, "qwen2_5_vl_7b": QWEN_7B}[path.parent.name])


def overrides_for(path: Path) -> list[str]:
    names = [s if isinstance(s, str) else s["name"] for s in yaml.safe_load(path.read_text()).get("reward_funcs", [])]
    judged = {"precision", "recall", "linguistic"} & set(names)
    return ["--judge_base_url", f"http://127.0.0.1:{free_port()}/v1", "--judge_max_retries", "0"] if judged else []


def test_an_80_gb_gpu_is_sized_as_the_device_reports_it():
    assert round(gpu_capacity(80) / GIB, 1) == 79.2 and round(gpu_capacity(40) / GIB, 1) == 39.6


def test_tied_embeddings_are_counted_once(qwen_3b_config):
    from balcaprl.config import CaptionModelConfig

    shape = model_shape(str(qwen_3b_config), CaptionModelConfig(model_name_or_path=str(qwen_3b_config)))
    assert shape.total_parameters == 3_754_622_976  # 4,065,787,904 with the LM head counted beside the embedding


def test_the_lora_recipes_launch_4_processes_not_the_accelerate_configs_8():
    hardware = resolve_hardware(LORA_7B, None, None, None)
    assert (hardware.num_processes, hardware.zero_stage, hardware.gpu_memory_gb) == (4, 2, 80.0)
    full = resolve_hardware(REPO / "recipes" / "qwen2_5_vl_7b" / "grpo_cider.yaml", None, None, None)
    assert full.num_processes == 8


def test_lora_7b_on_4x48_gb_with_zero3_shows_the_weight_sync_and_a_verdict_that_agrees(tmp_path):
    """The README's advice (ZeRO-3 for LoRA under 80 GB): the table's weight-sync column holds what the sync gathers
    and merges (one layer at a time), and the verdict agrees with the line that fails: vLLM's 0.3 share cannot hold
    the 7B's weights on a 48 GB GPU."""
    argv = ["--output_dir", str(tmp_path / "out")]
    zero3 = {"gpus": 4, "gpu_memory_gb": 48, "accelerate_config": "recipes/accelerate/zero3.yaml"}
    report = preflight(str(LORA_7B), argv, model_config=str(QWEN_7B), **zero3)
    memory, text = report.memory, report.render()
    h, i, V = 3584, 18944, 152064  # noqa: N806
    assert memory.sync_terms["sync: one merged LoRA layer"] == h * i * 2  # the largest MLP projection, bf16
    assert memory.sync_terms["sync: one layer gathered (ZeRO-3)"] == V * h * 2  # the embedding, the largest tensor
    resident = {k: v for k, v in memory.terms.items() if not k.startswith(("ZeRO-3", "activations", "LM head"))}
    assert memory.sync_total == pytest.approx(sum(resident.values()) + (h * i + V * h) * 2)
    assert "weight sync" in text.split("== memory per GPU (estimate) ==")[1].splitlines()[1]  # the column header
    assert not memory.vllm.holds and memory.verdict == "does not fit" and "verdict: does not fit" in text
    [problem] = [p.message for p in report.problems if p.check == "memory"]
    assert "vLLM's share (14.3 GiB) cannot hold its weights (15.4 GiB)" in problem
    assert "raise vllm_gpu_memory_utilization to 0.40" in problem
    # the advice taken: it fits, and no memory problem is left
    raised = preflight(
        str(LORA_7B), [*argv, "--vllm_gpu_memory_utilization", "0.4"], model_config=str(QWEN_7B), **zero3
    )
    assert raised.memory.vllm.holds and raised.memory.verdict == "fits"
    assert f"verdict: fits (peak {raised.memory.total / GIB:.1f} GiB at the {raised.memory.peak}" in raised.render()
    assert not [p for p in raised.problems if p.check == "memory"]


def memory_section(text: str) -> str:
    return text.split("== memory per GPU (estimate) ==\n", 1)[1].split("\n\n== ", 1)[0]


@pytest.mark.parametrize("gpu_gb", [24, 48, 80])
@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_no_verdict_is_contradicted_by_a_line_below_it(path, gpu_gb, qwen_3b_config, tmp_path):
    report = preflight(
        str(path), [*overrides_for(path), "--output_dir", str(tmp_path / "out")],
        model_config=config_for(path, qwen_3b_config), gpus=None, gpu_memory_gb=gpu_gb,
    )  # fmt: skip
    memory, section = report.memory, memory_section(report.render())
    stage, gradient_checkpointing = memory.notes[0], "gradient_checkpointing: true"
    [verdict_line] = [line for line in section.splitlines() if line.startswith("verdict: ")]
    verdict = re.match(r"verdict: (fits|tight|does not fit) \(peak ([\d.]+) GiB at the (training step|weight sync)",
                       verdict_line)  # fmt: skip
    assert verdict, verdict_line
    # the peak the verdict names is the larger total of the table
    totals = [float(x) for x in re.findall(r"\d+\.\d+", section.split("total per GPU", 1)[1].split(" of ")[0])]
    assert float(verdict.group(2)) == pytest.approx(max(totals), abs=0.051)
    share = max(totals) / (gpu_gb * 0.99)
    holds = "cannot hold" not in section
    expected = "does not fit" if share > 1.0 or not holds else "tight" if share >= 0.85 else "fits"
    assert verdict.group(1) == expected, section
    memory_problems = [p.message for p in report.problems if p.check == "memory"]
    assert len(memory_problems) == (verdict.group(1) == "does not fit"), (section, memory_problems)
    for problem in memory_problems:
        remedies = problem.split("Try: ", 1)[1]
        if "ZeRO-3" in stage:
            assert "ZeRO-3 (recipes/accelerate/zero3.yaml)" not in remedies
        if yaml.safe_load(path.read_text()).get("gradient_checkpointing"):
            assert gradient_checkpointing not in remedies
        if "GiB per GPU needed" in problem:  # short overall: more memory for vLLM cannot be the remedy
            assert "raise vllm_gpu_memory_utilization" not in remedies
        for lowered in re.findall(r"lower vllm_gpu_memory_utilization to ([\d.]+)", remedies):
            assert float(lowered) < yaml.safe_load(path.read_text())["vllm_gpu_memory_utilization"]
        if not holds:
            assert "cannot hold" in problem


@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_match_deepspeeds_own_estimators(stage):
    """Full fine-tuning of every parameter (DeepSpeed's estimators assume it), bf16, 8 GPUs: our weights, gradients,
    optimizer (and ZeRO-3 gathered layers) terms equal DeepSpeed 0.19's `estimate_zero{2,3}_model_states_mem_needs`
    up to the documented differences: the fp32 gradient partition of the optimizer step (4·P/N, not at either of
    our peaks) and, for ZeRO-3, the 16-bit gradient partition its estimator does not count (2·P/N)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from balcaprl.config import CaptionModelConfig
    from balcaprl.preflight.budget import TokenBudget
    from balcaprl.preflight.memory import memory_estimate

    model_args = CaptionModelConfig(model_name_or_path=str(QWEN_7B), dtype="bfloat16", freeze_vision_tower=False,
                                    freeze_projector=False)  # fmt: skip
    shape = model_shape(str(QWEN_7B), model_args)
    P, n = shape.total_parameters, 8  # noqa: N806
    assert shape.trainable_parameters == P
    from balcaprl.config import CaptionSFTConfig

    args = CaptionSFTConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none")
    estimate = memory_estimate(shape, Hardware(n, 80, stage, "test"), args, TokenBudget(0, 0, 0, True, "test"))
    states = ["weights", "gradients", "optimizer states (AdamW)"]
    ours = sum(estimate.terms[name] for name in states)
    if stage == 2:
        _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(P, n, 1, cpu_offload=False)
        assert ours + 4 * P / n == pytest.approx(deepspeed_gpu, abs=8)
    else:
        ours += estimate.terms["ZeRO-3 gathered layers (in use + prefetched)"]
        largest = shape.largest_layer_parameters
        _, deepspeed_gpu, _ = estimate_zero3_model_states_mem_needs(P, largest, n, 1, cpu_offload=False,
                                                                    cpu_offload_params=False)  # fmt: skip
        assert ours + 4 * P / n - 2 * P / n == pytest.approx(deepspeed_gpu, abs=8)
    assert 15 * GIB < deepspeed_gpu < 40 * GIB  # a real figure for 8.3 B parameters, not two zeros agreeing
