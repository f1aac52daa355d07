"""JudgeClient: async JSON answers from any OpenAI-compatible chat server (vLLM, SGLang, llama.cpp, hosted APIs).

Judge-based rewards (precision, recall, linguistic) ask an LLM for a small JSON object per caption or reference.
During RL that is hundreds of requests per step, so the client is built for a flaky server under load:

- concurrency: at most ``max_concurrency`` requests in flight (an ``asyncio.Semaphore``, held only while a request is
  on the wire, not while backing off);
- robustness: timeouts, HTTP 408/429/5xx, dropped connections, truncated bodies and answers that are not JSON or do not
  match the schema are retried ``max_retries`` times with exponential backoff and jitter. After the last try the call
  returns ``None`` (the reward's "could not score") and counts a failure — it never raises for a server fault. Any
  other 4xx (bad request, bad key) is not retried: ``None``, a failure, and one warning per status code. The openai
  client's own retries are off, so ``requests`` counts every HTTP attempt exactly;
- cost: answers are cached on disk (``cache_dir``), and identical requests in flight at the same time share one call,
  so a reference decomposed by 8 rollouts at once costs one request. The tokens paid for are counted from the
  ``usage`` of every response the server completed, including answers then rejected (not JSON, not the schema) and
  retried; cached and shared answers cost nothing, and a server that sends no ``usage`` counts 0 tokens;
- images: resized to ``max_pixels`` (aspect ratio kept, never upscaled), sent as JPEG (PNG when small and not from a
  JPEG), encoded once per distinct image and off the event loop (`JudgeClient.image_part`; the rules and their
  reasons are in `balcaprl.judge.images`);
- threads: TRL runs async reward functions on its own event loop in a background thread, so the ``AsyncOpenAI``
  client, the semaphore and the in-flight table are created lazily per event loop;
- secrets: the API key is read from the environment variable named by ``api_key_env`` when the first request is
  made; it never appears in ``repr``, exceptions or log records (server messages are scrubbed of it).

Metrics for the trainer: :meth:`JudgeClient.pop_metrics` returns ``judge/requests``, ``judge/retries``,
``judge/failures``, ``judge/cache_hits``, ``judge/bytes_sent``, ``judge/prompt_tokens`` and ``judge/completion_tokens``
for the interval since the previous call. The counters themselves (``requests``, ..., and ``calls``, the answers asked
for) are cumulative attributes that other readers, such as the failure budget of `balcaprl.judge.guard`, can
difference on their own schedule. ``price_per_million_tokens`` turns tokens into money (`token_cost`); the trainer
logs it as ``judge/cost``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import os
import random
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import openai

from balcaprl.judge.cache import CACHE_FORMAT_VERSION, _AnswerCache
from balcaprl.judge.config import RECIPE_KEYS, RESPONSE_FORMATS, JudgeConfig, price_pair
from balcaprl.judge.images import EncodedImage, ImageEncoder, ImageLike
from balcaprl.judge.messages import Message, _canonical_messages, _with_schema_instruction, extract_json_object

logger = logging.getLogger(__name__)
REQUEST_LOGGERS = ("httpx", "httpx2")  # openai's HTTP client (1-2: httpx, 3: httpx2) logs each request at INFO


def quiet_request_logs() -> None:
    """Per-request log lines of the HTTP client only when the root logger is at DEBUG."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in REQUEST_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


COUNTER_NAMES = ("requests", "retries", "failures", "cache_hits", "bytes_sent", "prompt_tokens", "completion_tokens")


NO_API_KEY = "EMPTY"  # what vLLM / llama.cpp servers without --api-key accept; the openai client refuses None


RETRYABLE_STATUS_CODES = frozenset({408, 429})  # plus every 5xx; 408 is a server-side timeout


_DEFAULTS = JudgeConfig()


@dataclass
class _LoopState:
    """What must belong to one event loop: the HTTP client, the concurrency bound, the in-flight table."""

    client: openai.AsyncOpenAI
    semaphore: asyncio.Semaphore
    inflight: dict[str, asyncio.Future] = field(default_factory=dict)


class _GiveUp(Exception):
    """A fault that retrying cannot fix (a 4xx other than 408/429)."""


