"""`load_caption_dataset`: any supported source -> rows ``{prompt, image, references}``, bad rows handled by policy
(see the package docstring, `balcaprl.data`).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from balcaprl.data.coco_llava import _read_coco, _read_llava
from balcaprl.data.constants import (
    BAD_IMAGE_POLICIES,
    DECODE_CHECK_ROWS,
    DEFAULT_INSTRUCTION,
    FORMATS,
    IMAGE_NOT_FOUND,
)
from balcaprl.data.formats import (
    PROMPT_FEATURE,
    _add_column,
    _detect_format,
    _read_hf,
    _read_jsonl,
    _read_karpathy,
    _SourceRows,
)
from balcaprl.data.images import ImageResize, _RowDecoder, image_problem

logger = logging.getLogger(__name__)


# How many offending rows a log line or an error message lists before saying "and N more".
_LISTED_ROWS = 5


# Threads of the load-time image check: file reads and PIL's decoders release the GIL, and on network storage the
# latency of opening many small files, not CPU, bounds the check.
_CHECK_THREADS = 4


# Rows checked per round of the threads: bounds the work done past the first bad row (on_bad_image="error") and the
# image bytes held at once (images stored inside a Hugging Face dataset).
_CHECK_CHUNK = 256


# Rows per task of a thread: a header check takes ~0.05 ms, about what handing one task to a thread costs.
_TASK_ROWS = 16


@dataclass
class SkippedRow:
    """A source row left out of the dataset: where it was, its image path (if any) and why."""

    origin: str
    path: str | None
    reason: str


@dataclass
class LoadReport:
    """What `load_caption_dataset_with_report` read: rows kept and rows skipped (``on_bad_image="skip"``).

    ``num_candidates`` counts the source rows of the split that were examined: all of them, or, with ``max_samples``,
    those drawn until enough usable rows were found. ``num_decoded`` counts the images among them decoded in full at
    load (`DECODE_CHECK_ROWS`); every other one had its header read (and, with ``"skip"``, verified).
    """

    source: str
    format: str
    split: str
    num_rows: int = 0
    num_candidates: int = 0
    num_decoded: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """One line for logs, listing the first skipped rows."""
        text = f"{self.num_rows} rows from {self.source} (format {self.format!r}, split {self.split!r})"
        text += f", {self.num_decoded} of {self.num_candidates} images decoded to check them"
        if self.skipped:
            listed = "; ".join(
                f"{row.origin}{f' ({row.path})' if row.path else ''}: {row.reason}"
                for row in self.skipped[:_LISTED_ROWS]
            )
            more = f"; and {self.num_skipped - _LISTED_ROWS} more" if self.num_skipped > _LISTED_ROWS else ""
            text += f", {self.num_skipped} of {self.num_candidates} skipped ({listed}{more})"
        return text


def load_caption_dataset(source: str | os.PathLike | Dataset | DatasetDict, **options: Any) -> Dataset:
    """Load a captioning dataset as rows ``{prompt, image, references, ...}`` with lazily opened images.

    Args:
        source: a Hugging Face dataset (Hub name, ``save_to_disk`` folder, data folder, or a `Dataset` /
            `DatasetDict`), a Karpathy JSON, a COCO captions annotations JSON, LLaVA / ShareGPT4V conversations (JSON
            or JSONL), or a JSONL file.
        format: ``"auto"`` (``*.json`` by content → karpathy, coco or llava; ``*.jsonl`` → llava if its first line
            has ``"conversations"``, else jsonl; anything else → hf), ``"hf"``, ``"karpathy"``, ``"jsonl"``,
            ``"coco"`` (one row per image, all its annotations' captions as references, column ``image_id``) or
            ``"llava"`` (one row per entry, even when entries share an image; the reference is the first ``"gpt"``
            turn, later turns are ignored; column ``id``).
        split: the split to load. Karpathy: ``"train"`` (with ``restval`` unless ``restval_as_train=False``),
            ``"val"`` (alias ``"validation"``), ``"test"`` or ``"restval"``. Hugging Face: any split expression
            (``"train[:1000]"``); a folder holding a single saved `Dataset` ignores it. JSONL, COCO and LLaVA: one file
            is one split, ``split`` is ignored.
        image_root: folder relative image paths are resolved against. Defaults to the data file's folder (Karpathy,
            COCO, LLaVA, JSONL), or a local Hugging Face dataset's folder (for a column of path strings).
        image_column: image column (Hugging Face: an ``Image`` feature or path strings) or JSONL key.
        caption_column: column (Hugging Face) or key (JSONL) with one reference string or a list of them per row.
            Karpathy JSONs always use ``sentences[*].raw``.
        instruction: text of the user turn; every row's ``prompt`` is ``[{"role": "user", "content": instruction}]``.
        max_samples: keep at most this many rows: a random subset (drawn with ``seed``, kept in source order), since
            sources are often sorted (by split, by origin) so that their first rows are not representative.
        on_bad_image: ``"error"`` or ``"skip"``: what a row failing the load-time check becomes, an error naming the
            row and its file, or a dropped row counted in the `LoadReport`; ``"skip"`` also drops rows without
            references (they can never be scored). The check, within a bounded budget (see `balcaprl.data`): every
            image's header is read (format, size, an aspect ratio of at most `MAX_ASPECT_RATIO` = 200:1) and, with
            ``"skip"``, verified; images are decoded in full, as reading their row does, for all rows when at most
            `DECODE_CHECK_ROWS` = 512 are examined, else for a seeded sample of 512 and the dataset's first row. An
            image the budget did not decode and that cannot be decoded fails when its row is read, naming row and
            file.
        seed: seed of the ``max_samples`` draw.
        restval_as_train: Karpathy only: whether ``split="train"`` includes the ``restval`` images (113,287 COCO
            training images, as in the GRPO-captioning paper) or not (82,783).
        hf_config_name: Hugging Face only: the dataset configuration name, if the dataset has several.
        image_resize: resize every image once, as it is read (see `ImageResize`); None keeps the source size.

    Returns:
        A `datasets.Dataset` whose rows hold a `PIL.Image.Image` (8-bit RGB, see `to_rgb`) under ``image``.
        Columns: ``prompt``, ``image``, ``references``, then the source's other columns (Karpathy: ``image_id`` and
        ``split``).

    Raises:
        FileNotFoundError: the source or (``on_bad_image="error"``) a row's image file does not exist.
        ValueError: a malformed source (the message names the file, line or row and key), a row without references
            or with an unreadable or too wide image (``on_bad_image="error"``), no usable row at all, or an invalid
            argument.
    """
    return load_caption_dataset_with_report(source, **options)[0]


def load_caption_dataset_with_report(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    format: str = "auto",
    split: str = "train",
    image_root: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "references",
    instruction: str = DEFAULT_INSTRUCTION,
    max_samples: int | None = None,
    on_bad_image: str = "error",
    seed: int = 0,
    restval_as_train: bool = True,
    hf_config_name: str | None = None,
    image_resize: ImageResize | None = None,
) -> tuple[Dataset, LoadReport]:
    """`load_caption_dataset` (its docstring describes the arguments), also returning the `LoadReport` (rows kept,
    rows skipped and why). The keyword arguments are declared here only; `load_caption_dataset` forwards them."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}.")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {list(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}.")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive number of rows or None, got {max_samples!r}.")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction must be a non-empty string, got {instruction!r}.")
    parsed = None  # a .json file parsed to detect its format, handed to its reader so it is read once
    if format == "auto":
        format, parsed = _detect_format(source)
    if format == "hf":
        rows = _read_hf(source, split, image_root, image_column, caption_column, hf_config_name)
    elif isinstance(source, (Dataset, DatasetDict)):
        raise ValueError(f"format={format!r} reads a file; a `datasets` object needs format='hf' or 'auto'.")
    elif format == "karpathy":
        rows = _read_karpathy(Path(source), split, image_root, restval_as_train, parsed)
    elif format == "coco":
        rows = _read_coco(Path(source), image_root, parsed)
    elif format == "llava":
        rows = _read_llava(Path(source), image_root, parsed)
    else:
        rows = _read_jsonl(Path(source), image_root, image_column, caption_column)
    report = LoadReport(source=rows.source, format=format, split=split)
    keep = _select_rows(rows, on_bad_image, max_samples, seed, report)
    prompts = [[{"role": "user", "content": instruction}]] * len(rows.table)
    dataset = _add_column(rows.table, "prompt", prompts, PROMPT_FEATURE, instruction)
    if len(keep) < len(dataset):  # `select` of every row would still slice the table, which bloats its pickles
        dataset = dataset.select(keep)
    extra_columns = [name for name in dataset.column_names if name not in ("prompt", "image", "references")]
    dataset = dataset.select_columns(["prompt", "image", "references", *extra_columns])
    decoder = _RowDecoder(rows.source, *_origins_by_path(rows, keep), resize=image_resize)
    if report.skipped:
        logger.warning("Loaded %s.", report.summary())
    else:
        logger.info("Loaded %s.", report.summary())
    return dataset.with_transform(decoder), report


