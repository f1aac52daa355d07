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

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor: it needs no torchvision and handles images and text only.

    transformers derives a processor's sub-processors from its ``__init__`` signature, so leaving out the
    ``video_processor`` parameter is what keeps it from trying to build one.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        # Saved checkpoints name the stock class, so that they load with plain `AutoProcessor` where torchvision
        # exists, exactly like a checkpoint from the Hub. The stock class also loads a video processor: without a
        # config for one it fails ("Can't load video processor"), so one is written beside the image processor's.
        output = super().save_pretrained(save_directory, **kwargs)
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            path = os.path.join(save_directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
                if data.get("processor_class") == type(self).__name__:
                    data["processor_class"] = Qwen2_5_VLProcessor.__name__
                if name == "processor_config.json" and "video_processor" not in data:
                    data["video_processor"] = self._video_processor_config()
                with open(path, "w", encoding="utf-8") as handle:
                    json.dump(data, handle, indent=2)
        return output

    def _video_processor_config(self) -> dict:
        # What a Hub checkpoint without a video config gets (transformers then reads the image processor's file):
        # the image processor's patching and normalisation; frame and size settings keep the video class defaults.
        shared = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor")
        config = {key: getattr(self.image_processor, key) for key in shared if hasattr(self.image_processor, key)}
        return {"video_processor_type": "Qwen2VLVideoProcessor", **config}


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
