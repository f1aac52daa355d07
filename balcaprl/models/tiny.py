"""Tiny, offline LLaVA-1.5 and Qwen2.5-VL models for tests and the demo.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained on a small caption corpus built in
this module, the weights are random, and the checkpoint is written to a local folder that loads back with the same
code users run on real checkpoints (`balcaprl.models.load_processor` + `from_pretrained`). Sizes follow what is
known to work on CPU (see ENVIRONMENT.md of the project).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from balcaprl.data.constants import DEFAULT_INSTRUCTION
from balcaprl.models.image_only import ImageOnlyQwen2_5_VLProcessor

FAMILIES = ("qwen2_5_vl", "llava")


# Special tokens, in id order, as the real tokenizers have them (Qwen2.5's first added tokens; Llama's <unk> <s> </s>
# plus llava-hf's <image> and <pad>), so that token roles and chat formatting match the real checkpoints.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]


# The real chat templates, verbatim (Qwen/Qwen2.5-VL-7B-Instruct and llava-hf/llava-1.5-7b-hf; a test compares them
# with tests/fixtures/reference-models). Qwen's adds the system prompt "You are a helpful assistant." when the
# conversation has none. LLaVA's renders `USER: <image>\n{text} ASSISTANT:` and ends the assistant turn with ' ' and
# no </s>: stage 1 supervises EOS itself (balcaprl.sft.CaptionSFTCollator).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "gray", "brown"]


_OBJECTS = ["circle", "square", "triangle", "dog", "cat", "car", "tree", "house", "person", "ball", "bird", "boat"]


_SIZES = ["small", "large", "tiny", "big"]


_PLACES = ["left", "right", "top", "bottom", "center", "corner"]


_TEMPLATES = [
    "a {size} {colour} {obj} on the {place}.",
    "There is a {size} {colour} {obj} at the {place} of the image.",
    "The image shows a {colour} {obj} next to a {size} {obj2}.",
    "A {colour} {obj} and a {colour2} {obj2} on a gray background.",
    "Describe this image in detail.",
    "In the {place}, a {size} {colour} {obj} sits above a {colour2} {obj2}.",
]


def caption_corpus(num_sentences: int = 2000, seed: int = 0) -> list[str]:
    """A small synthetic caption corpus: enough word variety to train a BPE tokenizer that covers captions."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        template = rng.choice(_TEMPLATES)
        sentences.append(
            template.format(
                size=rng.choice(_SIZES),
                colour=rng.choice(_COLOURS),
                colour2=rng.choice(_COLOURS),
                obj=rng.choice(_OBJECTS),
                obj2=rng.choice(_OBJECTS),
                place=rng.choice(_PLACES),
            )
        )
    return sentences


# The fixed text a chat-formatted caption prompt carries besides the caption: role names, Qwen's default system
# prompt and the default instruction. A real tokenizer encodes it in a few tokens; a BPE trained on captions alone
# spells it out letter by letter (72 prompt tokens instead of 27 for the demo's Qwen2.5-VL, more than the image's 16),
# which made every forward pass of the tiny models several times longer than the captions need.
CHAT_TEXTS = ("system\nYou are a helpful assistant.", "user\n", "assistant\n", "USER: ", " ASSISTANT:")


