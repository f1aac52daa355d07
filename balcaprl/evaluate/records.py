"""Caption records and their files: validation, JSONL captions, CaptionQA questions, and the one-line data errors.

A record is one caption of one image: ``{"id", "caption", "references", "image"?, ...extra columns}``. Every record
remembers where it came from (``captions.jsonl, line 3``, ``results.json, entry 7``, ``captions[2]``) so that an
error about it names the file, the line or row, and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balcaprl.text import caption_words

__all__ = [
    "CaptionRecord",
    "EvaluationDataError",
    "load_captions",
    "load_questions",
]

RECORD_KEYS = ("id", "caption", "references", "image")
# Keyword names a reward function receives from the harness itself; a record's extra column may not take them.
REWARD_ARGUMENTS = ("prompts", "completions", "log_extra")
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

ImageLike = Any  # a PIL image, a path, encoded bytes or a data URL: whatever `image_message_part` accepts


class EvaluationDataError(ValueError):
    """A problem in the data being evaluated, said in one line that names the file, the line or row, and the field.

    ``balcaprl evaluate`` prints it as ``error: ...`` and exits with status 2 (no traceback): it is the data to fix,
    not the program.
    """


@dataclass(frozen=True)
class CaptionRecord:
    """One validated caption; ``origin`` says where it came from, for error messages."""

    id: str
    caption: str
    references: tuple[str, ...]
    image: ImageLike | None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # other columns, e.g. a world `scene`
    origin: str = field(default="", compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The record as the loaders return it: extra columns, ``id``, ``caption``, ``references`` and (if any)
        ``image``."""
        row = {**self.extra, "id": self.id, "caption": self.caption, "references": list(self.references)}
        if self.image is not None:
            row["image"] = self.image
        return row

    def where(self) -> str:
        """``<origin> (id '...')``: the start of an error message about this record."""
        return f"{self.origin} (id {self.id!r})" if self.origin else f"id {self.id!r}"


def as_records(
    captions: Sequence[Mapping[str, Any] | CaptionRecord], what: str = "captions", origins: Sequence[str] = ()
) -> list[CaptionRecord]:
    """Validated records; ids become strings; keys besides `RECORD_KEYS` are kept as extra columns (reward functions
    get them as keyword arguments). A record's origin is ``origins[index]`` if given, else ``what[index]``; errors
    (`EvaluationDataError`) name it and the field."""
    records, seen = [], set()
    for index, item in enumerate(captions):
        origin = origins[index] if origins else f"{what}[{index}]"
        if isinstance(item, CaptionRecord):
            origin = item.origin or origin
            item = item.as_dict()
        if not isinstance(item, Mapping) or "id" not in item or "caption" not in item:
            raise EvaluationDataError(
                f"{origin}: expected a caption record with at least 'id' and 'caption', got {item!r:.200}."
            )
        record_id = str(item["id"])
        where = f"{origin} (id {record_id!r})"
        if record_id in seen:
            raise EvaluationDataError(
                f"{origin}: id {record_id!r} appears twice; ids must be unique (one caption per image)."
            )
        seen.add(record_id)
        caption = item["caption"]
        if not isinstance(caption, str):
            raise EvaluationDataError(f"{where}: field 'caption' is {type(caption).__name__}, not a string.")
        references = item.get("references") or ()
        if isinstance(references, str):
            references = (references,)
        if not isinstance(references, (list, tuple)) or not all(isinstance(ref, str) for ref in references):
            raise EvaluationDataError(f"{where}: field 'references' must be a string or a list of strings.")
        extra = {key: value for key, value in item.items() if key not in RECORD_KEYS}
        clashing = [key for key in extra if key in REWARD_ARGUMENTS]
        if clashing:
            raise EvaluationDataError(f"{where}: keys {clashing} are reserved for reward arguments; rename them.")
        records.append(CaptionRecord(record_id, caption, tuple(references), item.get("image"), extra, origin))
    return records


def non_empty_references(record: CaptionRecord) -> list[str]:
    """The references that hold at least one word (`balcaprl.text.caption_words`; "…" alone is empty)."""
    return [reference for reference in record.references if caption_words(reference)]


def require_references(records: Sequence[CaptionRecord], sections: str) -> None:
    """Every record has a non-empty reference, or an error naming the first that has none."""
    for record in records:
        if not non_empty_references(record):
            raise EvaluationDataError(
                f"{record.where()}: field 'references' holds no non-empty reference; {sections} need at least one "
                "per caption: add them, or switch those sections off."
            )


def check_image_paths(records: Sequence[CaptionRecord]) -> None:
    """Every image given as a path exists, or an error naming the first record whose image file is missing."""
    for record in records:
        is_path = isinstance(record.image, os.PathLike) or (
            isinstance(record.image, str) and not record.image.startswith("data:image/")  # a data URL is an image
        )
        if is_path and not Path(record.image).is_file():
            raise EvaluationDataError(
                f"{record.where()}: field 'image': file {str(record.image)!r} not found (the judge is shown the "
                "image; fix the path, or leave images out with --judge-text-only)."
            )