# One declaration of the loading options (above); help() and IDEs show it on load_caption_dataset too.
load_caption_dataset.__signature__ = inspect.signature(load_caption_dataset_with_report).replace(
    return_annotation="Dataset"
)


def corpus_references(dataset: Dataset, column: str = "references") -> list[list[str]]:
    """The references of every row, ``list[list[str]]`` (one inner list per image), without opening any image.

    This is the corpus CIDEr-D fixes its document frequencies on (SCST practice: the training references).
    """
    if column not in dataset.column_names:
        raise ValueError(f"The dataset has no {column!r} column; its columns are {dataset.column_names}.")
    corpus = []
    for row, value in enumerate(dataset.select_columns([column]).with_format(None)[column]):
        row_references = [value] if isinstance(value, str) else list(value or [])
        if not row_references:
            raise ValueError(f"Row {row} has no reference in column {column!r}.")
        corpus.append(row_references)
    return corpus


class _ImageCheck:
    """`image_problem` of a row's image (or the row's own problem, or a missing file), callable from the checking
    threads; returns (problem or None, whether the image was decoded in full)."""

    def __init__(self, rows: _SourceRows, verify: bool, decoded: set[int]):
        self.rows = rows
        self.verify = verify
        self.decoded = decoded
        self.stored_images = rows.table.select_columns(["image"]).with_format(None)

    def __call__(self, index: int, decode: bool | None = None) -> tuple[str | None, bool]:
        if self.rows.problems[index] is not None:
            return self.rows.problems[index], False
        path = self.rows.paths[index]
        if path is not None and not os.path.isfile(path):
            return IMAGE_NOT_FOUND, False
        decode = index in self.decoded if decode is None else decode
        source = path if path is not None else self.stored_images[index]["image"]["bytes"]
        return image_problem(source, verify=self.verify, decode=decode), decode

    def many(self, indices: list[int]) -> list[tuple[str | None, bool]]:
        return [self(index) for index in indices]