class JudgeClient:
    """Asynchronous JSON-answer client for an OpenAI-compatible chat server; see the module docstring.

    Args (each is also the recipe key ``judge_<arg>``, declared in `JudgeConfig`):
        base_url: the server's OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server serves.
        api_key_env: NAME of the environment variable holding the API key; None for servers without auth.
        max_concurrency: requests in flight at once, per event loop.
        timeout: seconds allowed for one request (connect + answer), after which it is retried.
        max_retries: extra attempts after the first for transient faults.
        cache_dir: directory of the on-disk answer cache; None disables it.
        temperature: sampling temperature (0 makes answers reproducible and cacheable).
        max_tokens: answer length limit.
        response_format: ``"json_schema"`` (the server constrains decoding to the schema: vLLM, SGLang, llama.cpp,
            OpenAI), ``"json_object"`` (any JSON object) or ``"none"`` (the prompt alone asks for JSON; for servers
            that reject ``response_format``).
        schema_in_prompt: append the schema and a "JSON only" instruction to the last user turn.
        backoff_base_s: first backoff delay; it doubles per retry, with jitter, up to ``backoff_max_s``.
        backoff_max_s: longest backoff delay (also caps a server's ``Retry-After``).
        max_pixels: pixel budget of images sent (aspect ratio kept, never upscaled; None: no limit).
        jpeg_quality: JPEG quality of images sent (PNG is used for small images that do not come from a JPEG).
        price_per_million_tokens: (input, output) price per million prompt / completion tokens, for the cost the
            trainer and the evaluation report (`balcaprl.judge.config.token_cost`); None: no cost.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_concurrency: int = _DEFAULTS.judge_max_concurrency,
        timeout: float = _DEFAULTS.judge_timeout,
        max_retries: int = _DEFAULTS.judge_max_retries,
        cache_dir: str | os.PathLike | None = _DEFAULTS.judge_cache_dir,
        temperature: float = _DEFAULTS.judge_temperature,
        max_tokens: int = _DEFAULTS.judge_max_tokens,
        response_format: str | None = _DEFAULTS.judge_response_format,
        schema_in_prompt: bool = _DEFAULTS.judge_schema_in_prompt,
        backoff_base_s: float = _DEFAULTS.judge_backoff_base_s,
        backoff_max_s: float = _DEFAULTS.judge_backoff_max_s,
        max_pixels: int | None = _DEFAULTS.judge_max_pixels,
        jpeg_quality: int = _DEFAULTS.judge_jpeg_quality,
        price_per_million_tokens: Sequence[float] | None = _DEFAULTS.judge_price_per_million_tokens,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"judge_base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}."
            )
        if not model:
            raise ValueError("judge_model must name the model the judge server serves (see its /v1/models).")
        response_format = "none" if response_format is None else str(response_format).lower()
        if response_format not in RESPONSE_FORMATS:
            raise ValueError(
                f"judge_response_format must be one of {list(RESPONSE_FORMATS)}, got {response_format!r}."
            )
        self.base_url = base_url.rstrip("/")
        self.model = str(model)
        self.api_key_env = api_key_env or None
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        if self.max_concurrency < 1 or self.timeout <= 0 or self.max_retries < 0:
            raise ValueError(
                "judge_max_concurrency must be >= 1, judge_timeout > 0 and judge_max_retries >= 0; got "
                f"{self.max_concurrency}, {self.timeout}, {self.max_retries}."
            )
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.response_format = response_format
        self.schema_in_prompt = schema_in_prompt
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.images = ImageEncoder(max_pixels, jpeg_quality)
        self.max_pixels = self.images.max_pixels
        self.jpeg_quality = self.images.jpeg_quality
        self.price_per_million_tokens = price_pair(price_per_million_tokens)

        # Cumulative counters; pop_metrics reports their increase since its previous call.
        self.calls = 0  # answers asked for (complete_json calls), however they were served
        self.requests = 0
        self.retries = 0
        self.failures = 0
        self.cache_hits = 0
        self.bytes_sent = 0  # request bodies, every attempt
        self.prompt_tokens = 0  # the server's usage.prompt_tokens, every completed response
        self.completion_tokens = 0  # the server's usage.completion_tokens, every completed response
        self._popped = dict.fromkeys(COUNTER_NAMES, 0)
        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._cache = None if self.cache_dir is None else _AnswerCache(self.cache_dir)
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._warned: set[str] = set()
        self._secret: str | None = None  # only kept to scrub it out of server messages before logging
        self._random = random.Random()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, **overrides: Any) -> JudgeClient:
        """A client from recipe keys (``judge_base_url``, ``judge_model``, …; the fields of `JudgeConfig`).

        ``config`` is a mapping or any object with those attributes (e.g. a `JudgeConfig`); keys that are missing
        or None keep the constructor defaults; ``overrides`` are constructor arguments that win over the recipe.
        """
        if isinstance(config, Mapping):
            values = {key: config.get(key) for key in RECIPE_KEYS}
        else:
            values = {key: getattr(config, key, None) for key in RECIPE_KEYS}
        arguments = {key.removeprefix("judge_"): value for key, value in values.items() if value is not None}
        arguments.update(overrides)
        missing = [key for key in ("judge_base_url", "judge_model") if not arguments.get(key.removeprefix("judge_"))]
        if missing:
            raise ValueError(f"A judge needs the recipe keys {missing}; add them to the recipe (see recipes/).")
        return cls(**arguments)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, "
            f"max_concurrency={self.max_concurrency}, timeout={self.timeout}, max_retries={self.max_retries}, "
            f"cache_dir={None if self.cache_dir is None else str(self.cache_dir)!r}, max_pixels={self.max_pixels})"
        )

    async def complete_json(
        self, messages: Sequence[Message], schema: dict[str, Any], *, cache_key_extra: str = ""
    ) -> dict[str, Any] | None:
        """The judge's answer to ``messages`` as a dict validated against the JSON ``schema``, or None.

        None means the judge could not answer after all retries (or the request was rejected); it is counted in
        ``failures``. Answers come from the disk cache or from an identical request already in flight when possible.
        ``cache_key_extra`` separates cache entries whose messages are equal but whose meaning differs (e.g. a prompt
        version). Raises ``ValueError`` only for an invalid ``schema``.
        """
        validator = self._validator(schema)
        key = self.cache_key(messages, schema, cache_key_extra=cache_key_extra)
        state = self._loop_state()
        self._count("calls")

        shared = state.inflight.get(key)
        if shared is not None:
            answer = await asyncio.shield(shared)
            self._count("cache_hits" if answer is not None else "failures")
            return copy.deepcopy(answer)
        if self._cache is not None:
            cached = self._cache.get(key)
            if cached is not None:
                self._count("cache_hits")
                return cached

        # A task of its own, so that one caller being cancelled does not cancel the answer others wait for.
        task = asyncio.ensure_future(self._fetch_answer(state, messages, schema, validator, key))
        state.inflight[key] = task
        task.add_done_callback(lambda done: state.inflight.pop(key) if state.inflight.get(key) is done else None)
        answer = await asyncio.shield(task)
        if answer is None:
            self._count("failures")
        return copy.deepcopy(answer)

    async def check(self, messages: Sequence[Message], schema: dict[str, Any]) -> str | None:
        """Ask the server itself (never the cache) and return None if it answered schema-valid JSON, else the fault.

        The health check of `balcaprl.judge.guard`: one real request with this client's retries, whose fault (e.g.
        ``"connection error (ConnectError)"``, ``"HTTP 401: ..."``, ``"answer does not match the schema: ..."``) is
        returned as one line instead of being logged. Counted like any request.
        """
        validator = self._validator(schema)
        state = self._loop_state()
        self._count("calls")
        answer, fault = await self._fetch(state, messages, schema, validator, key=None)
        if answer is None:
            self._count("failures")
            if not fault.startswith("rejected"):
                fault = f"{fault}, after {self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
            return " ".join(fault.split())  # one line, whatever the server put in its message
        return None

    def encode_image(self, image: ImageLike) -> EncodedImage:
        """``image`` resized to ``max_pixels`` and encoded, once per distinct content (see `balcaprl.judge.images`)."""
        return self.images.encode(image)

    async def image_part(self, image: ImageLike) -> dict[str, Any]:
        """The OpenAI image content part of ``image``, encoded in a worker thread so the event loop keeps serving.

        A ``data:image/...`` URL string is used as it is.
        """
        if isinstance(image, str) and image.startswith("data:image/"):
            return {"type": "image_url", "image_url": {"url": image}}
        encoded = await asyncio.to_thread(self.images.encode, image)
        return encoded.message_part()

    def cache_key(self, messages: Sequence[Message], schema: dict[str, Any], *, cache_key_extra: str = "") -> str:
        """sha256 of everything that determines the answer (images enter as their sha256)."""
        identity = {
            "version": CACHE_FORMAT_VERSION,
            "model": self.model,
            "messages": _canonical_messages(messages),
            "schema": schema,
            "extra": cache_key_extra,
            "generation": [self.temperature, self.max_tokens, self.response_format, self.schema_in_prompt],
        }
        encoded = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()

    def pop_metrics(self) -> dict[str, float]:
        """``judge/<counter>`` for each of `COUNTER_NAMES` (requests, retries, failures, cache hits, bytes sent,
        prompt and completion tokens): its increase since the previous call."""
        with self._lock:
            current = {name: getattr(self, name) for name in COUNTER_NAMES}
            interval = {f"judge/{name}": float(current[name] - self._popped[name]) for name in COUNTER_NAMES}
            self._popped = current
        return interval

    async def aclose(self) -> None:
        """Close the HTTP client of the running event loop, forget the others', and close the cache file."""
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._states.pop(loop, None)
            self._states.clear()  # other loops' clients cannot be awaited from here; their pools die with them
        if state is not None:
            await state.client.close()
        if self._cache is not None:
            self._cache.close()  # reopened on the next use

    async def __aenter__(self) -> JudgeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def _count_usage(self, response: Any) -> None:
        """Adds the response's ``usage`` tokens; a response without them (some servers, a proxy's page) adds 0."""
        usage = response.get("usage") if isinstance(response, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        with self._lock:
            self.prompt_tokens += _token_count(usage.get("prompt_tokens"))
            self.completion_tokens += _token_count(usage.get("completion_tokens"))

    def _validator(self, schema: dict[str, Any]) -> jsonschema.protocols.Validator:
        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            try:
                validator_class.check_schema(schema)
            except jsonschema.SchemaError as error:
                raise ValueError(f"The judge's JSON schema is invalid: {error.message}") from error
            validator = self._validators[key] = validator_class(schema)
        return validator

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._states.get(loop)
        if state is None:
            state = _LoopState(client=self._make_client(), semaphore=asyncio.Semaphore(self.max_concurrency))
            with self._lock:
                # A closed loop's client can never be used again; dropping it lets its sockets be collected.
                for closed_loop in [other for other in self._states if other.is_closed()]:
                    del self._states[closed_loop]
                state = self._states.setdefault(loop, state)
        return state

    def _make_client(self) -> openai.AsyncOpenAI:
        api_key = NO_API_KEY
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env, "")
            if value:
                api_key = self._secret = value
            else:
                self._warn_once(
                    "missing-key",
                    "Environment variable %s (judge_api_key_env) is not set; calling the judge without an API key.",
                    self.api_key_env,
                )
        # max_retries=0: this class does the retrying, so that every attempt is counted and bounded exactly.
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, timeout=self.timeout, max_retries=0)

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:300]

    def _warn_once(self, kind: str, message: str, *arguments: Any) -> None:
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        logger.log(logging.WARNING if first else logging.DEBUG, message, *arguments)

    def _request_arguments(self, messages: Sequence[Message], schema: dict[str, Any]) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": self.model,
            "messages": _with_schema_instruction(messages, schema) if self.schema_in_prompt else list(messages),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.response_format == "json_schema":
            arguments["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        elif self.response_format == "json_object":
            arguments["response_format"] = {"type": "json_object"}
        return arguments

    def _backoff_delay(self, retry: int, retry_after: float | None) -> float:
        """Exponential backoff with "equal jitter": half the step fixed, half random, so retries spread out."""
        step = min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1))
        delay = step / 2 + self._random.uniform(0, step / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    async def _fetch_answer(
        self,
        state: _LoopState,
        messages: Sequence[Message],
        schema: dict[str, Any],
        validator: jsonschema.protocols.Validator,
        key: str,
    ) -> dict[str, Any] | None:
        answer, fault = await self._fetch(state, messages, schema, validator, key)
        if answer is None and not fault.startswith("rejected"):  # rejections were warned about already
            self._warn_once(
                "gave-up",
                "Judge gave up on a request after %d attempts (last fault: %s); such requests score None and are "
                "counted in judge/failures (further ones are logged at DEBUG).",
                self.max_retries + 1,
                fault,
            )
        return answer

    async def _fetch(
        self,
        state: _LoopState,
        messages: Sequence[Message],
        schema: dict[str, Any],
        validator: jsonschema.protocols.Validator,
        key: str | None,
    ) -> tuple[dict[str, Any] | None, str]:
        """(answer, "") or (None, the last fault) after at most ``max_retries`` retries; caches under ``key``."""
        arguments = self._request_arguments(messages, schema)
        # The body's size, counted per attempt: what a judge at real image sizes is limited by.
        body_bytes = len(json.dumps(arguments, ensure_ascii=False, separators=(",", ":")).encode())
        fault, retry_after = "", None
        # A plain loop rather than a retry library (tenacity): each attempt must be counted exactly, the backoff
        # must not hold the concurrency slot, and an invalid answer is a value to retry on, not an exception.
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                await asyncio.sleep(self._backoff_delay(attempt, retry_after))
            try:
                answer, fault, retry_after = await self._attempt(state, arguments, validator, body_bytes)
            except _GiveUp as rejected:
                return None, str(rejected)
            if answer is not None:
                if self._cache is not None and key is not None:
                    self._cache.put(key, answer)
                return answer, ""
            logger.debug("Judge attempt %d/%d failed: %s", attempt + 1, self.max_retries + 1, fault)
        return None, fault

    async def _attempt(
        self,
        state: _LoopState,
        arguments: dict[str, Any],
        validator: jsonschema.protocols.Validator,
        body_bytes: int,
    ) -> tuple[dict[str, Any] | None, str, float | None]:
        """One HTTP request: (answer, "", None) on success, else (None, fault description, Retry-After seconds)."""
        async with state.semaphore:
            self._count("requests")
            self._count("bytes_sent", body_bytes)
            try:
                # The client's documented raw ``post`` with ``cast_to=object`` returns the JSON body as a dict: it
                # skips the typed request transform and response model, a third of the client's CPU per request.
                # wait_for bounds the whole exchange; the client's own timeout only bounds each socket operation.
                request = state.client.post("/chat/completions", body=arguments, cast_to=object)
                response = await asyncio.wait_for(request, self.timeout)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                return None, f"no answer within {self.timeout:g} s", None
            except openai.APIConnectionError as error:
                cause = error.__cause__ or error
                return None, f"connection error ({type(cause).__name__})", None
            except openai.APIStatusError as error:
                status = error.status_code
                if status >= 500 or status in RETRYABLE_STATUS_CODES:
                    return None, f"HTTP {status}", _retry_after_seconds(error.response)
                self._warn_once(
                    f"http-{status}",
                    "Judge at %s rejected a request with HTTP %d: %s. Not retrying; check judge_base_url, judge_model "
                    "and the key named by judge_api_key_env (%s)%s.",
                    self.base_url,
                    status,
                    self._scrub(str(error.message)),
                    self.api_key_env,
                    ", or set judge_response_format: none"
                    if status in (400, 422) and self.response_format != "none"
                    else "",
                )
                raise _GiveUp(f"rejected with HTTP {status}: {self._scrub(str(error.message))[:200]}") from None
            except (openai.APIError, ValueError) as error:  # a 200 whose body is not a chat completion
                return None, f"malformed response ({type(error).__name__})", None
        self._count_usage(response)  # paid for whether or not the answer is usable
        content = _message_content(response)
        answer = extract_json_object(content)
        if answer is None:
            return None, f"answer has no JSON object: {self._scrub(repr(content))[:120]}", None
        error = jsonschema.exceptions.best_match(validator.iter_errors(answer))
        if error is not None:
            return None, f"answer does not match the schema: {error.message[:120]}", None
        return answer, "", None


def _message_content(response: Any) -> str | None:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None  # not a chat completion (e.g. a proxy's 200 with an HTML error page, which arrives as a str)
    return content if isinstance(content, str) else None


def _token_count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _retry_after_seconds(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after")))
    except (AttributeError, TypeError, ValueError):
        return None
