"""The evaluation harness: pycocoevalcap parity, hand-computed metrics, judge-based sections against real servers.

Judge sections run against a real loopback HTTP server (`FaultInjectingServer`) whose scripted responder understands
every prompt, so the expected numbers are exact; one end-to-end run uses the real llama.cpp server.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from balcaprl.evaluate import compare_reports, evaluate_captions, harmonic_mean, load_captions, load_questions
from balcaprl.evaluate import main as evaluate_main
from balcaprl.evaluate.classic import close_meteor, java_available, ptb_tokenize
from balcaprl.judge.client import JudgeClient
from tests.loopback_server import prompt_text

REPOSITORY = Path(__file__).resolve().parents[1]

needs_java = pytest.mark.skipif(not java_available(), reason="java is not on PATH (the PTB tokenizer and METEOR)")


def judge_for(server) -> JudgeClient:
    return JudgeClient(server.base_url, "scripted", max_retries=1, backoff_base_s=0.001, backoff_max_s=0.01)


def image():
    return Image.new("RGB", (32, 32), (200, 30, 30))


REFERENCE = "a red circle and a gray background"  # units: "a red circle", "a gray background"


def judged_records():
    """P, R, L per caption (scripted judge): see the expected values in TestJudgeSections."""
    return [
        {"id": "1", "caption": "a red circle and a blue square", "references": [REFERENCE], "image": image()},
        {"id": "2", "caption": "a red circle", "references": [REFERENCE], "image": image()},
        {"id": "3", "caption": "FAIL here", "references": [REFERENCE], "image": image()},  # every judge call fails
        {"id": "4", "caption": "the the circle", "references": [REFERENCE]},  # no image
        {"id": "5", "caption": "", "references": [REFERENCE], "image": image()},  # empty caption
    ]


def assert_png(path: Path) -> None:
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.verify()


# ---------------------------------------------------------------------------------------------------- pure pieces


def test_harmonic_mean_is_exact_and_zero_safe():
    assert harmonic_mean([0.5, 0.25, 1.0]) == 3 / 7  # 3 / (2 + 4 + 1)
    assert harmonic_mean([0.6, 0.6, 0.6]) == pytest.approx(0.6, abs=1e-15)
    assert harmonic_mean([0.0, 0.5, 1.0]) == 0.0  # the limit as one value goes to 0
    assert harmonic_mean([0.5, None, 1.0]) is None and harmonic_mean([]) is None
    with pytest.raises(ValueError, match=">= 0"):
        harmonic_mean([0.5, -0.1])


def test_loaders_resolve_images_normalise_answers_and_name_bad_lines(tmp_path):
    image().save(tmp_path / "a.png")
    captions = tmp_path / "captions.jsonl"
    rows = [{"id": 7, "caption": "a red circle", "references": "a circle", "image": "a.png"}]
    captions.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert load_captions(captions) == [
        {"id": "7", "caption": "a red circle", "references": ["a circle"], "image": str(tmp_path / "a.png")}
    ]
    captions.write_text(json.dumps({"id": 1, "caption": "x"}) + "\n" + json.dumps({"id": "1", "caption": "y"}))
    with pytest.raises(ValueError, match="'1' appears twice"):
        load_captions(captions)
    captions.write_text(json.dumps({"id": 1, "caption": "x", "image": "missing.png"}))
    with pytest.raises(ValueError, match="line 1: image 'missing.png' not found"):
        load_captions(captions)

    questions = tmp_path / "questions.jsonl"
    base = {"id": 1, "question": "q?", "choices": ["B", "A", "red"]}
    answers = [2, "c", "A", "red"]  # index; letter; exact choice text wins over the letter reading; text
    questions.write_text("\n".join(json.dumps({**base, "answer": a, "category": ["x", "y"]}) for a in answers))
    loaded = load_questions(questions)
    assert [q["answer_index"] for q in loaded] == [2, 2, 1, 2]
    assert loaded[0]["id"] == "1" and loaded[0]["categories"] == ["x", "y"]
    questions.write_text(json.dumps({**base, "answer": "Z"}))
    with pytest.raises(ValueError, match="line 1: answer 'Z'"):
        load_questions(questions)


def test_judge_sections_need_a_judge(tmp_path):
    records = [{"id": "1", "caption": "a", "references": ["a"]}]
    with pytest.raises(ValueError, match="need a judge"):
        evaluate_captions(records, output_dir=tmp_path, classic=False, dcscore=True)


# --------------------------------------------------------------------------------------------------- classic metrics


PARITY_RECORDS = [
    {
        "id": "img1",
        "caption": "A man's dog, running on the beach.",
        "references": ["A dog runs along the beach.", "A brown dog running on sand near the sea!"],
    },
    {
        "id": "img2",
        "caption": "Two red buses parked (side by side).",
        "references": ["Two double-decker buses are parked next to each other.", "Red buses, parked."],
    },
    {
        "id": "img3",
        "caption": "a cat",
        "references": ["A cat sleeps on a sofa.", "A grey cat is sleeping.", "a sleepy cat on the couch"],
    },
    {"id": "img4", "caption": "", "references": ["An empty street at night."]},
]


@pytest.fixture(scope="module", autouse=True)
def _stop_the_shared_meteor_jvm():
    """The harness keeps one METEOR JVM per process (~1 GB); free it for the rest of the test session."""
    yield
    close_meteor()


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Our report and pycocoevalcap's own numbers on the same records (METEOR in a JVM of its own)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    report = evaluate_captions(PARITY_RECORDS, output_dir=tmp_path_factory.mktemp("parity"), plots=False)
    meteor = Meteor()  # pycocoevalcap's own scorer in its own JVM, not the one the harness keeps
    gts = PTBTokenizer().tokenize({r["id"]: [{"caption": c} for c in r["references"]] for r in PARITY_RECORDS})
    res = PTBTokenizer().tokenize({r["id"]: [{"caption": r["caption"]}] for r in PARITY_RECORDS})
    theirs, per_caption = {}, {}
    bleu, bleu_scores = Bleu(4).compute_score(gts, res, verbose=0)
    for order in range(4):
        theirs[f"BLEU-{order + 1}"], per_caption[f"BLEU-{order + 1}"] = bleu[order], bleu_scores[order]
    theirs["METEOR"], per_caption["METEOR"] = meteor.compute_score(gts, res)
    theirs["ROUGE-L"], per_caption["ROUGE-L"] = Rouge().compute_score(gts, res)
    theirs["CIDEr-D"], per_caption["CIDEr-D"] = Cider().compute_score(gts, res)
    meteor.meteor_p.kill()
    return report, theirs, per_caption, gts, res


@needs_java
class TestClassicMetrics:
    def test_tokenisation_equals_pycocoevalcap_ptb(self, parity):
        _, _, _, gts, res = parity
        ours = ptb_tokenize([r["caption"] for r in PARITY_RECORDS])
        assert ours == [res[r["id"]][0] for r in PARITY_RECORDS]
        assert ours[0] == "a man 's dog running on the beach"  # PTB's clitic split, punctuation dropped
        references = ptb_tokenize([c for r in PARITY_RECORDS for c in r["references"]])
        assert references == [c for r in PARITY_RECORDS for c in gts[r["id"]]]

    def test_scores_equal_pycocoevalcap_on_the_same_tokens(self, parity):
        report, theirs, per_caption, _, _ = parity
        classic = report["classic"]
        assert classic["tokenizer"] == "ptb" and set(classic["metrics"]) == set(theirs)
        for name, value in theirs.items():
            assert classic["metrics"][name] == pytest.approx(float(value), rel=1e-12, abs=1e-15), name
            ours = [row[name] for row in report["per_caption"]]
            assert ours == pytest.approx([float(v) for v in per_caption[name]], rel=1e-12, abs=1e-15), name
        assert "SPICE" in classic["skipped"]  # its CoreNLP jars are not shipped and cannot be downloaded here

    def test_hand_computed_bleu_1_and_cider_d(self, tmp_path):
        """Two images, one reference each: an exact match, and a caption sharing one word with its reference.

        BLEU-1 (corpus, clipped unigram precision × brevity penalty): matches 3 + 1 out of 3 + 2 candidate words,
        candidate length 5 = reference length 5, so BP = 1 and BLEU-1 = 4/5. Per caption: 1 and 1/2.
        CIDEr-D, df from the two references; idf(k) = log 2 − log max(1, df(k)):
        - "a red circle" = its reference: every n-gram vector equals the reference's, so sim_1 = sim_2 = sim_3 = 1,
          and there is no 4-gram (sim_4 = 0); no length penalty: 10 · (1 + 1 + 1 + 0) / 4 = 7.5.
        - "the cat" vs "a cat": unigrams g(the) = log 2 (df 0), g(cat) = log 2 (df 1); reference g(a) = 0 (df 2),
          g(cat) = log 2. sim_1 = (log 2)² / (√2 log 2 · log 2) = 1/√2; no shared bigram; same length:
          10 · (1/√2) / 4 = 2.5/√2.
        Mean CIDEr-D = (7.5 + 2.5/√2) / 2.
        """
        records = [
            {"id": "x", "caption": "a red circle", "references": ["a red circle"]},
            {"id": "y", "caption": "the cat", "references": ["a cat"]},
        ]
        report = evaluate_captions(records, output_dir=tmp_path, plots=False)
        assert_hand_values(report)


def assert_hand_values(report):
    metrics, rows = report["classic"]["metrics"], report["per_caption"]
    assert metrics["BLEU-1"] == pytest.approx(4 / 5, rel=1e-8)  # pycocoevalcap adds 1e-9-scale smoothing terms
    assert [row["BLEU-1"] for row in rows] == pytest.approx([1.0, 0.5], rel=1e-8)
    assert [row["CIDEr-D"] for row in rows] == pytest.approx([7.5, 2.5 / math.sqrt(2)], rel=1e-12)
    assert metrics["CIDEr-D"] == pytest.approx((7.5 + 2.5 / math.sqrt(2)) / 2, rel=1e-12)
    assert metrics["ROUGE-L"] == pytest.approx((1.0 + 0.5) / 2, rel=1e-12)  # LCS 1 of 2 words, F with β = 1.2


def test_without_java_meteor_is_skipped_and_the_rest_runs(tmp_path):
    """A real subprocess whose PATH has no java: the CLI scores the hand-computed corpus with the simple tokenizer."""
    directories = os.environ.get("PATH", "").split(os.pathsep)
    path = os.pathsep.join(d for d in directories if d and not os.access(os.path.join(d, "java"), os.X_OK))
    captions = tmp_path / "captions.jsonl"
    rows = [
        {"id": "x", "caption": "A red circle.", "references": ["a red circle"]},
        {"id": "y", "caption": "The cat!", "references": ["a cat"]},
    ]
    captions.write_text("\n".join(json.dumps(row) for row in rows))
    command = [
        sys.executable,
        "-m",
        "balcaprl.evaluate",
        "score",
        str(captions),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(
        command, env={**os.environ, "PATH": path}, cwd=REPOSITORY, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "java is not on PATH" in result.stderr  # the warning
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    classic = report["classic"]
    assert classic["tokenizer"] == "simple"
    assert "METEOR" in classic["skipped"] and "METEOR" not in classic["metrics"]
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(classic["metrics"])
    assert any("java is not on PATH" in note for note in report["notes"])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "NOT the PTB tokenizer" in markdown and "METEOR | skipped" in markdown
    assert_hand_values(report)  # lower-casing and punctuation removal give the same tokens as PTB here
    assert_png(tmp_path / "out" / "length.png")


# ------------------------------------------------------------------------------------------ judge-based sections


class TestJudgeSections:
    """Expected values from the scripted judge (TRUE_WORDS = red, circle; units split on " and ")."""

    QUESTIONS = [
        # caption 1 names circle only among these choices: B, correct.
        {"id": "1", "question": "Which shape?", "choices": ["triangle", "circle"], "answer": "B", "category": "shape"},
        # caption 1 names both colours: the judge abstains ("unknown"), wrong.
        {"id": "1", "question": "Square colour?", "choices": ["blue", "red"], "answer": 0, "category": "color"},
        # caption 2: "red" is choice B, correct (answer given as text).
        {
            "id": "2",
            "question": "Colour?",
            "choices": ["green", "red", "yellow"],
            "answer": "red",
            "category": "color",
        },
        # caption 2 names neither: abstains, wrong.
        {"id": "2", "question": "A dog?", "choices": ["yes", "no"], "answer": "yes", "category": ["objects"]},
        {"id": "3", "question": "Shape?", "choices": ["circle", "square"], "answer": 0},  # FAIL caption: judge fails
        {"id": "9", "question": "Shape?", "choices": ["circle", "square"], "answer": 0},  # no caption for image 9
        # caption 4 "the the circle": answers B (circle), the key says A: wrong.
        {"id": "4", "question": "Shape?", "choices": ["square", "circle"], "answer": "A", "category": "shape"},
    ]

    @pytest.fixture
    def report(self, scripted_server, tmp_path):
        return evaluate_captions(
            judged_records(),
            judge=judge_for(scripted_server),
            classic=False,
            dcscore=True,
            captionqa_questions=self.QUESTIONS,
            output_dir=tmp_path,
            name="scripted",
        )

    def test_balcap_means_counts_and_b_capscore(self, report, scripted_server):
        # P: caption 1 has 2 assertions, 1 verified (1/2); caption 2: 1/1; empty caption 5: 0; 3 fails; 4 has no image.
        # R: each non-empty caption covers "circle" of the 2 units (1/2); the empty one 0; 3 fails.
        # L: (mean(5, 5, 3) − 1) / 4 = 5/6 for 1 and 2; "the the" → fluency 1 → (3 − 1) / 4 = 1/2; empty → 0.
        balcap = report["balcap"]
        assert balcap["precision"] == {"mean": 0.5, "scored": 3, "unscorable": 1, "no_image": 1}
        assert balcap["recall"] == {"mean": 0.375, "scored": 4, "unscorable": 1}
        assert balcap["linguistic"]["mean"] == pytest.approx((5 / 6 + 5 / 6 + 1 / 2 + 0) / 4, rel=1e-12)
        assert balcap["linguistic"]["unscorable"] == 1
        expected = 3 / (1 / 0.5 + 1 / 0.375 + 1 / ((5 / 6 + 5 / 6 + 1 / 2) / 4))
        assert balcap["b_capscore"] == pytest.approx(expected, rel=1e-12)
        rows = {row["id"]: row for row in report["per_caption"]}
        assert rows["1"]["b_capscore"] == pytest.approx(3 / (2 + 2 + 6 / 5), rel=1e-12)
        assert rows["3"]["precision"] is None and rows["4"]["precision"] is None
        assert rows["5"]["b_capscore"] == 0.0
        assert report["summary"]["b-CapScore"] == balcap["b_capscore"]
        assert any("Precision (and so b-CapScore) needs the image" in note for note in report["notes"])

    def test_dcscore_precision_recall_f1(self, report, scripted_server):
        # Caption units checked against the image: caption 1 → [red circle ✓, blue square ✗] = 1/2; caption 2 → 1;
        # caption 4 (no image) → its unit "the the circle" is supported by the reference text → 1; empty → 0.
        # Recall as BalCapRL's: 1/2, 1/2, 1/2, 0. Caption 3 fails.
        dcscore = report["dcscore"]
        assert dcscore["precision"] == {"mean": 0.625, "scored": 4, "unscorable": 1}
        assert dcscore["recall"] == {"mean": 0.375, "scored": 4, "unscorable": 1}
        assert dcscore["f1"] == pytest.approx(2 * 0.625 * 0.375 / (0.625 + 0.375), rel=1e-12)
        assert dcscore["f1_mean"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3 + 0) / 4, rel=1e-12)
        assert dcscore["evidence_counts"] == {"image": 4, "references": 1}
        # Decomposed once for both sections (shared RecallReward + request sharing), once by the health check.
        assert scripted_server.judge.calls[f"decompose:{REFERENCE}"] == 1 + 1

    def test_captionqa_accuracy_per_category(self, report):
        captionqa = report["captionqa"]
        expected = {"questions": 6, "answered": 5, "correct": 2, "abstained": 2, "failed": 1}
        assert {key: captionqa[key] for key in expected} == expected
        assert captionqa["accuracy"] == 2 / 5 and captionqa["no_caption"] == 1
        per_category = {
            name: (entry["correct"], entry["answered"]) for name, entry in captionqa["per_category"].items()
        }
        assert per_category == {"color": (1, 2), "objects": (0, 1), "shape": (1, 2)}
        rows = {row["id"]: row for row in report["per_caption"]}
        assert rows["1"]["captionqa/accuracy"] == 0.5 and rows["4"]["captionqa/accuracy"] == 0.0
        assert rows["3"]["captionqa/accuracy"] is None

    def test_report_files_and_plots(self, report, tmp_path):
        saved = json.loads((tmp_path / "report.json").read_text())
        assert saved["summary"] == report["summary"] and len(saved["per_caption"]) == 5
        markdown = (tmp_path / "report.md").read_text()
        for heading in ("BalCapRL judge metrics", "DCScore-style", "CaptionQA-style", "Length (words)"):
            assert f"## {heading}" in markdown
        assert "**b-CapScore** = H(P, R, L)" in markdown
        for name in ("length.png", "metrics.png"):
            assert_png(tmp_path / name)
        assert report["judge"]["calls"]["requests"] > 0 and report["judge"]["calls"]["failures"] > 0


class TestCapArena:
    OURS = [
        {"id": "1", "caption": "a red circle on a gray background", "references": ["a red circle"], "image": image()},
        {"id": "2", "caption": "a cat", "references": ["a cat on a sofa"], "image": image()},
        {"id": "3", "caption": "two dogs", "references": ["two dogs"]},
        {"id": "4", "caption": "a long caption of six words", "references": ["x"]},
        {"id": "5", "caption": "FAIL", "references": ["x"]},
        {"id": "6", "caption": "not battled", "references": ["x"]},
    ]
    BASELINE = [
        {"id": "1", "caption": "a red circle", "references": ["a red circle"], "image": image()},
        {"id": "2", "caption": "a small black cat sleeping", "references": ["a cat on a sofa"], "image": image()},
        {"id": "3", "caption": "three cats", "references": ["two dogs"]},
        {"id": "4", "caption": "short", "references": ["x"]},
        {"id": "5", "caption": "something", "references": ["x"]},
    ]

    def battle(self, server, tmp_path, ours, baseline, name):
        return evaluate_captions(
            ours,
            judge=judge_for(server),
            classic=False,
            balcap=False,
            baseline_captions=baseline,
            output_dir=tmp_path / name,
            name=name,
            plots=False,
        )["caparena"]

    def test_swapping_the_systems_negates_the_score(self, scripted_server, tmp_path):
        # Longer caption wins in both orders: 1 and 4 won, 2 lost, 3 equal length (tie) → draw; 5 fails; 6 unpaired.
        ours = self.battle(scripted_server, tmp_path, self.OURS, self.BASELINE, "ours")
        expected = {"score": 1, "wins": 2, "losses": 1, "draws": 1, "battles": 4, "failed": 1, "no_baseline": 1}
        assert {key: ours[key] for key in expected} == expected
        theirs = self.battle(scripted_server, tmp_path, self.BASELINE, self.OURS, "theirs")
        assert theirs["score"] == -ours["score"]
        assert (theirs["wins"], theirs["losses"], theirs["draws"]) == (ours["losses"], ours["wins"], ours["draws"])
        assert theirs["no_baseline"] == 0  # every baseline id is in "ours"

        # Each pair was judged twice per run, positions swapped; both runs sent the same two requests.
        texts = [prompt_text(body["messages"]) for body in scripted_server.bodies]
        pair_one = [text for text in texts if "a red circle on a gray background" in text]
        ours_first = ['Description A:\n"""a red circle on a gray background"""' in text for text in pair_one]
        assert sorted(ours_first) == [False, False, True, True]
        assert scripted_server.fault_counts["bad_image"] == 0  # images went out as valid OpenAI image parts

    def test_a_judge_that_always_prefers_position_a_gives_only_draws(self, scripted_server, tmp_path):
        scripted_server.judge.arena_policy = "position_a"
        result = self.battle(scripted_server, tmp_path, self.OURS, self.BASELINE, "biased")
        assert (result["score"], result["wins"], result["losses"], result["draws"]) == (0, 0, 0, 4)
        assert result["position_consistent"] == 4

    def test_comparison_of_two_reports(self, scripted_server, tmp_path):
        ours = [{**row, "caption": row["caption"].replace("FAIL", "fails")} for row in self.OURS]
        reports = [
            evaluate_captions(
                records,
                judge=judge_for(scripted_server),
                classic=False,
                balcap=False,
                baseline_captions=baseline,
                output_dir=tmp_path / name,
                name=name,
            )  # fmt: skip
            for name, records, baseline in [("ours", ours, self.BASELINE), ("theirs", self.BASELINE, ours)]
        ]
        comparison = compare_reports([tmp_path / "ours", tmp_path / "theirs" / "report.json"], output_dir=tmp_path)
        assert comparison["names"] == ["ours", "theirs"]
        assert comparison["metrics"]["CapArena"] == [
            reports[0]["summary"]["CapArena"],
            reports[1]["summary"]["CapArena"],
        ]
        assert "Δ (2nd − 1st)" in (tmp_path / "comparison.md").read_text()
        assert_png(tmp_path / "comparison.png")


# ---------------------------------------------------------------------------------- exact rewards as the judges


WORLD_SCENE = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "left"}]}
WORLD_RECORDS = [
    # Facts of the scene: object(red circle), size(small), position(left), count(1).
    # All 3 claims true; 3 of 4 facts; grammatical, no repetition, well formed: P = 1, R = 3/4, L = 1.
    {"id": "a", "caption": "A small red circle on the left.", "references": ["x"], "scene": WORLD_SCENE},
    # One false claim: P = 0, R = 0; a consistent lower-case sentence: L = 1.
    {"id": "b", "caption": "a blue square.", "references": ["x"], "scene": WORLD_SCENE},
    # count(1) and object(red circle) true, size(large) false: P = 2/3, R = 2/4; "the the": 1 of 10 words
    # repeated, L = 0.9.
    {
        "id": "c",
        "caption": "There is one object. The the red circle is large.",
        "references": ["x"],
        "scene": WORLD_SCENE,
    },
]


def assert_world_values(folder: Path):
    report = json.loads((folder / "report.json").read_text())
    balcap = report["balcap"]
    assert balcap["scorers"] == {
        "precision": "world_precision",
        "recall": "world_recall",
        "linguistic": "world_linguistic",
    }
    assert balcap["precision"] == {"mean": pytest.approx(5 / 9, rel=1e-12), "scored": 3, "unscorable": 0}
    assert balcap["recall"]["mean"] == pytest.approx(5 / 12, rel=1e-12)
    assert balcap["linguistic"]["mean"] == pytest.approx(2.9 / 3, rel=1e-12)
    assert balcap["b_capscore"] == pytest.approx(3 / (9 / 5 + 12 / 5 + 3 / 2.9), rel=1e-12)
    rows = {row["id"]: row for row in report["per_caption"]}
    assert rows["a"]["b_capscore"] == pytest.approx(3 / (1 + 4 / 3 + 1), rel=1e-12)
    assert rows["b"]["b_capscore"] == 0.0
    assert [rows[key]["world_recall/facts"] for key in "abc"] == [4.0, 4.0, 4.0]  # the rewards read the scene
    assert rows["c"]["world_linguistic/repetition"] == pytest.approx(0.9, rel=1e-12)
    assert "Scored by world_precision, world_recall, world_linguistic" in (folder / "report.md").read_text()


def test_exact_world_rewards_stand_in_for_the_judges(tmp_path):
    """No judge at all: the world's exact rewards score P, R, L from each record's `scene` column."""
    from balcaprl.rewards.world import WorldLinguistic, WorldPrecision, WorldRecall

    report = evaluate_captions(
        WORLD_RECORDS,
        output_dir=tmp_path,
        classic=False,
        plots=False,
        balcap_rewards=(WorldPrecision(), WorldRecall(), WorldLinguistic()),
    )
    assert report["judge"] is None and report["summary"]["b-CapScore"] == report["balcap"]["b_capscore"]
    assert_world_values(tmp_path)

    # The same through the CLI, from a captions file whose extra `scene` key load_captions keeps.
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(record) + "\n" for record in WORLD_RECORDS))
    assert load_captions(captions)[0]["scene"] == WORLD_SCENE
    arguments = ["score", str(captions), "--output-dir", str(tmp_path / "cli"), "--exact-world-judges"]
    assert evaluate_main([*arguments, "--no-classic", "--no-plots"]) == 0
    assert_world_values(tmp_path / "cli")


def test_report_gives_the_judge_tokens_and_their_cost(scripted_server, tmp_path):
    """`score` with a priced judge: the report's token totals are the usage the server answered with (the health
    check is off, so every answer belongs to the scoring) and the cost is their price; without a price, no cost."""
    captions = tmp_path / "captions.jsonl"
    records = [{"id": "1", "caption": "a red circle"}, {"id": "2", "caption": "the the circle"}]
    captions.write_text("".join(json.dumps({**record, "references": [REFERENCE]}) + "\n" for record in records))
    judge = ["--judge-base-url", scripted_server.base_url, "--judge-model", "scripted", "--judge-max-retries", "1"]
    common = ["score", str(captions), "--no-classic", "--no-plots", "--no-judge-health-check", *judge]

    price = ["--judge-price-per-million-tokens", "3", "15"]
    assert evaluate_main([*common, "--output-dir", str(tmp_path / "priced"), *price]) == 0
    priced = json.loads((tmp_path / "priced" / "report.json").read_text())["judge"]
    calls = priced["calls"]
    assert calls["prompt_tokens"] == scripted_server.prompt_tokens > 0
    assert calls["completion_tokens"] == scripted_server.completion_tokens > 0
    assert priced["price_per_million_tokens"] == [3.0, 15.0]
    expected = (calls["prompt_tokens"] * 3 + calls["completion_tokens"] * 15) / 1e6
    assert priced["cost"] == pytest.approx(expected, rel=1e-12)
    line = (
        f"Judge tokens: {calls['prompt_tokens']} prompt, {calls['completion_tokens']} completion; cost {expected:.6g}"
    )
    assert f"{line} at 3 / 15 per million tokens." in (tmp_path / "priced" / "report.md").read_text()

    assert evaluate_main([*common, "--output-dir", str(tmp_path / "unpriced")]) == 0
    unpriced = json.loads((tmp_path / "unpriced" / "report.json").read_text())["judge"]
    assert "cost" not in unpriced and unpriced["calls"]["prompt_tokens"] == calls["prompt_tokens"]  # deterministic


# ------------------------------------------------------------------------------------------------ real llama.cpp


def test_end_to_end_with_the_real_llama_cpp_judge(llama_cpp_base_url, tmp_path):
    """Text judges (recall, linguistic, DCScore-style against references, CaptionQA, CapArena) on SmolLM2-135M.

    Its answers are poor; what is checked is the protocol: schema-constrained answers parse, every number is in
    range, the counts add up, and the report is written.
    """
    reference = "A red circle in the middle of a gray image."
    records = [
        {"id": "a", "caption": "A red circle on a gray background.", "references": [reference]},
        {"id": "b", "caption": "Two dogs play in a park.", "references": [reference]},
        {"id": "c", "caption": "A circle.", "references": [reference]},
    ]
    # One battle and one question (the server takes ~1 s per request): the protocol, not the statistics, is tested.
    baseline = [{"id": "a", "caption": "A picture.", "references": [reference]}]
    questions = [{"id": "a", "question": "What colour is the circle?", "choices": ["red", "blue"], "answer": "red"}]
    judge = JudgeClient(llama_cpp_base_url, "smollm2", max_tokens=96, timeout=60, max_retries=0, cache_dir=tmp_path)
    report = evaluate_captions(
        records, judge=judge, classic=False, dcscore=True, captionqa_questions=questions,
        baseline_captions=baseline, output_dir=tmp_path / "out", name="smollm2-judged",
    )  # fmt: skip

    balcap = report["balcap"]
    assert balcap["precision"]["no_image"] == 3 and balcap["b_capscore"] is None  # a text judge: no precision
    for metric in ("recall", "linguistic"):
        assert balcap[metric]["scored"] + balcap[metric]["unscorable"] == 3
    dcscore = report["dcscore"]
    assert dcscore["evidence_counts"] == {"image": 0, "references": 3}
    for value in [balcap["recall"]["mean"], balcap["linguistic"]["mean"], dcscore["f1"], dcscore["f1_mean"]] + [
        dcscore[key]["mean"] for key in ("precision", "recall")
    ]:
        assert value is None or 0.0 <= value <= 1.0
    captionqa = report["captionqa"]
    assert captionqa["answered"] + captionqa["failed"] == 1
    assert captionqa["accuracy"] in (None, 0.0, 1.0)
    caparena = report["caparena"]
    assert caparena["battles"] + caparena["failed"] == 1 and caparena["no_baseline"] == 2
    assert abs(caparena["score"]) <= caparena["battles"]
    assert caparena["wins"] + caparena["losses"] + caparena["draws"] == caparena["battles"]
    calls = report["judge"]["calls"]
    assert calls["requests"] >= 10  # it really asked the server
    assert sum(v is not None for v in [captionqa["accuracy"], balcap["linguistic"]["mean"]]) >= 1
    assert (tmp_path / "out" / "report.md").is_file()
    assert_png(tmp_path / "out" / "metrics.png")
