"""TRL's real ``use_vllm=True`` path (colocate) on CPU, through the vLLM stand-in in tests/vllm_standin.

TRL's ``trl.generation.vllm_generation`` binds ``LLM`` / ``SamplingParams`` at import time, only if vLLM is importable
then. The ``vllm_standin`` fixture puts the stand-in first on ``sys.path`` and binds those names exactly as that
guarded import would have, and undoes both (``vllm`` modules dropped from ``sys.modules``) afterwards, so the rest of
the suite still sees no vLLM. Subprocess runs get the stand-in through ``PYTHONPATH`` instead.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText
from trl.generation import vllm_generation

from balcaprl.advantages import compute_advantages
from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
from balcaprl.models.processors import load_processor
from balcaprl.trainer.vllm import vision_token_ids
from tests.helpers import RecordingTrainer, linguistic, make_config, mentions_colour, toy_dataset

STANDIN = Path(__file__).resolve().parent / "vllm_standin"
REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen2_5_vl", "llava"]
REWARDS = [mentions_colour, linguistic]


@pytest.fixture(scope="module")
def vllm_standin():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(STANDIN))
        import vllm
        from trl.import_utils import is_vllm_available
        from vllm.sampling_params import StructuredOutputsParams

        assert is_vllm_available() and vllm.__version__ == "0.31.0"
        # What `if is_vllm_available(): from vllm import ...` at the top of TRL's module binds when vLLM is installed.
        for name in ("LLM", "RequestOutput", "SamplingParams"):
            patch.setattr(vllm_generation, name, getattr(vllm, name), raising=False)
        patch.setattr(vllm_generation, "StructuredOutputsParams", StructuredOutputsParams, raising=False)
        yield vllm
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


class VLLMRecordingTrainer(RecordingTrainer):
    """Also keeps the rows whose SCST baseline was scored, to check the baseline against the engine's captions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.baseline_inputs: list[list[dict]] = []

    def _greedy_baseline_rewards(self, inputs, prompts, num_generations):
        self.baseline_inputs.append(list(inputs))
        return super()._greedy_baseline_rewards(inputs, prompts, num_generations)


def vllm_trainer(
    model_path, output_dir, *, lora=True, model=None, processing_class=None, train_dataset=None, **overrides
):
    """A recording trainer sampling with TRL's colocated vLLM (the stand-in), LoRA on the language model."""
    from peft import LoraConfig

    settings = dict(use_vllm=True, vllm_mode="colocate", max_steps=1)
    settings.update(overrides)
    return VLLMRecordingTrainer(
        model=model if model is not None else str(model_path),
        reward_funcs=REWARDS,
        args=make_config(output_dir, **settings),
        train_dataset=train_dataset if train_dataset is not None else toy_dataset(),
        processing_class=processing_class or load_processor(str(model_path)),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LORA_TARGETS) if lora else None,
    )


def engine(trainer):
    return trainer.vllm_generation.llm


def engine_parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine(trainer)._model.named_parameters()}


