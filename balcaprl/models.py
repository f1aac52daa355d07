"""Processor and policy loading for the two supported families (LLaVA-1.5, Qwen2.5-VL).

The one trap handled here: a stock Qwen2.5-VL checkpoint names ``Qwen2_5_VLProcessor``, whose video processor needs
torchvision. Where torchvision cannot be imported we load an image-only subclass instead, so captioning works with
or without torchvision; users who have torchvision get the stock processor untouched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from balcaprl.data import ImageResize

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


# LoRA on the language model only (attention and MLP projections). The vision towers of both families also have
# `q_proj`-like names (CLIP) or fused `qkv` layers (Qwen2.5-VL); the `language_model` prefix keeps them frozen.
LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_TARGET_PRESETS = {
    "language_model": LANGUAGE_MODEL_LORA_TARGETS,
    "language_model_attention": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
}

# Module names (as they appear in parameter names) of each family's parts, in transformers >= 5.
VISION_MODULES = {"qwen2_5_vl": "visual", "llava": "vision_tower"}
PROJECTOR_MODULES = {"qwen2_5_vl": "visual.merger", "llava": "multi_modal_projector"}
PARTS = ("vision", "projector", "language_model", "lora")


def resolve_model_path(model_name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``tiny:<family>`` → a tiny offline model built (once) under ``cache_dir``; anything else is returned as is."""
    if not model_name_or_path.startswith("tiny:"):
        return model_name_or_path
    from balcaprl.tiny import FAMILIES, build_tiny_model

    family = model_name_or_path.removeprefix("tiny:")
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny model {model_name_or_path!r}; use one of {[f'tiny:{f}' for f in FAMILIES]}.")
    # Keyed by the code that builds and saves it: a model cached by an older balcaprl is not silently reused.
    folder = Path(cache_dir or Path.home() / ".cache" / "balcaprl" / "tiny") / f"{family}-{_builder_fingerprint()}"
    if not (folder / "config.json").is_file():
        # Several launched processes may get here at once: each builds aside, the first rename wins.
        staging = folder.with_name(f"{folder.name}.building-{os.getpid()}")
        build_tiny_model(family, staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first (same deterministic build)
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


@lru_cache(maxsize=1)
def _builder_fingerprint() -> str:
    import hashlib

    from balcaprl import tiny

    digest = hashlib.sha256()
    for path in sorted({tiny.__file__, __file__}):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


# Where an adapter's base checkpoint is when the path in its adapter_config.json is not on this machine.
ADAPTER_BASE_ENV = "BALCAPRL_ADAPTER_BASE"


def adapter_base(model_name_or_path: str, base_model: str | None = None) -> str | None:
    """The base checkpoint of a LoRA adapter folder, None for anything else (a full checkpoint, a Hub name).

    The base is ``base_model`` when given, else the ``BALCAPRL_ADAPTER_BASE`` environment variable, else the
    ``base_model_name_or_path`` of the folder's ``adapter_config.json``. A base given as a local path that does not
    exist here (e.g. trained on another machine) is an error that says which file names it and how to override it.
    """
    adapter_config = Path(model_name_or_path) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    override = base_model or os.environ.get(ADAPTER_BASE_ENV)
    if override:
        return resolve_model_path(override)
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    looks_local = base and (os.path.isabs(base) or base.startswith(".") or base.count("/") > 1)
    if not base or (looks_local and not os.path.isdir(base)):
        raise ValueError(
            f"{adapter_config} names the base model {base!r}, which is not a folder here. Point "
            f"{ADAPTER_BASE_ENV}=<base checkpoint or Hub name> at where the base is on this machine (`balcaprl merge` "
            "takes --base-model), or edit base_model_name_or_path in that file."
        )
    return base


def load_model(model_name_or_path: str, base_model: str | None = None, **kwargs):
    """A captioning model from a full checkpoint, or from a LoRA adapter folder merged into its base.

    ``kwargs`` go to ``AutoModelForImageTextToText.from_pretrained`` (dtype, attn_implementation, revision).
    """
    from transformers import AutoModelForImageTextToText

    path = resolve_model_path(model_name_or_path)
    base = adapter_base(path, base_model)
    if base is None:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    from peft import PeftModel

    kwargs.pop("revision", None)  # a revision names the adapter's Hub version, not the base's
    model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
    return PeftModel.from_pretrained(model, path).merge_and_unload()


@contextmanager
def _plain_loading():
    """Load full, unpartitioned weights even inside a ZeRO-3 run (the LoRA stage 1 merges on its main process).

    While a ZeRO-3 `TrainingArguments` is alive, transformers' ``from_pretrained`` partitions the weights with
    collectives that every process must join (`transformers.integrations.deepspeed.is_deepspeed_zero3_enabled`); one
    process loading alone would wait for the others forever. Detaching transformers' global ZeRO-3 config for the
    duration of the load gives plain weights; it is restored afterwards.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | None = None,
    dtype: torch.dtype | str | None = "auto",
) -> Path:
    """Write ``adapter_dir`` merged into its base as a full checkpoint (model + processor) in ``output_dir``.

    The result loads like any checkpoint (`AutoModelForImageTextToText`, vLLM ``vllm serve``, the RL recipes).
    The processor comes from the adapter folder when it holds one (the run's pixel bounds), else from the base.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base = adapter_base(str(adapter_dir), base_model)
    if base is None:
        raise ValueError(f"{adapter_dir} holds no adapter_config.json: it is not a LoRA adapter folder.")
    with _plain_loading():
        model = load_model(str(adapter_dir), base_model, dtype=dtype)
    model.save_pretrained(output_dir)
    processor_files = ("processor_config.json", "preprocessor_config.json")
    has_processor = any((adapter_dir / name).is_file() for name in processor_files)
    load_processor(str(adapter_dir) if has_processor else base).save_pretrained(output_dir)
    return output_dir


def model_family(model_name_or_path: str) -> str:
    """``"qwen2_5_vl"`` or ``"llava"`` from a checkpoint's config, or a LoRA adapter folder's base's (a clear error
    for anything else)."""
    model_type = AutoConfig.from_pretrained(adapter_base(model_name_or_path) or model_name_or_path).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{model_name_or_path!r} is a {model_type!r} model; balcaprl supports {list(SUPPORTED_MODEL_TYPES)}."
        )
    return model_type


def part_of(parameter_name: str, family: str) -> str:
    """Which part a parameter belongs to: ``vision``, ``projector``, ``language_model`` or ``lora``."""
    if "lora_" in parameter_name:
        return "lora"
    if f"{PROJECTOR_MODULES[family]}." in parameter_name:
        return "projector"
    if f"{VISION_MODULES[family]}." in parameter_name:
        return "vision"
    return "language_model"


def load_dtype(model_args) -> torch.dtype | str | None:
    """The torch dtype a recipe's ``dtype`` key names (``"auto"`` and None pass through)."""
    return model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)


