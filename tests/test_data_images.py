"""The data path's images on real files: the load-time check (truncated, corrupt and too-wide images, its decode
budget), one-line errors when a row is read later, and the conversion of 16-bit, float and transparent images to RGB.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from datasets import Image as Image_
from PIL import Image, ImageFile

from balcaprl.data.constants import DECODE_CHECK_ROWS, MAX_ASPECT_RATIO
from balcaprl.data.images import ImageResize, to_rgb
from balcaprl.data.loading import load_caption_dataset, load_caption_dataset_with_report
from balcaprl.preflight.run import main as preflight_main
from tests.paths import REFERENCE_MODELS


def write_photo(path: Path, size=(64, 48), seed: int = 0) -> Path:
    """A noisy JPEG: most of its bytes are entropy-coded data, after the headers."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def truncate_jpeg_body(path: Path) -> None:
    """Cut a JPEG in the middle of its scan data: the header still opens and verifies, decoding fails."""
    data = path.read_bytes()
    start_of_scan = data.index(b"\xff\xda")
    path.write_bytes(data[: start_of_scan + (len(data) - start_of_scan) // 2])


def write_rows(folder: Path, images: list[str]) -> Path:
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"image": name, "references": [f"picture {name}"]}) + "\n" for name in images))
    return path


def photo_rows(folder: Path, count: int) -> tuple[Path, list[Path]]:
    files = [write_photo(folder / f"img{index}.jpg", seed=index) for index in range(count)]
    return write_rows(folder, [file.name for file in files]), files


def assert_one_line(error: BaseException) -> None:
    """The error prints as one exception of one line: no chained traceback ("direct cause", "during handling")."""
    assert "\n" not in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    printed = "".join(traceback.format_exception(error))
    assert "direct cause" not in printed and "During handling" not in printed


@pytest.fixture
def decoded_files(monkeypatch) -> set[str]:
    """The files PIL decodes (``ImageFile.load``, which still runs), in any thread."""
    decoded: set[str] = set()
    real_load = ImageFile.ImageFile.load

    def load(image):
        decoded.add(Path(getattr(image, "filename", "") or "").name)
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


# ---------------------------------------------------------------------------------------------------------------------
# Damaged files at load


def test_truncated_jpeg_error_at_load_names_row_and_file(tmp_path):
    source, files = photo_rows(tmp_path, 8)
    truncate_jpeg_body(files[5])
    with Image.open(files[5]) as image:  # what an existence or header check sees: a fine image
        image.verify()
    with pytest.raises(
        ValueError,
        match=r"^row 5 \(line 6\) of .*rows\.jsonl: unreadable image \(OSError: image file is truncated.*\) "
        r"\(image '.*img5\.jpg'\)\. Fix the data",
    ) as raised:
        load_caption_dataset(source)
    assert_one_line(raised.value)


def test_truncated_jpeg_skip_drops_and_counts_it(tmp_path):
    source, files = photo_rows(tmp_path, 8)
    truncate_jpeg_body(files[5])
    dataset, report = load_caption_dataset_with_report(source, on_bad_image="skip")
    assert len(dataset) == 7 and report.num_skipped == 1 and report.num_decoded == 8
    [skipped] = report.skipped
    assert skipped.origin.startswith("row 5 (line 6) of ") and skipped.path.endswith("img5.jpg")
    assert "image file is truncated" in skipped.reason
    assert all(dataset[index]["image"].size == (64, 48) for index in range(7))


def test_corrupt_image_bytes_in_a_hugging_face_dataset_are_named_by_row(tmp_path):
    write_photo(tmp_path / "good.jpg")
    truncated = write_photo(tmp_path / "bad.jpg", seed=1)
    truncate_jpeg_body(truncated)
    images = [{"bytes": (tmp_path / name).read_bytes(), "path": None} for name in ("good.jpg", "good.jpg", "bad.jpg")]
    source = Dataset.from_dict({"image": images, "references": [["a"], ["b"], ["c"]]}).cast_column("image", Image_())
    with pytest.raises(ValueError, match=r"^row 2 of the given dataset: unreadable image \(OSError: image file is"):
        load_caption_dataset(source)
    dataset, report = load_caption_dataset_with_report(source, on_bad_image="skip")
    assert len(dataset) == 2 and report.skipped[0].origin == "row 2 of the given dataset"


