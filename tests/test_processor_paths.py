"""The two processor paths agree: the stock processors GPU users get and the PIL fallback the CPU suite runs.

With vLLM installed, torchvision comes along and `load_processor` returns the stock `Qwen2_5_VLProcessor` (torchvision
image processor) or `LlavaProcessor` with the torchvision `CLIPImageProcessor`; without torchvision it returns the
image-only PIL fallback. The comparison tests need torchvision, so they run in `make test-torchvision`
(`.venv-torchvision`: a CUDA torch + torchvision pair that imports on CPU) and skip in the main virtualenv; the
path-selection and end-to-end tests run in both and check the path their environment must take.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

# the same rounding as qwen_vl_utils.smart_resize, whose module imports torchvision at the top (unusable here without)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from balcaprl.models.image_only import ImageOnlyQwen2_5_VLProcessor, torchvision_available
from balcaprl.models.processors import load_processor
from balcaprl.models.reference import build_reference_interface_model
from balcaprl.models.tiny import build_tiny_model

FAMILIES = ("qwen2_5_vl", "llava")
NEEDS_TORCHVISION = pytest.mark.skipif(
    not torchvision_available(), reason="torchvision does not import here; `make test-torchvision` runs this"
)
# Qwen2.5-VL bounds as a recipe passes them (small, so that the sizes below give different grids quickly).
QWEN_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}
# (width, height): square, landscape, portrait, 4:3, extreme aspect ratios both ways, smaller than one patch grid.
IMAGE_SIZES = [(56, 56), (300, 200), (200, 300), (640, 480), (97, 1000), (1000, 97), (33, 45)]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(kind, family): checkpoint} of the self-made tiny models and the real-interface ones."""
    root = tmp_path_factory.mktemp("processor_paths")
    folders = {("tiny", family): build_tiny_model(family, root / "tiny" / family) for family in FAMILIES}
    for family in FAMILIES:
        folders[("real_interface", family)] = build_reference_interface_model(family, root / "real_interface" / family)
    return folders


KINDS = ["tiny", "real_interface"]


def pixel_kwargs(family: str) -> dict:
    return dict(QWEN_PIXELS) if family == "qwen2_5_vl" else {}


def fallback_processor(path, family: str):
    """What `load_processor` returns where torchvision cannot be imported, built here although it can be."""
    if family == "qwen2_5_vl":
        return ImageOnlyQwen2_5_VLProcessor.from_pretrained(path, backend="pil", **QWEN_PIXELS)
    return AutoProcessor.from_pretrained(path, backend="pil")


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def resized_once(image: Image.Image, family: str) -> Image.Image:
    """The image as the data path hands it over: resized once to the recipe's bounds (smart_resize)."""
    if family != "qwen2_5_vl":
        return image
    height, width = smart_resize(image.height, image.width, factor=28, **QWEN_PIXELS)
    return image.resize((width, height), Image.BICUBIC)


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_load_processor_picks_the_path_of_this_environment(checkpoints, kind, family):
    processor = load_processor(str(checkpoints[(kind, family)]), **pixel_kwargs(family))
    image_processor = type(processor.image_processor).__name__
    if torchvision_available():
        # the stock classes, exactly as a GPU node with vLLM (hence torchvision) loads them
        assert type(processor) is not ImageOnlyQwen2_5_VLProcessor
        assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "llava": "LlavaProcessor"}[family]
        assert not image_processor.endswith("Pil"), image_processor
        if family == "qwen2_5_vl":
            assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    else:
        assert image_processor.endswith("Pil"), image_processor
        if family == "qwen2_5_vl":
            assert type(processor) is ImageOnlyQwen2_5_VLProcessor


@NEEDS_TORCHVISION
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_stock_and_fallback_processors_agree(checkpoints, kind, family):
    path = checkpoints[(kind, family)]
    stock, fallback = load_processor(str(path), **pixel_kwargs(family)), fallback_processor(path, family)
    assert not type(stock.image_processor).__name__.endswith("Pil")
    assert type(fallback.image_processor).__name__.endswith("Pil")
    prompt = stock.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == fallback.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    image_token = image_token_id(stock)
    assert image_token == image_token_id(fallback)
    for seed, (width, height) in enumerate(IMAGE_SIZES):
        raw = random_image(width, height, seed)
        for image, exact_pixels in ((resized_once(raw, family), True), (raw, False)):
            a = stock(text=[prompt], images=[image], return_tensors="pt")
            b = fallback(text=[prompt], images=[image], return_tensors="pt")
            where = f"{kind} {family} {width}x{height} {'resized once' if exact_pixels else 'raw'}"
            assert sorted(a.keys()) == sorted(b.keys()), where
            # the same prompt ids, hence the same image-token count, and the same patch grid
            assert torch.equal(a["input_ids"], b["input_ids"]), where
            assert int((a["input_ids"] == image_token).sum()) > 0, where
            if family == "qwen2_5_vl":
                assert torch.equal(a["image_grid_thw"], b["image_grid_thw"]), where
                grid = a["image_grid_thw"][0]
                assert int((a["input_ids"] == image_token).sum()) == int(grid.prod()) // 4, where
            assert a["pixel_values"].shape == b["pixel_values"].shape, where
            difference = (a["pixel_values"] - b["pixel_values"]).abs()
            if exact_pixels and family == "qwen2_5_vl":
                # resized once in the data path: nothing left to resample, equal up to float rounding
                assert difference.max() < 1e-5, (where, difference.max().item())
            else:
                # PIL and torchvision bicubic resampling differ by a few grey levels (normalised units); LLaVA always
                # resamples to its 336x336 crop, in the trainer and in vLLM (whose processor is the stock one)
                assert difference.mean() < 0.01 and difference.max() < 0.25, (where, difference.max().item())


@NEEDS_TORCHVISION
def test_checkpoint_saved_by_the_fallback_loads_with_the_stock_processor(tmp_path, checkpoints):
    # A checkpoint written on a machine without torchvision (e.g. SFT on CPU) must load on a GPU node with the stock
    # class, which also needs a video processor config; before the fix: "Can't load video processor".
    fallback = fallback_processor(checkpoints[("tiny", "qwen2_5_vl")], "qwen2_5_vl")
    fallback.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor" and "video_processor" in saved
    stock = AutoProcessor.from_pretrained(tmp_path)
    assert type(stock).__name__ == "Qwen2_5_VLProcessor"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_rl_steps_run_on_the_processor_path_of_this_environment(tmp_path, checkpoints, kind, family):
    # The short end-to-end check of each path: two GRPO steps (c-GDPO with the length mask) through TRL's real code.
    from balcaprl.train import main as train
    from balcaprl.world.splits import make_split, write_jsonl

    write_jsonl(make_split("train", 8, seed=0), tmp_path / "data")
    trainer = train([
        "--config", f"recipes/demo/{family}_balcaprl.yaml", "--model_name_or_path", str(checkpoints[(kind, family)]),
        "--dataset", str(tmp_path / "data" / "data.jsonl"), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--max_completion_length", "8", *(f"--{key}={value}" for key, value in pixel_kwargs(family).items()),
    ])  # fmt: skip
    image_processor = type(trainer.processing_class.image_processor).__name__
    assert image_processor.endswith("Pil") != torchvision_available(), image_processor
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [1, 2]
    assert all("length/masked_frac" in log for log in logs)
