"""Names and defaults of the data layer that recipes validate against (no datasets/PIL import)."""

from __future__ import annotations

FORMATS = ("auto", "hf", "karpathy", "jsonl", "coco", "llava")


BAD_IMAGE_POLICIES = ("error", "skip")


KARPATHY_SPLITS = ("train", "val", "test", "restval")


SFT_REFERENCE_MODES = ("all", "random")


SFT_FORMS = ("messages", "prompt_completion")


DEFAULT_INSTRUCTION = "Describe this image in detail."


NO_REFERENCES = "no reference caption"


IMAGE_NOT_FOUND = "image file not found"


# The widest aspect ratio (long side / short side) a row's image may have. Qwen2-VL's resize (transformers'
# `smart_resize`, which the Qwen2.5-VL image processors and vLLM call) raises "absolute aspect ratio must be smaller
# than 200" above it, mid-run; LLaVA-1.5's processor scales the short side to 336 and centre-crops a square, which
# keeps under 1/200 of such an image. The loader knows no model, so it treats a wider image as a bad image
# (`on_bad_image`) for every model, rather than padding or cropping it into pixels no reference caption describes.
MAX_ASPECT_RATIO = 200


# How many images the loader fully decodes (and converts to RGB) at load, on top of the header check every row gets:
# all of them when the rows examined are at most this many, else a seeded random sample of this many (plus the
# dataset's first row, which the entry points read before training). A bound on the time the check adds to every load
# (measured in docs/performance.md), large enough to find damage to 1 % of the files with probability
# 1 - 0.99^512 > 99 %.
DECODE_CHECK_ROWS = 512


# Single-channel modes of more than 8 bits. PIL's convert("RGB") clips their values at 255, so a 16-bit photo comes out
# nearly all white; `balcaprl.data.images.to_rgb` scales them instead. (16-bit RGB, RGBA and LA PNGs are not among
# them: PIL opens those as 8-bit RGB / RGBA already, keeping the high byte.)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
WIDE_MODES = (*SIXTEEN_BIT_MODES, "I", "F")
# Modes `to_rgb` composites on white.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def too_wide(width: int, height: int) -> bool:
    """Whether an image of ``width`` x ``height`` has an aspect ratio over `MAX_ASPECT_RATIO` (or a zero side)."""
    return min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height)
