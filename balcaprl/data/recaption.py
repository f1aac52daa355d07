"""``balcaprl data recaption``: detailed reference captions for a folder of images from an OpenAI-compatible vision
model, written as the project's JSONL (BalCapRL trains on ~90K ShareGPT4V images re-captioned by GPT-5-mini).

    balcaprl data recaption IMAGES --output captions.jsonl --base-url URL --model M [--api-key-env NAME] [...]

IMAGES is a folder (searched recursively, sorted), a JSONL file of the project's format (its ``image`` paths) or a
text file listing image paths, one per line (relative paths are relative to the listing's folder). The model is
asked the versioned prompt ``rewards/prompts/recaption_<version>.txt`` about each image; each answer becomes one line

    {"image": "<path relative to the output's folder>", "references": ["<caption>"],
     "recaption": {"model": "<model>", "prompt_version": "v1"}}

which `balcaprl.data.load_caption_dataset` reads as it is. Requests go through `balcaprl.judge.JudgeClient` (the
judge's concurrency bound, retries with backoff, on-disk answer cache and image encoding), asked for plain text.

- crash-safe: lines are appended as answers arrive, one write and a flush each; a line torn by a crash (the file's
  last, without its newline) is cut off on the next run;
- resumable: a rerun with the same ``--output`` skips the images already in it and asks only for the others;
- failures: an image still unanswered after the retries, answered with empty text, or whose answer was cut at
  ``--max-tokens`` is never written as a caption but listed, with the fault, in ``<output>.failed.jsonl`` (rewritten
  by each run, removed when nothing failed);
- exit code: 0 when every image has a caption, 1 when some failed, 2 for bad arguments (one error line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balcaprl.judge.client import JudgeClient
from balcaprl.judge.config import price_pair, token_cost

logger = logging.getLogger(__name__)

PROMPT_NAME = "recaption"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FAILED_SUFFIX = ".failed.jsonl"
MAX_TOKENS_PARAMETERS = ("max_tokens", "max_completion_tokens")
# The plain-text answer travels through JudgeClient's JSON validation as {"caption": text}; a caption cut at the
# token limit carries an extra key that the schema refuses, so that it is retried and then listed, never written.
CUT_MARK = "cut_at_max_tokens"
CAPTION_SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string", "minLength": 1}},
    "required": ["caption"],
    "additionalProperties": False,
}


class BadArguments(Exception):
    """A problem with the command line or its files, reported as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits; one line and exit code 2 instead
        raise BadArguments(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="balcaprl data recaption",
        description="Detailed reference captions for IMAGES from an OpenAI-compatible vision model, as JSONL.",
    )
    parser.add_argument("images", metavar="IMAGES", help="folder of images, JSONL dataset or list of image paths")
    parser.add_argument("--output", required=True, help="the JSONL file written (and resumed): FILE.jsonl")
    parser.add_argument("--base-url", required=True, help="the server's OpenAI base URL, e.g. http://host:8000/v1")
    parser.add_argument("--model", required=True, help="the model name the server serves")
    parser.add_argument("--api-key-env", help="NAME of the environment variable holding the API key")
    parser.add_argument("--prompt-version", default="v1", help="prompts/recaption_<version>.txt (default: v1)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default: 16)")
    parser.add_argument("--max-retries", type=int, default=4, help="retries of a failed request (default: 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per request (default: 60)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="length limit of a caption (default: 1024)")
    parser.add_argument(
        "--max-tokens-parameter",
        choices=MAX_TOKENS_PARAMETERS,
        default="max_tokens",
        help="request field carrying --max-tokens; OpenAI's reasoning models (gpt-5-mini) need max_completion_tokens",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: 0; gpt-5-mini accepts only 1)"
    )
    parser.add_argument("--cache-dir", help="on-disk answer cache (as the judge's judge_cache_dir)")
    parser.add_argument("--max-images", type=int, help="caption at most the first N images of IMAGES")
    parser.add_argument(
        "--price-per-million-tokens",
        type=float,
        nargs=2,
        metavar=("INPUT", "OUTPUT"),
        help="what the server charges per million prompt and completion tokens, for the cost in the summary line",
    )
    return parser


# ------------------------------------------------------------------------------------------------------ the images


