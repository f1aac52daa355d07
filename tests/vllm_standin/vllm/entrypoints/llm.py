"""``vllm.LLM`` for one CPU process: its own copy of the checkpoint, vLLM's input processing and sampler order.

What it mirrors (vLLM 0.31, read from its source):

- Engine arguments: the ones TRL passes are accepted (unknown ones are a `TypeError`, like ``EngineArgs``);
  ``max_model_len`` defaults to the model config's maximum positions, a larger value is an error. A processed
  prompt is refused with vLLM's messages (``vllm/v1/engine/input_processor.py``, ``_validate_prompt_len``) when it
  is longer than ``max_model_len``, and also when it is exactly that long (no room for the one output token every
  request asks for). ``mm_processor_kwargs`` override the processor defaults.
- Weights: loaded from the ``model`` folder at start-up in the config's dtype (``dtype="auto"``) or ``dtype``, held
  apart from the trainer's model, and overwritten by ``load_weights([(hf_name, tensor)])`` — each name renamed by the
  model class's ``hf_to_vllm_mapper`` as vLLM does (`vllm.model_executor.weights`); a name that maps to no
  parameter, or a wrong shape, is an error.
- Multimodal inputs: a raw image in ``multi_modal_data`` is processed by the checkpoint's own processor with the
  DEFAULTS of its processor files (not the trainer's min/max pixels): the stock ``AutoProcessor`` where torchvision
  imports, as vLLM uses, else balcaprl's image-only Qwen2.5-VL processor (same image processor and defaults; see
  `vllm.multimodal.processing`). With ``prompt_token_ids``, vLLM then replaces the next image placeholder token of
  the prompt by the run of placeholder tokens its processing produced, per image; the returned
  ``RequestOutput.prompt_token_ids`` are that processed prompt.
- Sampling, per step, in vLLM's order: allowed_token_ids mask → bad_words (-inf on the last token of a word whose
  prefix was just generated; single-token words always) → min_tokens → logit_bias → repetition / frequency /
  presence penalties → (greedy: argmax) temperature → min_p → top-k → top-p → sample. Temperature 0 is greedy.
  ``logprobs`` are "processed" (after all of the above, as TRL asks with ``logprobs_mode="processed_logprobs"``) or
  raw; each generated token gets ``{token_id: Logprob(logprob, rank, decoded_token)}`` for the sampled token and the
  top ``logprobs`` tokens. Generation stops at the tokenizer's EOS, the generation config's extra EOS ids or
  ``stop_token_ids`` (the stop token is kept in ``token_ids``), at ``max_tokens``, or at ``max_model_len``.
- ``sleep(level)`` / ``wake_up(tags)``: after level 2 the weights count as discarded until every one is loaded again.

What it does not do: no paging, KV cache, batching, CUDA graphs, tensor parallelism or quantization (each step
re-runs the whole sequence through the Hugging Face model, fine for tiny models); no stop strings or structured
outputs (refused, not ignored). A sampled image placeholder token: vLLM gives image features only to the
placeholder runs found when the prompt was processed and decodes on; the stand-in's Hugging Face forward counts
placeholder tokens, so its next step fails with "Image features and image tokens do not match" — the error the
trainer's own forward raises on such a completion with real vLLM.

One deliberate difference: where vLLM 0.31 SILENTLY expands an already-expanded prompt a second time (the prompt keeps
the old placeholder run plus a new one, and only the new one gets image features — huggingface/trl#6294), the
stand-in raises, so tests see the corruption.

Test-only extra: ``LLM.requests`` lists ``(sampling_params, outputs)`` of every ``generate`` call.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.model_executor.weights import EngineModel
from vllm.multimodal.processing import load_processor, runs_of
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

_LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
_MODEL_IMPLS = ("auto", "vllm", "transformers", "terratorch")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}
# Engine arguments the stand-in accepts without acting on them (memory and scheduling knobs of a GPU engine).
_IGNORED_ENGINE_ARGS = {
    "tokenizer_mode",
    "skip_tokenizer_init",
    "revision",
    "tokenizer_revision",
    "swap_space",
    "cpu_offload_gb",
    "enforce_eager",
    "disable_custom_all_reduce",
    "max_num_batched_tokens",
    "max_num_seqs",
    "enable_prefix_caching",
    "distributed_executor_backend",
    "kv_cache_dtype",
    "compilation_config",
    "disable_log_stats",
    "limit_mm_per_prompt",
    "enable_chunked_prefill",
}


class LLM:
    """A CPU stand-in for ``vllm.LLM`` (see the module docstring for what it mirrors and what it does not)."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str | torch.dtype = "auto",
        quantization: str | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        enable_sleep_mode: bool = False,
        max_model_len: int | None = None,
        model_impl: str = "auto",
        logprobs_mode: str = "raw_logprobs",
        mm_processor_kwargs: dict[str, Any] | None = None,
        **engine_args: Any,
    ):
        unknown = sorted(set(engine_args) - _IGNORED_ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        if tensor_parallel_size != 1:
            raise NotImplementedError("vLLM stand-in: tensor_parallel_size must be 1 (one CPU process, no TP).")
        if quantization is not None:
            raise NotImplementedError(f"vLLM stand-in: quantization={quantization!r} is not supported.")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"GPU memory utilization must be within (0, 1]. Got {gpu_memory_utilization}.")
        if logprobs_mode not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {list(_LOGPROBS_MODES)}, got {logprobs_mode!r}.")
        if model_impl not in _MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {list(_MODEL_IMPLS)}, got {model_impl!r}.")

        self.model_path = str(model)
        self.logprobs_mode = logprobs_mode
        self.enable_sleep_mode = enable_sleep_mode
        self.requests: list[tuple[list[SamplingParams], list[RequestOutput]]] = []
        self._generator = torch.Generator().manual_seed(seed)
        self._sleeping_level = 0
        self._kv_cache_awake = True

        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        self._text_config = config.get_text_config()
        torch_dtype = self._resolve_dtype(dtype, config)
        model_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        hf_model = model_class.from_pretrained(self.model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        hf_model.eval().requires_grad_(False)
        self._model = EngineModel(hf_model, self.model_path)
        self._accepts_mm_token_type_ids = "mm_token_type_ids" in inspect.signature(hf_model.forward).parameters

        tokenizer_path = tokenizer or self.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self._max_token_id = max(self.tokenizer.get_vocab().values())  # vLLM's cached tokenizer's max_token_id
        self.processor = None
        self.image_token_id = self.video_token_id = None
        if hasattr(config, "vision_config"):
            self.processor = load_processor(self.model_path, mm_processor_kwargs or {})
            self.image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
            self.video_token_id = getattr(config, "video_token_id", None)

        derived = self._derived_max_model_len()
        if max_model_len is not None and max_model_len > derived:
            raise ValueError(
                f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len "
                f"(max_position_embeddings={derived} in model's config.json). To allow overriding this maximum, set "
                "the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
            )
        model_config = SimpleNamespace(
            model=self.model_path,
            max_model_len=max_model_len or derived,
            dtype=torch_dtype,
            hf_config=config,
            logprobs_mode=logprobs_mode,
            vocab_size=self._text_config.vocab_size,
        )
        self._stop_ids = self._eos_token_ids()
        # The attribute chain TRL's colocate weight sync walks.
        self.llm_engine = SimpleNamespace(
            model_config=model_config,
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self._model))
            ),
        )

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _resolve_dtype(dtype, config) -> torch.dtype:
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype == "auto":
            # The config's dtype (vLLM on a GPU would also turn float32 checkpoints into bfloat16/float16).
            config_dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
            if isinstance(config_dtype, str):
                config_dtype = _DTYPES.get(config_dtype, torch.float32)
            return config_dtype or torch.float32
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}.")
        return _DTYPES[dtype]

    def _derived_max_model_len(self) -> int:
        keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
        lengths = [getattr(self._text_config, key) for key in keys if getattr(self._text_config, key, None)]
        return min(lengths) if lengths else 2048

    def _eos_token_ids(self) -> set[int]:
        # vLLM stops at the tokenizer's EOS plus every eos_token_id of the checkpoint's generation config.
        stop_ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        try:
            generation_config = GenerationConfig.from_pretrained(self.model_path)
        except OSError:
            return stop_ids
        eos = generation_config.eos_token_id
        stop_ids.update([eos] if isinstance(eos, int) else eos or [])
        return stop_ids

    def get_tokenizer(self):
        return self.tokenizer

    # ------------------------------------------------------------------------------------ memory management
    def reset_prefix_cache(self) -> bool:
        return True

    def sleep(self, level: int = 1) -> None:
        if not self.enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled. Create the LLM with enable_sleep_mode=True.")
        self._sleeping_level = level
        self._kv_cache_awake = False
        if level == 2:  # level 2 discards the weights instead of offloading them
            self._model.stale = {name for name, _ in self._model.named_parameters()}

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = tags or ["weights", "kv_cache"]
        if "kv_cache" in tags:
            self._kv_cache_awake = True
        if set(tags) >= {"weights", "kv_cache"}:
            self._sleeping_level = 0

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None, **kwargs) -> list:
        """Completions for each prompt: a token-id prompt (``{"prompt_token_ids": ...}``), a text prompt, or either
        with ``multi_modal_data``. ``sampling_params`` is one `SamplingParams` or one per prompt."""
        if lora_request is not None:
            raise NotImplementedError("vLLM stand-in: LoRA requests are not supported; sync merged weights instead.")
        if not self._kv_cache_awake:
            raise RuntimeError("vLLM stand-in: the engine is asleep; call wake_up() before generate().")
        if self._model.stale:
            raise RuntimeError(
                f"vLLM stand-in: {len(self._model.stale)} weights were discarded by sleep(level=2) and never loaded "
                f"again (e.g. {sorted(self._model.stale)[0]!r}); real vLLM would generate from garbage."
            )
        prompts = prompts if isinstance(prompts, list) else [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        outputs = []
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            prompt_ids, mm_inputs, text = self._process_inputs(prompt)
            self._validate_request(prompt_ids, params)
            completions = [
                self._decode(prompt_ids, mm_inputs, params, sample_index) for sample_index in range(params.n)
            ]
            outputs.append(RequestOutput(str(index), text, prompt_ids, None, completions))
        self.requests.append((params_list, outputs))
        return outputs

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's default: the sampling fields the checkpoint's generation config sets."""
        try:
            config = GenerationConfig.from_pretrained(self.model_path).to_diff_dict()
        except OSError:
            return SamplingParams()
        names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}
        names.update({"repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"})
        return SamplingParams(**{ours: config[theirs] for theirs, ours in names.items() if theirs in config})

    def _process_inputs(self, prompt) -> tuple[list[int], dict, str | None]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        mm_data = prompt.get("multi_modal_data") or {}
        unsupported = sorted(set(mm_data) - {"image"})
        if unsupported:
            raise NotImplementedError(f"vLLM stand-in: multi_modal_data {unsupported} is not supported (images only).")
        images = mm_data.get("image")
        if images is not None and not isinstance(images, list):
            images = [images]
        if images and self.processor is None:
            raise ValueError(f"{self.model_path} is not a multimodal model; it cannot take multi_modal_data.")
        text = prompt.get("prompt")
        if "prompt_token_ids" in prompt:
            prompt_ids = list(prompt["prompt_token_ids"])
            if not images:
                return prompt_ids, {}, text
            return (*self._apply_prompt_updates(prompt_ids, images), text)
        if not images:
            return self.tokenizer(text)["input_ids"], {}, text
        # A text prompt with images: the processor tokenizes and expands the placeholders itself.
        processed = self.processor(text=[text], images=images, return_tensors="pt")
        return processed["input_ids"][0].tolist(), self._mm_tensors(processed), text

    def _mm_tensors(self, processed) -> dict:
        return {
            key: value
            for key, value in processed.items()
            if key not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
        } | {"_mm_token_types": "mm_token_type_ids" in processed}

    def _apply_prompt_updates(self, prompt_ids: list[int], images: list) -> tuple[list[int], dict]:
        """vLLM's processing of a token prompt with images: process the images alone with the processor's defaults,
        then replace the next placeholder token of the prompt by the placeholder run produced for each image."""
        image_token = self.processor.image_token
        processed = self.processor(text=[image_token * len(images)], images=images, return_tensors="pt")
        runs = runs_of(processed["input_ids"][0].tolist(), self.image_token_id)
        if len(runs) != len(images):
            raise RuntimeError(
                f"Expected there to be {len(images)} prompt updates corresponding to {len(images)} image items, but "
                f"instead found {len(runs)} prompt updates!"
            )
        updated, start, placeholders = [], 0, []
        for item_index, (_, feature_size) in enumerate(runs):
            try:
                position = prompt_ids.index(self.image_token_id, start)
            except ValueError:
                raise RuntimeError(
                    f"Failed to apply prompt replacement for mm_items['image'][{item_index}]: the prompt has no "
                    f"{image_token!r} placeholder left for this image. This is likely because you forgot to include "
                    "input placeholder tokens (e.g., `<image>`, `<|image_pad|>`) in the prompt."
                ) from None
            updated += prompt_ids[start:position]
            placeholders.append((len(updated), feature_size))
            updated += [self.image_token_id] * feature_size
            start = position + 1
        updated += prompt_ids[start:]

        in_prompt = prompt_ids.count(self.image_token_id)
        if updated.count(self.image_token_id) != sum(size for _, size in runs):
            sizes = [f"{image.width}x{image.height}" for image in images]
            raise RuntimeError(
                f"vLLM stand-in: the prompt already holds {in_prompt} {image_token!r} tokens for {len(images)} "
                f"image(s) of {sizes}; vLLM 0.31 replaces the first placeholder of each image again by the "
                f"{[size for _, size in runs]} tokens of its own processing, leaving "
                f"{updated.count(self.image_token_id)} image tokens of which only the new run gets image features. "
                "Real vLLM does this silently (huggingface/trl#6294): send one placeholder token per image."
            )
        return updated, self._mm_tensors(processed) | {"_placeholders": placeholders}

    def _validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        # vLLM's InputProcessor._validate_prompt_len, then its vocabulary check, on the processed prompt.
        max_model_len = self.llm_engine.model_config.max_model_len
        vocab_size = self._text_config.vocab_size
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if prompt_len > max_model_len:
            if self.processor is not None:
                suggestion = (
                    "Make sure that `max_model_len` is no smaller than the number of text tokens plus multimodal "
                    "tokens. For image inputs, the number of image tokens depends on the number of images, and "
                    "possibly their aspect ratios as well."
                )
            else:
                suggestion = "Make sure that `max_model_len` is no smaller than the number of text tokens."
            raise VLLMValidationError(
                f"The decoder prompt (length {prompt_len}) is longer than the maximum model length of "
                f"{max_model_len}. {suggestion}"
            )
        if prompt_len == max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {prompt_len}) plus the number of requested output tokens (at least 1) is "
                f"longer than the maximum model length of {max_model_len}. Make sure that `max_model_len` is no "
                "smaller than the number of text tokens (prompt + requested output tokens)."
            )
        if max(prompt_ids) > max(self._max_token_id, vocab_size - 1):
            raise VLLMValidationError(f"Token id {max(prompt_ids)} is out of vocabulary")
        if params.stop:
            raise NotImplementedError("vLLM stand-in: stop strings are not supported; use stop_token_ids.")
        if params.structured_outputs is not None:
            raise NotImplementedError("vLLM stand-in: structured outputs are not supported.")
        params.update_from_tokenizer(self.tokenizer)
        params.verify(vocab_size)

    def _next_token_logits(self, token_ids: list[int], mm_inputs: dict) -> torch.Tensor:
        inputs = {"input_ids": torch.tensor([token_ids]), "attention_mask": torch.ones(1, len(token_ids), dtype=int)}
        inputs.update({key: value for key, value in mm_inputs.items() if not key.startswith("_")})
        if mm_inputs.get("_mm_token_types") and self._accepts_mm_token_type_ids:
            # Qwen2.5-VL's 3-D positions need to know which tokens are image (1) and video (2) placeholders.
            types = torch.zeros_like(inputs["input_ids"])
            types[inputs["input_ids"] == self.image_token_id] = 1
            if self.video_token_id is not None:
                types[inputs["input_ids"] == self.video_token_id] = 2
            inputs["mm_token_type_ids"] = types
        with torch.no_grad():
            return self._model.hf_model(**inputs).logits[0, -1].float()

    def _decode(self, prompt_ids: list[int], mm_inputs: dict, params: SamplingParams, sample_index: int):
        generator = self._generator
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed + sample_index)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._stop_ids)
        budget = self.llm_engine.model_config.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            budget = min(budget, params.max_tokens)
        output_ids: list[int] = []
        logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        cumulative, finish_reason, stop_reason = 0.0, "length", None
        for _ in range(budget):
            raw = self._next_token_logits(prompt_ids + output_ids, mm_inputs)
            logits = self._apply_logits_processors(raw.clone(), prompt_ids, output_ids, params, stop_ids)
            if params.sampling_type_is_greedy:
                token = int(logits.argmax())
                processed = logits
            else:
                processed = _truncate(logits / params.temperature, params)
                token = int(torch.multinomial(processed.softmax(-1), 1, generator=generator))
            if logprobs is not None:
                source = processed if self.logprobs_mode.startswith("processed") else raw
                values = source if self.logprobs_mode.endswith("logits") else source.log_softmax(-1)
                logprobs.append(self._logprob_dict(values, token, params.logprobs))
                cumulative += float(values[token])
            output_ids.append(token)
            if token in stop_ids:
                finish_reason, stop_reason = "stop", (token if token in params.stop_token_ids else None)
                break
        text = self.tokenizer.decode(output_ids, skip_special_tokens=params.skip_special_tokens)
        cumulative_logprob = cumulative if logprobs is not None else None
        return CompletionOutput(
            sample_index, text, output_ids, cumulative_logprob, logprobs, finish_reason, stop_reason
        )

    def _apply_logits_processors(self, logits, prompt_ids, output_ids, params: SamplingParams, stop_ids):
        if params.allowed_token_ids is not None:
            mask = torch.ones_like(logits, dtype=torch.bool)
            mask[params.allowed_token_ids] = False
            logits[mask] = -math.inf
        for word in params._bad_words_token_ids or []:
            prefix = word[:-1]
            if len(prefix) <= len(output_ids) and (not prefix or output_ids[-len(prefix) :] == prefix):
                logits[word[-1]] = -math.inf
        if len(output_ids) < params.min_tokens:
            logits[sorted(stop_ids)] = -math.inf
        for token_id, bias in (params.logit_bias or {}).items():
            logits[token_id] += bias
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)))
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
        if output_ids and (params.frequency_penalty or params.presence_penalty):
            counts = torch.bincount(torch.tensor(output_ids), minlength=logits.numel()).to(logits.dtype)
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _logprob_dict(self, values: torch.Tensor, token: int, num_top: int) -> dict[int, Logprob]:
        # vLLM's rank: how many tokens score at least as high (1 = the most likely).
        top = [] if num_top == 0 else values.topk(values.numel() if num_top == -1 else num_top).indices.tolist()
        entries = {}
        for token_id in [token, *top]:
            rank = int((values >= values[token_id]).sum())
            decoded = self.tokenizer.convert_ids_to_tokens(token_id)
            entries.setdefault(token_id, Logprob(float(values[token_id]), rank, decoded))
        return entries


def _truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """min_p, then top-k, then top-p on temperature-scaled logits (masked entries become -inf), as vLLM does."""
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    if params.top_k not in (0, -1) and params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort()
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[-1] = False  # keep at least one
        logits = logits.clone()
        logits[order[drop]] = -math.inf
    return logits
