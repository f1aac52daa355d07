"""No exit 0 without work: `balcaprl evaluate` checks its judge (as `balcaprl train` does) and its output folder before
scoring or generating anything, and exits 1 when a judged metric could score no caption.

Real judges on 127.0.0.1: a closed port (down), loopback servers that answer garbage, off-schema JSON or HTTP 401,
and the scripted judge, whose "FAIL" prompts always get HTTP 500 (a judge that passes the health check, then fails
the scoring calls). The console script runs as a subprocess where the exit code and stderr are the point.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from balcaprl import world
from balcaprl.evaluate import main as evaluate_main
from balcaprl.evaluate.classic import close_meteor
from tests.judge_servers import FaultInjectingServer, free_port

BALCAPRL = Path(sys.executable).parent / "balcaprl"  # the console script of this virtualenv, as a user runs it
REFERENCE = "a red circle and a gray background"
FAST_JUDGE = ["--judge-model", "scripted", "--judge-max-retries", "0"]


@pytest.fixture(scope="module", autouse=True)
def _stop_the_shared_meteor_jvm():
    yield
    close_meteor()


def write_captions(folder: Path, captions: list[str]) -> Path:
    """A captions JSONL whose records all have an image (so precision asks the judge) and the same reference."""
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    rows = [
        {"id": str(index), "caption": caption, "references": [REFERENCE], "image": "red.png"}
        for index, caption in enumerate(captions)
    ]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_console_script(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(BALCAPRL), "evaluate", *arguments]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def only_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def run_in_process(arguments: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `main(arguments)`."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = evaluate_main(arguments)
        except SystemExit as exit_info:
            status = exit_info.code
    return status, stderr.getvalue()


# ------------------------------------------------------------------------------------------ health check: score


def test_a_down_judge_stops_score_with_one_line_before_anything_is_scored(tmp_path):
    captions = write_captions(tmp_path, ["a red circle", "a blue square"])
    url = f"http://127.0.0.1:{free_port()}/v1"
    output = tmp_path / "out"
    started = time.perf_counter()
    result = run_console_script(
        "score", str(captions), "--output-dir", str(output), "--judge-base-url", url, *FAST_JUDGE
    )
    assert result.returncode == 1, result.stderr
    assert time.perf_counter() - started < 60
    line = only_line(result.stderr)
    assert line.startswith(
        "balcaprl evaluate: error: judge health check failed before scoring: 'linguistic' judge at "
        f"{url} (model 'scripted'): connection error (ConnectError), after 1 attempt"
    )
    assert f"'precision' judge at {url}" in line and "--no-judge-health-check" in line
    assert result.stdout == "" and not output.exists()  # no summary, no report


def test_garbage_answers_fail_the_health_check_and_nothing_is_scored(tmp_path):
    captions = write_captions(tmp_path, ["a red circle", "a blue square", "a red square"])
    output = tmp_path / "out"
    with FaultInjectingServer(lambda messages: "What a lovely picture!") as server:
        result = run_console_script(
            "score", str(captions), "--output-dir", str(output), "--judge-base-url", server.base_url, *FAST_JUDGE
        )
        url, requests = server.base_url, server.request_count
    assert result.returncode == 1, result.stderr
    line = only_line(result.stderr)
    assert line.startswith("balcaprl evaluate: error: judge health check failed before scoring: ")
    assert f"'recall' judge at {url}" in line
    assert "answer has no JSON object: 'What a lovely picture!'" in line
    assert requests == 3  # linguistic, recall, precision: one each, and not one of the 3 × 3 scoring calls
    assert not output.exists()


@pytest.mark.parametrize(
    ("server", "fault"),
    [
        (lambda: FaultInjectingServer(lambda messages: '{"verdict": "fine"}'), "answer does not match the schema"),
        (lambda: FaultInjectingServer(required_api_key="secret"), "rejected with HTTP 401"),
    ],
    ids=["off-schema JSON", "HTTP 401"],
)
def test_every_fault_of_the_health_check_is_named(tmp_path, server, fault):
    captions = write_captions(tmp_path, ["a red circle"])
    with server() as judge:
        url = judge.base_url
        arguments = ["score", str(captions), "--output-dir", str(tmp_path / "out"), "--no-classic"]
        status, stderr = run_in_process([*arguments, "--judge-base-url", url, *FAST_JUDGE])
    assert status == 1
    line = only_line(stderr)
    assert f"judge health check failed before scoring: 'linguistic' judge at {url}" in line
    assert fault in line and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- health check: caption and score


def test_a_down_judge_stops_run_before_the_model_is_loaded(tmp_path):
    data = world.write_jsonl(world.make_split("test", 2, seed=0), tmp_path / "world")
    url = f"http://127.0.0.1:{free_port()}/v1"
    output = tmp_path / "out"
    arguments = ["--model", str(tmp_path / "no-such-model"), "--data", str(data), "--output-dir", str(output)]
    status, stderr = run_in_process([*arguments, "--judge-base-url", url, *FAST_JUDGE])
    assert status == 1
    line = only_line(stderr)  # not the missing model's error: the judge is checked first
    assert line.startswith("python -m balcaprl.evaluate: error: judge health check failed before generating captions")
    assert f"'precision' judge at {url}" in line and "no-such-model" not in line
    assert not output.exists()


# ------------------------------------------------------------------------------- every judged call of a metric failed


def test_a_judge_failing_every_scoring_call_exits_1_and_the_report_names_the_counts(scripted_server, tmp_path):
    """The health check passes (its prompts hold no "FAIL"), then every call that holds a caption fails: precision,
    recall's verification and linguistic score nothing. Not exit 0, and no non-vision judge blamed."""
    captions = write_captions(tmp_path, ["FAIL one", "FAIL two"])
    output = tmp_path / "out"
    result = run_console_script(
        "score", str(captions), "--output-dir", str(output), "--no-classic", "--no-plots",
        "--judge-base-url", scripted_server.base_url, *FAST_JUDGE,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "balcaprl evaluate: error: no score for precision (2 of 2 captions), recall (2 of 2 captions), linguistic "
        f"(2 of 2 captions): all their judge calls failed; {output / 'report.md'} says why."
    )
    report = json.loads((output / "report.json").read_text())
    assert report["judge"]["health_check"] == "passed"
    summary = report["summary"]
    assert summary["precision"] is summary["recall"] is summary["linguistic"] is summary["b-CapScore"] is None
    assert set(report["unscored"]) == {"precision", "recall", "linguistic"}
    calls = report["judge"]["calls"]
    assert calls["asked"] == calls["failures"] + 1 > 1  # the reference's decomposition is the one that succeeded
    notes = report["notes"]
    assert "precision: no score (null, not 0): the judge failed on 2 of 2 captions." in notes
    assert f"Judge calls of this run: {calls['failures']} of {calls['asked']} failed after their retries" in "".join(
        notes
    )
    assert any(note.startswith("A judge health check after scoring passes") for note in notes)
    text = "\n".join(notes) + (output / "report.md").read_text()
    assert "vision" not in text and "cannot score precision" not in text and "left out of its mean" not in text


