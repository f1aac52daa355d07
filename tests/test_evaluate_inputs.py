"""`balcaprl evaluate score` on the formats people already have (COCO results + COCO or Karpathy references), its
one-line data errors (exit status 2, no traceback), and the shape of the `balcaprl.evaluate` package."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import balcaprl.evaluate
from balcaprl.evaluate import EvaluationOptions, evaluate_captions, load_coco_results
from balcaprl.evaluate import main as evaluate_main
from balcaprl.evaluate.classic import close_meteor

BALCAPRL = Path(sys.executable).parent / "balcaprl"  # the console script of this virtualenv
PACKAGE = Path(balcaprl.evaluate.__file__).parent

# A tiny COCO pair, written by hand. Image 3 has references but no result: it is not scored (as in the COCO
# evaluation), so it must not enter the document frequencies either.
RESULTS = [{"image_id": 1, "caption": "A red circle."}, {"image_id": 2, "caption": "The cat!"}]
ANNOTATIONS = {
    "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}, {"id": 3, "file_name": "3.png"}],
    "annotations": [
        {"id": 10, "image_id": 1, "caption": "A red circle."},
        {"id": 11, "image_id": 1, "caption": "a blue square"},
        {"id": 12, "image_id": 2, "caption": "A cat."},
        {"id": 13, "image_id": 3, "caption": "a red circle"},
    ],
}


def karpathy_entry(cocoid: int, folder: str, split: str, *captions: str) -> dict:
    sentences = [{"raw": caption} for caption in captions]
    return {"cocoid": cocoid, "filepath": folder, "filename": f"{cocoid}.png", "split": split, "sentences": sentences}


KARPATHY = {
    "images": [
        karpathy_entry(1, "val2014", "test", "A red circle.", "a blue square"),
        karpathy_entry(2, "val2014", "test", "A cat."),
        karpathy_entry(3, "train2014", "train", "a red circle"),
    ]
}


@pytest.fixture(scope="module", autouse=True)
def _stop_the_shared_meteor_jvm():
    yield
    close_meteor()


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def assert_hand_computed(report: dict) -> None:
    """BLEU-1 and CIDEr-D of the COCO pair, by hand (the same with the PTB and the simple tokenizer).

    Tokens: "a red circle" vs references {"a red circle", "a blue square"}; "the cat" vs {"a cat"}.
    BLEU-1 (corpus): clipped unigram matches 3 + 1 of 3 + 2 candidate words; closest reference lengths 3 and 2 make
    the reference length 5 = candidate length, so BP = 1: BLEU-1 = 4/5; per caption 1 and 1/2.
    CIDEr-D, df over the 2 scored images (|I| = 2), idf(k) = log 2 − log max(1, df(k)); "a" is in both sets: idf 0.
    - image 1: against "a red circle" every n-gram vector is the candidate's own: sim_1 = sim_2 = sim_3 = 1, no
      4-gram; against "a blue square" only "a" is shared, and its weight is 0: sim = 0. Same lengths, no penalty:
      10 / (4 · 2) · (1 + 1 + 1 + 0 + 0) = 3.75.
    - image 2: g(the) = log 2 (df 0), g(cat) = log 2 (df 1); reference g(a) = 0, g(cat) = log 2:
      sim_1 = (log 2)² / (√2 log 2 · log 2) = 1/√2, no shared bigram: 10 · (1/√2) / 4 = 2.5/√2.
    Had image 3 been counted (|I| = 3), every idf would change.
    """
    metrics = report["classic"]["metrics"]
    rows = {row["id"]: row for row in report["per_caption"]}
    assert sorted(rows) == ["1", "2"] and report["num_captions"] == 2
    assert metrics["BLEU-1"] == pytest.approx(4 / 5, rel=1e-8)  # pycocoevalcap adds 1e-9-scale smoothing terms
    assert [rows["1"]["BLEU-1"], rows["2"]["BLEU-1"]] == pytest.approx([1.0, 0.5], rel=1e-8)
    assert [rows["1"]["CIDEr-D"], rows["2"]["CIDEr-D"]] == pytest.approx([3.75, 2.5 / math.sqrt(2)], rel=1e-12)
    assert metrics["CIDEr-D"] == pytest.approx((3.75 + 2.5 / math.sqrt(2)) / 2, rel=1e-12)


def test_coco_results_with_coco_annotations_score_without_a_converter(tmp_path):
    results = write_json(tmp_path / "fakecap_results.json", RESULTS)
    annotations = write_json(tmp_path / "captions_val2014.json", ANNOTATIONS)
    output = tmp_path / "out"
    arguments = ["score", str(results), "--annotations", str(annotations), "--output-dir", str(output), "--no-plots"]
    assert evaluate_main(arguments) == 0
    report = json.loads((output / "report.json").read_text())
    assert_hand_computed(report)
    assert report["name"] == "fakecap_results"  # the results file's name, not "model"
    note = next(note for note in report["notes"] if note.startswith("BalCapRL metrics skipped"))
    assert "--judge-base-url" in note and "--exact-world-judges" in note and "JudgeClient" not in note


def test_coco_results_with_a_karpathy_split_score_the_same(tmp_path):
    results = write_json(tmp_path / "results.json", RESULTS)
    karpathy = write_json(tmp_path / "dataset_coco.json", KARPATHY)
    records = load_coco_results(results, karpathy, split="test")
    assert records[0] == {
        "id": "1",
        "caption": "A red circle.",
        "references": ["A red circle.", "a blue square"],
        "image": str(tmp_path / "val2014" / "1.png"),  # resolved, but only checked when a judge needs it
    }
    report = evaluate_captions(records, output_dir=tmp_path / "out", plots=False, balcap=False)
    assert_hand_computed(report)


def test_an_image_is_needed_only_by_a_judge(tmp_path):
    captions = tmp_path / "sft-run" / "captions.jsonl"
    captions.parent.mkdir()
    rows = [
        {"id": "a", "caption": "a red circle", "references": ["a red circle"], "image": "a.png"},
        {"id": "b", "caption": "a cat", "references": ["a cat"], "image": "missing.png"},
    ]
    captions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    Image.new("RGB", (8, 8)).save(captions.parent / "a.png")
    report = evaluate_captions(captions, output_dir=tmp_path / "out", plots=False, classic=False)
    assert report["name"] == "sft-run"  # a file called captions.* is named after its folder
    judge = ["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]  # never called: the check comes first
    error = run_cli_in_process(["score", str(captions), "--output-dir", str(tmp_path / "j"), *judge])
    assert f"{captions}, line 2 (id 'b'): field 'image': file" in error and "--judge-text-only" in error
    arguments = ["score", str(captions), "--output-dir", str(tmp_path / "t"), "--no-classic", "--no-balcap"]
    assert evaluate_main([*arguments, *judge, "--judge-text-only"]) == 0


def run_cli_in_process(arguments: list[str]) -> str:
    """The one-line error of `main(arguments)`, which must exit with status 2."""
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        evaluate_main(arguments)
    assert exit_info.value.code == 2
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m balcaprl.evaluate: error: "), lines
    return lines[0]


def data_error_cases(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name → (arguments after `score`, fragments the one-line error must hold)."""
    results = write_json(folder / "results.json", RESULTS)
    annotations = write_json(folder / "annotations.json", ANNOTATIONS)
    karpathy = write_json(folder / "karpathy.json", KARPATHY)
    lines = {
        "no_references.jsonl": [{"id": "a", "caption": "x", "references": ["a b"]}, {"id": "b", "caption": "y"}],
        "list_line.jsonl": [{"id": "a", "caption": "x", "references": ["a b"]}, ["a", "b"]],
        "list.json": [["a", "b"]],
        "number.json": 5,
    }
    for name, value in lines.items():
        text = json.dumps(value) if not isinstance(value, list) else "".join(json.dumps(row) + "\n" for row in value)
        (folder / name).write_text(text)
    (folder / "broken.jsonl").write_text('{"id": "a", "caption": "x", "references": "y"}\n{"id": "b",\n')
    unknown_image = write_json(folder / "unknown.json", [*RESULTS, {"image_id": 99, "caption": "a dog"}])
    no_caption = write_json(folder / "no_caption.json", [{"image_id": 1, "text": "a dog"}])
    return {
        "results without annotations": ([str(results)], ["results.json is a COCO results file", "--annotations"]),
        "annotations as captions": ([str(annotations)], ["annotations.json is a COCO captions (annotations) file"]),
        "karpathy as captions": ([str(karpathy)], ["karpathy.json is a Karpathy JSON", "after --annotations"]),
        "top-level number": ([str(folder / "number.json")], ["number.json: the file holds a JSON int; expected"]),
        "annotations of another shape": (
            [str(results), "--annotations", str(results)],
            ["results.json (--annotations) is a JSON list of another shape; expected a COCO captions JSON"],
        ),
        "karpathy without split": ([str(results), "--annotations", str(karpathy)], ["say which split", "--split"]),
        "image id without references": (
            [str(unknown_image), "--annotations", str(annotations)],
            ["unknown.json, entry 2: field 'image_id' 99 has no references in"],
        ),
        "result without caption": ([str(no_caption), "--annotations", str(annotations)], ["no_caption.json, entry 0"]),
        "row without references": (
            [str(folder / "no_references.jsonl")],
            ["no_references.jsonl, line 2 (id 'b'): field 'references' holds no non-empty reference"],
        ),
        "line of another type": (
            [str(folder / "list_line.jsonl")],
            ['list_line.jsonl, line 2: expected a JSON object {"id", "caption", "references", "image"?}, got list'],
        ),
        "list of other things": ([str(folder / "list.json")], ["list.json holds a JSON list whose first item is not"]),
        "invalid JSON line": ([str(folder / "broken.jsonl")], ["broken.jsonl, line 2: not valid JSON"]),
        "missing file": ([str(folder / "none.jsonl")], ["none.jsonl: no such file"]),
        "annotations with a jsonl file": (
            [str(folder / "no_references.jsonl"), "--annotations", str(annotations)],
            ["--annotations goes with a COCO results file"],
        ),
    }


