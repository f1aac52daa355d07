"""`SamplingParams` and `StructuredOutputsParams` with vLLM 0.31's fields, defaults and validation messages.

Unknown keyword arguments are a `TypeError` (vLLM's is a msgspec struct); out-of-range values are a
`VLLMValidationError` (a `ValueError`) with vLLM's message. ``temperature`` below 1e-5 means greedy: top-p, top-k and
min-p are reset and ``n`` must be 1, as in vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vllm.exceptions import VLLMValidationError

_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2


@dataclass
class StructuredOutputsParams:
    """Accepted so that TRL can build it; the stand-in engine refuses to decode with it (no grammar backend)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        count = sum(
            value is not None
            for value in (self.json, self.regex, self.choice, self.grammar, self.json_object, self.structural_tag)
        )
        if count > 1:
            raise VLLMValidationError(
                "You can only use one kind of structured outputs constraint "
                f"but multiple are specified: {self.__dict__}"
            )
        if count < 1:
            raise VLLMValidationError(
                f"You must use one kind of structured outputs constraint but none are specified: {self.__dict__}"
            )


@dataclass
class SamplingParams:
    """Sampling parameters of one request (the fields TRL and balcaprl can send; vLLM has a few more)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = _MAX_TEMP  # vLLM warns and clamps: smaller values overflow
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        self.bad_words = [] if self.bad_words is None else list(dict.fromkeys(self.bad_words))
        if self.logprobs is True:
            self.logprobs = 1
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:
            # Zero temperature means greedy sampling.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def _verify_args(self) -> None:
        if not isinstance(self.n, int):
            raise VLLMValidationError(f"n must be an int, but is of type {type(self.n)}")
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise VLLMValidationError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise VLLMValidationError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise VLLMValidationError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature):
            raise VLLMValidationError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int):
            raise VLLMValidationError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise VLLMValidationError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise VLLMValidationError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise VLLMValidationError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if not all(isinstance(token_id, int) for token_id in self.stop_token_ids):
            raise VLLMValidationError(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        if any(not stop for stop in self.stop):
            raise VLLMValidationError("stop cannot contain an empty string.")
        if any(not bad_word for bad_word in self.bad_words):
            raise VLLMValidationError(f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}")

    @property
    def sampling_type_is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenizes ``bad_words`` as vLLM does: each word with and without a leading space, no special tokens added.

        A single-token bad word bans that token at every step; a longer one bans its last token after its prefix.
        """
        if not self.bad_words:
            return
        self._bad_words_token_ids = []
        for bad_word in self.bad_words:
            for add_prefix_space in (False, True):
                prompt = (" " if add_prefix_space else "") + bad_word.lstrip()
                token_ids = tokenizer.encode(prompt, add_special_tokens=False)
                if not token_ids:
                    if not add_prefix_space:
                        raise VLLMValidationError("bad_words entries must tokenize to at least one token.")
                    continue
                previous = self._bad_words_token_ids[-1] if self._bad_words_token_ids else None
                if not add_prefix_space or (
                    previous is not None and token_ids[0] != previous[0] and len(token_ids) == len(previous)
                ):
                    self._bad_words_token_ids.append(token_ids)

    def verify(self, vocab_size: int) -> None:
        """The checks vLLM makes against the model config when a request is added."""
        for name, token_ids in (
            ("logit_bias", list(self.logit_bias or {})),
            ("stop_token_ids", self.stop_token_ids),
        ):
            invalid = [token_id for token_id in token_ids if token_id < 0 or token_id >= vocab_size]
            if invalid:
                raise VLLMValidationError(
                    f"token_id(s) {invalid} in {name} contain out-of-vocab token ids. Vocabulary size: {vocab_size}"
                )
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) == 0:
                raise VLLMValidationError("allowed_token_ids is not None and empty!")
            if any(token_id < 0 or token_id >= vocab_size for token_id in self.allowed_token_ids):
                raise VLLMValidationError("allowed_token_ids contains out-of-vocab token id!")
        bad_token_ids = [token_id for words in self._bad_words_token_ids or [] for token_id in words]
        invalid = [token_id for token_id in bad_token_ids if not 0 <= token_id < vocab_size]
        if invalid:
            raise VLLMValidationError(
                f"The model vocabulary size is {vocab_size}, but the following tokens were specified as bad: "
                f"{invalid}. All token id values should be integers satisfying: 0 <= token_id < {vocab_size}."
            )
