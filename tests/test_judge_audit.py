"""`balcaprl judge audit` against real HTTP judges on 127.0.0.1: an oracle that answers from the exact truth, one that
answers at random, one blind to omissions, a text-only one, and the real llama.cpp judge (SmolLM2-135M, slow)."""

from __future__ import annotations

import doctest
import hashlib
import json
import os
import random
import re
import time
from http import HTTPStatus

import pytest

from balcaprl.judge.audit import main, pearson, spearman, verdict
from balcaprl.judge.audit_set import (
    CORRECT,
    PERTURBATIONS,
    build_audit_set,
    expected_linguistic,
    read_audit_data,
    write_audit_set,
)
from balcaprl.rewards.world import score_caption
from balcaprl.world.captions import parse_caption
from balcaprl.world.scene import Scene
from tests.judge_servers import find_judge_gguf, free_port, llama_cpp_server, xllamacpp_available
from tests.loopback_server import LoopbackChatServer, prompt_text

SCENES = 6  # 180 items: ~200 judge requests per audit, well under a second on the loopback server
FAST = ["--judge-max-retries", "0", "--judge-backoff-base-s", "0.001"]


# ------------------------------------------------------------------------------------------------------ the judges
def quoted(text: str) -> str:
    return re.search(r'"""(.*?)"""', text, flags=re.DOTALL).group(1)


def numbered(text: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", text, flags=re.MULTILINE)


class OracleJudge:
    """Answers every judge prompt from the exact truth of the shapes world.

    precision: the caption's claims under the world's grammar, each verified against the scene looked up by caption;
    recall: a reference splits into the scene's facts (looked up by reference), and a fact is covered as
    `balcaprl.rewards.world.recall_score` says; linguistic: the item's defined score as three equal 1–5 ratings.
    ``blind_to_omissions`` marks every fact covered.
    """

    def __init__(self, items, blind_to_omissions: bool = False):
        self.scene_of_caption = {item.caption: Scene.from_dict(item.scene) for item in items}
        self.scene_of_reference = {item.reference[0]: Scene.from_dict(item.scene) for item in items}
        self.linguistic = {item.caption: item.expected.get("linguistic", 1.0) for item in items}
        self.facts = {str(fact): fact for item in items for fact in Scene.from_dict(item.scene).facts()}
        self.blind_to_omissions = blind_to_omissions

    def __call__(self, messages) -> str:
        text = prompt_text(messages)
        if "Split the caption into atomic assertions" in text:
            caption = quoted(text)  # the health check's caption is not in the set: no scene, every claim false
            scene = self.scene_of_caption.get(caption)
            parsed, facts = parse_caption(caption), scene.facts() if scene else frozenset()
            assertions = [
                {"text": str(claim), "verified": claim in facts, "pointable": True} for claim in parsed.claims
            ]
            assertions += [{"text": clause, "verified": False, "pointable": True} for clause in parsed.unparseable]
            return json.dumps({"assertions": assertions})
        if "atomic units of information" in text:
            return json.dumps({"units": [str(fact) for fact in sorted(self.scene_of_reference[quoted(text)].facts())]})
        if "numbered list of facts" in text:
            units = [self.facts[unit] for unit in numbered(text)]
            if self.blind_to_omissions:
                return json.dumps({"covered": [True] * len(units)})
            claimed = set(parse_caption(quoted(text)).claims) & set(units)  # the units are the scene's true facts
            placed = {fact.subject for fact in claimed if fact.kind == "position"}
            covered = [
                unit in claimed or (unit.kind == "relation" and unit.subject in placed and unit.target in placed)
                for unit in units
            ]
            return json.dumps({"covered": covered})
        if "Rate the writing" in text:
            rating = round(1 + 4 * self.linguistic.get(quoted(text), 1.0))
            return json.dumps({"clarity": rating, "fluency": rating, "coherence": rating})
        raise AssertionError(f"unexpected prompt: {text[:200]}")


def random_judge(messages) -> str:
    """Schema-valid answers drawn at random (seeded by the prompt, so a run is reproducible)."""
    text = prompt_text(messages)
    rng = random.Random(hashlib.sha256(text.encode()).hexdigest())
    if "Split the caption into atomic assertions" in text:
        count = rng.randint(1, 8)
        return json.dumps({"assertions": [{"text": "x", "verified": rng.random() < 0.5, "pointable": True}] * count})
    if "atomic units of information" in text:
        return json.dumps({"units": [f"fact {number}" for number in range(8)]})
    if "numbered list of facts" in text:
        return json.dumps({"covered": [rng.random() < 0.5 for _ in numbered(text)]})
    if "Rate the writing" in text:
        return json.dumps({aspect: rng.randint(1, 5) for aspect in ("clarity", "fluency", "coherence")})
    raise AssertionError(f"unexpected prompt: {text[:200]}")


class TextOnlyServer(LoopbackChatServer):
    """Refuses requests with an image as llama.cpp does for a model without a vision projector (HTTP 500)."""

    def handle_chat(self, handler, body, messages) -> None:
        has_image = any(
            isinstance(part, dict) and part.get("type") == "image_url"
            for message in messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
        )
        if has_image:
            error = {"error": {"code": 500, "message": "image input is not supported", "type": "server_error"}}
            handler.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, error)
            return
        super().handle_chat(handler, body, messages)