def test_every_data_error_is_one_line_with_exit_status_2(tmp_path):
    for name, (arguments, fragments) in data_error_cases(tmp_path).items():
        error = run_cli_in_process(["score", *arguments, "--output-dir", str(tmp_path / "out"), "--no-plots"])
        for fragment in fragments:
            assert fragment in error, (name, error)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("case", ["results without annotations", "row without references"])
def test_the_console_script_prints_no_traceback(tmp_path, case):
    arguments, fragments = data_error_cases(tmp_path)[case]
    command = [str(BALCAPRL), "evaluate", "score", *arguments, "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("balcaprl evaluate: error: ") and all(fragment in line for fragment in fragments)


def test_one_options_object_for_every_entry_point(tmp_path):
    records = [{"id": "x", "caption": "a red circle", "references": ["a red circle"]}]
    with pytest.raises(TypeError, match="Unknown evaluation settings \\['judges'\\]; the settings of Evaluati"):
        evaluate_captions(records, output_dir=tmp_path, judges=None)
    options = EvaluationOptions(classic=False, balcap=False, plots=False, name="from-options")
    report = evaluate_captions(records, output_dir=tmp_path, options=options, name="keyword-wins")
    assert report["name"] == "keyword-wins" and "classic" not in report and "balcap" not in report


def test_the_package_is_split_by_concern():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert len(sizes) >= 10 and max(sizes.values()) <= 400, sizes
    old_public_names = [
        "ARENA_SCHEMA", "ARENA_VERDICTS", "BLEU_NAMES", "CHOICE_LETTERS", "CLASSIC_NAMES", "ImageLike",
        "LENGTH_WINDOW", "STYLE_PROMPT_VERSION", "RECORD_KEYS", "REPORT_FORMAT_VERSION", "UNKNOWN_ANSWER",
        "WORLD_REWARDS",
        "balcap_section", "build_parser", "caparena_section", "captionqa_section", "classic_section", "close_meteor",
        "compare_reports", "dcscore_section", "evaluate_captions", "evaluate_captions_async", "generate_and_evaluate",
        "harmonic_mean", "java_available", "length_section", "load_captions", "load_questions", "main",
        "ptb_tokenize", "summary_metrics", "write_report",
    ]  # fmt: skip
    # a short public facade; every other name stays importable from the submodule that defines it
    assert len(balcaprl.evaluate.__all__) <= 15
    submodules = [path.stem for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__")]
    modules = [importlib.import_module(f"balcaprl.evaluate.{name}") for name in submodules]
    defined = {name for module in modules for name in vars(module)}
    assert [name for name in old_public_names if name not in defined] == []
    assert set(balcaprl.evaluate.__all__) <= set(dir(balcaprl.evaluate))


def test_a_coco_baseline_battles_through_the_same_annotations(scripted_server, tmp_path):
    """`--baseline` takes the captions' format: here another COCO results file, with the same --annotations."""
    results = write_json(tmp_path / "ours.json", RESULTS)
    baseline = write_json(
        tmp_path / "theirs.json",
        [{"image_id": 1, "caption": "A circle."}, {"image_id": 2, "caption": "A small black cat."}],
    )
    annotations = write_json(tmp_path / "captions.json", ANNOTATIONS)
    judge = ["--judge-base-url", scripted_server.base_url, "--judge-model", "scripted", "--judge-max-retries", "0"]
    arguments = ["score", str(results), "--annotations", str(annotations), "--baseline", str(baseline)]
    arguments += ["--output-dir", str(tmp_path / "out"), "--no-classic", "--no-balcap", "--no-plots", *judge]
    assert evaluate_main(arguments) == 0
    caparena = json.loads((tmp_path / "out" / "report.json").read_text())["caparena"]
    # The scripted judge prefers the longer caption in both orders: image 1 won, image 2 lost.
    assert (caparena["wins"], caparena["losses"], caparena["battles"], caparena["score"]) == (1, 1, 2, 0)
