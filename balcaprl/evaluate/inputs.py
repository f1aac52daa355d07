"""The formats captions already come in: our JSONL records, or a COCO results file with COCO or Karpathy references.

- **JSONL** — one ``{"id", "caption", "references", "image"?}`` per line (`balcaprl.evaluate.load_captions`).
- **COCO results** — the file the COCO caption evaluation server and ``pycocoevalcap`` take: a JSON list of
  ``{"image_id", "caption"}``. Its references come from ``annotations``: a COCO captions JSON
  (``captions_val2014.json``: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``) or a
  Karpathy-split JSON (``dataset_coco.json``: ``{"images": [{"cocoid"?, "imgid"?, "filepath"?, "filename", "split",
  "sentences": [{"raw"}]}]}``) with a ``split``; a Karpathy image is matched by ``cocoid`` (else ``imgid``).
  Only the images of the results file are scored, as the COCO evaluation does.

Images (needed only by judges) are ``image_root / file_name`` for COCO — none without ``image_root`` — and
``image_root / filepath / filename`` for Karpathy, ``image_root`` defaulting to the Karpathy JSON's folder. Any
other shape is refused in one line that says what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from balcaprl.evaluate.records import CAPTION_LINE, CaptionRecord, EvaluationDataError, as_records, read_captions

__all__ = ["load_coco_results", "read_caption_input"]

KARPATHY_SPLITS = ("train", "val", "test", "restval")
RESULTS_SHAPE = 'a COCO results file (a JSON list of {"image_id", "caption"})'
JSONL_SHAPE = f"a JSONL file of caption records {CAPTION_LINE}"
ANNOTATIONS_SHAPE = (
    'a COCO captions JSON ({"images", "annotations": [{"image_id", "caption"}]}) or a Karpathy JSON '
    '({"images": [{"filename", "split", "sentences"}]}) with --split'
)


def _load_json(path: Path) -> Any | None:
    """The file's JSON value, or None when the file is not one JSON document (it may be JSONL)."""
    if not path.is_file():
        raise EvaluationDataError(f"{path}: no such file.")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # meant as one JSON list: say where it breaks
            raise EvaluationDataError(
                f"{path}, line {error.lineno}: not valid JSON ({error.msg}); expected {RESULTS_SHAPE}."
            ) from error
        return None


def read_caption_input(
    path: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
) -> list[CaptionRecord]:
    """Records of a JSONL captions file, or of a COCO results file with its ``annotations`` (see the module).

    Image files are not checked here (the harness checks them when a judge will look at them). Anything else — an
    annotations file given as the captions, a JSON object of another shape, a results file without ``annotations``
    — is an `EvaluationDataError` saying what was expected.
    """
    path = Path(path)
    value = _load_json(path)
    if isinstance(value, list):
        if value and not (isinstance(value[0], dict) and "image_id" in value[0]):
            raise EvaluationDataError(
                f'{path} holds a JSON list whose first item is not {{"image_id", "caption"}} '
                f"({value[0]!r:.80}); expected {RESULTS_SHAPE} or {JSONL_SHAPE}."
            )
        if annotations is None:
            raise EvaluationDataError(
                f"{path} is {RESULTS_SHAPE}: give its references with --annotations (a COCO captions JSON, or a "
                "Karpathy JSON with --split)."
            )
        return load_coco_results(path, annotations, split=split, image_root=image_root, as_dicts=False)
    if isinstance(value, dict) and not {"id", "caption"} <= set(value):  # one JSONL record is a JSON object too
        kind = "a COCO captions (annotations) file" if "annotations" in value else "not a captions file"
        if "annotations" not in value and isinstance(value.get("images"), list):
            kind = "a Karpathy JSON (references)"
        raise EvaluationDataError(
            f"{path} is {kind}: expected {JSONL_SHAPE} or {RESULTS_SHAPE}; a references file goes after --annotations."
        )
    if value is not None and not isinstance(value, dict):
        raise EvaluationDataError(
            f"{path}: the file holds a JSON {type(value).__name__}; expected {JSONL_SHAPE} or {RESULTS_SHAPE}."
        )
    if annotations is not None:
        raise EvaluationDataError(
            f"--annotations goes with {RESULTS_SHAPE}; {path} is {JSONL_SHAPE}, whose records carry their references."
        )
    records = read_captions(path, check_images=False)
    if not records:
        raise EvaluationDataError(f"{path} is empty; expected {JSONL_SHAPE} or {RESULTS_SHAPE}.")
    return records


