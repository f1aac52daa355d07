"""``balcaprl data recaption`` against a real OpenAI-compatible HTTP server on 127.0.0.1: faults, resume, cache, the
trainable output, bad arguments."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from http import HTTPStatus
from pathlib import Path

import pytest
from PIL import Image

from balcaprl.data.loading import load_caption_dataset
from balcaprl.data.recaption import main
from balcaprl.judge import token_cost
from tests.loopback_server import ChatRequestHandler, LoopbackChatServer, chat_completion_body

NUM_IMAGES = 10
REPO = Path(__file__).resolve().parents[1]


class CaptionServer(LoopbackChatServer):
    """Answers each image with a caption naming the image's digest, with ``usage`` 100 prompt / 20 completion tokens.

    ``script`` maps the arrival index of a request (modulo 10) to a fault: ``"http_500"``, ``"empty"`` (whitespace
    text) or ``"cut"`` (finish_reason ``length``). Which images meet them depends on arrival order; how many does not.
    """

    def __init__(self, script: dict[int, str] | None = None):
        super().__init__(model="captioner")
        self.script = script or {}
        self.seen: list[str] = []  # the image digest of every request, in arrival order
        self.faulted: set[str] = set()

    def handle_chat(self, handler: ChatRequestHandler, body, messages) -> None:
        digest = image_digest(messages)
        with self._lock:
            fault = self.script.get(len(self.seen) % 10)
            self.seen.append(digest)
            if fault:
                self.faulted.add(digest)
        if fault == "http_500":
            handler.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": "injected", "type": "server"}})
            return
        answer = chat_completion_body("   " if fault == "empty" else f"A detailed caption of image {digest}.", "m")
        answer["usage"] = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
        if fault == "cut":
            answer["choices"][0]["finish_reason"] = "length"
        handler.send_json(HTTPStatus.OK, answer)


def image_digest(messages) -> str:
    parts = [part for part in messages[0]["content"] if part.get("type") == "image_url"]
    assert len(parts) == 1 and any(part.get("type") == "text" for part in messages[0]["content"])
    return hashlib.sha256(parts[0]["image_url"]["url"].encode()).hexdigest()[:12]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """NUM_IMAGES distinct small PNGs in nested folders, plus a file that is not an image."""
    folder = tmp_path / "images"
    for index in range(NUM_IMAGES):
        path = folder / f"part{index % 2}" / f"{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), (index * 20, 255 - index * 20, 7)).save(path)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(images: Path, output: Path, server: CaptionServer, *extra: str) -> int:
    argv = [str(images), "--output", str(output), "--base-url", server.base_url, "--model", "captioner"]
    return main([*argv, "--concurrency", "4", "--max-retries", "0", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_faults_listed_then_resumed_with_only_the_missing_images(images, tmp_path, capsys):
    output = tmp_path / "out" / "captions.jsonl"
    failed_file = tmp_path / "out" / "captions.failed.jsonl"
    with CaptionServer({1: "http_500", 4: "http_500", 7: "http_500"}) as flaky:
        assert run(images, output, flaky) == 1
    captioned, failed = read_jsonl(output), read_jsonl(failed_file)
    assert (len(captioned), len(failed), len(flaky.seen)) == (7, 3, NUM_IMAGES)
    assert all(record["error"] == "HTTP 500" for record in failed)
    assert all(record["references"][0].startswith("A detailed caption of image ") for record in captioned)
    assert all(record["recaption"] == {"model": "captioner", "prompt_version": "v1"} for record in captioned)
    names = sorted(record["image"] for record in captioned + failed)
    assert names == sorted(f"../images/part{i % 2}/{i:02d}.png" for i in range(NUM_IMAGES))
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("captioned 7, failed 3 (listed in ")
    assert "skipped (already done) 0" in summary and "tokens: prompt 700 completion 140, requests" in summary

    with CaptionServer() as healthy:
        assert run(images, output, healthy) == 0
    assert sorted(healthy.seen) == sorted(flaky.faulted) and len(healthy.seen) == 3  # only the failed ones
    assert len(read_jsonl(output)) == NUM_IMAGES and not failed_file.exists()
    assert (
        capsys.readouterr().out.strip().splitlines()[-1].startswith("captioned 3, failed 0, skipped (already done) 7")
    )

    with output.open("a") as handle:  # a run killed in the middle of a line
        handle.write('{"image": "../images/pa')
    with CaptionServer() as idle:
        assert run(images, output, idle) == 0
    assert idle.seen == [] and len(read_jsonl(output)) == NUM_IMAGES


def test_empty_and_cut_answers_are_failures_never_captions(images, tmp_path):
    output = tmp_path / "captions.jsonl"
    with CaptionServer({0: "empty", 1: "cut"}) as server:
        assert run(images, output, server, "--concurrency", "1", "--max-images", "3") == 1
    failed = read_jsonl(tmp_path / "captions.failed.jsonl")
    assert [(record["image"], record["error"].split(" (")[0]) for record in failed] == [
        ("images/part0/00.png", "empty answer"),  # sorted paths, one request at a time
        ("images/part0/02.png", "answer cut at --max-tokens 1024"),
    ]
    assert [record["image"] for record in read_jsonl(output)] == ["images/part0/04.png"]


def test_output_loads_for_training_and_cache_answers_a_second_output(images, tmp_path):
    cache = tmp_path / "cache"
    first, second = tmp_path / "first.jsonl", tmp_path / "nested" / "second.jsonl"
    with CaptionServer() as server:
        assert run(images, first, server, "--cache-dir", str(cache)) == 0
        assert len(server.seen) == NUM_IMAGES
        assert run(images, second, server, "--cache-dir", str(cache)) == 0
        assert len(server.seen) == NUM_IMAGES  # every answer came from the cache
    dataset = load_caption_dataset(str(first))
    assert len(dataset) == NUM_IMAGES
    row = dataset[0]
    assert row["image"].size == (16, 12) and row["references"][0].startswith("A detailed caption of image ")
    references = {record["image"].removeprefix("../"): record["references"] for record in read_jsonl(second)}
    assert references == {record["image"]: record["references"] for record in read_jsonl(first)}


@pytest.mark.parametrize(
    "case",
    [
        "missing_folder",
        "unwritable_output",
        "not_jsonl",
        "missing_model",
        "bad_prompt_version",
        "unset_key",
        "negative_price",
        "one_price",
    ],
)
def test_bad_arguments_one_line_exit_2(case, images, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RECAPTION_TEST_KEY", raising=False)
    (tmp_path / "file").write_text("")
    source, output = str(images), str(tmp_path / "out.jsonl")
    extra = ["--model", "m"]
    if case == "missing_folder":
        source = str(tmp_path / "nowhere")
    elif case == "unwritable_output":
        output = str(tmp_path / "file" / "out.jsonl")  # under a file: no folder can be made
    elif case == "not_jsonl":
        output = str(tmp_path / "out.json")
    elif case == "missing_model":
        extra = []
    elif case == "bad_prompt_version":
        extra += ["--prompt-version", "v999"]
    elif case == "negative_price":
        extra += ["--price-per-million-tokens", "-1", "2"]
    elif case == "one_price":
        extra += ["--price-per-million-tokens", "0.25"]
    else:
        extra += ["--api-key-env", "RECAPTION_TEST_KEY"]
    assert main([source, "--output", output, "--base-url", "http://127.0.0.1:9/v1", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("balcaprl data recaption: error: ")
    if case.endswith("price"):
        assert "--price-per-million-tokens" in captured.err


def test_price_turns_the_tokens_into_a_cost_in_the_summary(images, tmp_path, capsys):
    """10 answers of 100 prompt / 20 completion tokens at 0.25 / 2.0 per million: 1000 × 0.25 + 200 × 2 = 650 per
    million tokens, 0.00065."""
    with CaptionServer() as server:
        assert run(images, tmp_path / "out.jsonl", server, "--price-per-million-tokens", "0.25", "2.0") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "tokens: prompt 1000 completion 200, cost 0.00065, requests 10" in summary
    assert token_cost(1000, 200, (0.25, 2.0)) == pytest.approx(0.00065)  # the public helper the summary uses


def test_list_file_and_jsonl_inputs_and_request_body(images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nimages/part0/00.png\n\nimages/part1/01.png\nimages/part0/00.png\n")
    dataset = tmp_path / "data" / "old.jsonl"
    dataset.parent.mkdir()
    dataset.write_text(json.dumps({"image": "../images/part1/03.png", "references": ["short"]}) + "\n")
    with CaptionServer() as server:
        assert run(listing, tmp_path / "a.jsonl", server) == 0
        extra = ["--max-tokens-parameter", "max_completion_tokens", "--temperature", "1", "--max-tokens", "99"]
        assert run(dataset, tmp_path / "b.jsonl", server, *extra) == 0
    # lines are appended as answers arrive (concurrent requests): compared as a set; the repeated path asked once
    assert sorted(record["image"] for record in read_jsonl(tmp_path / "a.jsonl")) == [
        "images/part0/00.png",
        "images/part1/01.png",
    ]
    assert [record["image"] for record in read_jsonl(tmp_path / "b.jsonl")] == ["images/part1/03.png"]
    first, last = server.bodies[0], server.bodies[-1]
    assert "response_format" not in first and first["max_tokens"] == 1024 and first["temperature"] == 0
    assert "max_tokens" not in last and last["max_completion_tokens"] == 99 and last["temperature"] == 1


def test_output_trains_one_step_unchanged(tmp_path):
    """A 1-step c-GDPO run of the demo recipe (CIDEr-D against the captions) on a recaptioned folder: ~11 s."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(4):
        Image.new("RGB", (56, 56), (index * 60, 100, 7)).save(folder / f"{index}.png")
    output = tmp_path / "captions.jsonl"
    with CaptionServer() as server:
        assert run(folder, output, server) == 0
    recipe = (REPO / "recipes/demo/qwen2_5_vl_balcaprl.yaml").read_text().splitlines()
    overrides = {"reward_funcs": "[cider_d]", "length_mask_rewards": "[]"}
    recipe = [next((f"{k}: {v}" for k, v in overrides.items() if line.startswith(f"{k}:")), line) for line in recipe]
    (tmp_path / "recipe.yaml").write_text("\n".join(recipe) + "\n")
    command = [str(Path(sys.executable).parent / "balcaprl"), "train", str(tmp_path / "recipe.yaml")]
    command += [
        "--dataset",
        str(output),
        "--model_name_or_path",
        "tiny:qwen2_5_vl",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    command += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4"]
    command += ["--max_completion_length", "8"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "rewards/cider_d/mean" in result.stdout + result.stderr


def test_a_file_that_is_not_a_captions_file_is_left_alone(images, tmp_path, capsys):
    output = tmp_path / "other.jsonl"
    output.write_text('{"text": "not captions"}\n{"partial')
    with CaptionServer() as server:
        assert run(images, output, server) == 2
    assert server.seen == [] and output.read_text() == '{"text": "not captions"}\n{"partial'
    assert "other.jsonl:1 is not a caption line" in capsys.readouterr().err
