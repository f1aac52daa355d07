"""`balcaprl preflight`: every shipped recipe against the real model configs and its header's GPUs, memory figures
against hand arithmetic, and seeded problems each reported by name with exit code 1 before any weights load.

The model folders used here (`tests/fixtures/reference-models/`) hold configs and tokenizers but no weights: a check
that loaded weights could not pass on them.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from balcaprl.preflight.report import GIB
from balcaprl.preflight.run import main, preflight
from tests.judge_servers import free_port
from tests.paths import REFERENCE_MODELS

REPO = Path(__file__).resolve().parents[1]
LLAVA = REFERENCE_MODELS / "llava-1.5-7b-hf"
QWEN_7B = REFERENCE_MODELS / "qwen2_5_vl_7b_instruct"
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
STANDIN = Path(__file__).resolve().parent / "vllm_standin"


def model_config_for(path: Path, qwen_3b: Path) -> str:
    if path.parent.name == "demo":
        return "tiny:llava" if "llava" in path.name else "tiny:qwen2_5_vl"
    return str({"llava_1_5_7b": LLAVA, "qwen2_5_vl_3b": qwen_3b, "qwen2_5_vl_7b": QWEN_7B}[path.parent.name])


def run(argv: list[str]) -> tuple[int, str]:
    """`balcaprl preflight ARGV` in this process: (exit code, printed report)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main(argv)
    return code, output.getvalue()


def closed_judge() -> list[str]:
    return ["--judge_base_url", f"http://127.0.0.1:{free_port()}/v1", "--judge_max_retries", "0"]


def uses_judge(path: Path) -> bool:
    names = [s if isinstance(s, str) else s["name"] for s in yaml.safe_load(path.read_text()).get("reward_funcs", [])]
    return bool({"precision", "recall", "linguistic"} & set(names))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_prints_its_budget_table_and_verdict(path, qwen_3b_config):
    # Here (no data, no vLLM, no judge node) a GPU recipe fails only on what this machine lacks; its budget and
    # memory at the header's GPUs must pass.
    recipe = yaml.safe_load(path.read_text())
    overrides = closed_judge() if uses_judge(path) else []
    report = preflight(str(path), overrides, model_config=model_config_for(path, qwen_3b_config))
    text = report.render()
    assert "== token budget ==" in text and "== output ==" in text
    failing = {problem.check for problem in report.problems}
    assert failing <= {"data", "environment", "judge"}, report.render()
    if recipe.get("use_cpu"):
        assert "a CPU recipe" in text
        return
    assert "verdict: fits" in text and "largest term:" in text, text
    assert report.memory.verdict == "fits"
    if recipe.get("use_vllm"):
        assert report.budget.total <= recipe["vllm_max_model_length"]
        assert {p.message.split()[0] for p in report.problems if p.check == "environment"} == {"use_vllm"}


def llava_parameters() -> tuple[int, int]:
    """(total, language model) parameters of llava-1.5-7b-hf, counted by hand from its config."""
    h, i, layers, vocab = 4096, 11008, 32, 32064
    language = layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * vocab * h + h  # attention, MLP, 2 norms; embed, head
    vision_h, vision_i = 1024, 4096  # CLIP ViT-L/14 at 336 px: 577 positions, 24 layers with biases
    clip_layer = 4 * (vision_h * vision_h + vision_h) + 2 * vision_h * vision_i + vision_i + vision_h + 4 * vision_h
    vision = 3 * 14 * 14 * vision_h + vision_h + 577 * vision_h + 2 * vision_h + 24 * clip_layer + 2 * vision_h
    projector = (vision_h * h + h) + (h * h + h)
    assert language == 6_738_939_904
    return language + vision + projector, language


