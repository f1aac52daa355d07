"""Caption datasets → rows ``{prompt, image, references}`` for TRL's `GRPOTrainer`, and their SFT form.

Three sources, one entry point (`load_caption_dataset`):

- a Hugging Face dataset: a Hub name, a ``save_to_disk`` folder, a data folder (e.g. ``imagefolder`` with a
  ``metadata.jsonl``) or a `datasets.Dataset` object, with configurable image and caption columns;
- a Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``) and the folder of its images, the data of
  the GRPO-captioning paper (arXiv 2503.01333): COCO's ``restval`` counts as training data by default;
- a JSONL file, one ``{"image": path, "references": [...], ...}`` object per line; relative image paths are relative to
  the file's folder, extra keys (e.g. a ``scene`` dict) become columns.

Every row is ``prompt`` (``[{"role": "user", "content": instruction}]``, into which TRL inserts the image), ``image``
(a `PIL.Image.Image` in RGB) and ``references`` (a non-empty ``list[str]``), plus the source's extra columns.

Images are opened lazily: the dataset stores paths (or the source's bytes) under a ``datasets.Image(decode=False)``
feature, and a ``with_transform`` formatter opens each image when its row is read — so ``dataset.features["image"]``
says ``decode=False`` while rows hold PIL images. Read text columns with ``dataset.select_columns([...])`` or
`corpus_references`: in `datasets` 5, ``dataset["references"]`` is a lazy `Column` that formats whole rows, images
included.

Bad rows. Rows are named by their place in the source ("row 4 (images[4]) of dataset_coco.json", "row 2 (line 3)
of captions.jsonl", "row 7 of split 'train' of <dataset>"), which stays true after shuffling or selecting. (An image
stored as bytes inside a Hugging Face dataset has no path to find its row by: its decoding error names the dataset.)

- ``on_bad_image="error"`` (default): at load, a row without references (no key, an empty list, blank strings) is a
  `ValueError` and a missing image file a `FileNotFoundError`, naming the first such row, its image path and the
  source. Files are not decoded at load: one that cannot be decoded raises a `ValueError` naming row, path and source
  when its row is read — never an error deep inside a processor.
- ``on_bad_image="skip"``: such rows, and files that fail ``PIL.Image.verify()``, are dropped. The rows skipped, with
  their paths and reasons, are logged (a warning listing the first few) and returned in a `LoadReport` by
  `load_caption_dataset_with_report`. ``verify`` misses some damage (e.g. a truncated JPEG body); such a file still
  raises, with its row, when read.
- Malformed sources always raise, naming the file and line (JSONL, JSON syntax) or entry and key (Karpathy).

Image size. With an `ImageResize` (``image_resize=``, or `resize_images` on a loaded dataset;
`balcaprl.models.image_resize_for` derives it from the policy's processor), each image is resized once, when its row
is read, to the size the Qwen2.5-VL processor would resize it to (``smart_resize`` within the recipe's
``min_pixels`` / ``max_pixels``). The trainer's processor, vLLM (which processes the raw image with the checkpoint's
own defaults, not the recipe's bounds) and the judge rewards then all receive the same pixels and agree on the number
of image tokens.

`to_sft` turns a loaded dataset into what TRL's `SFTTrainer` takes for vision-language models, and
`corpus_references` lists the references per image, e.g. for CIDEr-D document frequencies.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets.fingerprint import Hasher
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

logger = logging.getLogger(__name__)

FORMATS = ("auto", "hf", "karpathy", "jsonl")
BAD_IMAGE_POLICIES = ("error", "skip")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
SFT_REFERENCE_MODES = ("all", "random")
SFT_FORMS = ("messages", "prompt_completion")
DEFAULT_INSTRUCTION = "Describe this image in detail."
NO_REFERENCES = "no reference caption"
IMAGE_NOT_FOUND = "image file not found"

STORED_IMAGE = datasets.Image(decode=False)
MESSAGES_FEATURE = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
PROMPT_FEATURE = List({"role": Value("string"), "content": Value("string")})
REFERENCES_FEATURE = List(Value("string"))

# How many offending rows a log line or an error message lists before saying "and N more".
_LISTED_ROWS = 5


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
    those drawn until enough usable rows were found.
    """

    source: str
    format: str
    split: str
    num_rows: int = 0
    num_candidates: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """One line for logs, listing the first skipped rows."""
        text = f"{self.num_rows} rows from {self.source} (format {self.format!r}, split {self.split!r})"
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
            `DatasetDict`), a Karpathy JSON, or a JSONL file.
        format: ``"auto"`` (``*.jsonl`` → jsonl, ``*.json`` → karpathy, anything else → hf), ``"hf"``, ``"karpathy"``
            or ``"jsonl"``.
        split: the split to load. Karpathy: ``"train"`` (with ``restval`` unless ``restval_as_train=False``),
            ``"val"`` (alias ``"validation"``), ``"test"`` or ``"restval"``. Hugging Face: any split expression
            (``"train[:1000]"``); a folder holding a single saved `Dataset` ignores it. JSONL: one file is one split,
            ``split`` is ignored.
        image_root: folder relative image paths are resolved against. Defaults to the Karpathy JSON's folder, the
            JSONL file's folder, or a local Hugging Face dataset's folder (for a column of path strings).
        image_column: image column (Hugging Face: an ``Image`` feature or path strings) or JSONL key.
        caption_column: column (Hugging Face) or key (JSONL) with one reference string or a list of them per row.
            Karpathy JSONs always use ``sentences[*].raw``.
        instruction: text of the user turn; every row's ``prompt`` is ``[{"role": "user", "content": instruction}]``.
        max_samples: keep at most this many rows: a random subset (drawn with ``seed``, kept in source order), since
            sources are often sorted (by split, by origin) so that their first rows are not representative.
        on_bad_image: ``"error"`` or ``"skip"``; see the module docstring. ``"skip"`` also drops rows without
            references (they can never be scored).
        seed: seed of the ``max_samples`` draw.
        restval_as_train: Karpathy only: whether ``split="train"`` includes the ``restval`` images (113,287 COCO
            training images, as in the GRPO-captioning paper) or not (82,783).
        hf_config_name: Hugging Face only: the dataset configuration name, if the dataset has several.
        image_resize: resize every image once, as it is read (see `ImageResize`); None keeps the source size.

    Returns:
        A `datasets.Dataset` whose rows hold a `PIL.Image.Image` (RGB) under ``image``. Columns: ``prompt``,
        ``image``, ``references``, then the source's other columns (Karpathy: ``image_id`` and ``split``).

    Raises:
        FileNotFoundError: the source or (``on_bad_image="error"``) a row's image file does not exist.
        ValueError: a malformed source (the message names the file, line or row and key), a row without references
            (``on_bad_image="error"``), no usable row at all, or an invalid argument.
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
    if format == "auto":
        format = _detect_format(source)
    if format == "hf":
        rows = _read_hf(source, split, image_root, image_column, caption_column, hf_config_name)
    elif isinstance(source, (Dataset, DatasetDict)):
        raise ValueError(f"format={format!r} reads a file; a `datasets` object needs format='hf' or 'auto'.")
    elif format == "karpathy":
        rows = _read_karpathy(Path(source), split, image_root, restval_as_train)
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


