"""The generation half of ``balcaprl evaluate``: a tiny model captions the shapes world's test split, then the harness
scores the captions — with the world's exact rewards, with a real llama.cpp judge, and across an interrupted run.

Nothing is mocked: the tiny Qwen2.5-VL really generates, and generation is counted from what the files hold (a
caption planted in the file survives a rerun only if it was not regenerated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from balcaprl import world
from balcaprl.evaluate import harmonic_mean
from balcaprl.evaluate import main as evaluate_main
from balcaprl.evaluate.classic import close_meteor, java_available
from balcaprl.generation import dataset_rows, read_caption_file
from balcaprl.rewards.world import score_caption

BALCAPRL = Path(sys.executable).parent / "balcaprl"  # the console script of this virtualenv, as a user runs it
WORLD_REWARD_NAMES = {"precision": "world_precision", "recall": "world_recall", "linguistic": "world_linguistic"}


@pytest.fixture(scope="module", autouse=True)
def _stop_the_shared_meteor_jvm():
    yield
    close_meteor()


@pytest.fixture(scope="module")
def world_data(tmp_path_factory) -> Path:
    """``data.jsonl`` (+ images) of 12 scenes of the world's test split."""
    return world.write_jsonl(world.make_split("test", 12, seed=0), tmp_path_factory.mktemp("world"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [str(BALCAPRL), "evaluate", *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def test_tiny_model_on_the_world_end_to_end_with_exact_judges(tiny_models, world_data, tmp_path):
    """`balcaprl evaluate --model ... --data .../data.jsonl --output-dir ...`, no subcommand, from another folder.

    Sampling gives non-empty captions from the random tiny model (greedy decoding gives only newlines). The report's
    P / R / L must be exactly the world rewards of those captions against each row's scene.
    """
    output = tmp_path / "out"
    model = tiny_models["qwen2_5_vl"]
    result = run_cli(
        "--model", str(model), "--data", str(world_data), "--output-dir", str(output), "--exact-world-judges",
        "--sample", "--temperature", "1.0", "--seed", "0", "--max-new-tokens", "12", "--batch-size", "5",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Captions: 12 generated, 0 reused" in result.stderr

    rows = read_jsonl(world_data)
    captions = read_jsonl(output / "captions.jsonl")
    assert [caption["id"] for caption in captions] == [str(index) for index in range(12)]  # no image_id: row index
    for caption, row in zip(captions, rows):
        assert caption["references"] == row["references"]
        assert caption["image"] == str((world_data.parent / row["image"]).resolve())
    assert sum(bool(caption["caption"].strip()) for caption in captions) >= 6

    report = json.loads((output / "report.json").read_text())
    assert report["name"] == Path(model).name and report["judge"] is None
    assert report["generation"]["generated"] == 12 and report["generation"]["reused"] == 0
    assert report["generation"]["generation"] == {
        "instruction": "Describe this image in detail.",
        "max_new_tokens": 12,
        "do_sample": True,
        "temperature": 1.0,
        "seed": 0,
    }
    assert report["generation"]["data"]["format"] == "jsonl" and report["generation"]["data"]["split"] is None
    assert report["balcap"]["scorers"] == WORLD_REWARD_NAMES
    per_caption = {row["id"]: row for row in report["per_caption"]}
    exact = [score_caption(caption["caption"], row["scene"]) for caption, row in zip(captions, rows)]
    for caption, scores in zip(captions, exact):
        values = per_caption[caption["id"]]
        assert values["caption"] == caption["caption"]
        assert (values["precision"], values["recall"], values["linguistic"]) == (
            scores["precision"],
            scores["recall"],
            scores["linguistic"],
        )
        assert values["world_recall/facts"] == scores["facts"] > 0  # the scene reached the reward
    means = [sum(scores[name] for scores in exact) / 12 for name in ("precision", "recall", "linguistic")]
    summary = report["summary"]
    assert [summary["precision"], summary["recall"], summary["linguistic"]] == pytest.approx(means, abs=1e-15)
    assert summary["b-CapScore"] == pytest.approx(harmonic_mean(means), abs=1e-15)
    classic = {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"} | ({"METEOR"} if java_available() else set())
    assert classic <= set(summary) and all(0 <= summary[name] for name in classic)
    markdown = (output / "report.md").read_text()
    assert "Scored by world_precision, world_recall, world_linguistic" in markdown
    assert "12 generated in this run, 0 reused" in markdown
    assert (output / "metrics.png").is_file() and (output / "length.png").is_file()


def test_real_llama_cpp_judge_on_generated_captions(tiny_models, world_data, llama_cpp_base_url, tmp_path, capsys):
    """The text judges of SmolLM2-135M (llama.cpp, no vision projector) on 2 generated captions.

    The server rejects image parts (HTTP 500 "image input is not supported"): the health check says so before any
    caption is generated. Past it (--no-judge-health-check), precision scores nothing, the report says why (the
    health check after scoring: the text requests pass, the image one fails) and the command exits 1. With
    --judge-text-only no image is sent, precision is counted as "no image", and the text answers come from the
    judge's cache.
    """
    output = tmp_path / "out"
    common = [
        "--model", str(tiny_models["qwen2_5_vl"]), "--data", str(world_data), "--output-dir", str(output),
        "--max-samples", "2", "--sample", "--max-new-tokens", "10", "--no-classic", "--no-plots", "--no-progress",
        "--judge-base-url", llama_cpp_base_url, "--judge-model", "smollm2", "--judge-max-retries", "0",
        "--judge-timeout", "60", "--judge-max-tokens", "96", "--judge-cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(common)
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("python -m balcaprl.evaluate: error: judge health check failed before generating ")
    assert f"'precision' judge at {llama_cpp_base_url} (model 'smollm2'): HTTP 500, after 1 attempt" in line
    assert "'linguistic'" not in line and "'recall'" not in line  # the text requests passed
    assert "cannot score precision" in line and "--judge-text-only" in line
    assert not output.exists()  # nothing generated

    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([*common, "--no-judge-health-check"])
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("python -m balcaprl.evaluate: error: no score for precision (2 of 2 captions)")
    report = json.loads((output / "report.json").read_text())
    balcap = report["balcap"]
    assert report["generation"]["generated"] == 2 and report["judge"]["health_check"] == "not run"
    assert balcap["precision"] == {"mean": None, "scored": 0, "unscorable": 2, "no_image": 0}
    assert balcap["b_capscore"] is None and report["unscored"]["precision"]["failed"] == 2
    notes = "\n".join(report["notes"])
    assert "precision: no score (null, not 0): the judge failed on 2 of 2 captions." in notes
    assert f"A judge health check after scoring fails: 'precision' judge at {llama_cpp_base_url}" in notes
    assert "cannot score precision" in notes  # the cause named, because the text requests of the same check passed
    for metric in ("recall", "linguistic"):
        assert balcap[metric]["scored"] + balcap[metric]["unscorable"] == 2
        assert balcap[metric]["mean"] is None or 0.0 <= balcap[metric]["mean"] <= 1.0
    assert balcap["recall"]["scored"] + balcap["linguistic"]["scored"] >= 1  # the protocol works end to end
    calls = report["judge"]["calls"]
    assert calls["requests"] >= 2 + 2 + 2 and calls["failures"] >= 2  # precision's 2 rejected image requests
    assert "## BalCapRL judge metrics" in (output / "report.md").read_text()

    assert evaluate_main([*common, "--judge-text-only"]) == 0
    text_only = json.loads((output / "report.json").read_text())
    assert text_only["generation"]["reused"] == 2 and text_only["generation"]["generated"] == 0
    assert text_only["judge"]["health_check"] == "passed" and text_only["unscored"] == {}
    assert text_only["balcap"]["precision"] == {"mean": None, "scored": 0, "unscorable": 0, "no_image": 2}
    assert any("needs the image: 2 record(s)" in note for note in text_only["notes"])
    for metric in ("recall", "linguistic"):  # the same answers, from the cache
        assert text_only["balcap"][metric] == balcap[metric]
    assert text_only["judge"]["calls"]["cache_hits"] >= balcap["recall"]["scored"] + balcap["linguistic"]["scored"]


class TestInterruptedRun:
    """A crash leaves K complete lines and half of the next: the rerun generates exactly the N − K missing captions."""

    N, K, BATCH = 9, 6, 3

    @pytest.fixture
    def arguments(self, tiny_models, world_data, tmp_path):
        return [
            "--model", str(tiny_models["qwen2_5_vl"]), "--data", str(world_data), "--output-dir", str(tmp_path),
            "--max-samples", str(self.N), "--max-new-tokens", "6", "--batch-size", str(self.BATCH),
            "--exact-world-judges", "--no-classic", "--no-plots", "--no-progress",
        ]  # fmt: skip

    def test_rerun_generates_only_the_missing_captions(self, arguments, tmp_path):
        """Sampled captions, so that they are not empty; the crash falls on a batch boundary (K = 2 batches), where a
        resumed run re-seeds exactly as the uninterrupted one did: the regenerated captions must be the same."""
        arguments = [*arguments, "--sample", "--seed", "3"]
        captions_file = tmp_path / "captions.jsonl"
        assert evaluate_main(arguments) == 0
        complete = captions_file.read_text().splitlines(keepends=True)
        assert len(complete) == self.N
        original = {record["id"]: record for record in map(json.loads, complete)}
        assert all(record["caption"].strip() for record in original.values())

        # The crash: K complete lines, then half of line K + 1 (no newline). One kept line gets a caption the model
        # would never write: if the rerun regenerated it, it would be gone.
        kept = complete[: self.K]
        planted = json.loads(kept[1])
        planted["caption"] = "PLANTED: not regenerated"
        kept[1] = json.dumps(planted) + "\n"
        captions_file.write_text("".join(kept) + complete[self.K][: len(complete[self.K]) // 2])

        assert evaluate_main(arguments) == 0
        lines = captions_file.read_text().splitlines(keepends=True)
        assert lines[: self.K] == kept  # untouched, the planted caption included
        records = [json.loads(line) for line in lines]
        assert len(records) == self.N and len({record["id"] for record in records}) == self.N
        assert {record["id"] for record in records} == set(original)
        assert [record["id"] for record in records[self.K :]] == [str(row) for row in range(self.K, self.N)]
        for record in records[self.K :]:  # generated again, by the same model with the same seeds
            assert record == original[record["id"]]
        report = json.loads((tmp_path / "report.json").read_text())
        generation = report["generation"]
        assert (generation["generated"], generation["reused"]) == (self.N - self.K, self.K)
        assert generation["dropped_partial_line"] is True
        assert {row["id"]: row["caption"] for row in report["per_caption"]}[planted["id"]] == planted["caption"]
        runs = json.loads((tmp_path / "generation.json").read_text())["runs"]
        assert [(run["generated"], run["reused"]) for run in runs] == [(self.N, 0), (self.N - self.K, self.K)]

        assert evaluate_main(arguments) == 0  # complete: nothing to generate
        assert captions_file.read_text().splitlines(keepends=True) == lines
        assert json.loads((tmp_path / "report.json").read_text())["generation"]["generated"] == 0

    def test_changed_settings_are_refused_unless_overwrite(self, arguments, tmp_path, capsys):
        captions_file = tmp_path / "captions.jsonl"
        assert evaluate_main(arguments) == 0
        before = captions_file.read_bytes()
        changed = [*arguments[:-3], "--max-new-tokens", "4", *arguments[-3:]]  # the last of a repeated option wins
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main(changed)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert f"holds {self.N} caption line(s) made with other settings" in message
        assert "generation.max_new_tokens: 6 → now 4" in message and "--overwrite" in message
        assert captions_file.read_bytes() == before  # nothing was touched

        with pytest.raises(SystemExit, match="2"):  # sampling is a decoding setting too
            evaluate_main([*arguments, "--sample", "--temperature", "0.7"])
        message = capsys.readouterr().err
        assert "generation.do_sample: False → now True" in message
        assert "generation.temperature: None → now 0.7" in message

        assert evaluate_main([*changed, "--overwrite"]) == 0
        generation = json.loads((tmp_path / "report.json").read_text())["generation"]
        assert (generation["generated"], generation["reused"]) == (self.N, 0)
        assert json.loads((tmp_path / "generation.json").read_text())["generation"]["max_new_tokens"] == 4

    def test_captions_of_unknown_origin_are_refused(self, arguments, tmp_path, capsys):
        (tmp_path / "captions.jsonl").write_text(json.dumps({"id": "0", "caption": "x", "references": []}) + "\n")
        with pytest.raises(SystemExit, match="2"):
            evaluate_main(arguments)
        assert "generation.json is missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ pieces


def test_read_caption_file_drops_only_a_half_written_last_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    lines = [json.dumps({"id": str(index), "caption": "c", "references": ["r"]}) for index in range(3)]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:10])
    assert read_caption_file(path) == ([json.loads(lines[0]), json.loads(lines[1])], True)
    assert path.read_text().endswith(lines[2][:10])  # without repair the file is left alone
    assert read_caption_file(path, repair=True)[1] is True
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"

    path.write_text(lines[0] + "\n" + lines[1])  # a complete last line that only lacks its newline is kept
    assert read_caption_file(path, repair=True) == ([json.loads(lines[0]), json.loads(lines[1])], False)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"

    path.write_text(lines[0][:10] + "\n" + lines[1] + "\n")  # damage before the last line is not a crash's
    with pytest.raises(ValueError, match="line 1: not a caption record"):
        read_caption_file(path, repair=True)


def test_dataset_rows_of_a_dataset_with_image_bytes_and_image_ids():
    """A Hugging Face dataset storing images as bytes: ids from `image_id`, bytes only on request, extra columns."""
    from balcaprl.data.loading import load_caption_dataset

    scenes = world.make_split("test", 3, seed=1)
    stored = world.to_dataset(scenes, image_size=32).add_column("image_id", [30, 10, 20])
    dataset = load_caption_dataset(stored, format="hf")
    rows = dataset_rows(dataset)
    assert [row["id"] for row in rows] == ["30", "10", "20"]
    assert all(row["image_path"] is None and row["image_bytes"] is None for row in rows)
    assert rows[0]["extra"]["scene"] == scenes[0].to_dict() and rows[0]["extra"]["image_id"] == 30
    assert dataset_rows(dataset, image_bytes=True)[1]["image_bytes"].startswith(b"\x89PNG")

    duplicated = load_caption_dataset(stored.remove_columns("image_id").add_column("image_id", [1, 2, 1]), format="hf")
    with pytest.raises(ValueError, match="Rows 0 and 2 share image_id '1'"):
        dataset_rows(duplicated)