def randomize_lora(model, seed=0) -> None:
    """LoRA B starts at zero (merged = base); give the adapters values, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


# ------------------------------------------------------------------------------------------ estimators with vLLM on
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("estimator", ["c_gdpo", "grpo", "scst"])
def test_estimators_train_with_vllm(vllm_standin, tiny_models, tmp_path, family, estimator):
    trainer = vllm_trainer(tiny_models[family], tmp_path, advantage_estimator=estimator, max_steps=2)
    trainer.train()

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("length/masked_frac" in log for log in logs)
    requests = engine(trainer).requests
    sampled = [outputs for params, outputs in requests if params[0].temperature == 1.0]
    greedy = [(params, outputs) for params, outputs in requests if params[0].temperature == 0.0]
    assert len(sampled) == 2  # TRL sampled every completion with the engine: 8 prompts (= 2 groups of G=4)
    assert all(len(outputs) == 8 and len(outputs[0].outputs) == 1 for outputs in sampled)

    matrices = trainer.reward_matrices
    samples = matrices[::2] if estimator == "scst" else matrices
    baselines = trainer.baseline_matrices if estimator == "scst" else [None] * len(samples)
    for rewards, baseline, generated in zip(samples, baselines, trainer.generated_advantages, strict=True):
        expected = compute_advantages(rewards, 4, estimator=estimator, baseline_rewards=baseline)
        torch.testing.assert_close(generated, expected)

    if estimator != "scst":
        assert not greedy
        return
    # SCST's baseline: one temperature-0 (greedy) request per step, one prompt per group, and the baseline rewards
    # are the rewards of exactly those engine completions.
    assert len(greedy) == 2
    for (params, outputs), scored_once, rows in zip(greedy, matrices[1::2], trainer.baseline_inputs, strict=True):
        assert all(p.n == 1 and p.sampling_type_is_greedy for p in params) and len(outputs) == 2
        greedy_ids = [output.outputs[0].token_ids for output in outputs]
        texts = trainer.processing_class.batch_decode(greedy_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": text}] for text in texts]
        expected = mentions_colour(None, completions, [rows[0]["references"], rows[4]["references"]])
        assert scored_once[:, 0].tolist() == expected  # each greedy caption scored once, for its own prompt
    assert all("scst/baseline_reward" in log for log in logs)


# ---------------------------------------------------------------------------------------------- vision tokens
def favour_vision_token(source: Path, destination: Path) -> Path:
    """A copy of a tiny checkpoint whose output layer strongly prefers the image placeholder token everywhere."""
    shutil.copytree(source, destination)
    model = AutoModelForImageTextToText.from_pretrained(destination)
    processor = load_processor(str(destination))
    image_token_id = model.config.image_token_id
    # The mean final hidden state over the dataset's prompts: a row along it wins the argmax for (nearly) any input.
    inputs = processor.apply_chat_template(
        [row["prompt"] for row in _prompts_with_images(4)], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt", padding=True,
    )  # fmt: skip
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state  # after the final norm: what the output layer sees
        direction = hidden[inputs["attention_mask"].bool()].mean(0)
        model.lm_head.weight[image_token_id] = 200 * direction / direction.norm() ** 2
    model.save_pretrained(destination)
    return destination


def _prompts_with_images(count: int) -> list[dict]:
    from trl.data_utils import prepare_multimodal_messages

    rows = [toy_dataset()[index] for index in range(count)]
    for row in rows:
        row["prompt"] = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tokens_are_never_sampled(vllm_standin, tiny_models, tmp_path, family):
    path = favour_vision_token(tiny_models[family], tmp_path / "model")
    user_kwargs = {"seed": 7, "bad_words": ["zebra"]}
    trainer = vllm_trainer(path, tmp_path / "run", max_steps=2, generation_kwargs=user_kwargs)
    forbidden = vision_token_ids(trainer.model.config)
    image_token_id = trainer.processing_class.image_token_id

    # The model is rigged: asked without bad_words, the engine samples the image token first (one token only: the
    # stand-in's next step would already fail on it, see vllm.entrypoints.llm).
    prompt_ids, images, _ = trainer._tokenize_prompts([row["prompt"] for row in _prompts_with_images(2)])
    params = vllm_standin.SamplingParams(max_tokens=1, seed=0)
    one_placeholder = [[t for i, t in enumerate(ids) if t != image_token_id or ids[i - 1] != t] for ids in prompt_ids]
    requests = [
        {"prompt_token_ids": ids, "multi_modal_data": {"image": image[0]}}
        for ids, image in zip(one_placeholder, images)
    ]
    rigged = engine(trainer).generate(requests, params)
    assert all(output.outputs[0].token_ids[0] == image_token_id for output in rigged)

    # Through TRL's vLLM path the trainer's bad_words keep every vision token out, and training runs.
    trainer.train()
    sampled = [o.outputs[0].token_ids for params, outputs in engine(trainer).requests[1:] for o in outputs]
    assert len(sampled) == 16 and all(not set(ids) & set(forbidden) for ids in sampled)
    # The user's generation_kwargs are kept (and not edited in place); the request is JSON-safe for server mode.
    kwargs = trainer.vllm_generation.generation_kwargs
    words = trainer.processing_class.tokenizer.convert_ids_to_tokens(forbidden)
    assert kwargs == {"seed": 7, "bad_words": ["zebra", *words]} and trainer.args.generation_kwargs == user_kwargs
    assert json.loads(json.dumps(kwargs)) == kwargs
    if family == "qwen2_5_vl":
        assert set(words) == {"<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"}
    else:
        assert words == ["<image>"]


# --------------------------------------------------------------------------------------- image processing in vLLM
def with_real_qwen_processor_defaults(source: Path, destination: Path) -> Path:
    """A copy of the tiny Qwen2.5-VL whose processor defaults are Qwen2.5-VL-7B-Instruct's (3136 .. 12845056 px)."""
    shutil.copytree(source, destination)
    config_path = destination / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    config_path.write_text(json.dumps(config, indent=2))
    return destination