def test_memory_of_llava_grpo_cider_by_hand(tmp_path):
    # recipes/llava_1_5_7b/grpo_cider.yaml on its header's 8x 80 GB GPUs with ZeRO-3: full fine-tuning of the language
    # model (vision tower and projector frozen), bf16 weights (d = 2 bytes), beta 0.04, micro-batch b = 5 rows of
    # s = 576 image + 20 prompt + 32 completion = 628 tokens, gradient checkpointing, vLLM colocated at 0.3.
    data = caption_jsonl(tmp_path)
    report = preflight("recipes/llava_1_5_7b/grpo_cider.yaml", ["--dataset", data, "--dataset_format", "jsonl"],
                       model_config=str(LLAVA))  # fmt: skip
    P, T = llava_parameters()  # noqa: N806
    assert P == 7_063_427_072
    n, d, b, s, c, h, i, k, L, V = 8, 2, 5, 628, 32, 4096, 11008, 4096, 32, 32064  # noqa: N806
    gpu = 80 * 0.99 * GIB  # an 80 GB GPU as the device reports it: 79.2 GiB
    expected = {
        "weights": P * d / n,  # ZeRO-3 shards the weights
        "ZeRO-3 gathered layers (in use + prefetched)": 2 * V * h * d,  # the largest module: embedding / LM head
        "gradients": T * d / n,
        "optimizer states (AdamW)": 12 * T / n,  # fp32 master + 2 moments, sharded
        "activations (gradient checkpointing)": L * b * s * h * d + b * s * (6 * h + 2 * k + 4 * i) * d,
        # TRL's fused LM head: one [b*c tokens x V] tile (V < 32768) and the fp32 gradient of the hidden states
        "LM head tiles (TRL's fused log-probs)": b * c * V * d + 4 * b * c * h,
        "LM head weight gradient (float32)": 4 * V * h,  # full fine-tuning: accumulated in fp32
        "reference model (beta > 0)": P * d / n,
        "vLLM share (0.3 of the GPU)": 0.3 * gpu,
        "CUDA context and buffers (fixed)": 1.5 * GIB,
    }
    assert report.budget.total == s and report.budget.prompt_exact
    assert report.memory.terms.keys() == expected.keys()
    for term, value in expected.items():
        assert math.isclose(report.memory.terms[term], value, rel_tol=1e-12), term
    # 1.645 + 0.489 + 1.569 + 9.414 + 1.216 + 0.011 + 0.489 + 1.645 + 23.76 + 1.5 = 41.74 GiB of 79.2 (< 85%): fits
    total = sum(expected.values()) / GIB
    assert math.isclose(report.memory.training_total / GIB, total) and 41.73 < total < 41.75
    # at a weight sync (full fine-tuning, ZeRO-3): the step's terms are gone, one parameter at a time is gathered
    sync = {name: value for name, value in expected.items() if not name.startswith(("ZeRO-3", "activ", "LM head"))}
    sync["sync: one layer gathered (ZeRO-3)"] = V * h * d
    assert report.memory.sync_terms == pytest.approx(sync, rel=1e-12)
    assert report.memory.verdict == "fits" and report.memory.largest == "vLLM share (0.3 of the GPU)"
    # vLLM's share holds the full bf16 weights (P * 2 = 13.16 GiB) + KV cache: 5 rollouts x 768 tokens x 2 (K, V)
    # x 32 layers x 4096 x 2 bytes = 1.875 GiB + its own peak: 4096 profiled tokens x (4h + 2k + 3i) x 2 bytes
    # (LLaVA's 577 image patches need less) + 1 GiB of CUDA graphs
    vllm = report.memory.vllm
    assert vllm.weights == P * 2 and vllm.kv_cache == 5 * 768 * 2 * 32 * 4096 * 2 and vllm.kv_cache / GIB == 1.875
    assert vllm.own_peak == 4096 * (4 * h + 2 * k + 3 * i) * 2 + GIB and vllm.holds


