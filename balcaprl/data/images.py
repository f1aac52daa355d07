"""The images of the data path: one conversion to RGB (`to_rgb`), one resize (`ImageResize`, `resize_images`), the
load-time check of an image file (`image_problem`) and the formatter that opens each row's image when it is read,
naming its source row on failure.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from datasets import Dataset
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_smart_resize

from balcaprl.data.constants import ALPHA_MODES, MAX_ASPECT_RATIO, SIXTEEN_BIT_MODES, WIDE_MODES, too_wide


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image: the one conversion of the data path (every row's image goes through it).

    - RGB: returned as is. L, 1, CMYK, YCbCr, P without transparency, ...: PIL's ``convert("RGB")``.
    - 16-bit grey (modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``; a 16-bit grey PNG or TIFF): value >> 8, so 65535 →
      255 (``convert("RGB")`` would clip every value above 255 to white).
    - ``I`` (32-bit integers): as 16-bit when every value lies in 0..65535 (how older PIL opened 16-bit PNGs), else
      its range min..max is stretched to 0..255.
    - ``F`` (32-bit floats): values in [0, 1] are scaled by 255; any other range min..max is stretched to 0..255
      (a constant image then is black). NaN counts as 0.
    - Transparency (RGBA, LA, PA, RGBa, La, or a ``transparency`` key: P palettes, L / RGB colour keys): composited on
      white, as image viewers show it and as the judge's JPEG encoding does, rather than keeping the colour stored
      under transparent pixels (often black, which turns a black-on-transparent drawing all black).
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in WIDE_MODES:
        return Image.fromarray(_to_8_bit(np.asarray(image), mode)).convert("RGB")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        flattened = Image.new("RGB", rgba.size, (255, 255, 255))
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    return image.convert("RGB")


def _to_8_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """The values of a single-channel image of ``mode`` (one of `WIDE_MODES`) as uint8, as `to_rgb` describes."""
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and values.size and 0 <= values.min() and values.max() <= 65535):
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and 0.0 <= low and high <= 1.0:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def aspect_problem(width: int, height: int) -> str:
    """The reason `image_problem` gives for an image `too_wide`."""
    return f"aspect ratio over {MAX_ASPECT_RATIO}:1 ({width}x{height} pixels), which Qwen2-VL's resize refuses"


def decode_image(source: str | BinaryIO) -> Image.Image:
    """The image at ``source`` (a path or a binary file), decoded now and converted by `to_rgb`.

    Raises what PIL raises: `FileNotFoundError`, `PIL.UnidentifiedImageError`, `OSError` ("image file is truncated"),
    `SyntaxError`, ... Decoding here (``load``) makes damage surface at once, not later inside a processor.
    """
    with Image.open(source) as image:  # leaving the block closes the file only; the decoded pixels stay
        image.load()
        return to_rgb(image)


def image_problem(source: str | bytes, *, verify: bool, decode: bool) -> str | None:
    """Why the image at ``source`` (a path, or the file's bytes) is unusable, or None: the load-time check of a row.

    The image is opened (PIL reads the header: format and size) and must not be wider than `MAX_ASPECT_RATIO`.
    ``verify`` adds ``Image.verify`` (PNG: every chunk's checksum, so it reads the whole file; JPEG: little more than
    the header). ``decode`` decodes it in full and converts it to RGB exactly as reading its row does
    (`decode_image`), which catches what neither shows, such as a truncated JPEG body.
    """

    def file():  # a fresh one each time: after verify, PIL needs the image opened again to decode it
        return io.BytesIO(source) if isinstance(source, bytes) else source

    try:
        with Image.open(file()) as image:
            width, height = image.size
            if verify:
                image.verify()
        if decode:
            decode_image(file())
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        return f"unreadable image ({_one_line(error)})"
    return aspect_problem(width, height) if too_wide(width, height) else None


@functools.cache
def reference_smart_resize():
    """Qwen2.5-VL's ``smart_resize(height, width, factor, min_pixels, max_pixels) -> (height, width)``: qwen-vl-utils'
    (the reference preprocessing of the Qwen2.5-VL authors) where it is installed and imports, else transformers'
    copy, the same arithmetic (`tests/test_torchvision_path.py` holds them equal where both import). qwen-vl-utils
    imports torchvision, which cannot load beside a CPU-only torch: there it raises on import, and the copy serves."""
    try:
        from qwen_vl_utils.vision_process import smart_resize
    except Exception:  # ImportError, or torchvision's RuntimeError ("operator torchvision::nms does not exist")
        return transformers_smart_resize
    return smart_resize


@dataclass(frozen=True)
class ImageResize:
    """Qwen2.5-VL's resize, done once in the data path: both sides multiples of ``factor``, pixels within bounds.

    The size is ``smart_resize`` (`reference_smart_resize`: qwen-vl-utils' where it imports, else transformers' copy,
    the function the Qwen2-VL image processors call, and through them vLLM), so the processor finds nothing left to
    resize: an image resized here keeps its size under any bounds that contain [``min_pixels``, ``max_pixels``], such
    as the checkpoint's defaults vLLM uses. The resampling is bicubic, as qwen-vl-utils' ``fetch_image`` resizes
    (PIL's default) and the image processors do.
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
        """(width, height) an image of ``width`` x ``height`` is resized to.

        Raises:
            ValueError: an aspect ratio over `MAX_ASPECT_RATIO`, which ``smart_resize`` refuses (the loader keeps such
                images out of a dataset, following ``on_bad_image``).
        """
        if too_wide(width, height):
            raise ValueError(
                f"A {width}x{height} image has an aspect ratio over {MAX_ASPECT_RATIO}:1, which Qwen2-VL's resize "
                "(transformers' smart_resize) refuses; load_caption_dataset leaves such rows out (on_bad_image)."
            )
        resize = reference_smart_resize()
        resized_height, resized_width = resize(height, width, self.factor, self.min_pixels, self.max_pixels)
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
        """Decode one stored image (``{"path", "bytes"}``, a path, or an already open image) to a resized RGB image.

        A failure here, at any step of a run, is one line naming the source row and the file (``from None``: PIL's
        own exception would only repeat it, as a second traceback). ``on_bad_image="skip"`` cannot apply this late:
        the sampler has already put the row in a batch whose size the trainer relies on (GRPO groups its generations
        by prompt), so there is no safe way to drop it; the load-time check (`image_problem`) is where rows are
        skipped.
        """
        path, data = None, None
        if isinstance(value, Image.Image):
            image = to_rgb(value)
        else:
            path, data = (value.get("path"), value.get("bytes")) if isinstance(value, dict) else (value, None)
            if data is None and path is None:
                raise ValueError(f"{self.origin(None)}: the row has no image.")
            try:
                image = decode_image(io.BytesIO(data) if data is not None else path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.origin(path)}: image file {path!r} not found.") from None
            except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
                raise ValueError(f"{self.origin(path)}: cannot decode {_shown(path)} ({_one_line(error)}).") from None
        if self.resize is None:
            return image
        try:
            return self.resize(image)
        except ValueError as error:  # too wide for the resize: the load-time check refuses such files, unless changed
            raise ValueError(f"{self.origin(path)}: {_shown(path)}: {error}") from None


def _shown(path: str | None) -> str:
    return f"image {path!r}" if path else "image bytes stored in the dataset"


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


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
