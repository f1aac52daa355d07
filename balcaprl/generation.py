"""Caption generation with a trained policy: batched, greedy or sampled, from a checkpoint or a LoRA adapter folder."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from balcaprl.models import load_processor, resolve_model_path


def load_for_generation(path: str | Path, dtype: torch.dtype | None = None):
    """(model, processor) in eval mode from a full checkpoint, or from a LoRA adapter folder (merged into its base).

    ``balcaprl train`` with ``use_peft`` saves an adapter whose ``adapter_config.json`` names the base checkpoint;
    the processor is read from the folder itself when it holds one, else from the base.
    """
    from transformers import AutoModelForImageTextToText

    path = Path(resolve_model_path(str(path)))
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        has_processor = (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file()
        processor = load_processor(str(path) if has_processor else base)
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
        processor = load_processor(str(path))
    model.eval()
    return model, processor


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_captions(
    model,
    processor,
    images: Sequence[Image.Image],
    instruction: str = "Describe this image in detail.",
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: bool = False,
) -> list[str]:
    """One caption per image, in order. Greedy by default; ``do_sample`` with ``temperature`` (and ``seed``).

    Prompts go through the processor's chat template exactly as in training (for Qwen2.5-VL that includes the
    ``mm_token_type_ids`` its 3-D positions need), left-padded for batched decoding.
    """
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = getattr(processor, "tokenizer", processor)
    captions: list[str] = []
    iterator = _batches(list(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=(len(images) + batch_size - 1) // batch_size, desc="captions", unit="batch")
    for batch in iterator:
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]}]
            for image in batch
        ]
        inputs = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        ).to(model.device)
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        captions.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return captions
