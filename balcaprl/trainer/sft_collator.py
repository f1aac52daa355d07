"""`CaptionSFTCollator`: stage-1 batches whose prompt tokens are exactly those RL and evaluation feed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CaptionSFTCollator:
    r"""Batches prompt-completion caption rows (`balcaprl.data.to_sft` ``form="prompt_completion"``) for `SFTTrainer`,
    so that stage 1 trains exactly what RL and evaluation generate from.

    TRL's own vision collator renders prompt and completion with the chat template and tokenizes both with
    ``add_special_tokens=False``. With llava-hf's real template that (1) drops the ``<s>`` that RL (TRL's
    `GRPOTrainer`) and evaluation (`balcaprl.generation`) put first, (2) never supervises ``</s>`` — the template ends
    the assistant turn with ``' '`` — so the model never learns to stop, and (3) tokenizes the caption on its own,
    which Llama's tokenizer starts with a stray ``'▁'`` token that generation after ``ASSISTANT:`` never produces.
    Here instead:

    - prompt tokens: ``processor.apply_chat_template(prompt with its image, add_generation_prompt=True,
      tokenize=True)``, the very call TRL's `GRPOTrainer` and `balcaprl.generation` make (BOS included when the
      tokenizer adds one);
    - completion tokens: the caption as the chat template renders it, tokenized as the continuation of the rendered
      prompt, with the template's trailing whitespace dropped and ``eos_token`` appended unless the turn already
      ends with it (Qwen2.5-VL's ``<|im_end|>`` is its EOS; LLaVA gets ``</s>``), all of it in the labels.

    Args:
        processor: the policy's processor.
        max_length: longest sequence; longer rows lose completion tokens from the end (a prompt alone longer than
            this is an error: cutting image tokens breaks the model's forward).
        completion_only_loss: labels on the completion only (default, as TRL's prompt-completion form); ``False``
            puts the prompt in the labels too.
    """

    processor: Any
    max_length: int | None = None
    completion_only_loss: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from trl.data_utils import prepare_multimodal_messages

        from balcaprl.generation import caption_prompt_batch

        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        prompts = [prepare_multimodal_messages(example["prompt"], images=example["images"]) for example in examples]
        prompt_batch = caption_prompt_batch(self.processor, None, conversations=prompts)
        prompt_mask = prompt_batch["attention_mask"].bool()
        # Per-token fields follow the tokens (Qwen2.5-VL's mm_token_type_ids give it its 3-D positions; Gemma-style
        # token_type_ids); completion and padding positions are text, 0. Image fields stay as the processor made them.
        per_token = [key for key in prompt_batch if key.endswith("token_type_ids")]
        rows = []
        for index, (prompt, example) in enumerate(zip(prompts, examples, strict=True)):
            prompt_ids = prompt_batch["input_ids"][index][prompt_mask[index]]
            if self.max_length is not None and len(prompt_ids) > self.max_length:
                raise ValueError(
                    f"A prompt is {len(prompt_ids)} tokens (image tokens included), longer than max_length="
                    f"{self.max_length}: raise max_length (or set it to null), or lower the image resolution."
                )
            completion_ids = torch.tensor(self._completion_ids(tokenizer, prompt, example["completion"]))
            if self.max_length is not None:
                completion_ids = completion_ids[: self.max_length - len(prompt_ids)]
            fields = {key: prompt_batch[key][index][prompt_mask[index]] for key in per_token}
            rows.append((prompt_ids, completion_ids, fields))

        length = max(len(prompt_ids) + len(completion_ids) for prompt_ids, completion_ids, _ in rows)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.full((len(rows), length), pad_id, dtype=prompt_batch["input_ids"].dtype)
        attention_mask = torch.zeros((len(rows), length), dtype=prompt_batch["attention_mask"].dtype)
        labels = torch.full((len(rows), length), -100, dtype=input_ids.dtype)
        output = {key: value for key, value in prompt_batch.items() if key not in per_token}
        output.update({key: torch.zeros((len(rows), length), dtype=prompt_batch[key].dtype) for key in per_token})
        for index, (prompt_ids, completion_ids, fields) in enumerate(rows):
            # Right padding, as TRL's collators do for training.
            ids = torch.cat([prompt_ids, completion_ids])
            input_ids[index, : len(ids)] = ids
            attention_mask[index, : len(ids)] = 1
            first_label = len(prompt_ids) if self.completion_only_loss else 0
            labels[index, first_label : len(ids)] = ids[first_label:]
            for key, value in fields.items():
                output[key][index, : len(value)] = value  # completion tokens are text (0)
        output.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return output

    def _completion_ids(self, tokenizer, prompt: list[dict], completion: list[dict]) -> list[int]:
        from trl.data_utils import prepare_multimodal_messages

        completion = prepare_multimodal_messages(completion)
        prompt_text = self.processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = self.processor.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"The chat template renders the prompt with its generation prompt as {prompt_text[-40:]!r} but the "
                f"conversation as {full_text[len(prompt_text) - 40 : len(prompt_text)]!r} at that place: a caption "
                "cannot be cut from it. Use a chat template whose generation prompt is a prefix of the assistant turn."
            )
        # The template's turn separator after the text (LLaVA: ' ', Qwen2.5-VL: '\n' after <|im_end|>) is not
        # generated: generation stops at EOS, which takes its place.
        completion_text = full_text[len(prompt_text) :].rstrip()
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        whole_ids = tokenizer(prompt_text + completion_text, add_special_tokens=False)["input_ids"]
        if whole_ids[: len(prompt_ids)] == prompt_ids:
            completion_ids = whole_ids[len(prompt_ids) :]
        else:  # a merge across the boundary: tokenize the completion on its own
            completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
            completion_ids = [*completion_ids, tokenizer.eos_token_id]
        return completion_ids