def _select_rows(rows: _SourceRows, on_bad_image: str, max_samples: int | None, seed: int, report: LoadReport):
    """Sorted indices of the rows to keep; raises on the first bad row with ``"error"``, records it with ``"skip"``.

    Rows are examined in source order, or, with ``max_samples``, in a seeded random order until enough usable rows
    are found. Every image's header is read (`image_problem`); with ``"skip"`` every image is also verified, because
    a bad row found later, when the trainer reads it, can no longer be skipped (with ``"error"`` it is the same
    one-line error, only later). The images of the decode sample (`DECODE_CHECK_ROWS`) and of the dataset's first
    row are decoded in full.
    """
    order = list(range(len(rows.origins)))
    if max_samples is not None and max_samples < len(order):
        random.Random(seed).shuffle(order)
        decoded = set(order[:DECODE_CHECK_ROWS])  # the first rows examined, already a seeded random draw
    elif len(order) <= DECODE_CHECK_ROWS:
        decoded = set(order)
    else:
        decoded = set(random.Random(seed).sample(order, DECODE_CHECK_ROWS))
    skip = on_bad_image == "skip"
    check = _ImageCheck(rows, skip, decoded)
    keep: list[int] = []
    position = 0

    def reject(index: int, problem: str) -> None:
        if not skip:
            raise _bad_row_error(rows.origins[index], rows.paths[index], problem)
        report.skipped.append(SkippedRow(rows.origins[index], rows.paths[index], problem))

    pool = ThreadPoolExecutor(_CHECK_THREADS, thread_name_prefix="balcaprl-image-check")
    try:
        while True:
            while position < len(order) and (max_samples is None or len(keep) < max_samples):
                wanted = _CHECK_CHUNK if max_samples is None else min(_CHECK_CHUNK, max_samples - len(keep))
                chunk = order[position : position + wanted]
                position += len(chunk)
                tasks = [chunk[start : start + _TASK_ROWS] for start in range(0, len(chunk), _TASK_ROWS)]
                for index, (problem, was_decoded) in zip(chunk, itertools.chain(*pool.map(check.many, tasks))):
                    report.num_candidates += 1
                    report.num_decoded += was_decoded
                    if problem is None:
                        keep.append(index)
                    else:
                        reject(index, problem)
            # The entry points read the dataset's first row before training (the judges' health check): decode it
            # too, and if it is bad and skipped, fill its place (with max_samples) and check the new first row.
            first = min(keep, default=None)
            if first is None or first in decoded:
                break
            decoded.add(first)
            problem, _ = check(first, decode=True)
            report.num_decoded += 1
            if problem is None:
                break
            keep.remove(first)
            reject(first, problem)
    finally:
        pool.shutdown(cancel_futures=True)
    report.num_rows = len(keep)
    if not keep:
        raise ValueError(f"No usable row in {rows.source} (split {report.split!r}): {report.summary()}.")
    return sorted(keep)


def _bad_row_error(origin: str, path: str | None, problem: str) -> Exception:
    """The one-line error of a bad row under ``on_bad_image="error"``, naming the row and its image file."""
    hint = "Fix the data, or load with on_bad_image='skip' to drop such rows."
    if problem == IMAGE_NOT_FOUND:
        return FileNotFoundError(f"{origin}: image file {path!r} not found. {hint}")
    image = f" (image {path!r})" if path else ""
    return ValueError(f"{origin}: {problem}{image}. {hint}")


def _origins_by_path(rows: _SourceRows, keep: list[int]) -> tuple[list[str], list[str]]:
    """(image paths, the source row using each: the first one, and how many other rows share the file)."""
    users: dict[str, list[int]] = {}
    for index in keep:
        if rows.paths[index] is not None:
            users.setdefault(rows.paths[index], []).append(index)
    origins = [
        rows.origins[indices[0]] + (f" (and {len(indices) - 1} other rows)" if len(indices) > 1 else "")
        for indices in users.values()
    ]
    return list(users), origins