# ---------------------------------------------------------------------------------------------------------------------
# The decode budget


def test_large_dataset_decodes_a_seeded_sample_and_its_first_row(tmp_path, decoded_files):
    source, files = photo_rows(tmp_path, DECODE_CHECK_ROWS + 88)
    dataset, report = load_caption_dataset_with_report(source)
    first = set(decoded_files)
    assert len(dataset) == len(files)
    # the sample, plus row 0 when the draw missed it: the entry points read the first row before training
    assert DECODE_CHECK_ROWS <= len(first) <= DECODE_CHECK_ROWS + 1 and report.num_decoded == len(first)
    assert "img0.jpg" in first
    decoded_files.clear()
    load_caption_dataset(source)
    assert decoded_files == first  # seeded: the same sample every load
    decoded_files.clear()
    load_caption_dataset(source, seed=1)
    assert decoded_files != first

    # Damage in the sample is found at load; damage outside it when its row is read, still one line.
    inside = next(file for file in files[1:] if file.name in first)
    outside_row, outside = next((row, file) for row, file in enumerate(files) if file.name not in first)
    truncate_jpeg_body(outside)
    dataset = load_caption_dataset(source)
    with pytest.raises(
        ValueError, match=rf"^row {outside_row} \(line {outside_row + 1}\) of .*rows\.jsonl: cannot decode image "
        rf"'.*{outside.name}' \(OSError: image file is truncated"
    ) as raised:  # fmt: skip
        dataset[outside_row]
    assert_one_line(raised.value)
    truncate_jpeg_body(inside)
    with pytest.raises(ValueError, match=rf"unreadable image .*{inside.name}"):
        load_caption_dataset(source)


def test_the_first_row_is_decoded_even_outside_the_sample(tmp_path, decoded_files):
    # The entry points read the dataset's first row before training. Seed 11 draws row 0 among the 40 rows examined
    # after the first DECODE_CHECK_ROWS (the decode sample under max_samples).
    source, files = photo_rows(tmp_path, DECODE_CHECK_ROWS + 88)
    dataset, report = load_caption_dataset_with_report(source, max_samples=DECODE_CHECK_ROWS + 40, seed=11)
    assert dataset.select_columns(["references"])[0]["references"] == ["picture img0.jpg"]
    assert "img0.jpg" in decoded_files and len(decoded_files) == report.num_decoded == DECODE_CHECK_ROWS + 1
    truncate_jpeg_body(files[0])
    with pytest.raises(ValueError, match=r"^row 0 \(line 1\) of .*: unreadable image .*img0\.jpg"):
        load_caption_dataset(source, max_samples=DECODE_CHECK_ROWS + 40, seed=11)
    # skipped, its place is filled: still max_samples rows, and the new first row was decoded too
    decoded_files.clear()
    dataset, report = load_caption_dataset_with_report(
        source, max_samples=DECODE_CHECK_ROWS + 40, seed=11, on_bad_image="skip"
    )
    assert len(dataset) == DECODE_CHECK_ROWS + 40 and [row.path for row in report.skipped] == [str(files[0])]
    first = dataset.select_columns(["references"])[0]["references"][0].removeprefix("picture ")
    assert first != "img0.jpg" and first in decoded_files


def test_max_samples_decodes_every_row_drawn(tmp_path, decoded_files):
    source, _ = photo_rows(tmp_path, DECODE_CHECK_ROWS + 88)
    dataset, report = load_caption_dataset_with_report(source, max_samples=20)
    assert len(dataset) == report.num_candidates == report.num_decoded == len(decoded_files) == 20


# ---------------------------------------------------------------------------------------------------------------------
# Errors when a row is read, after loading


