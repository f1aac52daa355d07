"""GPU users' Qwen2.5-VL image path, where torchvision and qwen-vl-utils import (`make test-torchvision`): the data
path's one resize is qwen-vl-utils' reference preprocessing, pixel for pixel, and counts the image tokens the stock
processor counts. Skipped where torchvision cannot load (beside the CPU-only torch of `make test`).
"""

import numpy as np
import pytest
from PIL import Image

from balcaprl.data.images import ImageResize, reference_smart_resize
from balcaprl.models import torchvision_available

pytestmark = pytest.mark.skipif(not torchvision_available(), reason="torchvision does not import here")

# (width, height, min_pixels, max_pixels): shrunk to the bound, enlarged to it, left as is, a tall strip, odd sizes
CASES = [
    (2000, 1500, 256 * 28 * 28, 1280 * 28 * 28),
    (100, 60, 256 * 28 * 28, 1280 * 28 * 28),
    (644, 476, 4 * 28 * 28, 16384 * 28 * 28),
    (90, 3000, 3136, 12845056),
    (1023, 767, 3136, 401408),
]


def gradient(width: int, height: int) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8))


def test_the_resize_is_qwen_vl_utils_own_where_it_imports():
    qwen_vl_utils = pytest.importorskip("qwen_vl_utils.vision_process")
    assert reference_smart_resize() is qwen_vl_utils.smart_resize


@pytest.mark.parametrize(("width", "height", "min_pixels", "max_pixels"), CASES)
def test_same_pixels_and_token_counts_as_qwen_vl_utils_and_the_stock_processor(
    width, height, min_pixels, max_pixels, reference_models
):
    from transformers import AutoImageProcessor

    qwen_vl_utils = pytest.importorskip("qwen_vl_utils.vision_process")
    image = gradient(width, height)
    resize = ImageResize(min_pixels, max_pixels)
    ours = resize(image)
    reference = qwen_vl_utils.fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels})
    assert ours.size == reference.size and np.array_equal(np.asarray(ours), np.asarray(reference))
    processor = AutoImageProcessor.from_pretrained(reference_models["qwen2_5_vl"], min_pixels=min_pixels,
                                                   max_pixels=max_pixels)  # fmt: skip
    assert "Pil" not in type(processor).__name__  # the stock (torchvision) processor
    grid = processor(images=[ours], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == resize.num_image_tokens(width, height)  # 2x2 patches merge into one token