@pytest.fixture(scope="module")
def items():
    return build_audit_set(SCENES, seed=0)


def audit(server, tmp_path, *extra: str) -> tuple[int, dict]:
    output = tmp_path / "audit"
    code = main(["--judge-base-url", server.base_url, "--judge-model", "loopback", "--n", str(SCENES)]
                + FAST + ["--output-dir", str(output), *extra])  # fmt: skip
    report = json.loads((output / "report.json").read_text()) if (output / "report.json").is_file() else {}
    return code, report


# --------------------------------------------------------------------------------------------------- the audit set
class TestAuditSet:
    def test_every_scene_has_a_correct_caption_and_every_perturbation_at_every_severity(self, items):
        per_scene = 1 + sum(len(severities) for _, severities in PERTURBATIONS.values())
        assert len(items) == SCENES * per_scene == SCENES * 30
        assert len({item.id for item in items}) == len(items)
        scene = [item for item in items if item.group == "scene-000"]
        assert [(item.perturbation, item.severity) for item in scene[:4]] == [
            (CORRECT, 0), ("colour", 1), ("colour", 2), ("colour", 3)
        ]  # fmt: skip
        assert scene[0].image.size == (448, 448)
        assert scene[0].expected == {"precision": 1.0, "recall": 1.0, "linguistic": 1.0}

    def test_expected_scores_are_the_world_rewards_and_fall_with_severity(self, items):
        for item in items:
            (reward,) = item.expected if item.perturbation != CORRECT else ("linguistic",)
            if reward in ("precision", "recall"):
                assert item.expected[reward] == score_caption(item.caption, item.scene)[reward]
            if item.perturbation != CORRECT and reward == "linguistic":
                assert item.expected[reward] == expected_linguistic(item.severity) == 1 - 0.25 * item.severity
        by_key = {(item.group, item.perturbation, item.severity): item for item in items}
        for (group, kind, severity), item in by_key.items():
            if severity:
                reward = PERTURBATIONS[kind][0]
                previous = by_key[(group, kind, severity - 1) if severity > 1 else (group, CORRECT, 0)]
                assert item.expected[reward] < previous.expected[reward], item.id

    def test_size_error_costs_one_claim_and_omissions_stay_true(self, items):
        correct = items[0]
        claims = score_caption(correct.caption, correct.scene)["claims"]
        size_1 = next(item for item in items if item.id == "scene-000/size/1")
        assert size_1.expected["precision"] == pytest.approx((claims - 1) / claims)
        for item in items:
            if PERTURBATIONS.get(item.perturbation, ("",))[0] in ("recall", "linguistic"):
                assert score_caption(item.caption, item.scene)["precision"] == 1.0 or item.perturbation == "grammar"

    def test_a_large_set_builds_every_perturbation(self):
        """Scenes whose objects share one colour (no shape left to rename one to) are passed over."""
        large = build_audit_set(100, seed=1)
        assert len(large) == 3000 and len({item.group for item in large}) == 100

    def test_the_written_set_reads_back_as_the_same_items(self, items, tmp_path):
        path = write_audit_set(items[:30], tmp_path)
        again = read_audit_data(path)
        assert [(i.id, i.caption, i.expected, i.group, i.perturbation, i.severity) for i in again] == [
            (i.id, i.caption, i.expected, i.group, i.perturbation, i.severity) for i in items[:30]
        ]
        assert (tmp_path / "images" / "scene-000.png").is_file()