def test_file_damaged_or_removed_after_loading_is_one_line_naming_row_and_file(tmp_path):
    source, files = photo_rows(tmp_path, 3)
    dataset = load_caption_dataset(source)
    files[1].write_bytes(b"not an image")
    with pytest.raises(
        ValueError, match=r"^row 1 \(line 2\) of .*rows\.jsonl: cannot decode image '.*img1\.jpg' \(Unidentified"
    ) as raised:
        dataset.__getitems__([0, 1])  # what a DataLoader calls
    assert_one_line(raised.value)
    files[2].unlink()
    with pytest.raises(
        FileNotFoundError, match=r"^row 2 \(line 3\) of .*: image file '.*img2\.jpg' not found"
    ) as raised:
        dataset[2]
    assert_one_line(raised.value)


# ---------------------------------------------------------------------------------------------------------------------
# Aspect ratio


def write_grey(path: Path, size: tuple[int, int]) -> str:
    Image.new("L", size, 90).save(path)
    return path.name


def test_image_wider_than_200_to_1_error_at_load_names_row_and_file(tmp_path):
    names = [write_grey(tmp_path / "square.png", (56, 56)), write_grey(tmp_path / "strip.png", (1, 300))]
    with pytest.raises(
        ValueError,
        match=r"^row 1 \(line 2\) of .*rows\.jsonl: aspect ratio over 200:1 \(1x300 pixels\), which Qwen2-VL's "
        r"resize refuses \(image '.*strip\.png'\)\.",
    ) as raised:
        load_caption_dataset(write_rows(tmp_path, names))
    assert_one_line(raised.value)


