"""Names and defaults of the data layer that recipes validate against (no datasets/PIL import)."""

from __future__ import annotations

FORMATS = ("auto", "hf", "karpathy", "jsonl")


BAD_IMAGE_POLICIES = ("error", "skip")


KARPATHY_SPLITS = ("train", "val", "test", "restval")


SFT_REFERENCE_MODES = ("all", "random")


SFT_FORMS = ("messages", "prompt_completion")


DEFAULT_INSTRUCTION = "Describe this image in detail."


NO_REFERENCES = "no reference caption"


IMAGE_NOT_FOUND = "image file not found"