def test_statistics_match_hand_computed_values():
    import balcaprl.judge.audit

    assert doctest.testmod(balcaprl.judge.audit).failed == 0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833)  # ties share the mean rank
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(0.9819805)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert verdict(0.9, 0.95, 0.9, 0.0)[0] == "usable"
    assert verdict(0.9, 0.95, 0.2, 0.0)[0] == "marginal"  # a blind spot: one type detected 1 time in 5
    assert verdict(0.5, 0.7, 0.6, 0.1)[0] == "marginal"
    assert verdict(None, 0.0, 0.0, 0.0) == (
        "not usable", ["Spearman undefined (constant judge scores) < 0.4", "mean detection rate 0.00 < 0.6"]
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------- judges
def test_an_oracle_judge_agrees_detects_everything_and_is_usable(items, tmp_path):
    with LoopbackChatServer(OracleJudge(items)) as server:
        started = time.perf_counter()
        code, report = audit(server, tmp_path)
        elapsed = time.perf_counter() - started
    assert code == 0, report
    assert elapsed < 20
    for name in ("precision", "recall", "linguistic"):
        section = report["rewards"][name]
        assert section["verdict"] == "usable", (name, section["verdict_reasons"])
        assert section["agreement"]["spearman"] == pytest.approx(1.0)
        assert section["agreement"]["mae"] == pytest.approx(0.0, abs=1e-9)
        assert section["failures"] == 0
        kinds = [kind for kind, (reward, _) in PERTURBATIONS.items() if reward == name]
        assert list(section["detection"]) == kinds
        for kind, entry in section["detection"].items():
            assert (entry["rate"], entry["pairs"]) == (1.0, SCENES * len(PERTURBATIONS[kind][1])), kind
        assert all(entry["strictly_decreasing"] == 1.0 for entry in section["monotonicity"].values())
        assert section["latency_s"]["calls"] >= section["items"] and section["latency_s"]["p99"] < 5
        assert section["judge"]["requests"] >= section["items"]
    assert report["rewards"]["recall"]["judge"]["requests"] == SCENES * 7  # one decomposition per reference + 6 items
    output = tmp_path / "audit"
    for name in ("precision", "recall", "linguistic"):
        assert (output / f"{name}_scatter.png").stat().st_size > 10_000
    markdown = (output / "report.md").read_text()
    assert "| precision | **usable** | 1.00 | 1.00 | 0.00 | 1.00 / 1.00 | 1.00 | 0 of 96 |" in markdown
    assert len(read_audit_data(output / "audit_set.jsonl")) == len(items)


def test_a_random_judge_does_not_agree_and_is_not_usable(tmp_path):
    with LoopbackChatServer(random_judge) as server:
        code, report = audit(server, tmp_path, "--judge-price-per-million-tokens", "2.5", "10")
    assert code == 0
    for name in ("precision", "recall", "linguistic"):
        section = report["rewards"][name]
        assert abs(section["agreement"]["spearman"]) < 0.3, name
        counters = section["judge"]
        assert counters["cost"] == pytest.approx(
            (2.5 * counters["prompt_tokens"] + 10 * counters["completion_tokens"]) / 1e6
        )
        assert section["verdict"] == "not usable", name
        assert "Spearman" in section["verdict_reasons"][0]


def test_a_judge_blind_to_omissions_is_caught_by_the_recall_section(items, tmp_path):
    with LoopbackChatServer(OracleJudge(items, blind_to_omissions=True)) as server:
        code, report = audit(server, tmp_path, "--rewards", "recall")
    assert code == 0 and list(report["rewards"]) == ["recall"]
    recall = report["rewards"]["recall"]
    assert {kind: entry["rate"] for kind, entry in recall["detection"].items()} == {
        "omit_object": 0.0,
        "omit_detail": 0.0,
    }
    assert recall["agreement"]["spearman"] is None  # every caption scored 1: no ranking at all
    assert recall["verdict"] == "not usable"
    assert recall["monotonicity"]["omit_detail"]["strictly_decreasing"] == 0.0
    assert "detection rate 0.00" in (tmp_path / "audit" / "report.md").read_text()


def test_a_text_only_judge_skips_precision_with_a_note_and_audits_the_rest(items, tmp_path, capsys):
    with TextOnlyServer(OracleJudge(items)) as server:
        code, report = audit(server, tmp_path)
    assert code == 0
    precision = report["rewards"]["precision"]
    assert precision["status"] == "skipped"
    assert "not one with an image (HTTP 500, after 1 attempt)" in precision["note"]
    assert "Precision needs a judge that sees the image" in precision["note"]
    assert [report["rewards"][name]["verdict"] for name in ("recall", "linguistic")] == ["usable", "usable"]
    markdown = (tmp_path / "audit" / "report.md").read_text()
    assert "| precision | skipped |" in markdown and "**skipped: the judge answers text requests" in markdown
    assert not (tmp_path / "audit" / "precision_scatter.png").exists()
    assert "precision: skipped: the judge answers text requests" in capsys.readouterr().out


def test_own_labelled_data_gets_the_same_analysis(items, tmp_path):
    path = write_audit_set(items, tmp_path / "mine")
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):  # a user's file: no scene graphs, no groups (grouped by image instead)
        record = json.loads(line)
        del record["scene"], record["group"], record["id"]
        lines[index] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with LoopbackChatServer(OracleJudge(items)) as server:
        code, report = audit(server, tmp_path, "--data", str(path), "--rewards", "linguistic,recall")
    assert code == 0
    assert report["source"]["kind"] == "data"
    assert list(report["rewards"]) == ["linguistic", "recall"]
    assert all(section["verdict"] == "usable" for section in report["rewards"].values())
    assert report["rewards"]["recall"]["detection"]["omit_object"]["pairs"] == SCENES * 2


