import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from balcaprl.models.image_only import ImageOnlyQwen2_5_VLProcessor, torchvision_available
from balcaprl.models.processors import load_processor
from balcaprl.models.tiny import build_tiny_model

IMAGE_TOKENS = {"qwen2_5_vl": ("<|image_pad|>", 4), "llava": ("<image>", 4)}


def caption_request(image):
    return [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_tiny_model_reloads_and_generates(tiny_models, family):
    path = tiny_models[family]
    processor = load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    inputs = processor.apply_chat_template(
        caption_request(Image.new("RGB", (56, 56), "red")),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    image_token, expected_count = IMAGE_TOKENS[family]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    assert (inputs["input_ids"] == image_token_id).sum().item() == expected_count
    if family == "qwen2_5_vl":
        # Without mm_token_type_ids Qwen2.5-VL silently falls back to 1-D positions (ENVIRONMENT.md).
        assert "mm_token_type_ids" in inputs
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 6
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_tokenizer_is_trained_locally_with_family_special_tokens(tiny_models):
    qwen = load_processor(str(tiny_models["qwen2_5_vl"])).tokenizer
    llava = load_processor(str(tiny_models["llava"])).tokenizer
    assert qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>"
    assert llava.eos_token == "</s>" and llava.pad_token == "<pad>" and llava.bos_token == "<s>"
    # A BPE trained on captions: common caption words are single tokens.
    assert len(qwen.tokenize(" circle")) == 1 and len(qwen) < 600
    assert qwen.decode(qwen("a red circle.")["input_ids"]) == "a red circle."


def test_qwen_processor_loads_with_or_without_torchvision(tiny_models):
    path = tiny_models["qwen2_5_vl"]
    saved = json.loads((path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"  # the checkpoint looks like a stock one
    processor = load_processor(str(path))
    if torchvision_available():
        assert type(processor) is Qwen2_5_VLProcessor
    else:
        assert type(processor) is ImageOnlyQwen2_5_VLProcessor
        assert not hasattr(processor, "video_processor") or processor.video_processor is None


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        build_tiny_model("blip", tmp_path)


def test_builds_are_deterministic(tmp_path):
    first = build_tiny_model("llava", tmp_path / "a", seed=3)
    second = build_tiny_model("llava", tmp_path / "b", seed=3)
    weights = [AutoModelForImageTextToText.from_pretrained(p).state_dict() for p in (first, second)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
