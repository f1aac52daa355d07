"""The installed TRL still has the code balcaprl's vLLM patch is written against (`CaptioningVLLMGeneration` in
balcaprl/trainer/vllm.py, SCST's greedy generation in balcaprl/trainer/grpo.py).

The patch subclasses TRL's `VLLMGeneration`, overrides some of its methods and relies on what others do. A TRL
release that renames, re-signs or rewrites any of them fails here, naming the method and the line that changed,
before it silently bypasses a fix (an override no longer called, a check run on the wrong ids). After reading the
new TRL code against the reasons below, update this file.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import sys

import pytest
import trl
from trl import GRPOTrainer
from trl.distributed import DistributedBackend
from trl.generation.vllm_generation import VLLMGeneration

from balcaprl.trainer.vllm import CaptioningVLLMGeneration

OWNERS = {"VLLMGeneration": VLLMGeneration, "GRPOTrainer": GRPOTrainer, "DistributedBackend": DistributedBackend}

# Source lines (whitespace-insensitive) the patch relies on, per TRL method, each with the reason.
RELIED_ON = {
    ("VLLMGeneration", "__init__"): {
        "self.processing_class = processing_class": "the image token id is read from the processor",
        "self.mode = mode": "colocate and server mode are told apart by `mode`",
        "self.temperature = temperature": "SCST's baseline swaps `temperature` on the instance",
        "self.generation_kwargs = generation_kwargs or {}": "the trainer adds `bad_words`; SCST swaps them",
    },
    ("VLLMGeneration", "_init_vllm"): {
        "self.vllm_client = VLLMClient(": "server mode talks through `vllm_client`",
        "self.llm = LLM(": "colocate mode holds the engine as `llm`",
    },
    ("VLLMGeneration", "generate"): {
        "temperature = self.temperature": "read per call, so SCST's temperature swap takes effect",
        "generation_kwargs.update(self.generation_kwargs)": "colocate: recipe kwargs override TRL's temperature "
        "(why SCST swaps them for greedy ones)",
        '"generation_kwargs": self.generation_kwargs,': "server: the same, through VLLMClient.generate",
        'row = {"prompt_token_ids": ids}': "colocate: the collapsed prompt ids reach vLLM as they are",
        'row["multi_modal_data"] = {"image": img_list if len(img_list) > 1 else img_list[0]}': "colocate: raw images, "
        "which vLLM expands into placeholder runs itself (huggingface/trl#6294)",
        "all_prompt_ids = [output.prompt_token_ids for output in all_outputs]": "colocate: output[0] is vLLM's "
        "processed prompt, where the image-token check counts",
        "features = self.vllm_client.image_features(all_images[::num_generations])": "server: images processed alone",
        "self._place_features(prompt_features, prompt_ids)": "server: the hook the image-token check overrides",
        "return prompt_ids, completion_ids, logprobs, logprob_token_ids": "the 4-tuple both callers unpack",
    },
    ("VLLMGeneration", "_place_features"): {
        'expected = len(features["mm_placeholders"]["image"])': "the server reports one placeholder per image",
        'return {**features, "mm_placeholders": {**features["mm_placeholders"], "image": placeholders}}': "TRL keeps "
        "the trainer's run lengths without comparing them with the server's (why the check runs first)",
    },
    ("VLLMGeneration", "_iter_named_params"): {
        "with self._dist.gather_params(list(model.parameters())):": "TRL gathers the whole model for PEFT; the LoRA "
        "override gathers one layer at a time with the same helper",
        "model.merge_adapter()": "TRL's in-place merge / unmerge that the LoRA override replaces",
        'name = name.removeprefix("base_model.model.").replace(".base_layer", "")': "the names the override sends",
        "if model.prefix in name:": "adapter weights are not sent",
        'if "original_module" in name:': "modules_to_save originals are not sent",
        'name = self._fix_param_name_to_vllm(name, extra_prefixes=["modules_to_save.default."])': "name clean-up",
        "if self._dist.is_fsdp:": "FSDP keeps TRL's path",
    },
    ("DistributedBackend", "gather_params"): {
        "if self.is_zero3:": "the LoRA override gathers per layer under ZeRO-3 through this helper",
        "with deepspeed.zero.GatheredParameters(params):": "a gather of exactly the parameters given (one layer)",
    },
    ("VLLMGeneration", "sync_weights"): {
        "for name, param in self._iter_named_params():": "colocate consumes the override's tensors in turn",
        "self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)])": "one "
        "tensor per load, so a sync holds one layer's merged weights at a time",
        "self.vllm_client.update_named_params(self._weight_metadata, self._iter_named_params())": "server: the same "
        "iterator is streamed",
    },
    ("GRPOTrainer", "__init__"): {
        "self.vllm_generation = VLLMGeneration(": "the trainer swaps this object's class for the patch",
        "generation_kwargs=args.generation_kwargs,": "the recipe's kwargs reach vLLM",
        "self.generation_config = GenerationConfig(**generation_kwargs, disable_compile=True)": "transformers: the "
        "recipe's kwargs live in `generation_config`, which SCST's greedy config copies and overrides",
    },
    ("GRPOTrainer", "_generate_single_turn"): {
        "if self.use_vllm:": "SCST's transformers path switches vLLM off for one call",
        "elif self.use_transformers_continuous_batching:": "... and continuous batching",
        "**generate_inputs, generation_config=self.generation_config": "the swapped greedy config is the one used",
    },
}

# Parameters of the methods the patch overrides or calls.
SIGNATURES = {
    ("VLLMGeneration", "generate"): ["self", "prompts", "images", "num_generations", "profiler"],
    ("VLLMGeneration", "_place_features"): ["self", "features", "prompt_ids"],
    ("VLLMGeneration", "_iter_named_params"): ["self"],
    ("VLLMGeneration", "sync_weights"): ["self"],
    ("VLLMGeneration", "_fix_param_name_to_vllm"): ["self", "name", "extra_prefixes"],
    ("GRPOTrainer", "_generate_single_turn"): [
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ],  # fmt: skip
    ("GRPOTrainer", "_tokenize_prompts"): ["self", "prompts"],
}

# sha256 of the whole source of each VLLMGeneration method the patch overrides or wraps, in TRL 1.16.0: any edit
# (even one the lines above do not show) asks for a re-read.
SOURCE_SHA256 = {
    "generate": "2d2ac2be5b1309c4cc5e084e238f63d82d65c4d7ecc7cdb8e94ebb2c3a5eee76",
    "_place_features": "5150ee5f57eb83d03bdb6a119ae9209d955a7f6f3754d9c1d8ad6c9ad74b36d3",
    "_iter_named_params": "baab615d5c7bc3e126cec1430f29213c984b275285b08a269cbfbf0adc2617b8",
    "sync_weights": "63d669fb32304ff5e275443abc5e4a2c1e6974ba196d30074bc0f2519f98644c",
    "_fix_param_name_to_vllm": "c42c3965795e12dc209190b543951a81f8d9bf5dd5ed0aed3397338b17b1bf3d",
}


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _source(owner: str, method: str) -> str:
    function = getattr(OWNERS[owner], method, None)
    assert function is not None, f"TRL {trl.__version__}: {owner}.{method} no longer exists; the vLLM patch uses it."
    return inspect.getsource(function)


@pytest.mark.parametrize(("owner", "method"), list(RELIED_ON), ids=lambda value: str(value))
def test_trl_still_has_the_lines_the_patch_relies_on(owner, method):
    source = _normalised(_source(owner, method))
    missing = [
        f"  {line!r}: {why}" for line, why in RELIED_ON[owner, method].items() if _normalised(line) not in source
    ]
    assert not missing, (
        f"TRL {trl.__version__}'s {owner}.{method} changed; lines the vLLM patch relies on are gone:\n"
        + ("\n".join(missing))
    )


@pytest.mark.parametrize(("owner", "method"), list(SIGNATURES), ids=lambda value: str(value))
def test_trl_methods_keep_their_parameters(owner, method):
    _source(owner, method)
    parameters = list(inspect.signature(getattr(OWNERS[owner], method)).parameters)
    assert parameters == SIGNATURES[owner, method], (
        f"TRL {trl.__version__}'s {owner}.{method} now takes {parameters}, the vLLM patch was written for "
        f"{SIGNATURES[owner, method]}."
    )


def test_every_override_still_overrides_a_trl_method():
    """An override of a method TRL renamed would never be called again: the fix would silently stop."""
    overrides = [name for name, value in vars(CaptioningVLLMGeneration).items() if inspect.isfunction(value)]
    assert set(overrides) == {"generate", "_place_features", "_iter_named_params"}
    for name in overrides:
        trl_method = getattr(VLLMGeneration, name, None)
        assert trl_method is not None, (
            f"TRL {trl.__version__}: VLLMGeneration.{name} no longer exists, so CaptioningVLLMGeneration.{name} "
            "would never be called."
        )
        trl_parameters = list(inspect.signature(trl_method).parameters)
        ours = list(inspect.signature(getattr(CaptioningVLLMGeneration, name)).parameters)
        assert ours == trl_parameters, (
            f"TRL {trl.__version__}: VLLMGeneration.{name} takes {trl_parameters}, ours {ours}"
        )


@pytest.mark.parametrize("method", list(SOURCE_SHA256))
def test_patched_trl_methods_are_the_reviewed_source(method):
    digest = hashlib.sha256(_source("VLLMGeneration", method).encode()).hexdigest()
    assert digest == SOURCE_SHA256[method], (
        f"TRL {trl.__version__}'s VLLMGeneration.{method} is not the TRL 1.16.0 source the vLLM patch "
        f"(balcaprl/trainer/vllm.py) was reviewed against (sha256 {digest[:12]}…, reviewed "
        f"{SOURCE_SHA256[method][:12]}…). "
        f"Re-read it against RELIED_ON[('VLLMGeneration', {method!r})] in this file, then record the new digest."
    )


def test_a_changed_trl_line_is_named(monkeypatch):
    """What a TRL upgrade that drops a relied-on line looks like here."""
    real_source = _source

    def edited_source(owner, method):
        return real_source(owner, method).replace("generation_kwargs.update(self.generation_kwargs)", "pass")

    monkeypatch.setattr(sys.modules[__name__], "_source", edited_source)
    with pytest.raises(AssertionError, match=r"(?s)VLLMGeneration\.generate changed.*generation_kwargs\.update"):
        test_trl_still_has_the_lines_the_patch_relies_on("VLLMGeneration", "generate")