def test_without_the_data_path_resize_the_counts_disagree_and_training_stops(vllm_standin, tiny_models, tmp_path):
    """The recipe's min/max_pixels reach the trainer's processor only; vLLM processes the raw 56x56 image with the
    checkpoint's defaults (4 image tokens) while the trainer upsizes it to 112x112 (16 tokens). Rows that skipped the
    data path's resize (a hand-built dataset here) are caught, not sampled from another resolution."""
    path = with_real_qwen_processor_defaults(tiny_models["qwen2_5_vl"], tmp_path / "model")
    recipe_processor = load_processor(str(path), min_pixels=112 * 112, max_pixels=112 * 112)
    trainer = vllm_trainer(path, tmp_path / "run", processing_class=recipe_processor)
    with pytest.raises(ValueError, match="into 4 image tokens, the trainer's processor into 16"):
        trainer.train()
    processed = engine(trainer).requests[-1][1][0].prompt_token_ids
    assert processed.count(recipe_processor.image_token_id) == 4


def test_data_path_resize_gives_the_engine_the_trainers_image_tokens(vllm_standin, tiny_models, tmp_path):
    """Images resized once when rows are read (`ImageResize` at the recipe's bounds): vLLM's default processing of
    the row's image counts what the trainer's processor counts, for images of several sizes and aspect ratios."""
    from PIL import Image

    from balcaprl.data.loading import load_caption_dataset
    from balcaprl.models.processors import image_resize_for

    path = with_real_qwen_processor_defaults(tiny_models["qwen2_5_vl"], tmp_path / "model")
    recipe_processor = load_processor(str(path), min_pixels=112 * 112, max_pixels=168 * 168)
    lines = []
    for index, (size, colour) in enumerate([((56, 56), "red"), ((300, 200), "blue"), ((90, 250), "green")] * 3):
        Image.new("RGB", size, colour).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "references": [f"a {colour} square here."]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines[:8]) + "\n")
    dataset = load_caption_dataset(tmp_path / "data.jsonl", image_resize=image_resize_for(recipe_processor))
    trainer = vllm_trainer(
        path, tmp_path / "run", processing_class=recipe_processor, train_dataset=dataset, max_steps=2
    )
    trainer.train()  # the trainer compares both counts on every batch and raises on a difference

    image_token_id = recipe_processor.image_token_id
    counts = {
        output.prompt_token_ids.count(image_token_id) for _, outputs in engine(trainer).requests for output in outputs
    }
    expected = {
        image_resize_for(recipe_processor).num_image_tokens(*size) for size in [(56, 56), (300, 200), (90, 250)]
    }
    assert counts <= expected and len(counts) > 1  # several resolutions were sampled, each as the trainer saw it


