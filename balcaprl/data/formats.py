"""Readers of each source format (Hugging Face dataset, Karpathy JSON, JSONL) into one row table, each row named by
its place in the source, and the detection of a file's format (COCO captions and LLaVA readers: `coco_llava`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets.fingerprint import Hasher

from balcaprl.data.constants import KARPATHY_SPLITS, NO_REFERENCES

logger = logging.getLogger(__name__)


STORED_IMAGE = datasets.Image(decode=False)


MESSAGES_FEATURE = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})


PROMPT_FEATURE = List({"role": Value("string"), "content": Value("string")})


REFERENCES_FEATURE = List(Value("string"))


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


def _detect_format(source) -> tuple[str, Any]:
    """(format of ``source``, its parsed JSON when detecting the format meant parsing a ``.json`` file, else None).

    ``.json``: by content (`_json_format`); ``.jsonl``: ``"llava"`` when the first non-empty line is an object with
    ``"conversations"``, else ``"jsonl"``; anything else (and `datasets` objects): ``"hf"``. The parsed JSON is handed
    to the reader so that a large file is read once.
    """
    if isinstance(source, (Dataset, DatasetDict)):
        return "hf", None
    name = str(source)
    if name.endswith(".jsonl"):
        return _jsonl_format(Path(source)), None
    if name.endswith(".json"):
        data = _load_json(Path(source), "JSON file")
        return _json_format(Path(source), data), data
    return "hf", None


def _json_format(path: Path, data: Any) -> str:
    """The format a parsed ``.json`` file's shape says, or one error naming the file and the shapes expected."""
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if any(isinstance(entry, dict) and "sentences" in entry for entry in data["images"]):
            return "karpathy"
    if isinstance(data, list) and any(isinstance(entry, dict) and "conversations" in entry for entry in data):
        return "llava"
    if isinstance(data, dict):
        shape = f"an object with keys {sorted(data)[:10]}"
    else:
        shape = f"a {type(data).__name__}" + (f" of {len(data)} items" if isinstance(data, list) else "")
    raise ValueError(
        f"{path} is not a Karpathy-split JSON, COCO captions annotations or LLaVA conversations: expected a Karpathy "
        "split file ({'images': [{'sentences': ...}]}), COCO captions annotations ({'images', 'annotations'}) or "
        f"LLaVA conversations ([{{'image', 'conversations'}}]), got {shape}. Or set the format explicitly."
    )


def _jsonl_format(path: Path) -> str:
    """``"llava"`` if the first non-empty line of a JSONL file is an object with ``"conversations"``, else ``"jsonl"``
    (whose reader reports a missing file or a malformed line)."""
    if not path.is_file():
        return "jsonl"
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return "jsonl"
                return "llava" if isinstance(first, dict) and "conversations" in first else "jsonl"
    return "jsonl"


def _load_json(path: Path, kind: str) -> Any:
    """The parsed JSON file; a missing file or invalid JSON is one error naming the file (and line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from error


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


def _read_karpathy(path: Path, split: str, image_root, restval_as_train: bool, data: Any = None) -> _SourceRows:
    """Rows of a Karpathy-split JSON (``data``: the file already parsed, or None to read it)."""
    split = "val" if split == "validation" else split
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"A Karpathy JSON has splits {list(KARPATHY_SPLITS)} (and 'validation'), got {split!r}.")
    if data is None:
        data = _load_json(path, "Karpathy JSON")
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
            f"{str(folder)!r} is a file: use format 'karpathy', 'coco', 'llava' (JSON files) or 'jsonl', or give a "
            "dataset folder."
        )
    dataset = datasets.load_dataset(str(source), config_name, split=split)
    return dataset, f"split {split!r} of {source}", folder if folder.is_dir() else None


def _pick_split(dataset_dict: DatasetDict, split: str, name: str) -> Dataset:
    if split not in dataset_dict:
        raise ValueError(f"{name} has no split {split!r}; its splits are {list(dataset_dict)}.")
    return dataset_dict[split]
