"""One image resize in the data path: the trainer's processor and vLLM's default processing count the same tokens.

TRL hands vLLM the raw dataset image beside the trainer's already expanded prompt; vLLM processes it with the
checkpoint's own image-processor bounds (Qwen2.5-VL-7B-Instruct: 3136 … 12,845,056 pixels), not the recipe's. These
tests compare the trainer's processor (recipe bounds) with a processor at the checkpoint's bounds, fed the image the
dataset row holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from balcaprl.data.images import ImageResize
from balcaprl.data.loading import load_caption_dataset
from balcaprl.models.processors import checkpoint_pixel_bounds, image_resize_for, load_processor
from balcaprl.runtime import RecipeError, check_vllm_image_bounds
from tests.paths import REFERENCE_MODELS

REFERENCE_QWEN = REFERENCE_MODELS / "qwen2_5_vl_7b_instruct"
# The bounds of the shipped Qwen2.5-VL recipes: 256 … 1280 image tokens of 28 x 28 pixels.
RECIPE_BOUNDS = {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}
# (width, height): square, COCO-like landscape and portrait, a 3:2 photo, a 12 MP photo, a small icon, a strip.
SIZES = [(336, 336), (640, 480), (480, 640), (2250, 1500), (4000, 3000), (40, 30), (1000, 120)]


@pytest.fixture(scope="module")
def checkpoint_image_processor():
    """The image processor vLLM would build for Qwen2.5-VL-7B-Instruct: its published preprocessor config."""
    config = json.loads((REFERENCE_QWEN / "preprocessor_config.json").read_text())
    return Qwen2VLImageProcessorPil(**{key: value for key, value in config.items() if not key.endswith("_type")})


@pytest.fixture(scope="module")
def trainer_processor(tiny_models):
    return load_processor(str(tiny_models["qwen2_5_vl"]), **RECIPE_BOUNDS)


def image_tokens(processor, image: Image.Image) -> int:
    """Image-pad tokens in the prompt the processor builds for one image (what the trainer's prompt holds)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    input_ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    return int((input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def engine_image_tokens(image_processor, image: Image.Image) -> int:
    grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // image_processor.merge_size**2


def photo(width: int, height: int) -> Image.Image:
    return Image.radial_gradient("L").resize((width, height)).convert("RGB")


def rows_file(tmp_path: Path, sizes) -> Path:
    lines = []
    for width, height in sizes:
        path = tmp_path / f"{width}x{height}.png"
        photo(width, height).save(path)
        lines.append(json.dumps({"image": path.name, "references": ["a gradient."]}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def test_checkpoint_bounds_are_read_from_the_published_config(checkpoint_image_processor):
    assert checkpoint_pixel_bounds(str(REFERENCE_QWEN)) == (3136, 12845056)


def test_without_the_data_path_resize_the_two_sides_disagree(trainer_processor, checkpoint_image_processor):
    # The failure the data path's resize exists for (numbers of the issue: 336 x 336 → 256 vs 144).
    image = photo(336, 336)
    assert image_tokens(trainer_processor, image) == 256
    assert engine_image_tokens(checkpoint_image_processor, image) == 144


def test_rows_carry_images_both_sides_count_alike(trainer_processor, checkpoint_image_processor, tmp_path):
    resize = image_resize_for(trainer_processor)
    assert resize == ImageResize(RECIPE_BOUNDS["min_pixels"], RECIPE_BOUNDS["max_pixels"], factor=28)
    dataset = load_caption_dataset(rows_file(tmp_path, SIZES), image_resize=resize)
    for (width, height), row in zip(SIZES, dataset):
        image = row["image"]
        assert image.width % 28 == 0 and image.height % 28 == 0
        tokens = image_tokens(trainer_processor, image)
        assert RECIPE_BOUNDS["min_pixels"] // 784 <= tokens <= RECIPE_BOUNDS["max_pixels"] // 784
        assert tokens == engine_image_tokens(checkpoint_image_processor, image), (width, height)
        # The trainer's processor finds nothing left to resize: the dataset image is what it encodes.
        assert tokens == resize.num_image_tokens(width, height) == image.width * image.height // 784


def test_resize_keeps_the_aspect_ratio_and_is_idempotent():
    resize = ImageResize(**RECIPE_BOUNDS)
    for width, height in SIZES:
        resized = resize(photo(width, height))
        assert resize(resized) is resized
        if RECIPE_BOUNDS["min_pixels"] < width * height < RECIPE_BOUNDS["max_pixels"]:
            assert abs(resized.width / resized.height - width / height) < 0.1 * width / height


def test_llava_images_are_left_to_its_fixed_size_processor(tiny_models):
    assert image_resize_for(load_processor(str(tiny_models["llava"]))) is None


def test_bounds_outside_the_checkpoints_are_refused_when_vllm_samples(checkpoint_image_processor):
    class Args:
        model_name_or_path = str(REFERENCE_QWEN)

    check_vllm_image_bounds(Args, ImageResize(**RECIPE_BOUNDS))  # within [3136, 12845056]
    with pytest.raises(RecipeError, match=r"max_pixels=16000000 reach outside .*\[3136, 12845056\]"):
        check_vllm_image_bounds(Args, ImageResize(RECIPE_BOUNDS["min_pixels"], 16_000_000))
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        ImageResize(1000, 10)