def resize_images(dataset: Dataset, image_resize: ImageResize | None) -> Dataset:
    """``dataset`` (from `load_caption_dataset`) with its images resized by ``image_resize`` as rows are read.

    For when the resize is known only after loading (the entry points read the policy's processor after the data and
    rewards, so that a bad recipe fails before any model file is touched). Rows are not copied.
    """
    decoder = dataset.format["format_kwargs"].get("transform")
    if not isinstance(decoder, _RowDecoder):
        raise ValueError("resize_images takes a dataset from load_caption_dataset (its images open lazily).")
    return dataset.with_transform(decoder.with_resize(image_resize))


def to_sft(
    dataset: Dataset,
    *,
    references: str = "all",
    form: str = "messages",
    seed: int = 0,
) -> Dataset:
    """The SFT form of a dataset from `load_caption_dataset`, as TRL's `SFTTrainer` takes vision-language data.

    ``form="messages"`` (default): rows ``{messages, images}`` with
    ``messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
    {"role": "assistant", "content": [{"type": "text", "text": caption}]}]`` and ``images = [PIL.Image]``. TRL puts the
    image into the ``{"type": "image"}`` part. The loss then covers the whole sequence (instruction and image
    placeholder tokens too) unless ``SFTConfig(assistant_only_loss=True)``, which needs a chat template with
    ``{% generation %}`` markers.

    ``form="prompt_completion"``: rows ``{prompt, completion, images}`` with the ``prompt`` of ``dataset`` and
    ``completion = [{"role": "assistant", "content": caption}]``; `SFTTrainer` then computes the loss on the caption
    only (``completion_only_loss`` defaults to on for this form), whatever the chat template.

    Args:
        dataset: rows ``{prompt, image, references}`` (other columns are dropped).
        references: ``"all"``: one row per (image, reference) pair, the cross-entropy stage of captioning papers;
            ``"random"``: one row per image with one of its references, drawn with ``seed`` (the same draw every
            time; shuffle references per epoch by calling `to_sft` again with another seed).
        form: ``"messages"`` or ``"prompt_completion"``.
        seed: seed of the ``"random"`` draw.

    Images stay lazy (opened when a row is read). Rows are written once: paths are cheap to repeat, but image bytes
    stored inside a Hugging Face dataset are copied once per row.
    """
    if references not in SFT_REFERENCE_MODES:
        raise ValueError(f"references must be one of {list(SFT_REFERENCE_MODES)}, got {references!r}.")
    if form not in SFT_FORMS:
        raise ValueError(f"form must be one of {list(SFT_FORMS)}, got {form!r}.")
    missing = [name for name in ("prompt", "image", "references") if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"to_sft needs a dataset with columns prompt, image, references (from load_caption_dataset); "
            f"missing {missing} among {dataset.column_names}."
        )
    decoder = dataset.format.get("format_kwargs", {}).get("transform")
    if not isinstance(decoder, _RowDecoder):
        decoder = _RowDecoder("the dataset given to to_sft")
    raw = dataset.select_columns(["prompt", "image", "references"]).with_format(None)
    if isinstance(raw.features["image"], datasets.Image):
        raw = raw.cast_column("image", STORED_IMAGE)
    features = {"images": List(STORED_IMAGE)}
    if form == "messages":
        features["messages"] = MESSAGES_FEATURE
    else:
        features.update(prompt=PROMPT_FEATURE, completion=PROMPT_FEATURE)
    sft = raw.map(
        _sft_rows,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=Features(features),
        fn_kwargs={"references": references, "form": form, "seed": seed},
        desc="SFT rows",
    )
    return sft.with_transform(decoder)


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


