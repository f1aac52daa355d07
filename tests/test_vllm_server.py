"""TRL's real ``vllm_mode="server"`` path on CPU: `VLLMGeneration` talks to a loopback `VLLMClient` (below), backed by
the vLLM stand-in engine, instead of an HTTP server.

What TRL 1.16 sends a server for an image prompt (``trl/generation/vllm_generation.py``, ``vllm_client.py``): the
images alone first (``image_features``: vLLM's ``/v1/chat/completions/render`` processes them in a throwaway
conversation and reports each image's placeholder ``length``), then the trainer's processor-expanded prompt ids with
those features re-pointed at the trainer's image-token runs (``_place_features``), to ``/inference/v1/generate``,
which echoes the prompt ids back. So the server's image-token count is the render step's ``length``, which TRL
overwrites with the trainer's: `CaptioningVLLMGeneration._place_features` compares them first.
"""

from __future__ import annotations

import functools

import pytest
from trl.generation import vllm_generation

from balcaprl.models.processors import load_processor
from tests import test_vllm_path
from tests.test_vllm_path import FAMILIES, vllm_trainer, with_real_qwen_processor_defaults

vllm_standin = test_vllm_path.vllm_standin  # the module's fixture: vLLM importable, as the stand-in
pytestmark = pytest.mark.usefixtures("vllm_standin")


class LoopbackVLLMClient:
    """The methods of `trl.generation.vllm_client.VLLMClient` that TRL's server mode calls, answered in-process by
    a stand-in engine for ``model_path`` with the server's processing (the checkpoint's default image settings).

    Differences from the HTTP client: no NCCL communicator (the real one needs CUDA), and the features carry the
    images themselves (``"images"``) where the real ones carry the processed tensors. Every call is recorded.
    """

    def __init__(self, model_path, base_url=None, host="0.0.0.0", server_port=8000, group_port=51216, **kwargs):
        from vllm import LLM

        self.llm = LLM(model=str(model_path), logprobs_mode="processed_logprobs")
        self.rendered: list[list[dict | None]] = []
        self.generate_calls: list[tuple[dict, list[dict | None] | None]] = []
        self.loaded_names: list[str] = []

    def init_communicator(self, device=0) -> None:
        pass

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}, "weight_transfer_config": {"backend": "nccl"}}

    def image_features(self, images) -> list[dict | None]:
        from vllm.multimodal.processing import runs_of

        features = []
        for prompt_images in images:
            if not prompt_images:
                features.append(None)
                continue
            processor = self.llm.processor  # the checkpoint's defaults, as the server's
            processed = processor(text=[processor.image_token * len(prompt_images)], images=prompt_images)
            runs = runs_of(list(processed["input_ids"][0]), self.llm.image_token_id)
            placeholders = [{"offset": offset, "length": length} for offset, length in runs]
            features.append({"mm_placeholders": {"image": placeholders}, "images": prompt_images})
        self.rendered.append(features)
        return features

    def generate(
        self,
        prompts,
        features=None,
        n=1,
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        max_tokens=16,
        logprobs=0,
        structured_outputs_regex=None,
        generation_kwargs=None,
    ):
        from vllm import SamplingParams

        params = dict(n=n, repetition_penalty=repetition_penalty, temperature=temperature, top_p=top_p, top_k=top_k,
                      min_p=min_p, max_tokens=max_tokens, logprobs=logprobs)  # fmt: skip
        params.update(generation_kwargs or {})  # as VLLMClient.generate does
        self.generate_calls.append((params, features))
        image_token_id = self.llm.image_token_id
        requests = []
        for ids, feature in zip(prompts, features or [None] * len(prompts), strict=True):
            if feature is None:
                requests.append({"prompt_token_ids": list(ids)})
                continue
            # The server fills the placed runs with the image data it processed; the stand-in engine expands one
            # placeholder per image with that same processing.
            one_each = [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != t]
            requests.append({"prompt_token_ids": one_each, "multi_modal_data": {"image": feature["images"]}})
        outputs = self.llm.generate(requests, SamplingParams(**params))
        logprob_values, logprob_token_ids = vllm_generation.extract_logprobs(outputs)
        return {
            "prompt_ids": list(prompts),  # the server echoes the ids it was given
            "completion_ids": [completion.token_ids for output in outputs for completion in output.outputs],
            "logprobs": logprob_values,
            "logprob_token_ids": logprob_token_ids,
        }

    def update_named_params(self, metadata, named_params) -> None:
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for (name, _, shape), (sent_name, tensor) in zip(metadata, named_params, strict=True):
            assert (name, shape) == (sent_name, list(tensor.shape)), "streamed tensors must follow the metadata"
            model.load_weights([(sent_name, tensor)])
            self.loaded_names.append(sent_name)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def server_trainer(monkeypatch, model_path, output_dir, **overrides):
    """A recording trainer in TRL's server mode, its `VLLMClient` the loopback client for ``model_path``."""
    monkeypatch.setattr(vllm_generation, "VLLMClient", functools.partial(LoopbackVLLMClient, model_path))
    return vllm_trainer(model_path, output_dir, vllm_mode="server", **overrides)