def list_images(source: Path) -> list[Path]:
    """The images of ``source`` (a folder, a JSONL dataset or a list file), absolute, in order, without repeats."""
    if source.is_dir():
        paths = sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    elif source.is_file():
        paths = _listed_images(source)
    else:
        raise BadArguments(f"IMAGES {str(source)!r} is neither a folder nor a file.")
    unique = list(dict.fromkeys(path.resolve() for path in paths))
    if not unique:
        raise BadArguments(f"IMAGES {str(source)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return unique


def _listed_images(listing: Path) -> list[Path]:
    paths = []
    with listing.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if listing.suffix == ".jsonl":
                try:
                    line = json.loads(line)["image"]
                except (ValueError, KeyError, TypeError) as error:
                    raise BadArguments(f"{listing}:{line_number}: no 'image' path ({type(error).__name__}).") from None
            paths.append(listing.parent / line)
    return paths


# ------------------------------------------------------------------------------------------------------ the client


class _PlainTextAnswers:
    """The client's HTTP client, whose chat answers come back as ``{"caption": text}`` JSON (see `CaptionClient`)."""

    def __init__(self, client: Any, owner: CaptionClient):
        self._client = client
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def post(self, path: str, **arguments: Any) -> Any:
        return self._owner._wrap_answer(await self._client.post(path, **arguments))


class CaptionClient(JudgeClient):
    """`JudgeClient` asked for plain text: the same concurrency bound, retries, cache, metrics and image encoding.

    The judge validates JSON answers; its HTTP client is wrapped so that a text answer arrives as ``{"caption":
    text}`` (empty text as no JSON, a cut one with an extra key: both faults the judge retries). It keeps each failed
    request's last fault for the failures file; the judge counts the server's ``usage`` tokens.
    """

    def __init__(self, *args: Any, max_tokens_parameter: str = "max_tokens", **kwargs: Any):
        super().__init__(*args, response_format="none", schema_in_prompt=False, **kwargs)
        self.max_tokens_parameter = max_tokens_parameter
        self.faults: dict[str, str] = {}

    async def caption(self, messages: list[dict[str, Any]], prompt_version: str) -> tuple[str | None, str]:
        """(caption, "") or (None, why not)."""
        extra = f"{PROMPT_NAME}_{prompt_version}:{self.max_tokens_parameter}"
        answer = await self.complete_json(messages, CAPTION_SCHEMA, cache_key_extra=extra)
        if answer is not None:
            return answer["caption"], ""
        return None, self.faults.get(self.cache_key(messages, CAPTION_SCHEMA, cache_key_extra=extra), "no answer")

    def _make_client(self) -> Any:
        return _PlainTextAnswers(super()._make_client(), self)

    def _request_arguments(self, messages: Sequence[dict[str, Any]], schema: dict[str, Any]) -> dict[str, Any]:
        arguments = super()._request_arguments(messages, schema)
        arguments[self.max_tokens_parameter] = arguments.pop("max_tokens")
        return arguments

    async def _fetch_answer(self, state, messages, schema, validator, key) -> dict[str, Any] | None:
        answer, fault = await self._fetch(state, messages, schema, validator, key)
        if answer is None:
            if fault.startswith("answer has no JSON object"):
                fault = "empty answer"
            elif CUT_MARK in fault:
                fault = f"answer cut at --max-tokens {self.max_tokens} (finish_reason: length)"
            self.faults[key] = fault
        return answer

    def _wrap_answer(self, response: Any) -> Any:
        try:
            choice = response["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return response  # not a chat completion: the judge's own checks name the fault
        text = content.strip() if isinstance(content, str) else ""
        answer: dict[str, Any] = {"caption": text}
        if choice.get("finish_reason") == "length":
            answer[CUT_MARK] = True
        choice["message"]["content"] = json.dumps(answer, ensure_ascii=False) if text else ""
        return response


# ------------------------------------------------------------------------------------------------------ the output


@dataclass
class RunTotals:
    """What a run did, for its summary line."""

    captioned: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)


def failures_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + FAILED_SUFFIX)


