"""SCST's greedy baseline stays greedy when a recipe sets sampling ``generation_kwargs`` (TRL passes them to
transformers' ``generate`` and over its own temperature to vLLM's ``SamplingParams``), on both generation paths.
Server mode: tests/test_vllm_server.py."""

from __future__ import annotations

import pytest
import torch
from trl.data_utils import prepare_multimodal_messages

from tests import test_vllm_path
from tests.helpers import greedy_caption_tokens, linguistic, make_trainer, mentions_colour, toy_dataset

vllm_standin = test_vllm_path.vllm_standin  # the module's fixture: vLLM importable, as the stand-in


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_transformers_baseline_is_greedy_whatever_generation_kwargs_say(tiny_models, tmp_path, family):
    user_kwargs = {"temperature": 0.7, "top_p": 0.9, "do_sample": True, "num_beams": 2}
    trainer = make_trainer(
        tiny_models[family], tmp_path, [mentions_colour, linguistic], advantage_estimator="scst",
        generation_kwargs=user_kwargs,
    )  # fmt: skip
    rows = [toy_dataset()[index] for index in range(2)]
    # with each row's image in its prompt, as TRL's _generate_and_score_completions puts it before generating
    prompts = [prepare_multimodal_messages(row["prompt"], [row["image"]]) for row in rows]
    prompt_ids, images, multimodal_fields = trainer._tokenize_prompts(prompts)
    assert all(image is not None for image in images)

    # The recipe's settings are live: TRL's sampling with them differs from seed to seed.
    sampled = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sampled.append(trainer._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations=1)[0])
    assert sampled[0] != sampled[1]

    # The baseline: the generation config transformers receives is greedy, and so are the captions.
    received = []
    generate = trainer.model.generate

    def recording_generate(*args, **kwargs):
        received.append(kwargs["generation_config"])
        return generate(*args, **kwargs)

    trainer.model.generate = recording_generate
    decodes = []
    for seed in range(3):
        torch.manual_seed(seed)
        decodes.append(trainer._generate_greedy(prompts))
    assert all(config.do_sample is False and config.num_beams == 1 for config in received) and len(received) == 3
    assert decodes[0] == decodes[1] == decodes[2]
    trainer.model.generate = generate
    trainer.model.eval()
    instruction = rows[0]["prompt"][0]["content"]  # the rows' own prompt ("Describe this image."), not the default
    images = [r["image"] for r in rows]
    reference, eos_ids = greedy_caption_tokens(trainer.model, trainer.processing_class, images, 8, instruction)
    for decoded, expected in zip(decodes[0], reference, strict=True):
        end = next((i + 1 for i, token in enumerate(expected) if token in eos_ids), len(expected))
        assert decoded == expected[:end]
    assert trainer.generation_config.do_sample and trainer.generation_config.temperature == 0.7  # left as it was


def test_vllm_baseline_is_greedy_whatever_generation_kwargs_say(vllm_standin, tiny_models, tmp_path):
    user_kwargs = {"temperature": 0.7, "top_p": 0.9, "seed": 7}
    trainer = test_vllm_path.vllm_trainer(
        tiny_models["qwen2_5_vl"], tmp_path, advantage_estimator="scst", generation_kwargs=user_kwargs
    )
    trainer.train()

    (sampled, _), (greedy, greedy_outputs) = test_vllm_path.engine(trainer).requests
    assert len(sampled) == 8 and all(p.temperature == 0.7 and p.top_p == 0.9 for p in sampled)
    # The engine decoded the baseline greedily: temperature 0 (vLLM then resets top-p), one completion per prompt,
    # the recipe's other settings and the trainer's banned vision tokens kept.
    assert len(greedy) == len(greedy_outputs) == 2
    for params in greedy:
        assert params.temperature == 0.0 and params.sampling_type_is_greedy and params.top_p == 1.0
        assert params.n == 1 and params.seed == 7 and "<|image_pad|>" in params.bad_words
    assert trainer.vllm_generation.generation_kwargs["temperature"] == 0.7  # restored after the baseline
    assert trainer.args.generation_kwargs == user_kwargs
