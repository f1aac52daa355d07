"""The one image resize of the data path (`ImageResize`, `resize_images`) and the formatter that opens each row's
image when it is read, naming its source row on failure.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


@dataclass(frozen=True)
class ImageResize:
    """Qwen2.5-VL's resize, done once in the data path: both sides multiples of ``factor``, pixels within bounds.

    The size is transformers' ``smart_resize`` (the function the Qwen2-VL image processors call, and through them
    vLLM), so the processor finds nothing left to resize: an image resized here keeps its size under any bounds that
    contain [``min_pixels``, ``max_pixels``], such as the checkpoint's defaults vLLM uses. (qwen-vl-utils has the same
    function, but it imports torchvision, which cannot be imported beside a CPU-only torch.)
    """

    min_pixels: int
    max_pixels: int
    factor: int = 28  # patch size 14 x spatial merge 2

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"Image pixel bounds must satisfy 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, "
                f"max_pixels={self.max_pixels}."
            )

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of ``width`` x ``height`` is resized to."""
        resized_height, resized_width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return resized_width, resized_height

    def num_image_tokens(self, width: int, height: int) -> int:
        """Image tokens of such an image in the prompt: one per ``factor`` x ``factor`` block after resizing."""
        resized_width, resized_height = self.size(width, height)
        return (resized_width // self.factor) * (resized_height // self.factor)

    def __call__(self, image: Image.Image) -> Image.Image:
        size = self.size(*image.size)
        # Bicubic, as the image processors resample; an image already at its size is returned as is.
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def resize_images(dataset: Dataset, image_resize: ImageResize | None) -> Dataset:
    """``dataset`` (from `load_caption_dataset`) with its images resized by ``image_resize`` as rows are read.

    For when the resize is known only after loading (the entry points read the policy's processor after the data and
    rewards, so that a bad recipe fails before any model file is touched). Rows are not copied.
    """
    decoder = dataset.format["format_kwargs"].get("transform")
    if not isinstance(decoder, _RowDecoder):
        raise ValueError("resize_images takes a dataset from load_caption_dataset (its images open lazily).")
    return dataset.with_transform(decoder.with_resize(image_resize))


class _RowDecoder:
    """The ``with_transform`` formatter: opens the images of the rows being read, and tidies message parts.

    It knows the source row of each image path, so that an error names the row wherever the dataset has been shuffled
    or selected to. Paths and rows are kept as two NUL-joined strings (NUL cannot occur in a path), because `datasets`
    hashes the formatter on every ``with_transform`` and DataLoader workers may pickle it: two strings cost
    milliseconds where a 100k-entry dict costs seconds. The lookup table is built on the first error only.
    """

    def __init__(
        self, source: str, paths: Sequence[str] = (), origins: Sequence[str] = (), resize: ImageResize | None = None
    ):
        self.source = source
        self.resize = resize
        self._paths = "\0".join(paths)
        self._origins = "\0".join(origins)
        self._lookup: dict[str, str] | None = None

    def with_resize(self, resize: ImageResize | None) -> _RowDecoder:
        decoder = copy.copy(self)
        decoder.resize = resize
        return decoder

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lookup": None}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "image" in batch:
            batch["image"] = [self.open(value) for value in batch["image"]]
        if "images" in batch:
            batch["images"] = [[self.open(value) for value in images] for images in batch["images"]]
        for key in ("messages", "prompt", "completion"):
            if key in batch:
                batch[key] = [_drop_empty_fields(messages) for messages in batch[key]]
        return batch

    def origin(self, path: str | None) -> str:
        """Where the image at ``path`` comes from, for messages."""
        if self._lookup is None:
            self._lookup = dict(zip(self._paths.split("\0"), self._origins.split("\0"))) if self._paths else {}
        return (self._lookup.get(path) if path else None) or f"a row of {self.source}"

    def open(self, value: Any) -> Image.Image:
        """Decode one stored image (``{"path", "bytes"}``, a path, or an already open image) to an RGB image."""
        if isinstance(value, Image.Image):
            return self._resized(value)
        path, data = (value.get("path"), value.get("bytes")) if isinstance(value, dict) else (value, None)
        if data is None and path is None:
            raise ValueError(f"{self.origin(None)}: the row has no image.")
        try:
            image = Image.open(io.BytesIO(data) if data is not None else path)
            image.load()  # decode now: damage surfaces here, not inside a processor
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self.origin(path)}: image file {path!r} not found.") from error
        except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            shown = f"image {path!r}" if path else "image bytes stored in the dataset"
            raise ValueError(
                f"{self.origin(path)}: cannot decode {shown} ({type(error).__name__}: {error})."
            ) from error
        return self._resized(image if image.mode == "RGB" else image.convert("RGB"))

    def _resized(self, image: Image.Image) -> Image.Image:
        return image if self.resize is None else self.resize(image)


def _drop_empty_fields(messages):
    # Arrow gives every part of a message the union of the parts' fields: {"type": "image"} comes back as
    # {"type": "image", "text": None}. Dropping the None fields restores what was written.
    if not isinstance(messages, list):
        return messages
    tidy = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{k: v for k, v in part.items() if v is not None} for part in content]
            message = {**message, "content": content}
        tidy.append(message)
    return tidy
