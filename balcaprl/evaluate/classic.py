"""Reference-based sections: the COCO caption metrics (pycocoevalcap, with the Java PTB tokenizer and METEOR) and
length statistics.

pycocoevalcap's ``Cider`` is CIDEr-D with document frequencies taken from the evaluated references (unlike the
``cider_d`` reward, whose df are fixed from a training corpus). Without ``java`` on PATH, METEOR (and SPICE) are
skipped and BLEU / ROUGE-L / CIDEr-D run on `balcaprl.text.simple_tokenize` text — the ``cider_d`` reward's tokenizer:
NFKC, lower-case, Unicode punctuation removed — which the report marks, because those numbers are not comparable with
published ones. With Java the text goes to the PTB tokenizer exactly as coco-caption sends it.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from balcaprl.evaluate.records import as_records, non_empty_references, require_references
from balcaprl.length import DEFAULT_WINDOW
from balcaprl.text import simple_tokenize

logger = logging.getLogger(__name__)

__all__ = ["classic_section", "close_meteor", "java_available", "length_section", "ptb_tokenize"]

LENGTH_WINDOW = DEFAULT_WINDOW  # BalCapRL's window, as training masks with it
BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
CLASSIC_NAMES = (*BLEU_NAMES, "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")


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

    Without Java: a warning, METEOR and SPICE skipped, the others on `balcaprl.text.simple_tokenize` text
    (``tokenizer: "simple"``; typographic punctuation counts as its ASCII counterpart).
    METEOR's JVM is started once per process and reused (`close_meteor` stops it).
    Temporary files: the PTB tokenizer's go to a private temporary directory (`ptb_tokenize`); METEOR writes none;
    SPICE (only when its jars are present) writes uniquely named files in pycocoevalcap's ``spice/tmp`` and shares an
    LMDB cache in ``spice/cache`` — concurrent runs are safe but need that folder writable.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    records = as_records(captions)
    require_references(records, "classic metrics")
    notes: list[str] = []
    skipped: dict[str, str] = {}
    has_java = java_available()
    if has_java:
        _shared_meteor()  # a first start loads the JVM while the tokenizer and BLEU run
        tokenizer_name = "ptb"
    else:
        message = (
            "java is not on PATH: METEOR and SPICE skipped, and BLEU / ROUGE-L / CIDEr-D use a simple tokenizer "
            "(NFKC, lower-case, punctuation removed) instead of the PTB tokenizer, so they are not comparable with "
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


def length_section(captions: Sequence[Mapping[str, Any]], window: tuple[float, float] = LENGTH_WINDOW) -> dict:
    """Word counts, ρ = words / mean reference words (`balcaprl.length.length_ratios`) and the share outside
    ``window`` (`balcaprl.length.length_conditional_mask`, bounds inclusive inside). Records without a non-empty
    reference get no ρ and are counted in ``no_reference``."""
    from balcaprl.length import length_conditional_mask, length_ratios, word_length

    records = as_records(captions)
    words = [word_length(record.caption) for record in records]
    with_reference = [record for record in records if non_empty_references(record)]
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
            [non_empty_references(record) for record in with_reference],
        )
        keep = length_conditional_mask(ratios, *window)
        reference_words = [
            statistics.fmean(map(word_length, non_empty_references(record))) for record in with_reference
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