def done_images(output: Path) -> set[Path]:
    """The images already captioned in ``output`` (absolute); a torn last line is cut off (and only then: the file is
    checked to be a captions file first), a complete one without its newline gets it."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    cut = data.rfind(b"\n") + 1  # 0 without any newline
    complete, tail = data[:cut], data[cut:]
    done = set()
    for line_number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        image = _caption_line_image(line)
        if image is None and line.strip():
            raise BadArguments(f"{output}:{line_number} is not a caption line; is --output the right file?")
        if image is not None:
            done.add((output.parent / image).resolve())
    if tail:
        image = _caption_line_image(tail.decode("utf-8", errors="replace"))
        with output.open("r+b") as handle:
            if image is not None:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
                done.add((output.parent / image).resolve())
            else:
                logger.warning("%s: dropping its torn last line (%d bytes), cut by a stopped run.", output, len(tail))
                handle.truncate(len(data) - len(tail))
    return done


def _caption_line_image(line: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    image = record.get("image") if isinstance(record, dict) else None
    return image if isinstance(image, str) and isinstance(record.get("references"), list) else None


def caption_line(image: Path, output: Path, caption: str, model: str, prompt_version: str) -> str:
    relative = os.path.relpath(image, output.parent.resolve())
    record = {
        "image": relative,
        "references": [caption],
        "recaption": {"model": model, "prompt_version": prompt_version},
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


def _append(handle: Any, line: str) -> None:
    handle.write(line)
    handle.flush()


# ------------------------------------------------------------------------------------------------------ the run


async def recaption(
    images: list[Path], output: Path, client: CaptionClient, prompt: str, prompt_version: str, totals: RunTotals
) -> None:
    """Caption ``images`` (none of them in ``output`` yet), appending to ``output`` and to its failures file."""
    queue = iter(images)
    progress_every = max(1, min(500, len(images) // 20))
    with output.open("a", encoding="utf-8") as captions, failures_path(output).open("w", encoding="utf-8") as failed:

        async def worker() -> None:
            for image in queue:  # one shared iterator: each image goes to one worker
                caption, fault = await _caption_one(client, image, prompt, prompt_version)
                if caption is not None:
                    _append(captions, caption_line(image, output, caption, client.model, prompt_version))
                    totals.captioned += 1
                else:
                    relative = os.path.relpath(image, output.parent.resolve())
                    _append(failed, json.dumps({"image": relative, "error": fault}, ensure_ascii=False) + "\n")
                    totals.failed += 1
                finished = totals.captioned + totals.failed
                if finished % progress_every == 0 or finished == len(images):
                    elapsed = time.monotonic() - totals.started
                    logger.info(
                        "%d/%d images (%d failed), %.1f images/s",
                        finished,
                        len(images),
                        totals.failed,
                        finished / max(elapsed, 1e-9),
                    )

        try:
            await asyncio.gather(*(worker() for _ in range(min(client.max_concurrency, len(images)))))
        finally:
            await client.aclose()


async def _caption_one(client: CaptionClient, image: Path, prompt: str, prompt_version: str) -> tuple[str | None, str]:
    try:
        image_part = await client.image_part(str(image))
    except Exception as error:  # an unreadable file is this image's failure, not the run's
        return None, f"unreadable image ({type(error).__name__}: {error})"[:300]
    messages = [{"role": "user", "content": [image_part, {"type": "text", "text": prompt}]}]
    return await client.caption(messages, prompt_version)


def _prepare(arguments: argparse.Namespace) -> tuple[list[Path], Path, CaptionClient, str]:
    from balcaprl.rewards.judged import load_prompt

    output = Path(arguments.output).expanduser()
    if not arguments.base_url.startswith(("http://", "https://")):
        raise BadArguments(
            f"--base-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {arguments.base_url!r}."
        )
    if not arguments.model.strip():
        raise BadArguments("--model must name the model the server serves (see its /v1/models).")
    if output.suffix != ".jsonl":
        raise BadArguments(f"--output must be a .jsonl file, got {str(output)!r}.")
    for name in ("concurrency", "max_tokens", "max_images"):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            raise BadArguments(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if arguments.api_key_env and not os.environ.get(arguments.api_key_env):
        raise BadArguments(f"the environment variable {arguments.api_key_env} (--api-key-env) is not set.")
    try:
        prompt = load_prompt(PROMPT_NAME, arguments.prompt_version)
    except FileNotFoundError as error:
        raise BadArguments(str(error)) from None
    images = list_images(Path(arguments.images).expanduser())[: arguments.max_images]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.open("a", encoding="utf-8").close()
    except OSError as error:
        raise BadArguments(f"cannot write --output {str(output)!r}: {error.strerror or error}.") from None
    try:
        price = price_pair(arguments.price_per_million_tokens)
    except ValueError:
        raise BadArguments(
            "--price-per-million-tokens must be two finite numbers >= 0 (input and output price per million tokens), "
            f"got {arguments.price_per_million_tokens}."
        ) from None
    try:
        client = CaptionClient(
            arguments.base_url,
            arguments.model,
            api_key_env=arguments.api_key_env,
            max_concurrency=arguments.concurrency,
            timeout=arguments.timeout,
            max_retries=arguments.max_retries,
            cache_dir=arguments.cache_dir,
            temperature=arguments.temperature,
            max_tokens=arguments.max_tokens,
            max_tokens_parameter=arguments.max_tokens_parameter,
            price_per_million_tokens=price,
        )
    except ValueError as error:  # the judge's own checks of its arguments
        raise BadArguments(str(error)) from None
    return images, output, client, prompt


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``balcaprl data recaption``; the exit code: 0 all captioned, 1 some failed (listed), 2 bad arguments."""
    from balcaprl.judge.client import quiet_request_logs

    try:
        arguments = build_parser().parse_args(argv)
        images, output, client, prompt = _prepare(arguments)
        done = done_images(output)
    except BadArguments as error:
        print(f"balcaprl data recaption: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_request_logs()

    pending = [image for image in images if image not in done]
    totals = RunTotals(skipped=len(images) - len(pending))
    logger.info(
        "Captioning %d images with %s (prompt %s): %d already in %s.",
        len(pending),
        arguments.model,
        arguments.prompt_version,
        totals.skipped,
        output,
    )
    if pending:
        asyncio.run(recaption(pending, output, client, prompt, arguments.prompt_version, totals))
    if totals.failed == 0:
        failures_path(output).unlink(missing_ok=True)
    print(
        f"captioned {totals.captioned}, failed {totals.failed}"
        + (f" (listed in {failures_path(output)})" if totals.failed else "")
        + f", skipped (already done) {totals.skipped}, cache hits {client.cache_hits}, tokens: prompt "
        f"{client.prompt_tokens} completion {client.completion_tokens}"
        + (
            f", cost {token_cost(client.prompt_tokens, client.completion_tokens, client.price_per_million_tokens):.6g}"
            if client.price_per_million_tokens
            else ""
        )
        + f", requests {client.requests}, elapsed {time.monotonic() - totals.started:.1f} s"
    )
    return 1 if totals.failed else 0