def test_memory_of_qwen_7b_balcaprl_by_hand(tmp_path):
    # recipes/qwen2_5_vl_7b/balcaprl.yaml on 8x 80 GB with ZeRO-3, beta 0 (no reference model), b = 8 rows of
    # s = 1230 image tokens + 62 prompt tokens (the bound without the tokenizer: 30 bytes of instruction + 32) + 512
    # completion = 1804 tokens. The data's largest image, 2000 x 1500, is resized within max_pixels 1003520: scale
    # sqrt(2000 * 1500 / 1003520) = 1.729, so 1500 / 1.729 / 28 -> 30 and 2000 / 1.729 / 28 -> 41 blocks of 28 px
    # (rounded down to stay within the bound): 30 x 41 = 1230 image tokens.
    data = caption_jsonl(tmp_path, size=(2000, 1500))
    overrides = ["--dataset", data, "--dataset_format", "jsonl", *closed_judge()]
    report = preflight("recipes/qwen2_5_vl_7b/balcaprl.yaml", overrides, model_config=str(QWEN_7B))
    h, i, L, V, heads, kv_heads = 3584, 18944, 28, 152064, 28, 4  # noqa: N806
    k = h // heads * kv_heads  # 512: the key/value width of grouped-query attention
    layer = (h * h + h) + 2 * (h * k + k) + h * h + 3 * h * i + 2 * h  # q (bias), k/v (bias), o, MLP, 2 norms
    T = L * layer + 2 * V * h + h  # noqa: N806 -- the trainable language model (untied embeddings)
    assert T == 7_615_616_512
    # a vision block: 2 RMS norms, fused qkv and proj (biases), gate/up/down MLP of 3420 (biases)
    vision_layer = 2 * 1280 + (1280 * 3840 + 3840) + (1280 * 1280 + 1280)
    vision_layer += 2 * (1280 * 3420 + 3420) + (3420 * 1280 + 1280)
    vision = 3 * 2 * 14 * 14 * 1280 + 32 * vision_layer + 1280 + (5120 * 5120 + 5120) + (5120 * h + h)  # + merger
    P = T + vision  # noqa: N806
    assert P == 8_292_166_656
    n, d, b, s, c = 8, 2, 8, 1804, 512
    assert report.budget.image_tokens == 30 * 41 and report.budget.total == s
    gpu = 80 * 0.99 * GIB
    expected = {
        "weights": P * d / n,
        "ZeRO-3 gathered layers (in use + prefetched)": 2 * V * h * d,
        "gradients": T * d / n,
        "optimizer states (AdamW)": 12 * T / n,
        "activations (gradient checkpointing)": L * b * s * h * d + b * s * (6 * h + 2 * k + 4 * i) * d,
        # 4096 of the b*c = 4096 completion tokens per tile, 32768 of the 152,064 vocabulary columns
        "LM head tiles (TRL's fused log-probs)": 4096 * 32768 * d + 4 * b * c * h,
        "LM head weight gradient (float32)": 4 * V * h,
        "vLLM share (0.3 of the GPU)": 0.3 * gpu,
        "CUDA context and buffers (fixed)": 1.5 * GIB,
    }
    assert report.memory.terms.keys() == expected.keys()  # beta 0: no reference model
    for term, value in expected.items():
        assert math.isclose(report.memory.terms[term], value, rel_tol=1e-12), term
    assert report.memory.verdict == "fits" and report.memory.largest == "vLLM share (0.3 of the GPU)"
    # vLLM profiles the checkpoint's largest image: max_pixels 12,845,056 / 14^2 = 65,536 patches through a
    # vision block of hidden 1280, intermediate 3420, more than 4096 language tokens need
    vllm = report.memory.vllm
    assert vllm.own_peak == 65536 * (4 * 1280 + 3 * 3420) * 2 + GIB


# ---------------------------------------------------------------------------------------------------------------
# A recipe that passes, and the same recipe with one seeded problem at a time
# ---------------------------------------------------------------------------------------------------------------


def caption_jsonl(folder: Path, rows: int = 3, size=(640, 480), missing: bool = False) -> str:
    """A JSONL of ``rows`` images with references (the last image deleted when ``missing``)."""
    lines = []
    for index in range(rows):
        image = folder / f"image_{index}.jpg"
        Image.new("RGB", size, (20 * index, 100, 150)).save(image)
        lines.append(json.dumps({"image": image.name, "references": [f"A blue picture number {index}."]}))
    if missing:
        image.unlink()
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "data.jsonl")