def test_engine_refuses_an_already_expanded_prompt(vllm_standin, tiny_models):
    """What TRL 1.16 sends to colocated vLLM for a VLM: the processor-expanded prompt and the raw image. vLLM 0.31
    expands it again (huggingface/trl#6294); the stand-in makes that loud."""
    path = tiny_models["qwen2_5_vl"]
    processor = load_processor(str(path))
    row = _prompts_with_images(1)[0]
    rendered = processor.apply_chat_template(
        [row["prompt"]], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expanded = rendered["input_ids"][0]
    llm = vllm_standin.LLM(model=str(path))
    with pytest.raises(RuntimeError, match="already holds 4 '<\\|image_pad\\|>' tokens"):
        llm.generate([{"prompt_token_ids": expanded, "multi_modal_data": {"image": row["image"]}}])


# ------------------------------------------------------------------------------------------------ weight sync
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_weights_equal_the_policy_after_sync(vllm_standin, tiny_models, tmp_path, family):
    trainer = vllm_trainer(tiny_models[family], tmp_path, lora=False, max_steps=2)
    before = engine_parameters(trainer)
    trainer.train()  # full fine-tuning: the policy changes, TRL syncs before each generation
    trainer.vllm_generation.sync_weights()
    after = engine_parameters(trainer)
    policy = dict(trainer.model.named_parameters())
    assert set(after) == set(policy)
    assert all(torch.equal(after[name], policy[name].detach()) for name in after)
    assert any(not torch.equal(before[name], after[name]) for name in after)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_gets_lora_merged_weights_and_bf16_base_never_drifts(vllm_standin, tiny_models, tmp_path, family):
    policy = AutoModelForImageTextToText.from_pretrained(tiny_models[family], dtype=torch.bfloat16)
    trainer = vllm_trainer(tiny_models[family], tmp_path, model=policy)
    randomize_lora(trainer.model)
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}

    for _ in range(50):
        trainer.vllm_generation.sync_weights()  # TRL's sync (colocate: load_weights into the engine)

    base_after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    drifted = [name for name in base_before if not torch.equal(base_before[name], base_after[name])]
    assert not drifted, f"{len(drifted)} base tensors changed after 50 bf16 syncs, e.g. {drifted[:3]}"
    # What the engine holds is the policy with the adapter merged, exactly as peft merges it.
    merged = copy.deepcopy(trainer.model).merge_and_unload()
    expected = {name: p.detach() for name, p in merged.named_parameters()}
    received = engine_parameters(trainer)
    assert set(received) == set(expected)
    assert all(torch.equal(received[n], expected[n].to(received[n].dtype)) for n in received)
    base_by_name = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in base_before.items()}
    lora_targets = [n for n in received if "language_model" in n and "q_proj.weight" in n]
    assert lora_targets and all(not torch.equal(received[n].bfloat16(), base_by_name[n]) for n in lora_targets)


def merged_bytes_alive_during_sync(trainer) -> tuple[int, int]:
    """(peak bytes of merged tensors alive at any yield of the LoRA sync, count of merged tensors sent).

    Consumes the engine patch's ``_iter_named_params`` as TRL's sync does (each tensor loaded, then dropped) and,
    at every yield, adds up the tensors sent so far that are not a parameter's own storage and are still alive.
    """
    own_storage = {parameter.data_ptr() for parameter in trainer.model.parameters()}
    sent: list[weakref.ref] = []
    peak = 0
    for _, tensor in trainer.vllm_generation._iter_named_params():
        if tensor.data_ptr() not in own_storage:
            sent.append(weakref.ref(tensor))
        del tensor
        alive = [ref() for ref in sent if ref() is not None]
        peak = max(peak, sum(item.numel() * item.element_size() for item in alive))
        del alive
    return peak, len(sent)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_sync_holds_one_layer_merged_at_a_time(vllm_standin, reference_models, tmp_path, family):
    """Merged LoRA weights are made per layer as the sync reaches it: the extra memory of a sync is one layer's."""
    policy = AutoModelForImageTextToText.from_pretrained(reference_models[family], dtype=torch.bfloat16)
    trainer = vllm_trainer(reference_models[family], tmp_path, model=policy)
    randomize_lora(trainer.model)
    from peft.tuners.lora import LoraLayer

    layers = [module for module in trainer.model.modules() if isinstance(module, LoraLayer)]
    bytes_of = [
        sum(p.numel() * p.element_size() for p in layer.get_base_layer().parameters(recurse=False)) for layer in layers
    ]
    peak, merged_sent = merged_bytes_alive_during_sync(trainer)
    assert merged_sent >= len(layers) > 10  # every LoRA layer was sent merged (weights; biases where present)
    assert 0 < peak <= max(bytes_of), f"{peak} bytes of merged weights alive at once; one layer is {max(bytes_of)}"
    assert sum(bytes_of) > 4 * max(bytes_of)  # merging every layer first would hold many times that


# ----------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_scst_with_vllm(tiny_models, tmp_path):
    """Two gloo processes, each with its own colocated engine: SCST's greedy requests have the same size on both."""
    script = REPO / "tests" / "scripts" / "two_process_vllm_train.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(script), str(tiny_models["qwen2_5_vl"]), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{STANDIN}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["vllm"] for r in ranks] == ["0.31.0", "0.31.0"]
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert step0["full"] == step1["full"] and len(step0["full"]) == 12
        torch.testing.assert_close(torch.tensor(step0["local"] + step1["local"]), torch.tensor(step0["full"]))
        baseline = torch.tensor(step0["baseline"]).view(3, 4, -1)
        assert (baseline == baseline[:, :1]).all()
        # Each process sent the engine the same number of greedy prompts (2: the most groups one process touches).
        assert step0["greedy_prompts"] == step1["greedy_prompts"] == 2