def load_policy(model_args, family: str | None = None):
    """Load the policy for captioning RL / SFT, with the vision tower and projector frozen as configured.

    ``model_args`` is a `balcaprl.config.CaptionModelConfig`. dtype and attention implementation come from it. A LoRA
    adapter folder is loaded merged into its base (`load_model`).
    Freezing matters for full fine-tuning; with LoRA, PEFT freezes the base and `peft_config` decides what trains.
    """
    path = resolve_model_path(model_args.model_name_or_path)
    family = family or model_family(path)
    dtype = load_dtype(model_args)
    # A LoRA adapter folder (e.g. a LoRA RL run's output) starts the run from its base with the adapter merged.
    model = load_model(
        path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )
    frozen_parts = {"vision"} if model_args.freeze_vision_tower else set()
    if model_args.freeze_projector:
        frozen_parts.add("projector")
    for name, parameter in model.named_parameters():
        if part_of(name, family) in frozen_parts:
            parameter.requires_grad_(False)
    return model


def peft_config(model_args, family: str):
    """The LoRA config of a run (None without ``use_peft``): LoRA on the language model, per ``lora_preset``.

    An unfrozen vision tower or projector is trained in full alongside the adapters (PEFT ``modules_to_save``).
    """
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    modules_to_save = list(model_args.lora_modules_to_save or [])
    if not model_args.freeze_projector:
        modules_to_save.append(PROJECTOR_MODULES[family].split(".")[-1])
    if not model_args.freeze_vision_tower:
        modules_to_save.append(VISION_MODULES[family])
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or LORA_TARGET_PRESETS[model_args.lora_preset],
        modules_to_save=modules_to_save or None,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
    )


def parameter_breakdown(model: torch.nn.Module, family: str) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per part (vision, projector, language_model, lora)."""
    counts = {part: {"trainable": 0, "total": 0} for part in PARTS}
    for name, parameter in model.named_parameters():
        part = counts[part_of(name, family)]
        part["total"] += parameter.numel()
        part["trainable"] += parameter.numel() if parameter.requires_grad else 0
    return counts


def format_parameter_breakdown(counts: dict[str, dict[str, int]]) -> str:
    """A small table of `parameter_breakdown`, for the start of a run."""
    lines = [f"{'part':<16}{'trainable':>14}{'total':>14}"]
    for part, count in counts.items():
        if count["total"]:
            lines.append(f"{part:<16}{count['trainable']:>14,}{count['total']:>14,}")
    trainable = sum(count["trainable"] for count in counts.values())
    total = sum(count["total"] for count in counts.values())
    lines.append(f"{'all':<16}{trainable:>14,}{total:>14,}  ({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(lines)