def passing_argv(tmp_path: Path, **changes) -> list[str]:
    """recipes/llava_1_5_7b/grpo_cider.yaml with a real dataset, vLLM off and a writable output folder: passes."""
    settings = {"dataset": caption_jsonl(tmp_path), "dataset_format": "jsonl", "image_root": str(tmp_path),
                "use_vllm": "false", "output_dir": str(tmp_path / "run")} | changes  # fmt: skip
    return ["recipes/llava_1_5_7b/grpo_cider.yaml", "--model-config", str(LLAVA)] + [
        item for key, value in settings.items() for item in (f"--{key}", value)
    ]


def problems_of(text: str) -> list[str]:
    return [line.strip() for line in text.split("problem(s)")[-1].splitlines()[1:] if line.strip()]


def test_a_recipe_that_can_run_exits_0(tmp_path):
    code, text = run(passing_argv(tmp_path))
    assert code == 0, text
    assert "== all checks passed ==" in text and "verdict: fits" in text
    assert "3 sampled rows load, images open" in text and "no checkpoint: starts from step 0" in text


def test_resume_checkpoint_is_found_and_a_half_written_newer_one_named(tmp_path):
    from tests.test_checkpoints import write_checkpoint

    write_checkpoint(tmp_path / "run" / "checkpoint-40", 40)
    (tmp_path / "run" / "checkpoint-50").mkdir()  # a save killed before it wrote anything
    code, text = run(passing_argv(tmp_path))
    assert code == 0, text
    assert "skips incomplete checkpoint-50: no trainer_state.json" in text
    assert f"resumes from {tmp_path / 'run' / 'checkpoint-40'}" in text


