"""The policy's processor (`load_processor`: the stock one, or the image-only Qwen2.5-VL processor without
torchvision) and the image resize it implies for the data path.
"""

from __future__ import annotations

from transformers import AutoProcessor, ProcessorMixin

from balcaprl.data.images import ImageResize
from balcaprl.models.image_only import ImageOnlyQwen2_5_VLProcessor, torchvision_available
from balcaprl.models.paths import model_family, resolve_model_path


def image_resize_for(processor: ProcessorMixin) -> ImageResize | None:
    """The data path's one image resize for ``processor``'s model (see `balcaprl.data.ImageResize`).

    Qwen2.5-VL: ``smart_resize`` at the processor's pixel bounds (the recipe's ``min_pixels`` / ``max_pixels``, else
    the checkpoint's). LLaVA-1.5: None, as its processor resizes and centre-crops every image to one fixed size, and
    vLLM runs that same processor.
    """
    image_processor = getattr(processor, "image_processor", None)
    merge_size = getattr(image_processor, "merge_size", None)
    if merge_size is None:
        return None
    min_pixels, max_pixels = _pixel_bounds(dict(image_processor.size))
    return ImageResize(min_pixels, max_pixels, factor=image_processor.patch_size * merge_size)


def checkpoint_pixel_bounds(model_name_or_path: str) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) the checkpoint's own image-processor config gives (what vLLM uses), None if none."""
    from transformers.image_processing_utils import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(resolve_model_path(model_name_or_path))
    if "merge_size" not in config:
        return None
    return _pixel_bounds({**config.get("size", {}), **config})


def _pixel_bounds(size: dict) -> tuple[int, int]:
    # Qwen2-VL image-processor configs say either min_pixels / max_pixels (the Hub checkpoints) or size
    # {shortest_edge, longest_edge} (what transformers 5 saves); both mean pixel counts.
    min_pixels = size.get("min_pixels") or size.get("shortest_edge")
    max_pixels = size.get("max_pixels") or size.get("longest_edge")
    return int(min_pixels), int(max_pixels)


def load_processor(model_name_or_path: str, **kwargs) -> ProcessorMixin:
    """Load the processor of a LLaVA-1.5 or Qwen2.5-VL checkpoint (local folder or Hub name).

    Extra ``kwargs`` go to ``from_pretrained`` (e.g. ``min_pixels`` / ``max_pixels`` for Qwen2.5-VL).
    """
    model_name_or_path = resolve_model_path(model_name_or_path)
    if model_family(model_name_or_path) == "qwen2_5_vl" and not torchvision_available():
        return ImageOnlyQwen2_5_VLProcessor.from_pretrained(model_name_or_path, **kwargs)
    return AutoProcessor.from_pretrained(model_name_or_path, **kwargs)