def test_server_mode_stops_when_the_servers_image_tokens_differ(tiny_models, tmp_path, monkeypatch):
    """The server processes the raw 56x56 image with the checkpoint's defaults (4 image tokens); the trainer, with the
    recipe's bounds, into 16. TRL would place the server's 4-token features on the trainer's 16-token runs."""
    path = with_real_qwen_processor_defaults(tiny_models["qwen2_5_vl"], tmp_path / "model")
    recipe_processor = load_processor(str(path), min_pixels=112 * 112, max_pixels=112 * 112)
    trainer = server_trainer(monkeypatch, path, tmp_path / "run", processing_class=recipe_processor)
    expected = (
        r"The vLLM server processed the image\(s\) of a prompt of this batch into 4 image tokens, the trainer's "
        r"processor into 16: .* Per image: server \[4\], trainer \[16\]\."
    )
    with pytest.raises(ValueError, match=expected):
        trainer.train()
    client = trainer.vllm_generation.vllm_client
    assert [placeholder["length"] for placeholder in client.rendered[0][0]["mm_placeholders"]["image"]] == [4]
    assert not client.generate_calls  # stopped before sampling from the wrong resolution


@pytest.mark.parametrize("family", FAMILIES)
def test_server_mode_samples_when_the_counts_agree(tiny_models, tmp_path, monkeypatch, family):
    trainer = server_trainer(monkeypatch, tiny_models[family], tmp_path, advantage_estimator="grpo")
    trainer.train()

    client = trainer.vllm_generation.vllm_client
    image_token_id = trainer.processing_class.image_token_id
    (params, features), = client.generate_calls  # fmt: skip
    assert params["n"] == 4 and len(features) == 2  # one request per prompt, G completions each
    # The server's count per image equals the trainer's run, which TRL placed the features on.
    for rendered, placed in zip(client.rendered[0], features, strict=True):
        trainer_lengths = [placeholder["length"] for placeholder in placed["mm_placeholders"]["image"]]
        assert [p["length"] for p in rendered["mm_placeholders"]["image"]] == trainer_lengths
    processed = [output.prompt_token_ids.count(image_token_id) for output in client.llm.requests[0][1]]
    assert processed == [sum(p["length"] for p in f["mm_placeholders"]["image"]) for f in features]
    # The weight sync streamed the names vLLM's hf_to_vllm_mapper accepts (LoRA merged, PEFT prefixes removed).
    policy = dict(trainer.model.named_parameters())
    assert client.loaded_names and all(
        "lora_" not in name and "base_model" not in name for name in client.loaded_names
    )
    assert len(client.loaded_names) == len([name for name in policy if "lora_" not in name])
    assert {name for name, _ in client.llm._model.named_parameters()} == set(client.loaded_names)


def test_scst_baseline_is_greedy_on_the_server_whatever_generation_kwargs_say(tiny_models, tmp_path, monkeypatch):
    user_kwargs = {"temperature": 0.7, "top_p": 0.9, "seed": 3}
    trainer = server_trainer(
        monkeypatch, tiny_models["qwen2_5_vl"], tmp_path, advantage_estimator="scst", generation_kwargs=user_kwargs
    )
    trainer.train()

    (sampled, _), (greedy, _) = trainer.vllm_generation.vllm_client.generate_calls
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["n"] == 4
    # What the server received for the baseline: temperature 0, the recipe's top_p gone, its other keys kept.
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and greedy["n"] == 1 and greedy["seed"] == 3
    server_params = [params for params, _ in trainer.vllm_generation.vllm_client.llm.requests]
    assert [params[0].sampling_type_is_greedy for params in server_params] == [False, True]
    assert trainer.args.generation_kwargs == user_kwargs  # the recipe's settings are not edited
