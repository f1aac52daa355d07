"""Stage 1 trains what generation uses: after SFT on one caption, greedy `generate` reproduces it and stops (EOS).

Guards the Qwen2.5-VL positions trap (ENVIRONMENT.md): a training path that drops ``mm_token_type_ids`` trains a
model that looks fine teacher-forced but decodes garbage under ``generate``.
"""

import json

import pytest
from PIL import Image

from balcaprl.generation import generate_captions, load_for_generation
from balcaprl.sft import main as sft_main
from tests.helpers import greedy_caption_tokens

CAPTION = "a red circle on a gray background."


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_sft_model_generates_what_it_learned(tmp_path, family):
    lines = []
    for index in range(16):
        path = tmp_path / "images" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (56, 56), (120 + index, 116, 104)).save(path)
        lines.append(json.dumps({"image": str(path), "references": [CAPTION]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "sft"
    sft_main([
        "--config", f"recipes/demo/{family}_sft.yaml", "--model_name_or_path", f"tiny:{family}",
        "--dataset", str(tmp_path / "data.jsonl"), "--output_dir", str(output), "--max_steps", "40",
        "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "40",
    ])  # fmt: skip
    model, processor = load_for_generation(output)
    images = [Image.new("RGB", (56, 56), (125, 116, 104)), Image.new("RGB", (56, 56), (131, 116, 104))]
    captions = generate_captions(model, processor, images, max_new_tokens=16)
    assert captions == [CAPTION, CAPTION]
    # ... and ends it with EOS: the tiny models have the real chat templates, and LLaVA's adds no </s> (stage 1 must).
    new_tokens, eos_ids = greedy_caption_tokens(model, processor, images, max_new_tokens=16)
    assert all(eos_ids & set(row) for row in new_tokens), [processor.tokenizer.decode(row) for row in new_tokens]