def train_tokenizer(
    corpus: list[str], special_tokens: list[str], vocab_size: int = 512, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` locally and wrap it as a `PreTrainedTokenizerFast`.

    The chat template's fixed text (`CHAT_TEXTS`) and the default instruction are added to the corpus, often enough
    (one copy per 10 corpus lines) that BPE merges their words whole.
    """
    copies = max(1, len(corpus) // 10)
    corpus = [*corpus, *[text for text in (*CHAT_TEXTS, DEFAULT_INSTRUCTION) for _ in range(copies)]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=chat_template)


def _qwen_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    # As Qwen2.5's: no BOS token (nothing is prepended), EOS <|im_end|>, pad <|endoftext|>.
    tokenizer = train_tokenizer(corpus, QWEN_SPECIAL_TOKENS, vocab_size, QWEN_CHAT_TEMPLATE)
    tokenizer.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": QWEN_SPECIAL_TOKENS[1:],
        }
    )
    return tokenizer


def _llava_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    # As llava-hf's Llama tokenizer: <s> is prepended only when add_special_tokens=True (its post-processor), never
    # by the chat template; </s> is EOS; <pad> pads (on the left by default).
    tokenizer = train_tokenizer(corpus, LLAVA_SPECIAL_TOKENS, vocab_size, LLAVA_CHAT_TEMPLATE)
    bos_id = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer.add_special_tokens(
        {
            "unk_token": "<unk>",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "additional_special_tokens": ["<image>"],
        }
    )
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    return tokenizer


def build_tiny_qwen2_5_vl(
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    image_size: int = 56,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Build a random tiny Qwen2.5-VL with its processor and save both to ``output_dir``.

    As in the real models, the last vision block attends over the whole image and the others inside 112-pixel
    windows (Qwen2.5-VL-7B: blocks 7, 15, 23 and 31 of 32 attend fully).

    ``image_size`` is the square side images are resized to (a multiple of 28): 56 px gives 4 image tokens.
    """
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (patch 14 x merge 2), got {image_size}")
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer(corpus or caption_corpus(seed=seed), vocab_size)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    # M-RoPE splits head_dim / 2 rotary frequencies into (temporal, height, width) sections that must add up to it.
    half_head_dim = hidden_size // 4 // 2
    spatial_section = half_head_dim * 3 // 8
    mrope_section = [half_head_dim - 2 * spatial_section, spatial_section, spatial_section]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
            "tie_word_embeddings": True,
            # As the real config: BOS id <|endoftext|> (never prepended by the tokenizer), EOS <|im_end|>.
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_hidden_size * 2,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            # Indexes of vision blocks: with the text depth here (a past mistake), a 2-block tower attended only
            # inside windows, and every object of the shapes world straddles a window border.
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        vision_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"),
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    # As Qwen2.5-VL-Instruct's generation config: stop at <|im_end|> or <|endoftext|>, BOS and pad <|endoftext|>.
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), endoftext],
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(model, processor, output_dir)


def build_tiny_llava(
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    image_size: int = 28,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Build a random tiny LLaVA-1.5 (CLIP vision tower + Llama) with its processor and save both."""
    if image_size % 14:
        raise ValueError(f"image_size must be a multiple of the patch size 14, got {image_size}")
    torch.manual_seed(seed)
    tokenizer = _llava_tokenizer(corpus or caption_corpus(seed=seed), vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_hidden_size * 2,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=14,
            projection_dim=vision_hidden_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(model, processor, output_dir)


def build_tiny_model(family: str, output_dir: str | Path, **kwargs) -> Path:
    """Build and save a tiny model of ``family`` (one of `FAMILIES`); returns the checkpoint folder."""
    builders = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "llava": build_tiny_llava}
    if family not in builders:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {list(builders)}.")
    return builders[family](output_dir, **kwargs)


def _save(model, processor, output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def tiny_caption_rows(num_rows: int, *, image_size: int = 56, seed: int = 0) -> list[dict]:
    """Rows ``{prompt, image, references}`` of single coloured shapes on a gray background, for quick runs.

    The gray is close to the image processors' mean colour, which makes colours easy for a tiny model to see.
    """
    from PIL import Image, ImageDraw

    palette = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        colour, shape = rng.choice(sorted(palette)), rng.choice(["circle", "square"])
        image = Image.new("RGB", (image_size, image_size), (122, 116, 104))
        box = [image_size // 4, image_size // 4, 3 * image_size // 4, 3 * image_size // 4]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=palette[colour])
        rows.append(
            {
                "prompt": [{"role": "user", "content": "Describe this image."}],
                "image": image,
                "references": [f"a {colour} {shape}.", f"There is a {colour} {shape} in the middle of the image."],
            }
        )
    return rows