def read_jsonl(path: str | os.PathLike, expected: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line; ``expected`` says what a line should hold, for errors."""
    if not Path(path).is_file():
        raise EvaluationDataError(f"{path}: no such file.")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvaluationDataError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
            if not isinstance(row, dict):
                raise EvaluationDataError(
                    f"{path}, line {number}: expected a JSON object {expected}, got {type(row).__name__}."
                )
            rows.append((number, row))
    return rows


CAPTION_LINE = '{"id", "caption", "references", "image"?}'


def read_captions(path: str | os.PathLike, *, check_images: bool = True) -> list[CaptionRecord]:
    """`CaptionRecord` s of a JSONL captions file (see `load_captions`), each with its line as origin."""
    folder = Path(path).resolve().parent
    rows, origins = [], []
    for number, row in read_jsonl(path, CAPTION_LINE):
        where = f"{path}, line {number}"
        missing = [key for key in ("id", "caption") if key not in row]
        if missing:
            raise EvaluationDataError(f"{where}: missing {missing} (each line is a caption record {CAPTION_LINE}).")
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise EvaluationDataError(f"{where}: field 'image' must be a path string, got {type(image).__name__}.")
            image_path = Path(image).expanduser()
            image_path = image_path if image_path.is_absolute() else folder / image_path
            if check_images and not image_path.is_file():
                raise EvaluationDataError(f"{where}: image {image!r} not found (looked for {image_path}).")
            row = {**row, "image": str(image_path)}
        rows.append(row)
        origins.append(where)
    return as_records(rows, what=str(path), origins=origins)


def load_captions(path: str | os.PathLike, *, check_images: bool = True) -> list[dict[str, Any]]:
    """Caption records from a JSONL file, one ``{"id", "caption", "references", "image"?}`` object per line.

    ``id`` becomes a string; ``references`` may be one string or a list; ``image`` (optional) is a path, relative
    paths being resolved against the file's folder (so a captions file can sit next to its images); with
    ``check_images=False`` a missing image file is left for whoever needs it (the harness checks images only when a
    judge or reward will look at them). Other keys (e.g. the ``scene`` graph the exact world rewards read) are kept
    as they are. Errors (`EvaluationDataError`) name the line and the field.
    """
    return [record.as_dict() for record in read_captions(path, check_images=check_images)]


def default_name(path: str | os.PathLike) -> str:
    """A report's name for captions read from ``path``: the file's name without extension, or its folder's name
    for a file called ``captions.*`` (as ``balcaprl evaluate run`` writes)."""
    path = Path(path).resolve()
    return path.parent.name if path.stem == "captions" and path.parent.name else path.stem


# ---------------------------------------------------------------------------------------------------------- questions


def _answer_index(answer: Any, choices: list[str]) -> int | None:
    """Index of the correct choice: an int index, a choice's exact text, or a letter (A = first choice)."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if isinstance(answer, str):
        if answer in choices:  # CaptionQA's own files give the choice text; it wins over a letter reading
            return choices.index(answer)
        letter = answer.strip().upper()
        if len(letter) == 1 and letter in CHOICE_LETTERS[: len(choices)]:
            return CHOICE_LETTERS.index(letter)
    return None


QUESTION_LINE = '{"id", "question", "choices", "answer", "category"?}'


def load_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """CaptionQA-style questions from JSONL: ``{"id": image id, "question", "choices": [...], "answer", "category"?}``.

    ``answer`` is the 0-based index of the correct choice, its exact text, or its letter ("A" = first); it is
    normalised to ``answer_index``. ``category`` (optional) is a string or a list of strings. Errors name the line.
    """
    return [normalize_question(row, f"{path}, line {number}") for number, row in read_jsonl(path, QUESTION_LINE)]


def normalize_question(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One validated question; idempotent (a normalised question, with ``answer_index``, passes unchanged)."""
    if not isinstance(row, Mapping):
        raise EvaluationDataError(f"{where}: expected a question {QUESTION_LINE}, got {type(row).__name__}.")
    if "answer" not in row and "answer_index" in row:
        row = {**row, "answer": int(row["answer_index"]), "category": row.get("categories")}
    missing = [key for key in ("id", "question", "choices", "answer") if key not in row]
    if missing:
        raise EvaluationDataError(f"{where}: missing {missing} (need 'id', 'question', 'choices', 'answer').")
    choices = row["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise EvaluationDataError(f"{where}: field 'choices' must be a list of 2 to {len(CHOICE_LETTERS)} strings.")
    choices = [str(choice) for choice in choices]
    answer_index = _answer_index(row["answer"], choices)
    if answer_index is None:
        raise EvaluationDataError(
            f"{where}: answer {row['answer']!r} is neither a choice index (0-{len(choices) - 1}), nor a choice's "
            f"text, nor a letter A-{CHOICE_LETTERS[len(choices) - 1]}."
        )
    category = row.get("category")
    categories = [] if category is None else [category] if isinstance(category, str) else [str(c) for c in category]
    return {
        "id": str(row["id"]),
        "question": str(row["question"]),
        "choices": choices,
        "answer_index": answer_index,
        "categories": categories,
    }