def test_an_explicit_half_written_resume_checkpoint_is_a_problem(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    code, text = run(passing_argv(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-7")))
    assert code == 1
    assert problems_of(text) == [
        f"1. [output] resume_from_checkpoint {tmp_path / 'checkpoint-7'}: no trainer_state.json (the save did not "
        "finish)."
    ]


def test_missing_logger_package(tmp_path):
    code, text = run(passing_argv(tmp_path, report_to="wandb"))
    assert code == 1
    assert problems_of(text) == ["1. [environment] report_to wandb needs the 'wandb' package, which is not "
                                 "installed: pip install wandb."]  # fmt: skip


def test_too_small_vllm_context(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(STANDIN))  # the vLLM stand-in's dist-info: vllm 0.31.0 "installed"
    code, text = run(passing_argv(tmp_path, use_vllm="true", vllm_max_model_length="512"))
    assert code == 1
    [problem] = problems_of(text)
    assert problem.startswith("1. [token budget] vllm_max_model_length 512 < the token budget 628 (image 576")
    assert "Set vllm_max_model_length: 768" in problem  # 628 + 64, rounded up to a multiple of 256


def test_missing_vllm(tmp_path):
    code, text = run(passing_argv(tmp_path, use_vllm="true"))
    assert code == 1 and problems_of(text) == [
        "1. [environment] use_vllm needs the 'vllm' package, which is not installed: pip install \"balcaprl[vllm]\"."
    ]


def test_unsupported_vllm_version(tmp_path, monkeypatch):
    # An installed vLLM outside the `vllm` extra's pin (a stand-in package with its own dist-info)
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text('__version__ = "0.35.0"\n')
    (site / "vllm-0.35.0.dist-info").mkdir()
    (site / "vllm-0.35.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.35.0\n")
    monkeypatch.syspath_prepend(str(site))
    code, text = run(passing_argv(tmp_path, use_vllm="true"))
    assert code == 1 and problems_of(text) == [
        '1. [environment] vllm 0.35.0 is not a supported version (vllm==0.31.0): pip install "balcaprl[vllm]".'
    ]


def test_unreachable_judge(tmp_path):
    port = free_port()  # a closed loopback port: connection refused
    argv = passing_argv(tmp_path, judge_base_url=f"http://127.0.0.1:{port}/v1", judge_max_retries="0")
    argv[0] = "recipes/qwen2_5_vl_7b/balcaprl.yaml"
    argv[2] = str(QWEN_7B)
    code, text = run(argv)
    assert code == 1
    [problem] = problems_of(text)
    assert problem.startswith("1. [judge] judge health check failed before training")
    for reward in ("precision", "recall", "linguistic"):
        assert f"'{reward}' judge at http://127.0.0.1:{port}/v1" in problem


def test_judge_health_check_false_skips_the_judge_check_as_training_does(tmp_path):
    port = free_port()  # nothing listens: the check would fail if it ran
    argv = passing_argv(tmp_path, judge_base_url=f"http://127.0.0.1:{port}/v1", judge_health_check="false")
    argv[0], argv[2] = "recipes/qwen2_5_vl_7b/balcaprl.yaml", str(QWEN_7B)
    code, text = run(argv)
    assert code == 0, text
    assert "not checked (judge_health_check: false) for ['precision', 'recall', 'linguistic']" in text


def test_judge_that_answers_passes_with_its_latency(tmp_path, scripted_server):
    argv = passing_argv(tmp_path, judge_base_url=scripted_server.base_url, judge_model="scripted")
    argv[0], argv[2] = "recipes/qwen2_5_vl_7b/balcaprl.yaml", str(QWEN_7B)
    code, text = run(argv)
    assert code == 0, text
    assert "schema-valid answers for ['precision', 'recall', 'linguistic'] in" in text
    assert scripted_server.request_count >= 3  # one real request per judge reward (check_judges)


def broken_data(tmp_path: Path) -> dict:
    (tmp_path / "broken").mkdir()
    return {"dataset": caption_jsonl(tmp_path / "broken", missing=True), "image_root": str(tmp_path / "broken")}


def test_missing_image(tmp_path):
    code, text = run(passing_argv(tmp_path, **broken_data(tmp_path)))
    assert code == 1
    [problem] = problems_of(text)
    assert problem.startswith("1. [data]") and "image_2.jpg" in problem


def test_batch_that_cannot_fit_the_given_gpu(tmp_path):
    code, text = run([*passing_argv(tmp_path, per_device_train_batch_size="64", num_generations="8"),
                      "--gpus", "1", "--gpu-memory", "24"])  # fmt: skip
    assert code == 1
    [problem] = problems_of(text)
    assert problem.startswith("1. [memory] does not fit:") and "the largest term is" in problem
    assert "verdict: does not fit" in text


def test_several_problems_are_listed_together(tmp_path):
    code, text = run(passing_argv(tmp_path, **broken_data(tmp_path), report_to="wandb"))
    assert code == 1 and [p.split("]")[0] for p in problems_of(text)] == ["1. [environment", "2. [data"]


def test_train_stops_before_weights_with_the_preflight_problems(tmp_path):
    # The reference folder has no weights: reaching the weights would fail differently.
    from balcaprl.cli import main as cli

    argv = passing_argv(tmp_path, report_to="wandb", model_name_or_path=str(LLAVA), bf16="false", use_cpu="true")
    del argv[1:3]  # train takes no --model-config
    with pytest.raises(SystemExit) as stopped:
        cli(["train", *argv])
    message = str(stopped.value)
    assert message.startswith("balcaprl train: error: preflight found problems before loading weights:")
    assert "[environment] report_to wandb needs the 'wandb' package" in message


def test_lora_trains_the_adapters_and_needs_no_reference_model(tmp_path):
    # LoRA r=16 on the language model's q/k/v/o (4096 -> 4096) and gate/up (4096 -> 11008), down (11008 -> 4096):
    # r x (in + out) per matrix, 32 layers. The reference model is the base with the adapters off: no second copy.
    overrides = ["--dataset", caption_jsonl(tmp_path), "--dataset_format", "jsonl", "--image_root", str(tmp_path),
                 "--use_peft", "true", "--lora_r", "16"]  # fmt: skip
    report = preflight("recipes/llava_1_5_7b/grpo_cider.yaml", overrides, model_config=str(LLAVA))
    h, i, r = 4096, 11008, 16
    lora = 32 * r * (4 * (h + h) + 2 * (h + i) + (i + h))
    assert lora == 39_976_960
    assert report.memory.terms["optimizer states (AdamW)"] == 12 * lora / 8
    assert report.memory.terms["gradients"] == lora * 2 / 8
    assert "reference model (beta > 0)" not in report.memory.terms