def test_image_wider_than_200_to_1_skip_drops_it_and_200_to_1_is_resized(tmp_path):
    names = [write_grey(tmp_path / f"{w}x{h}.png", (w, h)) for w, h in [(56, 56), (500, 2), (2, 400), (1, 300)]]
    resize = ImageResize(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    dataset, report = load_caption_dataset_with_report(
        write_rows(tmp_path, names), on_bad_image="skip", image_resize=resize
    )
    assert [row.path.rsplit("/", 1)[-1] for row in report.skipped] == ["500x2.png", "1x300.png"]
    assert all("aspect ratio over 200:1" in row.reason for row in report.skipped)
    assert len(dataset) == 2
    width, height = dataset[1]["image"].size  # 2 x 400: exactly 200:1, which Qwen2-VL's resize takes
    assert width % 28 == 0 and height % 28 == 0 and height > width


def test_image_resize_refuses_a_too_wide_image_with_its_size():
    resize = ImageResize(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    with pytest.raises(ValueError, match=r"^A 1x300 image has an aspect ratio over 200:1.*smart_resize"):
        resize.size(1, 300)
    assert resize.size(2, 2 * MAX_ASPECT_RATIO)[1] % 28 == 0


def test_image_made_too_wide_after_loading_is_one_line_when_read(tmp_path):
    names = [write_grey(tmp_path / "a.png", (56, 56)), write_grey(tmp_path / "b.png", (56, 56))]
    dataset = load_caption_dataset(write_rows(tmp_path, names), image_resize=ImageResize(3136, 28 * 28 * 64))
    write_grey(tmp_path / "b.png", (1, 300))
    with pytest.raises(ValueError, match=r"^row 1 \(line 2\) of .*: image '.*b\.png': A 1x300 image") as raised:
        dataset[1]
    assert_one_line(raised.value)


QWEN_7B = REFERENCE_MODELS / "qwen2_5_vl_7b_instruct"


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_preflight_reports_a_too_wide_image_instead_of_crashing(tmp_path, capsys, policy):
    # Qwen2.5-VL: the token budget resizes the sampled images, where a 1 x 300 image used to raise in smart_resize.
    names = [write_grey(tmp_path / f"img{index}.png", (640, 480)) for index in range(3)]
    names.insert(1, write_grey(tmp_path / "strip.png", (1, 300)))
    argv = ["recipes/qwen2_5_vl_7b/grpo_cider.yaml", "--model-config", str(QWEN_7B)]
    for key, value in {"dataset": str(write_rows(tmp_path, names)), "dataset_format": "jsonl",
                       "image_root": str(tmp_path), "on_bad_image": policy, "use_vllm": "false",
                       "output_dir": str(tmp_path / "run")}.items():  # fmt: skip
        argv += [f"--{key}", value]
    code = preflight_main(argv)
    text = capsys.readouterr().out
    data_problems = [line for line in text.splitlines() if "[data]" in line]
    if policy == "error":
        assert code == 1
        [problem] = data_problems
        assert "row 1 (line 2) of" in problem and "aspect ratio over 200:1 (1x300 pixels)" in problem
        assert "strip.png" in problem
    else:
        assert not data_problems, text
        assert "3 sampled rows load" in text and "on_bad_image skip:" in text and "1 of 4 skipped" in text
        assert "largest of 3 sampled: 640x480" in text


# ---------------------------------------------------------------------------------------------------------------------
# Conversion to RGB


def gradient_16_bit() -> np.ndarray:
    """A 16-bit grey gradient over the whole range, mostly above 255 (what convert("RGB") clips to white)."""
    return np.linspace(0, 65535, 96 * 64).round().astype(np.uint16).reshape(64, 96)


def load_single(tmp_path: Path, name: str) -> np.ndarray:
    dataset = load_caption_dataset(write_rows(tmp_path, [name]))
    image = dataset[0]["image"]
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    values = gradient_16_bit()
    Image.fromarray(values).save(tmp_path / "depth.png")
    with Image.open(tmp_path / "depth.png") as image:
        assert image.mode == "I;16"  # really a 16-bit PNG
        assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.99  # what a plain conversion does with it
    pixels = load_single(tmp_path, "depth.png")
    expected = values.astype(int) >> 8
    assert all(np.abs(pixels[..., channel] - expected).max() <= 1 for channel in range(3))
    assert abs(pixels.mean() - expected.mean()) <= 1
    assert (pixels == 255).mean() < 0.01 and pixels.max() == 255 and pixels.min() == 0


def test_32_bit_integer_and_float_tiffs(tmp_path):
    values = gradient_16_bit()
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "int.tif")  # mode I, values within 16 bits
    Image.fromarray((values.astype(np.int32) - 30000) * 4).save(tmp_path / "wide.tif")  # mode I, beyond 16 bits
    Image.fromarray(values.astype(np.float32) / 65535).save(tmp_path / "unit.tif")  # mode F within [0, 1]
    Image.fromarray(values.astype(np.float32) / 65535 * 4 - 1).save(tmp_path / "range.tif")  # F in [-1, 3]
    for name, mode in {"int.tif": "I", "wide.tif": "I", "unit.tif": "F", "range.tif": "F"}.items():
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode, name
    assert np.array_equal(load_single(tmp_path, "int.tif")[..., 0], values.astype(int) >> 8)
    # Any other range is stretched to 0..255: the gradient keeps its shape.
    ramp = np.round(values.astype(float) / 65535 * 255).astype(int)
    for name in ("wide.tif", "unit.tif", "range.tif"):
        assert np.abs(load_single(tmp_path, name)[..., 1] - ramp).max() <= 1, name


def test_16_bit_modes_and_transparency_by_hand():
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    for array in (values, values.astype(">u2")):
        image = Image.fromarray(array)
        assert image.mode in ("I;16", "I;16B")
        assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 0, 1, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255, 0]
    # A black drawing on a transparent background stays visible: transparency is composited on white.
    drawing = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    drawing.putpixel((1, 1), (0, 0, 0, 255))
    drawing.putpixel((2, 2), (200, 0, 0, 128))
    flat = to_rgb(drawing)
    assert flat.getpixel((0, 0)) == (255, 255, 255) and flat.getpixel((1, 1)) == (0, 0, 0)
    assert flat.getpixel((2, 2)) == (227, 127, 127)  # red: (200 * 128 + 255 * 127) / 255 = 227.4
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert list(to_rgb(palette).getdata()) == [(255, 255, 255), (10, 20, 30)]
    assert to_rgb(Image.new("LA", (1, 1), (40, 0))).getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb and to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_transparent_png_loads_composited_on_white(tmp_path):
    drawing = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    for x in range(8):
        drawing.putpixel((x, 4), (0, 0, 0, 255))
    drawing.save(tmp_path / "line.png")
    pixels = load_single(tmp_path, "line.png")
    assert (pixels[4] == 0).all() and (np.delete(pixels, 4, axis=0) == 255).all()