# ---------------------------------------------------------------------------------------------------------------------
# Sources → _SourceRows


@dataclass
class _SourceRows:
    """A source read into a table (``image`` stored undecoded, ``references``, extra columns) before validation.

    ``origins[i]`` says where row i comes from ("row 3 (line 4) of /data/x.jsonl"); ``paths[i]`` is its image path
    (None for images stored as bytes); ``problems[i]`` is why row i is unusable whatever its image (no references,
    no image), or None.
    """

    source: str
    table: Dataset
    origins: list[str]
    paths: list[str | None]
    problems: list[str | None]


def _detect_format(source) -> str:
    if isinstance(source, (Dataset, DatasetDict)):
        return "hf"
    name = str(source)
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "karpathy"
    return "hf"


def _clean_references(value: Any, origin: str, key: str) -> list[str]:
    """A reference string or list of strings → the stripped, non-empty strings; any other type is an error."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(text, str) for text in values):
        raise ValueError(
            f"{origin}: {key!r} must be a string or a list of strings, got {type(value).__name__} {value!r:.80}."
        )
    return [text.strip() for text in values if text.strip()]


def _row_problem(has_image: bool, references: list[str], no_image: str) -> str | None:
    """Why a row is unusable whatever its image file holds (no image, no reference), or None."""
    if not has_image:
        return no_image
    return None if references else NO_REFERENCES


def _resolve(path: str, root: str | os.PathLike | None) -> str:
    expanded = os.path.expanduser(path)
    if root is None or os.path.isabs(expanded):
        return expanded
    return os.path.join(root, expanded)


def _add_column(dataset: Dataset, name: str, values: list, feature, recipe: str) -> Dataset:
    """``dataset.add_column``, with a fingerprint derived from ``recipe`` instead of hashing every value.

    ``recipe`` with the dataset's own fingerprint must determine the values (hashing 100k+ Python values costs
    seconds on each load).
    """
    fingerprint = Hasher.hash([dataset._fingerprint, "balcaprl.data", name, recipe])
    return dataset.add_column(name, values, feature=feature, new_fingerprint=fingerprint)


def _rows_from_lists(
    source: str,
    origins: list[str],
    paths: list[str | None],
    references: list[list[str]],
    problems: list[str | None],
    extras: dict[str, list],
) -> _SourceRows:
    features = {"image": STORED_IMAGE, "references": REFERENCES_FEATURE}
    for key, values in extras.items():
        try:
            features[key] = Dataset.from_dict({key: values}).features[key]
        except Exception as error:  # pyarrow's message does not say which key holds the inconsistent values
            raise ValueError(
                f"{source}: the values of key {key!r} do not share one type across rows; make them consistent "
                f"({type(error).__name__}: {error})."
            ) from error
    table = Dataset.from_dict({"image": paths, "references": references, **extras}, features=Features(features))
    return _SourceRows(source, table, origins, paths, problems)


def _read_karpathy(path: Path, split: str, image_root, restval_as_train: bool) -> _SourceRows:
    split = "val" if split == "validation" else split
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"A Karpathy JSON has splits {list(KARPATHY_SPLITS)} (and 'validation'), got {split!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"Karpathy JSON {str(path)!r} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(
            f"{path} is not a Karpathy-split JSON: expected an object with an 'images' list "
            '({"images": [{"filename": ..., "split": ..., "sentences": [{"raw": ...}]}]}).'
        )
    wanted = {split} | ({"restval"} if split == "train" and restval_as_train else set())
    root = Path(image_root) if image_root is not None else path.parent
    origins, paths, references, problems, image_ids, splits = [], [], [], [], [], []
    for index, entry in enumerate(data["images"]):
        where = f"images[{index}] of {path}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}.")
        for key in ("filename", "split", "sentences"):
            if key not in entry:
                raise ValueError(f"{where}: missing key {key!r} (has {sorted(entry)}).")
        if entry["split"] not in KARPATHY_SPLITS:
            raise ValueError(f"{where}: unknown split {entry['split']!r}; expected one of {list(KARPATHY_SPLITS)}.")
        if entry["split"] not in wanted:
            continue
        if not isinstance(entry["sentences"], list):
            raise ValueError(f"{where}: 'sentences' must be a list, got {type(entry['sentences']).__name__}.")
        texts = []
        for number, sentence in enumerate(entry["sentences"]):
            if isinstance(sentence, dict) and "raw" in sentence:
                texts.append(sentence["raw"])
            elif isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                texts.append(" ".join(sentence["tokens"]))
            else:
                raise ValueError(f"{where}: sentences[{number}] has neither 'raw' nor 'tokens' ({sentence!r:.80}).")
        origins.append(f"row {index} (images[{index}]) of {path}")
        paths.append(_resolve(os.path.join(entry.get("filepath", ""), entry["filename"]), root))
        references.append(_clean_references(texts, where, "sentences"))
        problems.append(None if references[-1] else NO_REFERENCES)
        image_ids.append(entry.get("cocoid", entry.get("imgid", index)))
        splits.append(entry["split"])
    extras = {"image_id": image_ids, "split": splits}
    return _rows_from_lists(str(path), origins, paths, references, problems, extras)


def _read_jsonl(path: Path, image_root, image_key: str, caption_key: str) -> _SourceRows:
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {str(path)!r} does not exist.")
    root = Path(image_root) if image_root is not None else path.parent
    origins, paths, references, problems, records = [], [], [], [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}.")
            origin = f"row {len(origins)} (line {line_number}) of {path}"
            image = record.pop(image_key, None)
            if image is not None and not isinstance(image, str):
                raise ValueError(f"{origin}: {image_key!r} must be an image path, got {type(image).__name__}.")
            row_references = _clean_references(record.pop(caption_key, None), origin, caption_key)
            origins.append(origin)
            paths.append(_resolve(image, root) if image else None)
            references.append(row_references)
            problems.append(_row_problem(bool(image), row_references, f"no {image_key!r} image path"))
            records.append(record)
    if not origins:
        raise ValueError(f"{path} has no rows.")
    extra_keys = list(dict.fromkeys(key for record in records for key in record))
    reserved = [key for key in extra_keys if key in ("prompt", "image", "references")]
    if reserved:
        raise ValueError(
            f"{path}: keys {reserved} would overwrite the columns load_caption_dataset makes; rename them."
        )
    extras = {key: [record.get(key) for record in records] for key in extra_keys}
    return _rows_from_lists(str(path), origins, paths, references, problems, extras)


def _read_hf(source, split: str, image_root, image_column: str, caption_column: str, config_name) -> _SourceRows:
    dataset, name, local_folder = _load_hf(source, split, config_name)
    columns = dataset.column_names
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in columns:
            raise ValueError(f"{name} has no column {column!r} ({role}); its columns are {columns}.")
    for target, column in (("image", image_column), ("references", caption_column)):
        if column != target and target in columns:
            raise ValueError(
                f"{name} has a {target!r} column besides {column!r}; rename or drop it, or load it as {target!r}."
            )
    if "prompt" in columns:
        logger.info("Replacing the 'prompt' column of %s with the instruction.", name)
        dataset = dataset.remove_columns("prompt")
    origins = [f"row {index} of {name}" for index in range(len(dataset))]
    references = [
        _clean_references(value, origins[index], caption_column)
        for index, value in enumerate(dataset.select_columns([caption_column]).with_format(None)[caption_column])
    ]
    root = Path(image_root) if image_root is not None else local_folder
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        image_table = dataset.select_columns([image_column]).cast_column(image_column, STORED_IMAGE)
        image_array = image_table.with_format("arrow")[image_column]
        stored_paths = pc.struct_field(image_array, "path").to_pylist()
        has_bytes = pc.is_valid(pc.struct_field(image_array, "bytes")).to_pylist()
        paths = [None if present or not p else _resolve(p, root) for p, present in zip(stored_paths, has_bytes)]
        # Only rewrite the column when relative paths had to be resolved: it keeps big byte columns memory-mapped.
        rewrite = any(p is not None and p != s for p, s in zip(paths, stored_paths))
        if not rewrite:
            dataset = dataset.cast_column(image_column, STORED_IMAGE)
    elif feature == Value("string") or feature == Value("large_string"):
        stored_paths = dataset.select_columns([image_column]).with_format(None)[image_column]
        paths = [_resolve(p, root) if p else None for p in stored_paths]
        has_bytes = [False] * len(paths)
        rewrite = True
    else:
        raise ValueError(
            f"{name}: column {image_column!r} must hold images (datasets.Image) or image paths, got {feature}."
        )
    if rewrite:
        if any(has_bytes):
            raise ValueError(f"{name}: column {image_column!r} mixes relative paths and image bytes; not supported.")
        stored = [{"bytes": None, "path": path} if path else None for path in paths]
        dataset = _add_column(dataset.remove_columns(image_column), "image", stored, STORED_IMAGE, str(root))
    elif image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    dataset = _add_column(dataset.remove_columns(caption_column), "references", references, REFERENCES_FEATURE, "")
    problems = [
        _row_problem(path is not None or in_bytes, row_references, "no image")
        for path, in_bytes, row_references in zip(paths, has_bytes, references)
    ]
    return _SourceRows(name, dataset, origins, paths, problems)


def _load_hf(source, split: str, config_name) -> tuple[Dataset, str, Path | None]:
    """(dataset of ``split``, a name for messages, the local folder relative paths default to)."""
    if isinstance(source, Dataset):
        return source, "the given dataset", None
    if isinstance(source, DatasetDict):
        return _pick_split(source, split, "the given DatasetDict"), f"split {split!r} of the given DatasetDict", None
    folder = Path(source)
    if (folder / "dataset_dict.json").is_file():
        dataset = _pick_split(datasets.load_from_disk(str(folder)), split, str(folder))
        return dataset, f"split {split!r} of {folder}", folder
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(folder)), str(folder), folder
    if folder.is_file():
        raise ValueError(
            f"{str(folder)!r} is a file: use format='karpathy' (Karpathy JSON) or 'jsonl', or give a dataset folder."
        )
    dataset = datasets.load_dataset(str(source), config_name, split=split)
    return dataset, f"split {split!r} of {source}", folder if folder.is_dir() else None


def _pick_split(dataset_dict: DatasetDict, split: str, name: str) -> Dataset:
    if split not in dataset_dict:
        raise ValueError(f"{name} has no split {split!r}; its splits are {list(dataset_dict)}.")
    return dataset_dict[split]


# ---------------------------------------------------------------------------------------------------------------------
# Validation


def _image_problem(path: str | None, verify: bool, stored_images: Dataset, index: int) -> str | None:
    """Why the image of row ``index`` is unusable, or None: a file must exist; ``verify`` also runs PIL's check.

    ``path`` is None for images stored as bytes in ``stored_images`` (a one-column table of undecoded images).
    """
    if path is not None and not os.path.isfile(path):
        return IMAGE_NOT_FOUND
    if not verify:
        return None
    try:
        source = path if path is not None else io.BytesIO(stored_images[index]["image"]["bytes"])
        with Image.open(source) as handle:
            handle.verify()
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        return f"unreadable image ({type(error).__name__}: {error})"
    return None


def _select_rows(rows: _SourceRows, on_bad_image: str, max_samples: int | None, seed: int, report: LoadReport):
    """Sorted indices of the rows to keep; raises on the first bad row with ``"error"``, records it with ``"skip"``."""
    order = list(range(len(rows.origins)))
    if max_samples is not None and max_samples < len(order):
        random.Random(seed).shuffle(order)
    skip = on_bad_image == "skip"
    stored_images = rows.table.select_columns(["image"]).with_format(None)
    keep = []
    for index in order:
        if max_samples is not None and len(keep) == max_samples:
            break
        report.num_candidates += 1
        path = rows.paths[index]
        problem = rows.problems[index] or _image_problem(path, skip, stored_images, index)
        if problem is None:
            keep.append(index)
        elif skip:
            report.skipped.append(SkippedRow(rows.origins[index], path, problem))
        else:
            hint = "Fix the data, or load with on_bad_image='skip' to drop such rows."
            if problem == IMAGE_NOT_FOUND:
                raise FileNotFoundError(f"{rows.origins[index]}: image file {path!r} not found. {hint}")
            image = f" (image {path!r})" if path else ""
            raise ValueError(f"{rows.origins[index]}: {problem}{image}. {hint}")
    report.num_rows = len(keep)
    if not keep:
        raise ValueError(f"No usable row in {rows.source} (split {report.split!r}): {report.summary()}.")
    return sorted(keep)


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


def _sft_rows(batch: dict[str, list], indices: Sequence[int], *, references: str, form: str, seed: int) -> dict:
    """Batched ``map`` function of `to_sft`: GRPO rows → SFT rows (one per reference, or one random reference)."""
    output = {"images": [], "messages": []} if form == "messages" else {"images": [], "prompt": [], "completion": []}
    for index, prompt, image, row_references in zip(indices, batch["prompt"], batch["image"], batch["references"]):
        row_references = [row_references] if isinstance(row_references, str) else list(row_references or [])
        if not row_references:
            raise ValueError(f"Row {index} has no reference caption; every SFT row needs one.")
        if references == "random":
            # One generator per row, seeded by (seed, row): the draw does not depend on map's batching.
            row_references = [random.Random(f"{seed}-{index}").choice(row_references)]
        for caption in row_references:
            output["images"].append([image])
            if form == "messages":
                output["messages"].append([*_with_image_part(prompt), _assistant(caption, structured=True)])
            else:
                output["prompt"].append(prompt)
                output["completion"].append([_assistant(caption, structured=False)])
    return output


def _with_image_part(prompt: list[dict]) -> list[dict]:
    """The prompt messages with structured content and a ``{"type": "image"}`` part opening the first user turn."""
    messages, image_placed = [], False
    for message in prompt:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        if message["role"] == "user" and not image_placed:
            parts = [{"type": "image"}, *parts]
            image_placed = True
        messages.append({"role": message["role"], "content": parts})
    return messages


def _assistant(caption: str, *, structured: bool) -> dict:
    content = [{"type": "text", "text": caption}] if structured else caption
    return {"role": "assistant", "content": content}
