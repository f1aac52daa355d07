"""Readers of COCO captions annotations (``captions_train2014.json``) and LLaVA / ShareGPT4V conversations (a JSON
list or JSONL of ``{"id", "image", "conversations"}``) into the row table of `balcaprl.data.formats`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from balcaprl.data.constants import NO_REFERENCES
from balcaprl.data.formats import _clean_references, _load_json, _resolve, _row_problem, _rows_from_lists, _SourceRows

# The speaker names of an assistant turn: "gpt" in LLaVA and ShareGPT4V, "assistant" in some re-exports.
ASSISTANT_SPEAKERS = ("gpt", "assistant")


COCO_SHAPE = '{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "id", "caption"}]}'


def _read_coco(path: Path, image_root, data: Any = None) -> _SourceRows:
    """One row per image of a COCO captions annotations file, all of its captions as references.

    ``data``: the file already parsed, or None to read it. Images without an annotation are rows without references.
    """
    if data is None:
        data = _load_json(path, "COCO captions file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO captions annotations file: expected {COCO_SHAPE}.")
    if not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"{path}: 'annotations' must be a list of {{'image_id', 'id', 'caption'}}; expected {COCO_SHAPE}."
        )
    root = Path(image_root) if image_root is not None else path.parent
    position: dict[Any, int] = {}
    file_names = []
    for index, image in enumerate(data["images"]):
        where = f"images[{index}] of {path}"
        if not isinstance(image, dict):
            raise ValueError(f"{where}: expected an object, got {type(image).__name__}.")
        for key in ("id", "file_name"):
            if key not in image:
                raise ValueError(f"{where}: missing key {key!r} (has {sorted(image)}).")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ValueError(f"{where}: 'file_name' must be an image path, got {image['file_name']!r:.80}.")
        if image["id"] in position:
            raise ValueError(f"{where}: image id {image['id']!r} is already that of images[{position[image['id']]}].")
        position[image["id"]] = index
        file_names.append(image["file_name"])
    captions: list[list[str]] = [[] for _ in file_names]
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise ValueError(f"annotations[{index}] of {path}: expected an object, got {type(annotation).__name__}.")
        where = f"annotation id {annotation.get('id')!r} (annotations[{index}]) of {path}"
        for key in ("image_id", "caption"):
            if key not in annotation:
                raise ValueError(f"{where}: missing key {key!r} (has {sorted(annotation)}).")
        if not isinstance(annotation["caption"], str):
            raise ValueError(f"{where}: 'caption' must be a string, got {type(annotation['caption']).__name__}.")
        if annotation["image_id"] not in position:
            raise ValueError(
                f"{where}: image_id {annotation['image_id']!r} is not the id of any of the file's images."
            )
        captions[position[annotation["image_id"]]].append(annotation["caption"])
    image_ids = list(position)
    origins = [f"row {index} (images[{index}], id {image_id!r}) of {path}" for index, image_id in enumerate(image_ids)]
    references = [_clean_references(texts, origin, "caption") for texts, origin in zip(captions, origins)]
    paths = [_resolve(file_name, root) for file_name in file_names]
    problems = [None if row_references else NO_REFERENCES for row_references in references]
    if not origins:
        raise ValueError(f"{path} has no images.")
    return _rows_from_lists(str(path), origins, paths, references, problems, {"image_id": image_ids})


def _read_llava(path: Path, image_root, data: Any = None) -> _SourceRows:
    """One row per LLaVA / ShareGPT4V entry (a JSON list, or a ``.jsonl`` file of one entry per line).

    The reference is the first assistant turn's text; later assistant turns (follow-up answers) are not captions and
    are ignored. Entries sharing an image stay separate rows. ``data``: the JSON list already parsed, or None.
    """
    root = Path(image_root) if image_root is not None else path.parent
    if data is None and path.suffix == ".jsonl":
        entries = _jsonl_entries(path)
    else:
        if data is None:
            data = _load_json(path, "LLaVA conversations file")
        if not isinstance(data, list):
            raise ValueError(
                f"{path} is not LLaVA conversations: expected a list [{{'id', 'image', 'conversations'}}, ...], got "
                f"a {type(data).__name__} (a file of one entry per line needs the .jsonl suffix)."
            )
        entries = ((f"entry {index}", entry) for index, entry in enumerate(data))
    origins, paths, references, problems, ids = [], [], [], [], []
    for place, entry in entries:
        where = f"{place} of {path}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}.")
        if "id" in entry:
            where = f"{place} (id {entry['id']!r}) of {path}"
        image = entry.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: 'image' must be one image path, got {type(image).__name__} {image!r:.80}.")
        text = _first_answer(entry, where)
        origin = f"row {len(origins)} ({place}) of {path}"
        origins.append(origin)
        paths.append(_resolve(image, root) if image else None)
        references.append(_clean_references(text, origin, "value"))
        problems.append(_row_problem(bool(image), references[-1], "no 'image' path"))
        ids.append(None if entry.get("id") is None else str(entry["id"]))
    if not origins:
        raise ValueError(f"{path} has no entries.")
    return _rows_from_lists(str(path), origins, paths, references, problems, {"id": ids})


def _jsonl_entries(path: Path):
    """(``"line N"``, parsed object) of each non-empty line of a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA conversations file {str(path)!r} does not exist.")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from error


def _first_answer(entry: dict, where: str) -> str | None:
    """The text of an entry's first assistant turn, or None if it has none."""
    if "conversations" not in entry:
        raise ValueError(f"{where}: missing key 'conversations' (has {sorted(entry)}).")
    turns = entry["conversations"]
    if not isinstance(turns, list):
        raise ValueError(
            f"{where}: 'conversations' must be a list of turns {{'from': 'human' or 'gpt', 'value': text}}, got "
            f"{type(turns).__name__} {turns!r:.80}."
        )
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(
                f"{where}: conversations[{number}] is not a turn {{'from': ..., 'value': ...}}: {turn!r:.80}."
            )
        if turn["from"] in ASSISTANT_SPEAKERS:
            if not isinstance(turn["value"], str):
                raise ValueError(
                    f"{where}: conversations[{number}]['value'] must be a string, got {type(turn['value']).__name__}."
                )
            return turn["value"]
    return None
