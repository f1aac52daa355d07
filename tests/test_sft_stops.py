"""Stage 1 on the real interfaces (issue 9, point 5): the caption's end is supervised, and SFT sees the prompt tokens
RL and evaluation see — with llava-hf's real template, which ends the assistant turn with ``' '`` and no ``</s>``.

The models are tiny-depth builds of the real checkpoints' interfaces (`reference_models` fixture), trained through
the real ``balcaprl sft`` entry point (TRL's `SFTTrainer`).
"""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import prepare_multimodal_messages

from balcaprl.generation import load_for_generation
from balcaprl.models.processors import load_processor
from balcaprl.sft import main as sft_main
from balcaprl.trainer.sft_collator import CaptionSFTCollator
from tests.helpers import greedy_caption_tokens

CAPTION = "a red circle."
MAX_NEW_TOKENS = 24


def _caption_data(tmp_path, num_rows: int = 16):
    lines = []
    for index in range(num_rows):
        path = tmp_path / "images" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (56, 56), (120 + index, 116, 104)).save(path)
        lines.append(json.dumps({"image": str(path), "references": [CAPTION]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.jsonl"


def _sft(tmp_path, family, model_path, max_steps, batch_size=1):
    # Batch 1: TRL scores every position's log-probability on CPU, and LLaVA's 576 image tokens times its 32,064-token
    # vocabulary make each row cost ~0.5 s; one caption is learned in ~30 such steps either way.
    output = tmp_path / "sft"
    trainer = sft_main([
        "--config", f"recipes/demo/{family}_sft.yaml", "--model_name_or_path", str(model_path),
        "--dataset", str(_caption_data(tmp_path)), "--output_dir", str(output), "--max_steps", str(max_steps),
        "--per_device_train_batch_size", str(batch_size), "--learning_rate", "1e-2", "--logging_steps", "10",
    ])  # fmt: skip
    return trainer, output


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_sft_teaches_the_real_interface_model_to_stop(tmp_path, reference_models, family):
    _, output = _sft(tmp_path, family, reference_models[family], max_steps=40)
    model, processor = load_for_generation(output)
    tokenizer = processor.tokenizer
    images = [Image.new("RGB", (56, 56), (125 + index, 116, 104)) for index in range(2)]
    new_tokens, eos_ids = greedy_caption_tokens(model, processor, images, MAX_NEW_TOKENS)
    for row in new_tokens:
        decoded = tokenizer.decode(row, skip_special_tokens=False)
        stops = [position for position, token in enumerate(row) if token in eos_ids]
        assert stops, f"{family}: greedy caption never ends with EOS {eos_ids} within {MAX_NEW_TOKENS}: {decoded!r}"
        assert tokenizer.decode(row[: stops[0]], skip_special_tokens=True).strip() == CAPTION, decoded


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_sft_batch_has_the_rl_prompt_tokens_and_a_supervised_eos(tmp_path, reference_models, family):
    trainer, _ = _sft(tmp_path, family, reference_models[family], max_steps=1)
    processor = trainer.processing_class
    tokenizer = processor.tokenizer
    rows = [trainer.train_dataset[index] for index in range(3)]
    batch = trainer.data_collator([dict(row) for row in rows])
    # The tokens TRL's GRPOTrainer feeds for the same prompts and images (its own tokenization code).
    rl = GRPOTrainer(
        model=trainer.model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=GRPOConfig(
            output_dir=str(tmp_path / "rl"), use_cpu=True, bf16=False, report_to="none", num_generations=2,
            per_device_train_batch_size=2, max_completion_length=8, gradient_checkpointing=False,
        ),
        train_dataset=trainer.train_dataset,
        processing_class=processor,
    )  # fmt: skip
    rl_prompts = [prepare_multimodal_messages(row["prompt"], images=row["images"]) for row in rows]
    rl_prompt_ids, _, _ = rl._tokenize_prompts(rl_prompts)
    for index in range(len(rows)):
        ids = batch["input_ids"][index][batch["attention_mask"][index].bool()].tolist()
        labels = batch["labels"][index][batch["attention_mask"][index].bool()].tolist()
        prompt_length = len(rl_prompt_ids[index])
        decoded = tokenizer.decode(ids)
        assert ids[:prompt_length] == list(rl_prompt_ids[index]), decoded
        if family == "llava":
            assert ids[0] == tokenizer.bos_token_id == 1, decoded  # <s>, as in RL and evaluation
        assert all(label == -100 for label in labels[:prompt_length])
        completion = ids[prompt_length:]
        assert labels[prompt_length:] == completion
        assert completion[-1] == tokenizer.eos_token_id, decoded  # </s> (LLaVA), <|im_end|> (Qwen2.5-VL)
        assert tokenizer.decode(completion, skip_special_tokens=True).strip() == CAPTION
        # The caption is tokenized as generation continues the prompt: no stray whitespace token first (Llama's
        # tokenizer gives '▁' + '▁a' for a separately tokenized ' a …', but '▁a' after 'ASSISTANT:').
        assert tokenizer.decode(completion[:1]).strip(), decoded


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_collator_batches_rows_of_different_lengths_like_single_rows(reference_models, family):
    """Right padding and the per-token fields (Qwen's mm_token_type_ids → 3-D positions) line up: each row's logits
    in a batch equal its logits alone."""
    path = reference_models[family]
    processor = load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    collator = CaptionSFTCollator(processor)
    rows = [
        {"prompt": [{"role": "user", "content": "Describe this image."}], "images": [Image.new("RGB", size, "red")],
         "completion": [{"role": "assistant", "content": caption}]}
        for size, caption in [((56, 56), "a red square on a gray background."), ((112, 84), "red.")]
    ]  # fmt: skip
    batch = collator([dict(row) for row in rows])
    assert batch["attention_mask"][1].tolist()[-1] == 0 or batch["attention_mask"][0].tolist()[-1] == 0
    if family == "qwen2_5_vl":
        image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_id)
        assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [4, 12]  # 56×56 → 2×2, 112×84 → 4×3
    with torch.no_grad():
        together = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        for index, row in enumerate(rows):
            alone = collator([dict(row)])
            length = int(alone["attention_mask"].sum())
            assert torch.equal(alone["input_ids"][0], batch["input_ids"][index, :length])
            assert torch.equal(alone["labels"][0], batch["labels"][index, :length])
            logits = model(**{key: value for key, value in alone.items() if key != "labels"}).logits
            torch.testing.assert_close(together[index, :length], logits[0], atol=1e-4, rtol=1e-4)