def load_coco_results(
    results: str | os.PathLike,
    annotations: str | os.PathLike,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    as_dicts: bool = True,
) -> list[Any]:
    """Caption records (dicts, or `CaptionRecord` s with ``as_dicts=False``) of a COCO results file, with the
    references (and image paths) of ``annotations``: a COCO captions JSON, or a Karpathy JSON and its ``split``.

    Errors name the file, the entry and the field: an entry that is not ``{"image_id", "caption"}``, an image id
    given twice, or one that has no reference in ``annotations``.
    """
    results = Path(results)
    entries = _load_json(results)
    if not isinstance(entries, list):
        found = "not one JSON document" if entries is None else f"a JSON {type(entries).__name__}"
        raise EvaluationDataError(f"{results} is {found}; expected {RESULTS_SHAPE}.")
    references, images, described = _read_annotations(Path(annotations), split, image_root)
    rows, origins = [], []
    for index, entry in enumerate(entries):
        where = f"{results}, entry {index}"
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise EvaluationDataError(f'{where}: expected {{"image_id", "caption"}}, got {entry!r:.120}.')
        image_id = str(entry["image_id"])
        if image_id not in references:
            raise EvaluationDataError(
                f"{where}: field 'image_id' {entry['image_id']!r} has no references in {described}; is it the "
                "annotations file (and split) of these results?"
            )
        rows.append(
            {
                "id": image_id,
                "caption": entry["caption"],
                "references": references[image_id],
                "image": images.get(image_id),
            }
        )
        origins.append(where)
    if not rows:
        raise EvaluationDataError(f"{results} holds no results; expected {RESULTS_SHAPE}.")
    records = as_records(rows, what=str(results), origins=origins)
    return [record.as_dict() for record in records] if as_dicts else records


def _read_annotations(
    path: Path, split: str | None, image_root: str | os.PathLike | None
) -> tuple[dict[str, list[str]], dict[str, str], str]:
    """(references by image id, image path by image id, a description of the source for messages)."""
    data = _load_json(path)
    is_coco = isinstance(data, dict) and isinstance(data.get("annotations"), list)
    is_karpathy = isinstance(data, dict) and "annotations" not in data and isinstance(data.get("images"), list)
    if not is_coco and not is_karpathy:
        found = "not one JSON document" if data is None else f"a JSON {type(data).__name__} of another shape"
        raise EvaluationDataError(f"{path} (--annotations) is {found}; expected {ANNOTATIONS_SHAPE}.")
    if is_coco:
        if split is not None:
            raise EvaluationDataError(f"{path} is a COCO captions JSON, one split already: drop --split {split}.")
        return (*_coco_references(path, data, image_root), str(path))
    if split not in KARPATHY_SPLITS:
        raise EvaluationDataError(
            f"{path} is a Karpathy JSON: say which split the results caption with --split "
            f"({', '.join(KARPATHY_SPLITS)}), got {split!r}."
        )
    return (*_karpathy_references(path, data, split, image_root), f"split {split!r} of {path}")


def _coco_references(
    path: Path, data: Mapping[str, Any], image_root: str | os.PathLike | None
) -> tuple[dict[str, list[str]], dict[str, str]]:
    references: dict[str, list[str]] = {}
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
            raise EvaluationDataError(f'{path}, annotations[{index}]: expected {{"image_id", "caption": str}}.')
        if "image_id" not in annotation:
            raise EvaluationDataError(f"{path}, annotations[{index}]: missing field 'image_id'.")
        references.setdefault(str(annotation["image_id"]), []).append(annotation["caption"])
    images = {}
    if image_root is not None:
        if not isinstance(data.get("images"), list):
            raise EvaluationDataError(
                f'{path}: --image-root needs the field \'images\' (a list of {{"id", "file_name"}}).'
            )
        for index, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise EvaluationDataError(f'{path}, images[{index}]: expected {{"id", "file_name"}}.')
            images[str(image["id"])] = str(Path(image_root) / image["file_name"])
    return references, images


def _karpathy_references(
    path: Path, data: Mapping[str, Any], split: str, image_root: str | os.PathLike | None
) -> tuple[dict[str, list[str]], dict[str, str]]:
    root = Path(image_root) if image_root is not None else path.parent
    references: dict[str, list[str]] = {}
    images: dict[str, str] = {}
    for index, entry in enumerate(data["images"]):
        where = f"{path}, images[{index}]"
        if not isinstance(entry, dict) or not {"filename", "split", "sentences"} <= set(entry):
            raise EvaluationDataError(f'{where}: expected {{"filename", "split", "sentences"}}.')
        if entry["split"] != split:
            continue
        image_id = entry.get("cocoid", entry.get("imgid"))
        if image_id is None:
            raise EvaluationDataError(f"{where}: no 'cocoid' nor 'imgid' to match the results' image_id with.")
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise EvaluationDataError(f"{where}: field 'sentences' must be a list of {{\"raw\": caption}}.")
        references[str(image_id)] = [sentence["raw"] for sentence in sentences]
        images[str(image_id)] = str(root / entry.get("filepath", "") / entry["filename"])
    return references, images
