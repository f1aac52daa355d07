"""Caption generation with a trained policy: batched, greedy or sampled, from a checkpoint or a LoRA adapter folder.

- `load_for_generation` and `generate_captions`: a model in eval mode, one caption per image.
- `caption_dataset`: the captions of a whole dataset split written to ``captions.jsonl`` as they are produced, so that
  an interrupted run continues where it stopped (`balcaprl evaluate --model ...` builds on it). The settings that
  decide the captions are recorded in ``generation.json`` beside them; a rerun with other settings is refused
  (`GenerationSettingsError`) unless ``overwrite``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from balcaprl.data.constants import DEFAULT_INSTRUCTION
from balcaprl.models.loading import load_model
from balcaprl.models.paths import adapter_base, resolve_model_path
from balcaprl.models.processors import load_processor

logger = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"
SETTINGS_FILE = "generation.json"
SETTINGS_FORMAT_VERSION = 1
# The settings that decide which captions a run writes; anything else in generation.json (batch size, run history)
# may change between runs.
COMPARED_SETTINGS = ("model_path", "model_weights", "data", "generation")
# Dataset columns that are not passed on as extra columns of a caption record.
_NOT_EXTRA = ("prompt", "image", "references")


def load_for_generation(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """(model, processor) in eval mode from a full checkpoint, or from a LoRA adapter folder (merged into its base).

    ``balcaprl train`` with ``use_peft`` saves an adapter whose ``adapter_config.json`` names the base checkpoint;
    the processor is read from the folder itself when it holds one, else from the base. ``device`` (e.g. ``"cuda"``)
    moves the model there; None leaves it where ``from_pretrained`` put it (the CPU).
    """
    path = Path(resolve_model_path(str(path)))
    base = adapter_base(str(path))
    model = load_model(str(path), dtype=dtype)
    has_processor = (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file()
    processor = load_processor(str(path) if has_processor or base is None else base)
    if device is not None:
        model.to(device)
    model.eval()
    return model, processor


def caption_prompt_batch(
    processor, images: Sequence[Any] | None, instruction: str = DEFAULT_INSTRUCTION, *, conversations=None
):
    """The processor's left-padded batch of captioning prompts, generation prompt included: one user turn per image
    (``images``), or the given ``conversations``. How evaluation prompts, how stage 1 (`balcaprl.sft`) tokenizes the
    prompts it supervises, and the same as TRL's GRPO prompts (BOS and special tokens included)."""
    if conversations is None:
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]}]
            for image in images
        ]
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    )


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_captions(
    model,
    processor,
    images: Sequence[Image.Image],
    instruction: str = DEFAULT_INSTRUCTION,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: bool = False,
) -> list[str]:
    """One caption per image, in order. Greedy by default; ``do_sample`` with ``temperature`` (and ``seed``).

    Prompts go through the processor's chat template exactly as in training (for Qwen2.5-VL that includes the
    ``mm_token_type_ids`` its 3-D positions need), left-padded for batched decoding.
    """
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = getattr(processor, "tokenizer", processor)
    captions: list[str] = []
    iterator = _batches(list(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=(len(images) + batch_size - 1) // batch_size, desc="captions", unit="batch")
    for batch in iterator:
        inputs = caption_prompt_batch(processor, batch, instruction).to(model.device)
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        captions.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return captions


# ------------------------------------------------------------------------------------------ a split to captions.jsonl


class GenerationSettingsError(ValueError):
    """The captions already in an output folder were made with other settings, or cannot be traced to any."""


@dataclass
class CaptionRun:
    """What `caption_dataset` did.

    ``records`` holds one ``{"id", "caption", "references", "image"?}`` per dataset row, in dataset order, exactly as
    in the captions file; ``generated`` + ``reused`` = ``len(records)``; ``settings`` is what ``generation.json``
    records (model, data, decoding), ``rows`` what `dataset_rows` read.
    """

    path: Path
    records: list[dict[str, Any]]
    generated: int
    reused: int
    dropped_partial_line: bool
    settings: dict[str, Any]
    rows: list[dict[str, Any]]


def dataset_row_ids(dataset) -> list[str]:
    """One id per row: the ``image_id`` column when the dataset has one, else the row index; unique, as strings."""
    if "image_id" not in dataset.column_names:
        return [str(index) for index in range(len(dataset))]
    ids = [str(value) for value in dataset.select_columns(["image_id"]).with_format(None)["image_id"]]
    first_row: dict[str, int] = {}
    for row, value in enumerate(ids):
        if value in first_row:
            raise ValueError(
                f"Rows {first_row[value]} and {row} share image_id {value!r}: caption ids must be unique (one caption "
                "per image). Keep one row per image (its references as a list), or drop the image_id column."
            )
        first_row[value] = row
    return ids


def dataset_rows(dataset, *, image_bytes: bool = False) -> list[dict[str, Any]]:
    """Per row, without decoding any image: ``{"id", "references", "image_path", "image_bytes", "extra"}``.

    ``image_path`` is the absolute path of the row's image file, None for an image stored as bytes in the dataset;
    those bytes (encoded) are read into ``image_bytes`` only when asked, since a Hugging Face dataset can hold
    gigabytes of them. ``extra`` holds the row's other columns (e.g. a ``scene`` graph, an ``image_id``), which
    reward functions take as keyword arguments.
    """
    import pyarrow.compute as pc

    ids = dataset_row_ids(dataset)
    raw = dataset.with_format(None)
    stored_images = raw.select_columns(["image"])
    images = dataset.select_columns(["image"]).with_format("arrow")["image"]  # no copy of the bytes
    paths = pc.struct_field(images, "path").to_pylist()
    stored = pc.is_valid(pc.struct_field(images, "bytes")).to_pylist()
    references = raw.select_columns(["references"])["references"]
    extra_columns = [name for name in dataset.column_names if name not in _NOT_EXTRA]
    extras = raw.select_columns(extra_columns).to_list() if extra_columns else [{} for _ in ids]
    rows = []
    for index, (row_id, row_references, path, in_bytes, extra) in enumerate(
        zip(ids, references, paths, stored, extras)
    ):
        rows.append(
            {
                "id": row_id,
                "references": list(row_references),
                # As in balcaprl.data: next to stored bytes, "path" is only the original file name.
                "image_path": str(Path(path).resolve()) if path and not in_bytes else None,
                "image_bytes": stored_images[index]["image"]["bytes"] if in_bytes and image_bytes else None,
                "extra": extra,
            }
        )
    return rows


def read_caption_file(path: str | os.PathLike, *, repair: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """The records of a captions JSONL written by `caption_dataset`, and whether a half-written last line was dropped.

    Only the last line can be incomplete (the process died while writing it): it is dropped, and with ``repair`` the
    file is cut after the last complete line, so that appending continues on a fresh line. A complete last line that
    only lacks its newline is kept (``repair`` adds the newline). Any other bad line is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        return [], False
    data = path.read_bytes()
    complete, _, tail = data.rpartition(b"\n")
    lines = complete.split(b"\n") if complete else []
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _caption_record(line)
        if record is None:
            raise ValueError(
                f"{path}, line {number}: not a caption record ({line[:120]!r}). Only the last line can be "
                "half-written by a crash; fix or delete this line, or rerun with --overwrite to start again."
            )
        records.append(record)
    dropped = False
    if tail.strip():
        record = _caption_record(tail)
        if record is not None:
            records.append(record)
            if repair:
                with path.open("ab") as handle:
                    handle.write(b"\n")
        else:
            dropped = True
            logger.warning("%s: dropping its half-written last line (%d bytes): %r", path, len(tail), tail[:80])
            if repair:
                with path.open("r+b") as handle:
                    handle.truncate(len(data) - len(tail))
    return records, dropped


def _caption_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None
    if not isinstance(record.get("caption"), str) or not isinstance(record.get("references"), list):
        return None
    return record


def model_fingerprint(path: str | os.PathLike) -> str | None:
    """A short hash of the names, sizes and modification times of a local checkpoint's weight files (None for a Hub
    name): it changes when a checkpoint is re-saved at the same path."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = sorted(
        item for pattern in ("*.safetensors", "*.bin", "*.pt") for item in folder.glob(pattern) if item.is_file()
    )
    if not files:
        return None
    listing = [(item.name, item.stat().st_size, item.stat().st_mtime_ns) for item in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def _differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        keys = list(dict.fromkeys([*recorded, *current]))
        return [text for key in keys for text in _differences(recorded.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if recorded == current else [f"{prefix.rstrip('.')}: {recorded!r} → now {current!r}"]


def _check_settings(settings_path: Path, captions_path: Path, settings: Mapping[str, Any], count: int) -> None:
    """Refuse to add captions to a file written with other settings (or whose settings were not recorded)."""
    advice = "Use another --output-dir, or pass --overwrite (overwrite=True) to delete them and start again."
    if not settings_path.is_file():
        raise GenerationSettingsError(
            f"{captions_path} already holds {count} caption line(s) but {settings_path.name} is missing, so which "
            f"model and settings wrote them is unknown. {advice}"
        )
    try:
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise GenerationSettingsError(f"{settings_path} is not valid JSON ({error.msg}). {advice}") from error
    differences = [
        text for key in COMPARED_SETTINGS for text in _differences(recorded.get(key), settings.get(key), f"{key}.")
    ]
    if differences:
        raise GenerationSettingsError(
            f"{captions_path} holds {count} caption line(s) made with other settings than this run's "
            f"({'; '.join(differences)}); mixing them would evaluate two different caption sets as one. {advice}"
        )


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)  # atomic: a crash never leaves half a settings file


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def caption_dataset(
    model: str | os.PathLike,
    dataset,
    output_dir: str | os.PathLike,
    *,
    instruction: str,
    data: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    image_bytes: bool = False,
) -> CaptionRun:
    """Caption every row of ``dataset`` (from `balcaprl.data.load_caption_dataset`) into ``output_dir/captions.jsonl``.

    Lines ``{"id", "caption", "references", "image"?}`` (``id`` from `dataset_row_ids`; ``image`` the absolute path
    when the row has one) are appended and flushed after every batch, so a run that dies loses at most one batch.
    A rerun with the same folder reads the ids already there (`read_caption_file`: a half-written last line is
    dropped), generates only the missing rows, and does not even load the model when none is missing.

    ``output_dir/generation.json`` records what decides the captions: the model (path, and a fingerprint of its
    weight files), ``data`` (the caller's description of the rows: source, split, ...; also the row count), the
    instruction and the decoding settings. If the captions already written were made with different ones, the run
    stops with a `GenerationSettingsError` saying what differs — unless ``overwrite``, which deletes them first.
    ``batch_size``, ``dtype`` and ``device`` may change between runs. ``image_bytes`` is passed to `dataset_rows`.

    Decoding: greedy by default; ``do_sample`` draws with ``temperature``, the generator seeded with ``seed`` + the
    index of the batch's first row before each batch, so a run resumed at a batch boundary with the same batch size
    draws what an uninterrupted run would have.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    captions_path, settings_path = output / CAPTIONS_FILE, output / SETTINGS_FILE
    rows = dataset_rows(dataset, image_bytes=image_bytes)
    model_path = resolve_model_path(str(model))
    settings = {
        "format_version": SETTINGS_FORMAT_VERSION,
        "model": str(model),
        "model_path": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "model_weights": model_fingerprint(model_path),
        "data": {**(data or {}), "num_rows": len(rows)},
        "generation": {
            "instruction": instruction,
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": float(temperature) if do_sample else None,
            "seed": seed if do_sample else None,
        },
    }

    if overwrite:
        captions_path.unlink(missing_ok=True)
    existing_lines = 0
    if captions_path.is_file():
        existing_lines = sum(1 for line in captions_path.read_bytes().split(b"\n") if line.strip())
    history: list[dict[str, Any]] = []
    if existing_lines:
        _check_settings(settings_path, captions_path, settings, existing_lines)
        history = json.loads(settings_path.read_text(encoding="utf-8")).get("runs", [])
    written, dropped = read_caption_file(captions_path, repair=True)

    row_by_id = {row["id"]: row for row in rows}
    captions_by_id: dict[str, dict[str, Any]] = {}
    for record in written:
        row = row_by_id.get(record["id"])
        problem = None
        if row is None:
            problem = "is not an id of the data"
        elif record["id"] in captions_by_id:
            problem = "appears twice"
        elif record["references"] != row["references"]:
            problem = "has other references than that row of the data"
        if problem is not None:
            raise GenerationSettingsError(
                f"{captions_path}: caption id {record['id']!r} {problem}: the file does not belong to this data. Use "
                "another --output-dir, or pass --overwrite to delete it and start again."
            )
        captions_by_id[record["id"]] = record
    pending = [index for index, row in enumerate(rows) if row["id"] not in captions_by_id]
    reused = len(rows) - len(pending)
    run = {"started": _now(), "reused": reused, "generated": 0, "batch_size": batch_size, "finished": None}
    _write_json(settings_path, {**settings, "runs": [*history, run]})
    logger.info(
        "Captions: %d of %d rows already in %s, %d to generate%s.",
        reused,
        len(rows),
        captions_path,
        len(pending),
        " (a half-written last line was dropped)" if dropped else "",
    )

    if pending:
        loaded_model, processor = load_for_generation(model_path, dtype=dtype, device=device)
        images = dataset.select_columns(["image"])  # keeps the lazy image decoding of load_caption_dataset
        bar = tqdm(total=len(rows), initial=reused, desc="captions", unit="caption", disable=not progress)
        with captions_path.open("a", encoding="utf-8") as handle, bar:
            for batch in _batches(pending, batch_size):
                captions = generate_captions(
                    loaded_model,
                    processor,
                    images[list(batch)]["image"],
                    instruction,
                    batch_size=len(batch),
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    seed=seed + batch[0] if do_sample else None,
                )
                for index, caption in zip(batch, captions):
                    row = rows[index]
                    record = {"id": row["id"], "caption": caption, "references": row["references"]}
                    if row["image_path"] is not None:
                        record["image"] = row["image_path"]
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    captions_by_id[row["id"]] = record
                handle.flush()
                run["generated"] += len(batch)
                bar.update(len(batch))
    run["finished"] = _now()
    _write_json(settings_path, {**settings, "runs": [*history, run]})
    logger.info("Captions: %d generated, %d reused → %s", run["generated"], reused, captions_path)
    records = [captions_by_id[row["id"]] for row in rows]
    return CaptionRun(captions_path, records, run["generated"], reused, dropped, settings, rows)
