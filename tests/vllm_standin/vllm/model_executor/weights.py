"""The engine's copy of the model and vLLM 0.31's weight-name rules for ``load_weights`` (what TRL's sync calls).

vLLM holds its own module tree, whose parameter names differ from the Hugging Face checkpoint's, and renames each
incoming weight with the model class's ``hf_to_vllm_mapper`` before looking it up. The facts copied here (read from
vLLM's ``vllm/model_executor/models/qwen2_5_vl.py``, ``llava.py`` and ``utils.py``):

- ``WeightsMapper._map_name`` applies EVERY matching ``orig_to_new_prefix`` rule in turn (no early exit), each
  replacing the prefix once.
- ``Qwen2_5_VLForConditionalGeneration``: ``model.language_model.`` -> ``language_model.model.``, ``model.visual.``
  -> ``visual.``, ``lm_head.`` -> ``language_model.lm_head.``, ``model.`` -> ``language_model.model.``.
- ``LlavaForConditionalGeneration``: ``model.language_model.`` -> ``language_model.model.``, ``model.vision_tower.``
  -> ``vision_tower.``, ``model.multi_modal_projector.`` -> ``multi_modal_projector.``, ``lm_head.`` ->
  ``language_model.lm_head.``.
- Text-only causal LMs have no mapper: vLLM's names are the checkpoint's.
- With tied word embeddings the language model's loader skips ``lm_head.`` weights (``skip_prefixes``).
- A name that maps to no parameter is an error (``AutoWeightsLoader``: "There is no module or parameter named ...";
  inside the language model's own loader a ``KeyError``).

The stand-in's vLLM names are the checkpoint's names mapped by these rules, so it accepts exactly the names vLLM
would (the checkpoint's, and older layouts that map to the same parameter) and refuses the rest. It does not model
vLLM's fused ``qkv_proj`` / ``gate_up_proj`` tensors (vLLM loads each HF shard into them by name; the stand-in copies
the shard into the Hugging Face parameter). LLaVA's vision-tower layers past its feature layer, which vLLM builds
without and skips on load, are loaded here: both accept their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class WeightsMapper:
    """``vllm.model_executor.models.utils.WeightsMapper``, prefix rules only (all the two families use)."""

    orig_to_new_prefix: dict[str, str] = field(default_factory=dict)

    def map_name(self, key: str) -> str:
        for prefix, new_prefix in self.orig_to_new_prefix.items():
            if key.startswith(prefix):
                key = key.replace(prefix, new_prefix, 1)
        return key


# ``hf_to_vllm_mapper`` of vLLM 0.31's model class, by Hugging Face ``model_type``.
HF_TO_VLLM_MAPPERS = {
    "qwen2_5_vl": WeightsMapper(
        {
            "model.language_model.": "language_model.model.",
            "model.visual.": "visual.",
            "lm_head.": "language_model.lm_head.",
            "model.": "language_model.model.",
        }
    ),
    "llava": WeightsMapper(
        {
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        }
    ),
}


class EngineModel:
    """The engine's model: a Hugging Face model held apart from the trainer's, loaded by vLLM's weight names."""

    def __init__(self, hf_model: torch.nn.Module, source: str):
        self.hf_model = hf_model
        self.source = source
        self.stale: set[str] = set()  # parameters discarded by sleep(level=2) and not loaded since
        config = hf_model.config
        self.architecture = (getattr(config, "architectures", None) or [type(hf_model).__name__])[0]
        self.mapper = HF_TO_VLLM_MAPPERS.get(config.model_type, WeightsMapper())
        # vLLM's parameter name -> (checkpoint name, parameter).
        self._by_vllm_name = {
            self.mapper.map_name(name): (name, parameter) for name, parameter in hf_model.named_parameters()
        }
        language_model = "language_model." if config.model_type in HF_TO_VLLM_MAPPERS else ""
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        self._skipped_prefixes = (f"{language_model}lm_head.",) if tied else ()

    def named_parameters(self):
        """The parameters by their checkpoint names (what tests compare with the policy)."""
        return self.hf_model.named_parameters()

    def load_weights(self, weights) -> set[str]:
        loaded = set()
        for name, tensor in weights:
            vllm_name = self.mapper.map_name(name)
            if vllm_name.startswith(self._skipped_prefixes):
                continue
            if vllm_name not in self._by_vllm_name:
                examples = ", ".join(list(self._by_vllm_name)[:3])
                raise ValueError(
                    f"There is no module or parameter named {vllm_name!r} in {self.architecture} (vLLM stand-in: "
                    f"load_weights got {name!r}, which vLLM's hf_to_vllm_mapper maps to {vllm_name!r}; vLLM's "
                    f"parameters are named like {examples}). Send the checkpoint's own parameter names (PEFT / "
                    "wrapper prefixes removed)."
                )
            hf_name, parameter = self._by_vllm_name[vllm_name]
            if tuple(parameter.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"vLLM stand-in: load_weights got {name!r} of shape {tuple(tensor.shape)}, the engine's parameter "
                    f"{vllm_name!r} has shape {tuple(parameter.shape)}."
                )
            with torch.no_grad():
                parameter.copy_(tensor.detach().to(device=parameter.device, dtype=parameter.dtype))
            loaded.add(vllm_name)
            self.stale.discard(hf_name)
        return loaded
