"""Processor and policy loading for the two supported families (LLaVA-1.5, Qwen2.5-VL).

The one trap handled here: a stock Qwen2.5-VL checkpoint names ``Qwen2_5_VLProcessor``, whose video processor needs
torchvision. Where torchvision cannot be imported we load an image-only subclass instead, so captioning works with
or without torchvision; users who have torchvision get the stock processor untouched.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache

from transformers import AutoConfig, AutoProcessor, ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

SUPPORTED_MODEL_TYPES = ("llava", "qwen2_5_vl")


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor: it needs no torchvision and handles images and text only.

    transformers derives a processor's sub-processors from its ``__init__`` signature, so leaving out the
    ``video_processor`` parameter is what keeps it from trying to build one.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        # Saved checkpoints name the stock class, so that they load with plain `AutoProcessor` where torchvision
        # exists, exactly like a checkpoint from the Hub.
        output = super().save_pretrained(save_directory, **kwargs)
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            path = os.path.join(save_directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
                if data.get("processor_class") == type(self).__name__:
                    data["processor_class"] = Qwen2_5_VLProcessor.__name__
                    with open(path, "w", encoding="utf-8") as handle:
                        json.dump(data, handle, indent=2)
        return output


@lru_cache(maxsize=1)
def torchvision_available() -> bool:
    """True when torchvision imports and works (a CUDA torchvision wheel beside a CPU torch fails at import)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # any failure means "not usable", whatever the wheel's reason
        return False
    return True


def load_processor(model_name_or_path: str, **kwargs) -> ProcessorMixin:
    """Load the processor of a LLaVA-1.5 or Qwen2.5-VL checkpoint (local folder or Hub name).

    Extra ``kwargs`` go to ``from_pretrained`` (e.g. ``min_pixels`` / ``max_pixels`` for Qwen2.5-VL).
    """
    config = AutoConfig.from_pretrained(model_name_or_path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{model_name_or_path!r} is a {config.model_type!r} model; "
            f"balcaprl supports {list(SUPPORTED_MODEL_TYPES)}."
        )
    if config.model_type == "qwen2_5_vl" and not torchvision_available():
        return ImageOnlyQwen2_5_VLProcessor.from_pretrained(model_name_or_path, **kwargs)
    return AutoProcessor.from_pretrained(model_name_or_path, **kwargs)


# LoRA on the language model only (attention and MLP projections). The vision towers of both families also have
# `q_proj`-like names (CLIP) or fused `qkv` layers (Qwen2.5-VL); the `language_model` prefix keeps them frozen.
LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