# ------------------------------------------------------------------------------------------------------------- CLI
def write_lines(path, records) -> str:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return str(path)


GOOD = {"caption": "A red circle.", "reference": "A red circle on the left.", "expected": {"recall": 0.5}}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"reference": "x", "expected": {"recall": 1}}, ":2: key 'caption' must be a string"),
        ({**GOOD, "expected": {"precision": 1.5}}, ":2: key 'expected.precision' must be a number in [0, 1]"),
        ({**GOOD, "expected": {"fluency": 1}}, ":2: key 'expected.fluency' is not a reward"),
        ({**GOOD, "expected": {"precision": 1}}, ":2: key 'image' is missing: the precision judge must see the image"),
        ({**GOOD, "image": "nowhere.png"}, ":2: key 'image': cannot read"),
        ({"caption": "x", "expected": {"recall": 1}}, ":2: key 'reference' is missing"),
        ({**GOOD, "severity": -1, "perturbation": "omission"}, ":2: key 'severity' must be an integer >= 0"),
        ("{not json", ":2: not JSON"),
    ],
)
def test_a_bad_data_line_is_one_error_naming_the_line_and_key(tmp_path, capsys, bad, message):
    data = write_lines(tmp_path / "mine.jsonl", [GOOD, bad])
    code = main(["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--data", data])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and error.startswith("balcaprl judge audit: error: ")
    assert f"{data}{message}" in error


