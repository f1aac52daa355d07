"""Caption evaluation harness: captions of a dataset split by a model, then metrics, judge-based evaluations,
``report.json`` / ``report.md`` / plots.

Generation half: `generate_and_evaluate` loads a split (`balcaprl.data.load_caption_dataset`), captions it with a
checkpoint or LoRA adapter (`balcaprl.generation.caption_dataset`: batched, greedy or sampled, appended to
``captions.jsonl`` batch by batch, so an interrupted run resumes where it stopped; the model and settings are
recorded in ``generation.json`` and a rerun with different ones is refused unless told to overwrite), then scores
them like the scoring half does.

Scoring half. Input: captions already produced, one record per image ``{"id": str, "caption": str, "references":
[str, ...], "image": PIL image or path (optional), ...extra columns}`` (`load_captions` reads them from JSONL). Entry
points: `evaluate_captions` (sync) / `evaluate_captions_async`, and `compare_reports` for model-vs-model tables and
plots. ``balcaprl evaluate [run|score|compare] ...`` (or ``python -m balcaprl.evaluate``) runs them from the command
line (see `main`).

Sections of a report (each can be switched off; what is skipped and why is written into the report's notes):

- **classic** — BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and SPICE) computed by pycocoevalcap on PTB-tokenised text, the
  COCO caption evaluation protocol. pycocoevalcap's ``Cider`` is CIDEr-D with document frequencies taken from the
  evaluated references (unlike the ``cider_d`` reward, whose df are fixed from a training corpus). The PTB tokenizer
  and METEOR run on Java: without ``java`` on PATH METEOR is skipped and the others use `simple_tokenize` (lower-case,
  punctuation removed), which is marked in the report because the numbers are then not comparable with published ones.
  SPICE runs only when its Stanford CoreNLP jars are already in pycocoevalcap's ``spice/lib`` (it would download them).
- **length** — words per caption, ρ = words / mean reference words (`balcaprl.length.length_ratios`) and the fraction
  outside BalCapRL's window [0.5, 2].
- **balcap** — mean precision P, recall R and linguistic L from the judge rewards of `balcaprl.rewards.judged` (the
  same objects and prompts as in training) and b-CapScore = H(P̄, R̄, L̄), the harmonic mean of the three means
  (0 if any is 0). Captions the judge could not score (None) are left out of a mean and counted. Precision needs the
  image; records without one are counted as ``no_image``. The length mask is NOT applied: it is a training device.
  Any three reward functions can stand in for the judges (``balcap_rewards``; ``--exact-world-judges`` uses the
  synthetic world's exact rewards of `balcaprl.rewards.world`, which read the records' ``scene`` column).
- **dcscore**, **captionqa**, **caparena** — judge-based evaluations in the style of the benchmarks the BalCapRL
  paper reports; their functions (`dcscore_section`, `captionqa_section`, `caparena_section`) document how they follow
  and where they differ from the original protocols. Their numbers are "-style": the papers' data, judges and exact
  prompts are not reproduced, so do not put them in a table next to published DCScore / CaptionQA / CapArena values.

Every judge call goes through `balcaprl.judge.JudgeClient`, so an interrupted evaluation re-run with the same
``judge_cache_dir`` only pays for the calls that had not been answered.

Files written in ``output_dir``: ``report.json`` (every number, plus per-caption values), ``report.md`` (tables),
``length.png`` (word counts; ρ with the [0.5, 2] window marked) and ``metrics.png`` (bars, ×100); by the generation
half also ``captions.jsonl`` and ``generation.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime
import inspect
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balcaprl.judge import JudgeClient, image_message_part

logger = logging.getLogger(__name__)

__all__ = [
    "balcap_section",
    "caparena_section",
    "captionqa_section",
    "classic_section",
    "close_meteor",
    "compare_reports",
    "dcscore_section",
    "evaluate_captions",
    "evaluate_captions_async",
    "generate_and_evaluate",
    "harmonic_mean",
    "java_available",
    "length_section",
    "LENGTH_WINDOW",
    "load_captions",
    "load_questions",
    "main",
    "ptb_tokenize",
    "summary_metrics",
    "write_report",
]

REPORT_FORMAT_VERSION = 1
PROMPT_VERSION = "v1"
LENGTH_WINDOW = (0.5, 2.0)
BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
CLASSIC_NAMES = (*BLEU_NAMES, "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
ARENA_VERDICTS = ("A", "B", "tie")
UNKNOWN_ANSWER = "unknown"
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

ImageLike = Any  # a PIL image, a path, encoded bytes or a data URL: whatever `image_message_part` accepts


# ------------------------------------------------------------------------------------------------------------ records


RECORD_KEYS = ("id", "caption", "references", "image")
# Keyword names a reward function receives from the harness itself; a record's extra column may not take them.
_REWARD_ARGUMENTS = ("prompts", "completions", "log_extra")


@dataclass(frozen=True)
class _Record:
    id: str
    caption: str
    references: tuple[str, ...]
    image: ImageLike | None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # other columns, e.g. a world `scene`


def _as_records(captions: Sequence[Mapping[str, Any]], what: str = "captions") -> list[_Record]:
    """Validated records; ids become strings; keys besides `RECORD_KEYS` are kept as extra columns (reward
    functions get them as keyword arguments); errors name the record."""
    records, seen = [], set()
    for index, item in enumerate(captions):
        if isinstance(item, _Record):
            item = {
                **item.extra,
                "id": item.id,
                "caption": item.caption,
                "references": item.references,
                "image": item.image,
            }
        if not isinstance(item, Mapping) or "id" not in item or "caption" not in item:
            raise ValueError(f"{what}[{index}] must be a mapping with at least 'id' and 'caption', got {item!r:.200}.")
        record_id = str(item["id"])
        if record_id in seen:
            raise ValueError(f"{what}: id {record_id!r} appears twice; ids must be unique (one caption per image).")
        seen.add(record_id)
        caption = item["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"{what}: the caption of id {record_id!r} is {type(caption).__name__}, not a string.")
        references = item.get("references") or ()
        if isinstance(references, str):
            references = (references,)
        if not all(isinstance(reference, str) for reference in references):
            raise ValueError(f"{what}: the references of id {record_id!r} must be strings.")
        extra = {key: value for key, value in item.items() if key not in RECORD_KEYS}
        clashing = [key for key in extra if key in _REWARD_ARGUMENTS]
        if clashing:
            raise ValueError(f"{what}: id {record_id!r} has keys {clashing}, reserved for reward arguments.")
        records.append(_Record(record_id, caption, tuple(references), item.get("image"), extra))
    return records


def _require_references(records: Sequence[_Record], sections: str) -> None:
    for record in records:
        if not any(reference.split() for reference in record.references):
            raise ValueError(
                f"Caption id {record.id!r} has no non-empty reference; {sections} need at least one per caption "
                "(or switch those sections off)."
            )


def _read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
            rows.append((number, row))
    return rows


def load_captions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Caption records from a JSONL file, one ``{"id", "caption", "references", "image"?}`` object per line.

    ``id`` becomes a string; ``references`` may be one string or a list; ``image`` (optional) is a path, relative
    paths being resolved against the file's folder (so a captions file can sit next to its images). Other keys (e.g.
    the ``scene`` graph the exact world rewards read) are kept as they are. Errors name the line.
    """
    folder = Path(path).resolve().parent
    records = []
    for number, row in _read_jsonl(path):
        missing = [key for key in ("id", "caption") if key not in row]
        if missing:
            raise ValueError(f"{path}, line {number}: missing {missing} (need 'id' and 'caption').")
        record = {key: value for key, value in row.items() if key not in RECORD_KEYS}
        record.update(id=str(row["id"]), caption=row["caption"], references=row.get("references") or [])
        if isinstance(record["references"], str):
            record["references"] = [record["references"]]
        image = row.get("image")
        if image is not None:
            image_path = Path(image).expanduser()
            image_path = image_path if image_path.is_absolute() else folder / image_path
            if not image_path.is_file():
                raise ValueError(f"{path}, line {number}: image {image!r} not found (looked for {image_path}).")
            record["image"] = str(image_path)
        records.append(record)
    _as_records(records, what=str(path))  # validates types and duplicate ids, naming the file
    return records


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


def load_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """CaptionQA-style questions from JSONL: ``{"id": image id, "question", "choices": [...], "answer", "category"?}``.

    ``answer`` is the 0-based index of the correct choice, its exact text, or its letter ("A" = first); it is
    normalised to ``answer_index``. ``category`` (optional) is a string or a list of strings. Errors name the line.
    """
    return [_question(row, f"{path}, line {number}") for number, row in _read_jsonl(path)]


