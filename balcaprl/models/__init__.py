"""Models of the two supported families (LLaVA-1.5, Qwen2.5-VL): where they live, their processors, loading with
adapters and LoRA, and the tiny offline builders that tests and the demo use.
"""

from balcaprl._lazy import lazy_exports

__all__ = [
    "ADAPTER_BASE_ENV",
    "ImageOnlyQwen2_5_VLProcessor",
    "LANGUAGE_MODEL_LORA_TARGETS",
    "LORA_TARGET_PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "adapter_base",
    "build_reference_interface_model",
    "build_tiny_model",
    "checkpoint_pixel_bounds",
    "image_resize_for",
    "load_model",
    "load_policy",
    "load_processor",
    "merge_adapter",
    "model_family",
    "peft_config",
    "resolve_model_path",
    "tiny_caption_rows",
    "torchvision_available",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "resolve_model_path": "paths",
        "model_family": "paths",
        "adapter_base": "paths",
        "ADAPTER_BASE_ENV": "paths",
        "SUPPORTED_MODEL_TYPES": "paths",
        "load_processor": "processors",
        "image_resize_for": "processors",
        "checkpoint_pixel_bounds": "processors",
        "ImageOnlyQwen2_5_VLProcessor": "image_only",
        "torchvision_available": "image_only",
        "load_model": "loading",
        "load_policy": "loading",
        "merge_adapter": "loading",
        "peft_config": "loading",
        "LORA_TARGET_PRESETS": "loading",
        "LANGUAGE_MODEL_LORA_TARGETS": "loading",
        "build_tiny_model": "tiny",
        "tiny_caption_rows": "tiny",
        "build_reference_interface_model": "reference",
    },
)