def test_with_the_check_skipped_a_down_judge_still_does_not_exit_0(tmp_path):
    captions = write_captions(tmp_path, ["a red circle"])
    url = f"http://127.0.0.1:{free_port()}/v1"
    arguments = ["score", str(captions), "--output-dir", str(tmp_path / "out"), "--no-classic", "--no-plots"]
    status, stderr = run_in_process([*arguments, "--judge-base-url", url, *FAST_JUDGE, "--no-judge-health-check"])
    assert status == 1
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith("python -m balcaprl.evaluate: error: no score for precision (1 of 1 captions)")
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["judge"]["health_check"] == "not run"
    fault = f"A judge health check after scoring fails: 'linguistic' judge at {url} (model 'scripted'): connection"
    assert any(note.startswith(fault) for note in report["notes"])


def test_partial_failures_keep_scoring_count_and_exit_0(scripted_server, tmp_path):
    captions = write_captions(tmp_path, ["a red circle", "FAIL here", "a red circle and a blue square"])
    arguments = ["score", str(captions), "--output-dir", str(tmp_path / "out"), "--no-classic", "--no-plots"]
    assert evaluate_main([*arguments, "--judge-base-url", scripted_server.base_url, *FAST_JUDGE]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["unscored"] == {}
    assert report["balcap"]["precision"] == {"mean": 0.75, "scored": 2, "unscorable": 1, "no_image": 0}
    rows = {row["id"]: row for row in report["per_caption"]}
    assert rows["1"]["precision"] is rows["1"]["recall"] is rows["1"]["linguistic"] is None  # unscorable: None, not 0
    assert "precision: 1 of 3 caption(s) could not be scored" in "\n".join(report["notes"])


# ------------------------------------------------------------------------------------------------ the output folder


def read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the existing-file cases run as root too)")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder / "out"


OUTPUT_DIRS = {
    "an existing file": (lambda tmp_path: tmp_path / "captions.jsonl", "is a file, not a folder"),
    "a path under a file": (lambda tmp_path: tmp_path / "captions.jsonl" / "out", "which is a file, not a folder"),
    "under a read-only folder": (read_only_folder, "(Permission denied)"),
}


@pytest.mark.parametrize("case", list(OUTPUT_DIRS))
def test_an_unwritable_output_dir_is_one_line_before_the_judge_is_asked(scripted_server, tmp_path, case):
    captions = write_captions(tmp_path, ["a red circle"])
    make_path, reason = OUTPUT_DIRS[case]
    output = make_path(tmp_path)
    before = captions.read_bytes()
    result = run_console_script(
        "score", str(captions), "--output-dir", str(output), "--judge-base-url", scripted_server.base_url, *FAST_JUDGE
    )
    assert result.returncode == 2
    line = only_line(result.stderr)
    assert line.startswith(f"balcaprl evaluate: error: --output-dir {output} ") and reason in line
    assert scripted_server.request_count == 0  # neither the health check nor any scoring call
    assert captions.read_bytes() == before


def test_an_unwritable_output_dir_stops_run_before_the_data_and_the_model(tmp_path):
    a_file = tmp_path / "report"
    a_file.write_text("not a folder")
    arguments = ["--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "no-such-data.jsonl")]
    status, stderr = run_in_process([*arguments, "--output-dir", str(a_file), "--exact-world-judges"])
    assert status == 2
    assert only_line(stderr) == (
        f"python -m balcaprl.evaluate: error: --output-dir {a_file} is a file, not a folder: give a folder path."
    )