def test_a_bad_judge_setting_is_a_usage_error(capsys):
    code = main(["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-timeout", "0"])
    assert code == 2
    assert "judge_timeout > 0" in capsys.readouterr().err


def test_an_unknown_reward_is_a_usage_error(capsys):
    code = main(["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--rewards", "precision,fluency"])
    error = capsys.readouterr().err
    assert code == 2
    assert "argument --rewards: unknown reward 'fluency'; choose from precision,recall,linguistic" in error
    assert error.count("\n") == 1


def test_a_missing_judge_is_a_usage_error_and_an_unreachable_one_exits_1(tmp_path, capsys):
    assert main(["--judge-model", "m"]) == 2
    assert "needs both --judge-base-url URL and --judge-model NAME" in capsys.readouterr().err
    url = f"http://127.0.0.1:{free_port()}/v1"
    code = main(["--judge-base-url", url, "--judge-model", "m", "--n", "1", "--output-dir", str(tmp_path), *FAST])
    assert code == 1
    assert f"error: the judge at {url} (model 'm') did not answer: connection error" in capsys.readouterr().err


def test_the_console_script_dispatches_judge_audit(capsys):
    from balcaprl.cli import main as console

    with pytest.raises(SystemExit) as exit_info:
        console(["judge", "audit", "--judge-model", "m"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        console(["judge", "--help"])
    assert exit_info.value.code == 0 and "audit" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------- llama.cpp
@pytest.fixture(scope="module")
def smollm2_judge():
    """llama.cpp serving SmolLM2-135M-Instruct with room for a decomposition answer (n_predict 384)."""
    reason = "xllamacpp is not installed" if not xllamacpp_available() else find_judge_gguf()[1]
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must provide it)")
        pytest.skip(reason)
    with llama_cpp_server(find_judge_gguf()[0], n_ctx=4096, n_parallel=2, n_predict=384) as base_url:
        yield base_url


@pytest.mark.slow
def test_the_real_smollm2_judge_end_to_end(smollm2_judge, tmp_path, capsys):
    """SmolLM2-135M is text-only: precision is skipped with a note, recall and linguistic run end to end."""
    output = tmp_path / "smollm2"
    code = main(["--judge-base-url", smollm2_judge, "--judge-model", "smollm2", "--n", "2", "--judge-timeout", "120",
                 "--judge-max-retries", "1", "--judge-max-concurrency", "2", "--output-dir", str(output)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((output / "report.json").read_text())
    assert report["rewards"]["precision"]["status"] == "skipped"
    assert "Precision needs a judge that sees the image" in report["rewards"]["precision"]["note"]
    for name in ("recall", "linguistic"):
        section = report["rewards"][name]
        assert section["status"] == "audited" and section["items"] == {"recall": 12, "linguistic": 20}[name]
        assert section["verdict"] in ("usable", "marginal", "not usable")
        assert section["latency_s"]["calls"] >= section["items"]
    print((output / "report.md").read_text())  # the measured numbers (docs/judge_audit.md quotes a run)


def test_a_reward_no_item_labels_is_skipped_with_a_note(tmp_path):
    records = [{**GOOD, "caption": f"A red circle, take {number}."} for number in range(4)]
    data = write_lines(tmp_path / "mine.jsonl", records)
    with LoopbackChatServer(random_judge) as server:
        code, report = audit(server, tmp_path, "--data", data, "--rewards", "precision,recall")
    assert code == 0
    assert report["rewards"]["precision"] == {
        "status": "skipped", "note": "skipped: no item gives an expected score for it.", "items": 0
    }  # fmt: skip
    recall = report["rewards"]["recall"]
    assert recall["status"] == "audited" and recall["items"] == 4 and recall["detection"] == {}
    assert recall["agreement"]["spearman"] is None  # every label is 0.5: nothing to rank