def _question(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One validated question; idempotent (a normalised question, with ``answer_index``, passes unchanged)."""
    if "answer" not in row and "answer_index" in row:
        row = {**row, "answer": int(row["answer_index"]), "category": row.get("categories")}
    missing = [key for key in ("id", "question", "choices", "answer") if key not in row]
    if missing:
        raise ValueError(f"{where}: missing {missing} (need 'id', 'question', 'choices', 'answer').")
    choices = row["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise ValueError(f"{where}: 'choices' must be a list of 2 to {len(CHOICE_LETTERS)} strings.")
    choices = [str(choice) for choice in choices]
    answer_index = _answer_index(row["answer"], choices)
    if answer_index is None:
        raise ValueError(
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


# --------------------------------------------------------------------------------------------------------------- math


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """n / Σ 1/v — 0 if any value is 0 (its limit), None if any value is None or the list is empty."""
    if not values or any(value is None for value in values):
        return None
    if any(value < 0 for value in values):
        raise ValueError(f"The harmonic mean is defined here for values >= 0, got {list(values)}.")
    if any(value == 0 for value in values):
        return 0.0
    return len(values) / sum(1.0 / value for value in values)


def _mean_of_scored(values: Sequence[float | None]) -> dict[str, Any]:
    scored = [value for value in values if value is not None]
    return {
        "mean": sum(scored) / len(scored) if scored else None,
        "scored": len(scored),
        "unscorable": len(values) - len(scored),
    }


def _finite(value: Any) -> Any:
    """JSON-safe copy: numpy scalars become floats, NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------ classic (coco-eval)


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (the PTB tokenizer, METEOR and SPICE need one)."""
    return shutil.which("java") is not None


def _spice_missing_reason() -> str | None:
    """None if SPICE can run offline, else why not."""
    from pycocoevalcap.spice import get_stanford_models

    library = Path(get_stanford_models.__file__).resolve().parent / get_stanford_models.SPICELIB
    jars = [library / f"{get_stanford_models.JAR}.jar", library / f"{get_stanford_models.JAR}-models.jar"]
    missing = [jar.name for jar in jars if not jar.is_file()]
    if missing:
        return (
            f"SPICE skipped: its Stanford CoreNLP jars {missing} are not in {library}, and pycocoevalcap would "
            "download them at run time (run `python -m pycocoevalcap.spice.get_stanford_models` once with network)."
        )
    return None


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """coco-caption's tokenisation: Stanford PTBTokenizer (Java, lower-cased) then punctuation tokens removed.

    The same jar, flags and punctuation list as ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``, with three
    differences that make it safe rather than different: the temporary input file goes to a private temporary
    directory (pycocoevalcap writes it into its own package folder, which fails on a read-only install); every run
    of whitespace (newlines, U+2028, ...) becomes one space, so one text is always one line; and the file is read
    and written as UTF-8 (``-encoding UTF-8``) instead of the JVM's locale default. Empty texts are not sent.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).resolve().parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    lines = [" ".join(text.split()) for text in texts]
    to_send = [index for index, line in enumerate(lines) if line]
    tokenized = [""] * len(lines)
    if not to_send:
        return tokenized
    with tempfile.TemporaryDirectory(prefix="balcaprl-ptb-") as folder:
        source = Path(folder) / "sentences.txt"
        source.write_text("\n".join(lines[index] for index in to_send), encoding="utf-8")
        command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        result = subprocess.run([*command, "-encoding", "UTF-8", str(source)], capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"The PTB tokenizer failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    output = result.stdout.decode("utf-8").split("\n")
    if len(output) < len(to_send):
        raise RuntimeError(f"The PTB tokenizer returned {len(output)} lines for {len(to_send)} texts.")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    for index, line in zip(to_send, output):
        tokenized[index] = " ".join(token for token in line.rstrip().split(" ") if token and token not in punctuation)
    return tokenized


_meteor_lock = threading.Lock()
_meteor: Any = None  # the process's pycocoevalcap METEOR scorer, see _shared_meteor


def _shared_meteor() -> Any:
    """pycocoevalcap's METEOR scorer, started once per process and then reused.

    Its JVM needs ~6 s (2 cores) to load the paraphrase tables, then scores a batch in milliseconds: a loop that
    evaluates checkpoints pays the start once. The scorer serialises calls with its own lock (thread-safe). It is
    stopped by `close_meteor` and at interpreter exit; a dead or broken one is replaced on the next call.
    """
    global _meteor
    from pycocoevalcap.meteor.meteor import Meteor

    with _meteor_lock:
        if _meteor is None or _meteor.meteor_p.poll() is not None:
            if _meteor is None:
                atexit.register(close_meteor)
            _meteor = Meteor()
        return _meteor


def close_meteor() -> None:
    """Stop the shared METEOR JVM (it holds up to 2 GB of heap); the next evaluation starts a new one."""
    global _meteor
    with _meteor_lock:
        meteor, _meteor = _meteor, None
    if meteor is None:
        return
    process = meteor.meteor_p
    with meteor.lock:
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        process.kill()
        process.wait()


def classic_section(captions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and (when possible) SPICE by pycocoevalcap: ``{"metrics", "per_caption",
    "tokenizer", "skipped", "notes"}``. Scores are corpus-level as pycocoevalcap computes them (BLEU over the corpus,
    the others averaged over images), as fractions (papers print them ×100).

    Without Java: a warning, METEOR and SPICE skipped, the others on `simple_tokenize` text (``tokenizer: "simple"``).
    METEOR's JVM is started once per process and reused (`close_meteor` stops it).
    Temporary files: the PTB tokenizer's go to a private temporary directory (`ptb_tokenize`); METEOR writes none;
    SPICE (only when its jars are present) writes uniquely named files in pycocoevalcap's ``spice/tmp`` and shares an
    LMDB cache in ``spice/cache`` — concurrent runs are safe but need that folder writable.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    records = _as_records(captions)
    _require_references(records, "classic metrics")
    notes: list[str] = []
    skipped: dict[str, str] = {}
    has_java = java_available()
    if has_java:
        _shared_meteor()  # a first start loads the JVM while the tokenizer and BLEU run
        tokenizer_name = "ptb"
    else:
        message = (
            "java is not on PATH: METEOR and SPICE skipped, and BLEU / ROUGE-L / CIDEr-D use a simple tokenizer "
            "(lower-case, punctuation removed) instead of the PTB tokenizer, so they are not comparable with "
            "published COCO numbers. Install a JRE (e.g. `apt-get install default-jre-headless`) for the standard "
            "protocol."
        )
        logger.warning(message)
        notes.append(message)
        skipped["METEOR"] = "java is not on PATH"
        skipped["SPICE"] = "java is not on PATH"
        tokenizer_name = "simple"

    texts = [record.caption for record in records] + [ref for record in records for ref in record.references]
    if has_java:
        tokenized = ptb_tokenize(texts)
    else:
        from balcaprl.rewards.cider import simple_tokenize

        tokenized = [" ".join(simple_tokenize(text)) for text in texts]
    candidates, references = tokenized[: len(records)], iter(tokenized[len(records) :])
    res = {record.id: [candidates[index]] for index, record in enumerate(records)}
    gts = {record.id: [next(references) for _ in record.references] for record in records}

    metrics: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    bleu, bleu_per_caption = Bleu(4).compute_score(gts, res, verbose=0)
    for order, name in enumerate(BLEU_NAMES):
        metrics[name], per_metric[name] = float(bleu[order]), [float(v) for v in bleu_per_caption[order]]
    if has_java:
        try:
            score, scores = _shared_meteor().compute_score(gts, res)
            metrics["METEOR"], per_metric["METEOR"] = float(score), [float(v) for v in scores]
        except Exception as error:  # a crashed JVM: report it, drop the process, keep the other metrics
            close_meteor()
            skipped["METEOR"] = f"METEOR failed: {type(error).__name__}: {error}"
            notes.append(skipped["METEOR"])
    score, scores = Rouge().compute_score(gts, res)
    metrics["ROUGE-L"], per_metric["ROUGE-L"] = float(score), [float(v) for v in scores]
    score, scores = Cider().compute_score(gts, res)
    metrics["CIDEr-D"], per_metric["CIDEr-D"] = float(score), [float(v) for v in scores]

    if has_java:
        reason = _spice_missing_reason()
        if reason is None:
            from pycocoevalcap.spice.spice import Spice

            score, scores = Spice().compute_score(gts, res)
            by_id = dict(zip(sorted(gts), scores))  # SPICE returns its scores in sorted-id order
            metrics["SPICE"] = float(score)
            per_metric["SPICE"] = [float(by_id[record.id]["All"]["f"]) for record in records]
        else:
            skipped["SPICE"] = reason
            notes.append(reason)

    per_caption = {
        record.id: {name: values[index] for name, values in per_metric.items()} for index, record in enumerate(records)
    }
    return {
        "metrics": metrics,
        "per_caption": per_caption,
        "tokenizer": tokenizer_name,
        "skipped": skipped,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------------------- length


def length_section(captions: Sequence[Mapping[str, Any]], window: tuple[float, float] = LENGTH_WINDOW) -> dict:
    """Word counts, ρ = words / mean reference words (`balcaprl.length.length_ratios`) and the share outside
    ``window`` (`balcaprl.length.length_conditional_mask`, bounds inclusive inside). Records without a non-empty
    reference get no ρ and are counted in ``no_reference``."""
    from balcaprl.length import length_conditional_mask, length_ratios, word_length

    records = _as_records(captions)
    words = [word_length(record.caption) for record in records]
    with_reference = [record for record in records if any(reference.split() for reference in record.references)]
    section: dict[str, Any] = {
        "unit": "words",
        "window": list(window),
        "words_mean": statistics.fmean(words) if words else None,
        "words_median": statistics.median(words) if words else None,
        "words_min": min(words, default=None),
        "words_max": max(words, default=None),
        "no_reference": len(records) - len(with_reference),
        "per_caption": {record.id: {"words": count} for record, count in zip(records, words)},
    }
    if with_reference:
        ratios = length_ratios(
            [record.caption for record in with_reference],
            [[reference for reference in record.references if reference.split()] for record in with_reference],
        )
        keep = length_conditional_mask(ratios, *window)
        reference_words = [
            statistics.fmean(word_length(r) for r in record.references if r.split()) for record in with_reference
        ]
        section.update(
            reference_words_mean=statistics.fmean(reference_words),
            ratio_mean=float(ratios.mean()),
            ratio_median=statistics.median(ratios.tolist()),  # torch's median of an even count is the lower one
            below_window=float((ratios < window[0]).double().mean()),
            above_window=float((ratios > window[1]).double().mean()),
            outside_window=float((~keep).double().mean()),
        )
        for record, ratio, reference_length in zip(with_reference, ratios.tolist(), reference_words):
            section["per_caption"][record.id].update(ratio=ratio, reference_words=reference_length)
    return section


# -------------------------------------------------------------------------------------------------- BalCapRL (judge)


async def _call_reward(
    function: Callable, records: Sequence[_Record], rows: Sequence[int]
) -> tuple[list[float | None], dict[str, dict[int, Any]]]:
    """Scores of ``records[rows]`` by a TRL reward function (sync or async), as a list over every record (None
    elsewhere), and what it logged through ``log_extra`` (column → {record index: value}).

    The function gets TRL's arguments: ``prompts``, ``completions`` (the captions), ``log_extra``, and the columns
    ``image``, ``references`` (the non-empty ones) and every extra column of the records, one entry per caption.
    """
    scores: list[float | None] = [None] * len(records)
    logged: dict[str, dict[int, Any]] = {}
    if not rows:
        return scores, logged
    chosen = [records[index] for index in rows]
    columns: dict[str, list] = {
        "image": [record.image for record in chosen],
        "references": [[reference for reference in record.references if reference.split()] for record in chosen],
    }
    for column in dict.fromkeys(key for record in chosen for key in record.extra):
        columns[column] = [record.extra.get(column) for record in chosen]

    def log_extra(column: str, values: Sequence[Any]) -> None:
        logged[column] = dict(zip(rows, values))

    captions = [record.caption for record in chosen]
    found = function(prompts=[None] * len(rows), completions=captions, log_extra=log_extra, **columns)
    if inspect.isawaitable(found):
        found = await found
    found = list(found)
    if len(found) != len(rows):
        name = _reward_name(function)
        raise ValueError(f"The reward {name!r} returned {len(found)} scores for {len(rows)} captions.")
    for index, score in zip(rows, found):
        value = None if score is None else float(score)
        scores[index] = None if value is None or math.isnan(value) else value
    return scores, logged


def _reward_name(function: Any) -> str:
    return getattr(function, "__name__", type(function).__name__)


async def balcap_section(
    records: Sequence[Mapping[str, Any]],
    judge: JudgeClient | None = None,
    recall: Any = None,
    *,
    rewards: Sequence[Callable] | None = None,
) -> dict[str, Any]:
    """Mean precision P, recall R, linguistic L and b-CapScore, scored by the training rewards.

    By default the judge rewards (`PrecisionReward`, `RecallReward`, `LinguisticReward` on ``judge``); precision
    needs the image, so records without one are not scored for it (``precision.no_image``). ``recall`` lets another
    section share the recall reward object (and its decomposed references).

    ``rewards=(precision, recall, linguistic)`` puts any three TRL reward functions in the judges' place — e.g. the
    exact rewards of the synthetic world, ``(WorldPrecision(), WorldRecall(), WorldLinguistic())``, which read each
    record's ``scene`` column. Each is called once on every record with the columns ``image``, ``references`` and
    the records' extra columns as keyword arguments; no judge is needed. ``scorers`` in the section names them.

    b-CapScore = H(P̄, R̄, L̄) over the scored captions of each metric (harmonic mean; 0 if any mean is 0; None if a
    metric scored nothing, e.g. precision when no record has an image). Per caption, ``b_capscore`` is H(P, R, L) of
    that caption, and the sub-scores the rewards log (``precision/assertions``, ``world_recall/covered``, ...) are
    kept.
    """
    records = _as_records(records)
    everything = list(range(len(records)))
    if rewards is None:
        from balcaprl.rewards.judged import LinguisticReward, PrecisionReward, RecallReward

        if judge is None:
            raise ValueError("balcap_section needs a judge, or rewards=(precision, recall, linguistic) functions.")
        functions = [PrecisionReward(judge), recall if recall is not None else RecallReward(judge)]
        functions.append(LinguisticReward(judge))
        precision_rows = [index for index, record in enumerate(records) if record.image is not None]
    else:
        functions = list(rewards)
        if len(functions) != 3 or not all(callable(function) for function in functions):
            raise ValueError(f"rewards must be three reward functions (precision, recall, linguistic): {rewards!r}.")
        precision_rows = everything
    outcomes = await asyncio.gather(
        _call_reward(functions[0], records, precision_rows),
        _call_reward(functions[1], records, everything),
        _call_reward(functions[2], records, everything),
    )
    (precision_values, _), (recall_values, _), (linguistic_values, _) = outcomes
    precision_summary = _mean_of_scored([precision_values[index] for index in precision_rows])
    if rewards is None:
        precision_summary["no_image"] = len(records) - len(precision_rows)
    section = {
        "precision": precision_summary,
        "recall": _mean_of_scored(recall_values),
        "linguistic": _mean_of_scored(linguistic_values),
    }
    means = [section[name]["mean"] for name in ("precision", "recall", "linguistic")]
    section["b_capscore"] = harmonic_mean(means)
    section["scorers"] = dict(zip(("precision", "recall", "linguistic"), map(_reward_name, functions)))
    section["prompt_version"] = getattr(functions[0], "prompt_version", None)
    per_caption: dict[str, dict[str, Any]] = {}
    for index, record in enumerate(records):
        values = [precision_values[index], recall_values[index], linguistic_values[index]]
        per_caption[record.id] = dict(
            precision=values[0], recall=values[1], linguistic=values[2], b_capscore=harmonic_mean(values)
        )
    for _, logged in outcomes:
        for column, values in logged.items():
            for index, value in values.items():
                per_caption[records[index].id][column] = value
    section["per_caption"] = per_caption
    return section


# --------------------------------------------------------------------------------------------------- DCScore-style


def _dcscore_verify_schema(num_units: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "correct": {"type": "array", "items": {"type": "boolean"}, "minItems": num_units, "maxItems": num_units}
        },
        "required": ["correct"],
    }


async def _dcscore_one(record: _Record, judge: JudgeClient, recall: Any, template: str) -> dict[str, Any]:
    """P, R, F1 of one caption; a component is None when a judge call it needs failed."""
    references = [reference for reference in record.references if reference.split()]
    reference_units = dict(zip(references, await asyncio.gather(*(recall.units(ref) for ref in references))))
    recall_score, _, _ = await recall.score(record.caption, references, reference_units)

    evidence = "image" if record.image is not None else "references"
    caption_units = await recall.units(record.caption) if record.caption.strip() else []
    correct: int | None
    if caption_units is None:
        correct = None
    elif not caption_units:
        correct = 0
    elif record.image is not None:
        numbered = "\n".join(f"{index}. {unit}" for index, unit in enumerate(caption_units, start=1))
        messages = [
            {
                "role": "user",
                "content": [
                    image_message_part(record.image),
                    {"type": "text", "text": template.format(units=numbered, count=len(caption_units))},
                ],
            }
        ]
        answer = await judge.complete_json(
            messages, _dcscore_verify_schema(len(caption_units)), cache_key_extra=f"dcscore_verify_{PROMPT_VERSION}"
        )
        correct = None if answer is None else sum(answer["correct"])
    else:
        # No image: a caption unit counts as correct when the references state or imply it (recall_verify prompt
        # with the references as the "description"). This is DCScore's matching step without its image check.
        correct = await recall.covered("\n".join(references), caption_units) if references else None
    precision_score = None
    if correct is not None:
        precision_score = correct / len(caption_units) if caption_units else 0.0
    f1 = None
    if precision_score is not None and recall_score is not None:
        f1 = harmonic_mean([precision_score, recall_score])
    return {
        "precision": precision_score,
        "recall": recall_score,
        "f1": f1,
        "caption_units": None if caption_units is None else len(caption_units),
        "correct_units": correct,
        "evidence": evidence,
    }


async def dcscore_section(
    records: Sequence[Mapping[str, Any]], judge: JudgeClient, recall: Any = None
) -> dict[str, Any]:
    """DCScore-style precision / recall / F1 over primitive units.

    Original (DCScore, Ye et al., "Painting with Words", ICLR 2025, arXiv 2503.07906): GPT-4o decomposes the caption
    and the detailed human reference into primitive information units, matches caption units to reference units and
    verifies the rest against the image; precision = correct caption units / caption units, recall = reference units
    the caption covers / reference units; the score combines the two as an F1.

    Here, with any judge and the prompts of `balcaprl.rewards.judged`:

    - decomposition: the caption and each reference are split by the ``recall_decompose`` prompt (the recall reward's;
      references are decomposed once and shared with the BalCapRL recall);
    - precision: every caption unit is checked against the image by a vision judge (``dcscore_verify`` prompt) —
      there is no matching step that credits units through the reference first. A record without an image falls back
      to checking the caption units against its references (``recall_verify`` prompt), which under-counts correct
      details the references omit; ``evidence`` says which was used per caption and ``evidence_counts`` overall;
    - recall: exactly the BalCapRL recall (reference units covered by the caption; the mean over several references),
      so its judge calls are cache hits when the balcap section runs too;
    - aggregation: ``precision`` and ``recall`` are means over scored captions, ``f1`` = H(P̄, R̄) (the headline,
      like b-CapScore) and ``f1_mean`` the mean of per-caption F1s. An empty caption has no units: P = R = 0.
      The original's judge, prompts and unit-matching details are not reproduced.
    """
    from balcaprl.rewards.judged import RecallReward, load_prompt

    records = _as_records(records)
    recall = recall if recall is not None else RecallReward(judge)
    template = load_prompt("dcscore_verify", PROMPT_VERSION)
    results = await asyncio.gather(*(_dcscore_one(record, judge, recall, template) for record in records))
    precision_summary = _mean_of_scored([result["precision"] for result in results])
    recall_summary = _mean_of_scored([result["recall"] for result in results])
    f1_summary = _mean_of_scored([result["f1"] for result in results])
    evidence_counts = {"image": 0, "references": 0}
    for result in results:
        evidence_counts[result["evidence"]] += 1
    return {
        "precision": precision_summary,
        "recall": recall_summary,
        "f1": harmonic_mean([precision_summary["mean"], recall_summary["mean"]]),
        "f1_mean": f1_summary["mean"],
        "f1_scored": f1_summary["scored"],
        "evidence_counts": evidence_counts,
        "prompt_version": PROMPT_VERSION,
        "per_caption": {
            record.id: {f"dcscore/{key}": value for key, value in result.items()}
            for record, result in zip(records, results)
        },
    }


# ------------------------------------------------------------------------------------------------- CaptionQA-style


def _captionqa_schema(num_choices: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": [*CHOICE_LETTERS[:num_choices], UNKNOWN_ANSWER]}},
        "required": ["answer"],
    }


async def captionqa_section(
    records: Sequence[Mapping[str, Any]], questions: Sequence[Mapping[str, Any]], judge: JudgeClient
) -> dict[str, Any]:
    """CaptionQA-style utility: a text-only judge answers multiple-choice questions from the caption alone.

    Original (CaptionQA, Yang et al., arXiv 2511.21025): 33,027 multiple-choice questions about images of four
    domains (natural, document, e-commerce, embodied AI), each tagged with categories of a domain taxonomy; an LLM
    that never sees the image answers them from the caption; the score is the accuracy, overall and per category.

    Here: the questions come from the user (`load_questions`; CaptionQA's own files fit: answer given as choice text,
    category as a list); any judge; our prompt (``captionqa_v1``) lists the choices as letters and lets the judge
    answer ``"unknown"`` when the caption does not settle it — an abstention, scored as wrong and counted in
    ``abstained`` (the original's handling of unanswerable questions and its answer extraction are not reproduced).
    Accuracy = correct / answered, where answered excludes judge failures (counted in ``failed``); questions whose
    image id has no caption are not asked and are counted in ``no_caption``. A question with several categories
    counts toward each.
    """
    from balcaprl.rewards.judged import load_prompt

    records = _as_records(records)
    questions = [_question(row, f"questions[{index}]") for index, row in enumerate(questions)]
    template = load_prompt("captionqa", PROMPT_VERSION)
    caption_by_id = {record.id: record.caption for record in records}
    asked = [question for question in questions if question["id"] in caption_by_id]

    async def ask(question: Mapping[str, Any]) -> str | None:
        choices = "\n".join(f"{CHOICE_LETTERS[index]}. {choice}" for index, choice in enumerate(question["choices"]))
        prompt = template.format(caption=caption_by_id[question["id"]], question=question["question"], choices=choices)
        answer = await judge.complete_json(
            [{"role": "user", "content": prompt}],
            _captionqa_schema(len(question["choices"])),
            cache_key_extra=f"captionqa_{PROMPT_VERSION}",
        )
        return None if answer is None else answer["answer"]

    answers = await asyncio.gather(*(ask(question) for question in asked))

    def tally() -> dict[str, int]:
        return {"questions": 0, "answered": 0, "correct": 0, "abstained": 0, "failed": 0}

    overall, by_category, by_caption = tally(), {}, {}
    for question, answer in zip(asked, answers):
        buckets = [overall, by_caption.setdefault(question["id"], tally())]
        buckets += [by_category.setdefault(category, tally()) for category in question["categories"]]
        for bucket in buckets:
            bucket["questions"] += 1
            if answer is None:
                bucket["failed"] += 1
                continue
            bucket["answered"] += 1
            bucket["abstained"] += answer == UNKNOWN_ANSWER
            bucket["correct"] += answer == CHOICE_LETTERS[question["answer_index"]]

    def with_accuracy(bucket: dict[str, int]) -> dict[str, Any]:
        return {**bucket, "accuracy": bucket["correct"] / bucket["answered"] if bucket["answered"] else None}

    return {
        **with_accuracy(overall),
        "no_caption": len(questions) - len(asked),
        "per_category": {name: with_accuracy(bucket) for name, bucket in sorted(by_category.items())},
        "prompt_version": PROMPT_VERSION,
        "per_caption": {
            record_id: {
                "captionqa/accuracy": with_accuracy(bucket)["accuracy"],
                "captionqa/questions": bucket["questions"],
            }
            for record_id, bucket in by_caption.items()
        },
    }


# -------------------------------------------------------------------------------------------------- CapArena-style

ARENA_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": list(ARENA_VERDICTS)}},
    "required": ["winner"],
}


async def _arena_verdict(
    judge: JudgeClient, template: str, caption_a: str, caption_b: str, image: Any, references: Sequence[str]
) -> str | None:
    if image is not None:
        context = "The image is shown above."
    else:
        context = "You cannot see the image; judge from the reference description(s) below."
    reference_block = ""
    if references:
        quoted = "\n".join(f'"""{reference}"""' for reference in references)
        reference_block = (
            "\nReference description(s) written by people (they can miss details, so a detail absent from them is "
            f"not necessarily wrong):\n{quoted}\n"
        )
    text = template.format(context=context, references=reference_block, caption_a=caption_a, caption_b=caption_b)
    content: Any = text if image is None else [image_message_part(image), {"type": "text", "text": text}]
    answer = await judge.complete_json(
        [{"role": "user", "content": content}], ARENA_SCHEMA, cache_key_extra=f"arena_{PROMPT_VERSION}"
    )
    return None if answer is None else answer["winner"]


async def _battle(judge: JudgeClient, template: str, record: _Record, baseline: _Record) -> dict[str, Any]:
    """Both orders of one pair; outcome +1 / −1 / 0 from the evaluated system's side, None if a call failed."""
    image = record.image if record.image is not None else baseline.image
    references = record.references
    if references != baseline.references:  # a symmetric choice, so that swapping the systems sends the same prompts
        references = tuple(sorted(set(record.references) | set(baseline.references)))
    references = [reference for reference in references if reference.split()]
    first, second = await asyncio.gather(
        _arena_verdict(judge, template, record.caption, baseline.caption, image, references),
        _arena_verdict(judge, template, baseline.caption, record.caption, image, references),
    )
    if first is None or second is None:
        outcome = None
    elif first == "A" and second == "B":
        outcome = 1
    elif first == "B" and second == "A":
        outcome = -1
    else:
        outcome = 0
    return {"outcome": outcome, "verdicts": [first, second]}


async def caparena_section(
    records: Sequence[Mapping[str, Any]],
    baseline: Sequence[Mapping[str, Any]],
    judge: JudgeClient,
    baseline_name: str = "baseline",
) -> dict[str, Any]:
    """CapArena-style pairwise battles against a baseline's captions of the same images.

    Original (CapArena-Auto, Cheng et al., Findings of ACL 2025, arXiv 2503.12329): 600 images; each model's caption
    battles the captions of three baselines (GPT-4o, CogVLM-19B, MiniCPM-8B); a GPT-4o judge sees the image, the
    human reference caption and the two captions; a win scores +1, a loss −1, a draw 0, summed per baseline into
    [−600, 600].

    Here, with any judge: the image when the record has one (else a text-only judge decides from the references),
    the references when present, our prompt (``arena_v1``), one baseline per call. Each pair is judged TWICE, the
    second time with positions swapped, to cancel the judge's position bias; a battle is a win only when both orders
    prefer our caption, a loss only when both prefer the baseline's, and a draw otherwise (a tie verdict, or two
    orders that disagree — a judge that always says "A" yields only draws). Double judging is our choice; check the
    official CapArena code if you need parity with it. The two calls of a pair are the same whichever system is
    called "ours", so swapping the systems negates the score exactly (with a deterministic or cached judge).
    score = wins − losses ∈ [−N, N] over the N battles judged; pairs with a failed call are not counted (``failed``);
    ids without a baseline caption are not battled (``no_baseline``). ``position_consistent`` counts battles whose
    two verdicts named the same position (a sign of position bias).
    """
    from balcaprl.rewards.judged import load_prompt

    records, baseline = _as_records(records), _as_records(baseline, what="baseline")
    template = load_prompt("arena", PROMPT_VERSION)
    baseline_by_id = {record.id: record for record in baseline}
    paired = [record for record in records if record.id in baseline_by_id]
    if not paired:
        raise ValueError("No caption id has a baseline caption: the baseline must caption the same image ids.")
    battles = await asyncio.gather(*(_battle(judge, template, record, baseline_by_id[record.id]) for record in paired))
    outcomes = [battle["outcome"] for battle in battles]
    wins, losses = outcomes.count(1), outcomes.count(-1)
    judged = sum(outcome is not None for outcome in outcomes)
    return {
        "baseline": baseline_name,
        "score": wins - losses,
        "battles": judged,
        "normalized_score": (wins - losses) / judged if judged else None,
        "wins": wins,
        "losses": losses,
        "draws": outcomes.count(0),
        "failed": len(outcomes) - judged,
        "no_baseline": len(records) - len(paired),
        "position_consistent": sum(
            battle["verdicts"][0] == battle["verdicts"][1] != "tie"
            for battle in battles
            if battle["outcome"] is not None
        ),
        "prompt_version": PROMPT_VERSION,
        "per_caption": {
            record.id: {"caparena/outcome": battle["outcome"], "caparena/verdicts": battle["verdicts"]}
            for record, battle in zip(paired, battles)
        },
    }


# ------------------------------------------------------------------------------------------------------- entry point


def _balcap_notes(section: Mapping[str, Any]) -> list[str]:
    """What a reader of the balcap numbers must know: captions left out of a mean, and why."""
    notes = []
    no_image = section["precision"].get("no_image", 0)
    if no_image:
        notes.append(
            f"Precision (and so b-CapScore) needs the image: {no_image} record(s) without one were not scored for "
            "precision."
        )
    for metric in ("precision", "recall", "linguistic"):
        entry = section[metric]
        if not entry["unscorable"]:
            continue
        attempted = entry["scored"] + entry["unscorable"]
        text = (
            f"{metric}: {entry['unscorable']} of {attempted} caption(s) could not be scored (judge calls failed "
            "after their retries; see the log) and are left out of its mean."
        )
        if metric == "precision" and not entry["scored"] and "no_image" in entry:
            text += (
                " No precision call succeeded: precision shows the judge the image, so it needs a vision (MLLM) judge;"
                " a text-only server (e.g. llama.cpp without --mmproj) rejects image parts. With a text-only judge,"
                " leave images out (`--judge-text-only`) to skip precision."
            )
        notes.append(text)
    return notes


def _load_maybe(value: Any, loader: Any) -> Any:
    return loader(value) if isinstance(value, (str, os.PathLike)) else value


async def evaluate_captions_async(
    captions: Sequence[Mapping[str, Any]] | str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    judge: JudgeClient | None = None,
    classic: bool = True,
    balcap: bool = True,
    dcscore: bool = False,
    captionqa_questions: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None,
    baseline_captions: Sequence[Mapping[str, Any]] | str | os.PathLike | None = None,
    name: str | None = None,
    baseline_name: str = "baseline",
    plots: bool = True,
    balcap_rewards: Sequence[Callable] | None = None,
    generation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`evaluate_captions` for callers already inside an event loop; the judge is left open (the caller owns it)."""
    caption_rows = _load_maybe(captions, load_captions)
    records = _as_records(caption_rows)
    if not records:
        raise ValueError("No captions to evaluate.")
    needs_judge = {
        "dcscore=True": dcscore,
        "captionqa_questions": captionqa_questions is not None,
        "baseline_captions": baseline_captions is not None,
    }
    if judge is None and any(needs_judge.values()):
        wanted = [key for key, value in needs_judge.items() if value]
        raise ValueError(f"{wanted} need a judge: pass judge=JudgeClient(...) (see balcaprl.judge).")
    if classic or dcscore or (balcap and judge is not None and balcap_rewards is None):
        _require_references(records, "classic metrics, BalCapRL recall and DCScore")
    questions = None
    if captionqa_questions is not None:
        questions = _load_maybe(captionqa_questions, load_questions)
        questions = [_question(row, f"captionqa_questions[{index}]") for index, row in enumerate(questions)]
    baseline = None
    if baseline_captions is not None:
        baseline = _as_records(_load_maybe(baseline_captions, load_captions), what="baseline_captions")

    notes: list[str] = []
    report: dict[str, Any] = {
        "format_version": REPORT_FORMAT_VERSION,
        "name": name or "model",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_captions": len(records),
        "judge": None if judge is None else {"base_url": judge.base_url, "model": judge.model},
        "notes": notes,
    }
    if generation is not None:
        report["generation"] = dict(generation)
    counter_names = ("requests", "retries", "failures", "cache_hits")
    counters_before = {} if judge is None else {counter: getattr(judge, counter) for counter in counter_names}

    classic_task = None
    if classic:
        try:
            import pycocoevalcap.bleu.bleu  # noqa: F401  (a namespace package: import a real module)
        except ImportError:
            notes.append("Classic metrics skipped: pycocoevalcap is not installed (pip install pycocoevalcap).")
        else:
            rows = [{"id": r.id, "caption": r.caption, "references": list(r.references)} for r in records]
            classic_task = asyncio.ensure_future(asyncio.to_thread(classic_section, rows))  # JVMs run meanwhile
    if balcap and judge is None and balcap_rewards is None:
        notes.append(
            "BalCapRL metrics skipped: no judge given (pass judge=JudgeClient(...), or balcap_rewards=(precision, "
            "recall, linguistic) reward functions)."
        )

    judge_tasks: dict[str, Any] = {}
    if balcap and balcap_rewards is not None:
        judge_tasks["balcap"] = balcap_section(records, rewards=balcap_rewards)
    if judge is not None:
        from balcaprl.rewards.judged import RecallReward

        shared_recall = RecallReward(judge)  # one object: each reference is decomposed once for both sections
        if balcap and balcap_rewards is None:
            judge_tasks["balcap"] = balcap_section(records, judge, shared_recall)
        if dcscore:
            judge_tasks["dcscore"] = dcscore_section(records, judge, shared_recall)
        if questions is not None:
            judge_tasks["captionqa"] = captionqa_section(records, questions, judge)
        if baseline is not None:
            judge_tasks["caparena"] = caparena_section(records, baseline, judge, baseline_name)
    try:
        results = dict(zip(judge_tasks, await asyncio.gather(*judge_tasks.values())))
    except BaseException:
        if classic_task is not None:
            classic_task.cancel()  # its thread finishes on its own; nobody will read its result
        raise
    if classic_task is not None:
        results["classic"] = await classic_task
        notes.extend(results["classic"].pop("notes"))
    results["length"] = length_section(
        [{"id": r.id, "caption": r.caption, "references": list(r.references)} for r in records]
    )
    if results["length"]["no_reference"]:
        notes.append(f"{results['length']['no_reference']} caption(s) have no reference: no length ratio for them.")
    if "balcap" in results:
        notes.extend(_balcap_notes(results["balcap"]))
    if judge is not None:
        report["judge"]["calls"] = {
            counter: getattr(judge, counter) - counters_before[counter] for counter in counter_names
        }

    per_caption: dict[str, dict[str, Any]] = {r.id: {"id": r.id, "caption": r.caption} for r in records}
    for section_name in ("length", "classic", "balcap", "dcscore", "captionqa", "caparena"):
        section = results.get(section_name)
        if section is None:
            continue
        for record_id, values in section.pop("per_caption").items():
            per_caption.setdefault(record_id, {"id": record_id}).update(values)
        report[section_name] = section
    report["summary"] = summary_metrics(report)
    report["per_caption"] = list(per_caption.values())
    report = _finite(report)
    write_report(report, output_dir, plots=plots)
    return report


def evaluate_captions(
    captions: Sequence[Mapping[str, Any]] | str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    judge: JudgeClient | None = None,
    classic: bool = True,
    balcap: bool = True,
    dcscore: bool = False,
    captionqa_questions: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None,
    baseline_captions: Sequence[Mapping[str, Any]] | str | os.PathLike | None = None,
    name: str | None = None,
    baseline_name: str = "baseline",
    plots: bool = True,
    balcap_rewards: Sequence[Callable] | None = None,
    generation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score captions already produced; write ``report.json``, ``report.md`` and plots to ``output_dir``; return the
    report.

    Args:
        captions: records ``{"id", "caption", "references", "image"?}`` or a JSONL path (`load_captions`).
        output_dir: where the report files go (created).
        judge: the judge for the judge-based sections; without one only classic metrics and lengths run.
        classic: BLEU-1..4 / METEOR / ROUGE-L / CIDEr-D (/ SPICE) by pycocoevalcap (`classic_section`).
        balcap: mean precision / recall / linguistic and b-CapScore (`balcap_section`; needs ``judge`` or
            ``balcap_rewards``).
        balcap_rewards: three TRL reward functions (precision, recall, linguistic) that stand in for the judges of
            the balcap section, e.g. the synthetic world's exact ``(WorldPrecision(), WorldRecall(),
            WorldLinguistic())``; they get the records' extra columns (a world ``scene``) as keyword arguments.
        dcscore: DCScore-style P / R / F1 (`dcscore_section`; needs ``judge``).
        captionqa_questions: a questions JSONL path (`load_questions`) or their list: CaptionQA-style accuracy
            (`captionqa_section`).
        baseline_captions: records or a JSONL path of another system's captions of the same ids: CapArena-style
            battles (`caparena_section`), reported under ``baseline_name``.
        name: the evaluated system's name in tables and comparisons.
        plots: write ``length.png`` and ``metrics.png`` (needs matplotlib; without it a note replaces them).
        generation: how the captions were made (model, data, decoding settings; see `generate_and_evaluate`),
            stored as the report's ``generation`` and shown in ``report.md``.

    The report's ``summary`` holds the headline numbers flat (fractions; CIDEr-D as computed; ``CapArena`` as
    wins − losses), ``notes`` what was skipped and why, ``per_caption`` every per-caption value. Runs its own event
    loop (use `evaluate_captions_async` inside one) and closes the judge's HTTP client at the end (it reopens on use).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "evaluate_captions was called inside a running event loop; use `await evaluate_captions_async(...)`."
        )

    async def run() -> dict[str, Any]:
        try:
            return await evaluate_captions_async(
                captions,
                output_dir=output_dir,
                judge=judge,
                classic=classic,
                balcap=balcap,
                dcscore=dcscore,
                captionqa_questions=captionqa_questions,
                baseline_captions=baseline_captions,
                name=name,
                baseline_name=baseline_name,
                plots=plots,
                balcap_rewards=balcap_rewards,
                generation=generation,
            )
        finally:
            if judge is not None:
                await judge.aclose()

    return asyncio.run(run())


# ------------------------------------------------------------------------------------------------------------- report


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The headline numbers of a report, flat: ``{"BLEU-4": ..., "b-CapScore": ..., "CapArena": ...}``."""
    summary: dict[str, Any] = {}
    classic = report.get("classic")
    if classic:
        summary.update({name: classic["metrics"][name] for name in CLASSIC_NAMES if name in classic["metrics"]})
    balcap = report.get("balcap")
    if balcap:
        summary.update(
            precision=balcap["precision"]["mean"],
            recall=balcap["recall"]["mean"],
            linguistic=balcap["linguistic"]["mean"],
        )
        summary["b-CapScore"] = balcap["b_capscore"]
    dcscore = report.get("dcscore")
    if dcscore:
        summary["DCScore-P"] = dcscore["precision"]["mean"]
        summary["DCScore-R"] = dcscore["recall"]["mean"]
        summary["DCScore-F1"] = dcscore["f1"]
    captionqa = report.get("captionqa")
    if captionqa:
        summary["CaptionQA"] = captionqa["accuracy"]
    caparena = report.get("caparena")
    if caparena:
        summary["CapArena"] = caparena["score"]
        summary["CapArena/normalized"] = caparena["normalized_score"]
    length = report.get("length")
    if length:
        summary["length/words_mean"] = length["words_mean"]
        if "ratio_mean" in length:
            summary["length/ratio_mean"] = length["ratio_mean"]
            summary["length/outside_window"] = length["outside_window"]
    return summary


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _plain(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _markdown(report: Mapping[str, Any], plot_files: Sequence[str]) -> str:
    lines = [f"# Caption evaluation: {report['name']}", ""]
    judge = report.get("judge")
    judge_text = "no judge" if judge is None else f"judge `{judge['model']}` at {judge['base_url']}"
    lines += [f"{report['num_captions']} captions · {report['created']} · {judge_text}", ""]
    if judge is not None and "calls" in judge:
        calls = judge["calls"]
        lines += [
            f"Judge calls: {calls['requests']} requests, {calls['cache_hits']} cache hits, "
            f"{calls['retries']} retries, {calls['failures']} failures.",
            "",
        ]
    generation = report.get("generation")
    if generation:
        settings = generation.get("generation", {})
        decoding = "greedy"
        if settings.get("do_sample"):
            decoding = f"sampled (temperature {settings.get('temperature')}, seed {settings.get('seed')})"
        data = generation.get("data", {})
        split = f" (split `{data['split']}`)" if data.get("split") else ""
        lines += [
            f"Captions by `{generation.get('model')}` on `{data.get('source')}`{split}, "
            f"{decoding}, at most {settings.get('max_new_tokens')} new tokens: {generation.get('generated')} "
            f"generated in this run, {generation.get('reused')} reused from an earlier one "
            f"(`{generation.get('captions_file')}`).",
            "",
        ]
    if report["notes"]:
        lines += ["## Notes", "", *[f"- {note}" for note in report["notes"]], ""]

    classic = report.get("classic")
    if classic:
        tokenizer = "PTB (Java)" if classic["tokenizer"] == "ptb" else "simple, NOT the PTB tokenizer (no Java)"
        lines += [f"## Reference-based metrics (pycocoevalcap; tokenizer: {tokenizer}; ×100)", ""]
        rows = [[name, _percent(classic["metrics"][name])] for name in CLASSIC_NAMES if name in classic["metrics"]]
        rows += [[name, "skipped (see notes)"] for name in classic["skipped"]]
        lines += _table(["metric", "score"], rows)

    length = report["length"]
    low, high = length["window"]
    lines += ["## Length (words)", ""]
    spread = [_plain(length["words_mean"], 1), _plain(length["words_median"], 1), length["words_min"]]
    rows = [["caption words (mean / median / min / max)", " / ".join(str(v) for v in [*spread, length["words_max"]])]]
    if "ratio_mean" in length:
        ratio_mean, ratio_median = length["ratio_mean"], length["ratio_median"]
        outside, below, above = (_percent(length[key]) for key in ("outside_window", "below_window", "above_window"))
        rows += [
            ["reference words (mean)", _plain(length["reference_words_mean"], 1)],
            ["ρ = caption / reference words (mean / median)", f"{_plain(ratio_mean)} / {_plain(ratio_median)}"],
            [f"% outside [{low:g}, {high:g}] (below / above)", f"{outside} ({below} / {above})"],
        ]
    lines += _table(["statistic", "value"], rows)

    balcap = report.get("balcap")
    if balcap:
        scorers = balcap.get("scorers", {})
        if scorers and scorers != {"precision": "precision", "recall": "recall", "linguistic": "linguistic"}:
            lines += ["## BalCapRL metrics (×100)", "", f"Scored by {', '.join(scorers.values())}, not by judges.", ""]
        else:
            lines += ["## BalCapRL judge metrics (×100)", ""]
        rows = []
        for metric in ("precision", "recall", "linguistic"):
            entry = balcap[metric]
            extra = f", {entry['no_image']} without image" if "no_image" in entry else ""
            rows.append(
                [metric, _percent(entry["mean"]), f"{entry['scored']} ({entry['unscorable']} unscorable{extra})"]
            )
        rows.append(["**b-CapScore** = H(P, R, L)", _percent(balcap["b_capscore"]), ""])
        lines += _table(["metric", "mean", "captions scored"], rows)

    dcscore = report.get("dcscore")
    if dcscore:
        evidence = dcscore["evidence_counts"]
        lines += [
            "## DCScore-style (×100)",
            "",
            f"Caption units verified against the image for {evidence['image']} caption(s), against the references "
            f"for {evidence['references']}.",
            "",
        ]
        rows = [
            ["precision", _percent(dcscore["precision"]["mean"]), dcscore["precision"]["scored"]],
            ["recall", _percent(dcscore["recall"]["mean"]), dcscore["recall"]["scored"]],
            ["**F1** = H(P, R)", _percent(dcscore["f1"]), ""],
            ["mean per-caption F1", _percent(dcscore["f1_mean"]), dcscore["f1_scored"]],
        ]
        lines += _table(["metric", "value", "captions scored"], rows)

    captionqa = report.get("captionqa")
    if captionqa:
        lines += ["## CaptionQA-style (accuracy ×100)", ""]
        if captionqa["no_caption"]:
            lines += [f"{captionqa['no_caption']} question(s) had no caption for their image and were not asked.", ""]

        def qa_row(label: str, entry: Mapping[str, Any]) -> list[Any]:
            return [label, _percent(entry["accuracy"]), entry["answered"], entry["abstained"], entry["failed"]]

        rows = [qa_row("**all**", captionqa)]
        rows += [qa_row(category, entry) for category, entry in captionqa["per_category"].items()]
        lines += _table(["category", "accuracy", "answered", "abstained", "judge failed"], rows)

    caparena = report.get("caparena")
    if caparena:
        lines += [f"## CapArena-style vs {caparena['baseline']}", ""]
        keys = ["score", "battles", "wins", "losses", "draws", "failed", "position_consistent"]
        rows = [[caparena[key] for key in keys]]
        header = ["score (W − L)", "battles", "wins", "losses", "draws", "failed", "same position both orders"]
        lines += _table(header, rows)

    if plot_files:
        lines += ["## Plots", "", *[f"![{Path(file).stem}]({file})" for file in plot_files], ""]
    lines += ["Per-caption values are in `report.json` (`per_caption`).", ""]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], output_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (if ``plots`` and matplotlib is installed) the PNGs; return paths."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots:
        try:
            paths.update(_plot_report(report, output))
        except ImportError:
            message = "Plots skipped: matplotlib is not installed (pip install matplotlib)."
            logger.warning(message)
            report["notes"].append(message)
    report_json = output / "report.json"
    report_json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report_md = output / "report.md"
    report_md.write_text(_markdown(report, [path.name for path in paths.values()]), encoding="utf-8")
    return {"json": report_json, "markdown": report_md, **paths}


# -------------------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, safe in threads and headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _percent_metrics(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(reference-based, judge-based) headline metrics ×100; CapArena as (W − L) / N × 100."""
    reference_based = {name: 100 * summary[name] for name in CLASSIC_NAMES if summary.get(name) is not None}
    judge_names = ["precision", "recall", "linguistic", "b-CapScore", "DCScore-P", "DCScore-R", "DCScore-F1"]
    judge_based = {name: 100 * summary[name] for name in [*judge_names, "CaptionQA"] if summary.get(name) is not None}
    if summary.get("CapArena/normalized") is not None:
        judge_based["CapArena (W−L)/N"] = 100 * summary["CapArena/normalized"]
    return reference_based, judge_based


def _plot_report(report: Mapping[str, Any], output: Path) -> dict[str, Path]:
    paths = {"length_plot": output / "length.png"}
    rows = report["per_caption"]
    words = [row["words"] for row in rows if row.get("words") is not None]
    ratios = [row["ratio"] for row in rows if row.get("ratio") is not None]
    reference_words = [row["reference_words"] for row in rows if row.get("reference_words") is not None]
    low, high = report["length"]["window"]

    figure = _figure(10, 3.8)
    words_axis, ratio_axis = figure.subplots(1, 2)
    top = max(words + reference_words + [1])
    bins = list(range(0, int(top) + 2, max(1, int(top) // 30 + 1)))
    words_axis.hist(words, bins=bins, alpha=0.7, label="captions")
    if reference_words:
        words_axis.hist(reference_words, bins=bins, alpha=0.5, label="references (mean per image)")
    words_axis.set(xlabel="words", ylabel="captions", title="Caption length")
    words_axis.legend()
    _ratio_histogram(ratio_axis, {report["name"]: ratios}, low, high)
    if ratios:
        ratio_axis.set_title(
            f"Length ratio ρ ({100 * report['length']['outside_window']:.1f}% outside [{low:g}, {high:g}])"
        )
    figure.savefig(paths["length_plot"], dpi=100)

    reference_based, judge_based = _percent_metrics(report["summary"])
    panels = [("Reference-based (×100)", reference_based), ("Judge-based (×100)", judge_based)]
    panels = [(title, values) for title, values in panels if values]
    if panels:
        paths["metrics_plot"] = output / "metrics.png"
        figure = _figure(5 * len(panels), 0.35 * max(len(values) for _, values in panels) + 1.5)
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for axis, (title, values) in zip(axes, panels):
            bars = axis.barh(list(values), list(values.values()), color="tab:blue")
            axis.bar_label(bars, fmt="%.1f", padding=2)
            axis.invert_yaxis()
            axis.axvline(0, color="black", linewidth=0.8)
            axis.set_title(f"{report['name']}: {title}")
            axis.margins(x=0.15)
        figure.savefig(paths["metrics_plot"], dpi=100)
    return paths


def _ratio_histogram(axis: Any, ratios_by_name: Mapping[str, Sequence[float]], low: float, high: float) -> None:
    values = [ratio for ratios in ratios_by_name.values() for ratio in ratios]
    right = max([high * 1.25, *values]) * 1.02
    bins = [right * step / 40 for step in range(41)]
    axis.axvspan(low, high, color="tab:green", alpha=0.12, label=f"window [{low:g}, {high:g}]")
    for bound in (low, high):
        axis.axvline(bound, color="tab:green", linestyle="--", linewidth=1)
    for name, ratios in ratios_by_name.items():
        if ratios:
            histtype = "step" if len(ratios_by_name) > 1 else "bar"
            axis.hist(ratios, bins=bins, histtype=histtype, alpha=0.8, linewidth=1.5, label=name)
    axis.set(xlabel="ρ = caption words / mean reference words", ylabel="captions")
    axis.legend(fontsize="small")


# --------------------------------------------------------------------------------------------------------- comparison


def _load_report(report: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(report, Mapping):
        return report
    path = Path(report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"No report at {path}; pass a report dict, a report.json or the folder holding one.")
    return json.loads(path.read_text(encoding="utf-8"))


def compare_reports(
    reports: Sequence[Mapping[str, Any] | str | os.PathLike],
    *,
    output_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Model-vs-model comparison of reports (dicts, ``report.json`` paths or their folders).

    Writes ``comparison.json`` (``{"names", "metrics": {metric: [value per report]}}``), ``comparison.md`` (a table
    with a Δ column when there are two reports) and ``comparison.png`` (grouped bars ×100 of the metrics that every
    report has, and the length-ratio histograms overlaid). To compare two caption sets, evaluate each first.
    """
    loaded = [_load_report(report) for report in reports]
    if len(loaded) < 2:
        raise ValueError("compare_reports needs at least two reports.")
    names = (
        list(names) if names is not None else [str(report.get("name", index)) for index, report in enumerate(loaded)]
    )
    if len(names) != len(loaded) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(loaded)} distinct names, got {names}.")
    summaries = [report.get("summary") or summary_metrics(report) for report in loaded]
    metric_names = [name for name in summaries[0] if all(name in summary for summary in summaries[1:])]
    metrics = {metric: [summary[metric] for summary in summaries] for metric in metric_names}
    comparison = {"names": names, "metrics": metrics}

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "comparison.json").write_text(json.dumps(_finite(comparison), indent=2) + "\n", encoding="utf-8")
    header = ["metric", *names, *(["Δ (2nd − 1st)"] if len(names) == 2 else [])]
    rows = []
    for metric, values in metrics.items():
        row = [metric, *(_plain(value, 4) for value in values)]
        if len(names) == 2:
            row.append("–" if None in values else _plain(values[1] - values[0], 4))
        rows.append(row)
    text = ["# Caption evaluation comparison", "", "Fractions as in report.json (×100 in the plot).", ""]
    text += _table(header, rows)

    if plots:
        try:
            _plot_comparison(loaded, names, summaries, output / "comparison.png")
        except ImportError:
            text += ["Plot skipped: matplotlib is not installed (pip install matplotlib).", ""]
        else:
            text += ["![comparison](comparison.png)", ""]
    (output / "comparison.md").write_text("\n".join(text), encoding="utf-8")
    return comparison


def _plot_comparison(
    reports: Sequence[Mapping[str, Any]], names: Sequence[str], summaries: Sequence[Mapping[str, Any]], path: Path
) -> None:
    percent = [_percent_metrics(summary) for summary in summaries]
    merged = [{**reference, **judged} for reference, judged in percent]
    shared = [metric for metric in merged[0] if all(metric in values for values in merged[1:])]
    ratios = {
        name: [row["ratio"] for row in report.get("per_caption", []) if row.get("ratio") is not None]
        for name, report in zip(names, reports)
    }
    has_ratios = any(ratios.values())
    figure = _figure(6 + 5 * has_ratios, 0.45 * max(len(shared), 4) + 1.5)
    axes = figure.subplots(1, 1 + has_ratios, squeeze=False)[0]
    height = 0.8 / len(names)
    for index, name in enumerate(names):
        positions = [position + index * height for position in range(len(shared))]
        bars = axes[0].barh(positions, [merged[index][metric] for metric in shared], height=height, label=name)
        axes[0].bar_label(bars, fmt="%.1f", padding=2, fontsize="x-small")
    axes[0].set_yticks([position + 0.4 - height / 2 for position in range(len(shared))], shared)
    axes[0].invert_yaxis()
    axes[0].axvline(0, color="black", linewidth=0.8)
    axes[0].set_title("Metrics (×100)")
    axes[0].margins(x=0.15)
    axes[0].legend(fontsize="small")
    if has_ratios:
        low, high = reports[0].get("length", {}).get("window", LENGTH_WINDOW)
        _ratio_histogram(axes[1], ratios, low, high)
        axes[1].set_title("Length ratio ρ")
    figure.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------- generation half


def generate_and_evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    split: str = "test",
    format: str = "auto",
    image_root: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "references",
    instruction: str | None = None,
    max_samples: int | None = None,
    on_bad_image: str = "error",
    data_seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    dtype: Any = None,
    device: str | None = None,
    overwrite: bool = False,
    judge_text_only: bool = False,
    progress: bool = True,
    **scoring: Any,
) -> dict[str, Any]:
    """Caption a dataset split with a model, then evaluate the captions (``balcaprl evaluate --model ...``).

    1. The split is loaded by `balcaprl.data.load_caption_dataset` (``format``, ``split``, ``image_root``,
       ``image_column``, ``caption_column``, ``instruction``, ``max_samples``, ``on_bad_image``; ``data_seed`` seeds
       the ``max_samples`` draw).
    2. `balcaprl.generation.caption_dataset` captions it into ``output_dir/captions.jsonl`` (batched; greedy, or
       ``do_sample`` with ``temperature`` and ``seed``), appending every batch as it is produced; a rerun with the
       same folder generates only the captions that are missing, and refuses (`GenerationSettingsError`) when the
       model, data or decoding settings differ from those recorded in ``output_dir/generation.json`` — unless
       ``overwrite``. ``dtype`` / ``device`` place the model (``device=None``: CUDA when available).
    3. `evaluate_captions` scores every caption, with ``scoring`` as its keyword arguments (``judge``, ``classic``,
       ``balcap``, ``balcap_rewards``, ``dcscore``, ``captionqa_questions``, ``baseline_captions``, ``name``,
       ``baseline_name``, ``plots``), and writes the report into ``output_dir``. The records it scores carry the
       image (path, or the bytes stored in the dataset) and the dataset's extra columns, e.g. the ``scene`` the
       exact world rewards read. ``judge_text_only`` leaves the images out (for a judge that cannot see them:
       precision is then not asked, DCScore checks against the references, CapArena judges from text).

    Returns the report; its ``generation`` entry says which model and settings made the captions and how many were
    generated in this run or reused.
    """
    import torch

    from balcaprl.data import DEFAULT_INSTRUCTION, load_caption_dataset_with_report
    from balcaprl.generation import caption_dataset

    allowed = set(inspect.signature(evaluate_captions).parameters) - {"captions", "output_dir", "generation"}
    unknown = sorted(set(scoring) - allowed)
    if unknown:
        raise TypeError(f"generate_and_evaluate got unknown arguments {unknown}; scoring ones are {sorted(allowed)}.")
    instruction = instruction or DEFAULT_INSTRUCTION
    dataset, loaded = load_caption_dataset_with_report(
        data,
        format=format,
        split=split,
        image_root=image_root,
        image_column=image_column,
        caption_column=caption_column,
        instruction=instruction,
        max_samples=max_samples,
        on_bad_image=on_bad_image,
        seed=data_seed,
    )
    source = Path(data)
    data_settings = {
        "source": str(source.resolve()) if source.exists() else str(data),
        "format": loaded.format,
        "split": None if loaded.format == "jsonl" else split,  # one JSONL file is one split
        "image_root": None if image_root is None else str(Path(image_root).resolve()),
        "image_column": image_column,
        "caption_column": caption_column,
        "max_samples": max_samples,
        "on_bad_image": on_bad_image,
        "data_seed": data_seed if max_samples is not None else None,
    }
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    run = caption_dataset(
        model,
        dataset,
        output_dir,
        instruction=instruction,
        data=data_settings,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        progress=progress,
        image_bytes=scoring.get("judge") is not None and not judge_text_only,
    )
    records = []
    for row, written in zip(run.rows, run.records):
        record = {**row["extra"], "id": written["id"], "caption": written["caption"], "references": row["references"]}
        image = row["image_path"] or row["image_bytes"]
        if image is not None and not judge_text_only:
            record["image"] = image
        records.append(record)
    generation = {
        **run.settings,
        "captions_file": str(run.path),
        "generated": run.generated,
        "reused": run.reused,
        "dropped_partial_line": run.dropped_partial_line,
        "judge_text_only": judge_text_only,
    }
    scoring["name"] = scoring.get("name") or Path(str(model)).name or str(model)
    return evaluate_captions(records, output_dir=output_dir, generation=generation, **scoring)


# ---------------------------------------------------------------------------------------------------------------- CLI

WORLD_REWARDS = ("world_precision", "world_recall", "world_linguistic")


def _add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="the system's name in the report (run: the model folder's name)")
    parser.add_argument("--no-classic", action="store_true", help="skip pycocoevalcap metrics")
    parser.add_argument("--no-balcap", action="store_true", help="skip BalCapRL precision / recall / linguistic")
    parser.add_argument("--dcscore", action="store_true", help="add DCScore-style P/R/F1 (needs a judge)")
    parser.add_argument("--captionqa", metavar="QUESTIONS.jsonl", help="add CaptionQA-style accuracy (needs a judge)")
    parser.add_argument(
        "--baseline-captions",
        "--baseline",
        dest="baseline",
        metavar="CAPTIONS.jsonl",
        help="add CapArena-style battles against these captions of the same ids (needs a judge)",
    )
    parser.add_argument("--baseline-name", default="baseline")
    parser.add_argument("--no-plots", action="store_true")
    scorers = parser.add_mutually_exclusive_group()
    scorers.add_argument(
        "--exact-world-judges",
        action="store_true",
        help=f"score BalCapRL P/R/L with the synthetic world's exact rewards ({', '.join(WORLD_REWARDS)}; they read "
        "each record's `scene`) instead of judges",
    )
    scorers.add_argument(
        "--balcap-rewards",
        nargs=3,
        metavar=("PRECISION", "RECALL", "LINGUISTIC"),
        help="three reward specs (registered names or 'package.module:function') that score BalCapRL P/R/L instead "
        "of the judges",
    )
    parser.add_argument(
        "--judge-text-only",
        action="store_true",
        help="the judge cannot see images: send none (precision is not asked; DCScore and CapArena use text only)",
    )
    judge_options = [("base_url", str), ("model", str), ("api_key_env", str), ("max_concurrency", int)]
    judge_options += [("timeout", float), ("max_retries", int), ("cache_dir", str), ("temperature", float)]
    judge_options += [("max_tokens", int), ("response_format", str)]
    for key, kind in judge_options:  # the recipe's judge_* keys (see balcaprl.judge.RECIPE_KEYS)
        parser.add_argument(f"--judge-{key.replace('_', '-')}", dest=f"judge_{key}", type=kind)


def _scoring_arguments(arguments: argparse.Namespace) -> dict[str, Any]:
    """`evaluate_captions` keywords from the scoring options (a judge when --judge-base-url is given)."""
    judge = None
    if arguments.judge_base_url:
        judge = JudgeClient.from_config(vars(arguments))  # the judge_* recipe keys; None keeps a default
    specs = list(WORLD_REWARDS) if arguments.exact_world_judges else arguments.balcap_rewards
    balcap_rewards = None
    if specs and not arguments.no_balcap:
        from balcaprl.rewards import get_reward_funcs

        judge_keys = {key: value for key, value in vars(arguments).items() if key.startswith("judge_")}
        balcap_rewards = get_reward_funcs(specs, **judge_keys)
    return {
        "judge": judge,
        "classic": not arguments.no_classic,
        "balcap": not arguments.no_balcap,
        "balcap_rewards": balcap_rewards,
        "dcscore": arguments.dcscore,
        "captionqa_questions": arguments.captionqa,
        "baseline_captions": arguments.baseline,
        "name": arguments.name,
        "baseline_name": arguments.baseline_name,
        "plots": not arguments.no_plots,
    }


def _without_images(captions: str | os.PathLike) -> list[dict[str, Any]]:
    return [{key: value for key, value in row.items() if key != "image"} for row in load_captions(captions)]


def build_parser(prog: str = "balcaprl evaluate") -> argparse.ArgumentParser:
    """The parser of `main`: ``run`` (the default), ``score`` and ``compare``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Caption a dataset split with a model and score the captions (run), score captions already "
        "made (score), or compare reports (compare).",
        epilog=f"`{prog} --model M --data D --output-dir DIR ...` (options first) means `{prog} run ...`.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="caption a dataset split with a model (resumable), then score the captions")
    run.add_argument("--model", required=True, help="checkpoint or LoRA adapter folder, Hub name, or tiny:<family>")
    run.add_argument("--data", required=True, help="JSONL file, Karpathy JSON, or Hugging Face dataset (name/folder)")
    run.add_argument("--output-dir", required=True, help="captions.jsonl, generation.json and the report go here")
    data = run.add_argument_group("data (see balcaprl.data.load_caption_dataset)")
    data.add_argument("--split", default="test", help="default: test (a JSONL file is one split: ignored)")
    data.add_argument("--format", default="auto", help="auto (default), hf, karpathy or jsonl")
    data.add_argument("--image-root", help="folder relative image paths are resolved against")
    data.add_argument("--image-column", default="image")
    data.add_argument("--caption-column", default="references")
    data.add_argument("--instruction", help="the user turn (default: 'Describe this image in detail.')")
    data.add_argument("--max-samples", type=int, help="caption a random subset of this many rows")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the --max-samples draw")
    data.add_argument("--on-bad-image", default="error", help="error (default) or skip")
    generation = run.add_argument_group("generation")
    generation.add_argument("--batch-size", type=int, default=16, help="images per generate call (default: 16)")
    generation.add_argument("--max-new-tokens", type=int, default=512, help="caption length limit (default: 512)")
    generation.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generation.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    generation.add_argument("--seed", type=int, default=0, help="with --sample")
    generation.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    generation.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    generation.add_argument(
        "--overwrite", action="store_true", help="delete the captions already in --output-dir and start again"
    )
    generation.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scoring_arguments(run.add_argument_group("scoring"))

    score = commands.add_parser("score", help="score a captions JSONL file")
    score.add_argument("captions", help="JSONL of {id, caption, references, image?, ...extra columns}")
    score.add_argument("--output-dir", required=True)
    _add_scoring_arguments(score)

    compare = commands.add_parser("compare", help="compare reports (report.json files or their folders)")
    compare.add_argument("reports", nargs="+")
    compare.add_argument("--output-dir", required=True)
    compare.add_argument("--names", nargs="+")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[run] --model M --data D --output-dir DIR [options]``, ``score CAPTIONS.jsonl --output-dir DIR
    [options]`` or ``compare A B --output-dir DIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    prog = "balcaprl evaluate" if Path(sys.argv[0]).name == "balcaprl" else "python -m balcaprl.evaluate"
    parser = build_parser(prog)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if arguments.command == "compare":
        compare_reports(arguments.reports, output_dir=arguments.output_dir, names=arguments.names)
        print(Path(arguments.output_dir) / "comparison.md")
        return 0
    scoring = _scoring_arguments(arguments)
    if arguments.command == "score":
        captions = _without_images(arguments.captions) if arguments.judge_text_only else arguments.captions
        report = evaluate_captions(captions, output_dir=arguments.output_dir, **scoring)
        print(json.dumps(report["summary"], indent=2))
        return 0

    from balcaprl.generation import GenerationSettingsError

    dtype = None
    if arguments.dtype != "auto":
        import torch

        dtype = getattr(torch, arguments.dtype, None)
        if not isinstance(dtype, torch.dtype):
            parser.error(f"--dtype must be auto, float32, bfloat16 or float16, got {arguments.dtype!r}.")
    try:
        report = generate_and_evaluate(
            arguments.model,
            arguments.data,
            output_dir=arguments.output_dir,
            split=arguments.split,
            format=arguments.format,
            image_root=arguments.image_root,
            image_column=arguments.image_column,
            caption_column=arguments.caption_column,
            instruction=arguments.instruction,
            max_samples=arguments.max_samples,
            on_bad_image=arguments.on_bad_image,
            data_seed=arguments.data_seed,
            batch_size=arguments.batch_size,
            max_new_tokens=arguments.max_new_tokens,
            do_sample=arguments.sample,
            temperature=arguments.temperature,
            seed=arguments.seed,
            dtype=dtype,
            device=arguments.device,
            overwrite=arguments.overwrite,
            judge_text_only=arguments.judge_text_only,
            progress=not arguments.no_progress,
            **scoring,
        )
    except GenerationSettingsError as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    print(json.dumps(report["summary"], indent=2))
    print(Path(arguments.output_dir) / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
