"""Stage 1: ``python -m balcaprl.sft --config recipes/<model>/sft.yaml [--key value ...]`` (``balcaprl sft``).

Cross-entropy fine-tuning on the reference captions with TRL's `SFTTrainer` (the GRPO-captioning paper's stage 1;
a random policy does not learn caption rewards by RL alone). The loss covers the caption and its end-of-sequence
token only (TRL's prompt-completion form, batched by `CaptionSFTCollator`: the prompt tokens are exactly those RL and
evaluation feed). The checkpoint written to ``output_dir`` is a full model (LoRA adapters merged, under DDP, ZeRO-2
and ZeRO-3 alike; the adapter itself is kept in ``output_dir/adapter``) with its processor, which the RL recipes start
from. Stages: parse → seed / checkpoint detection → data → processor (images
resized once) and model → trainer → train → save.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig

from balcaprl.config import CaptionDataConfig, CaptionModelConfig
from balcaprl.train import (
    RecipeError,
    check_before_weights,
    end_process_group,
    load_family_and_processor,
    load_training_data,
    parse_config,
    prepare_run,
    print_parameter_breakdown,
    require,
    time_limit_callbacks,
)

logger = logging.getLogger("balcaprl")


@dataclass
class CaptionSFTConfig(SFTConfig):
    r"""TRL's `SFTConfig` plus how reference captions become training rows.

    sft_references (`str`, defaults to `"all"`): `"all"`, one row per (image, reference) pair; `"random"`, one row
        per image with one of its references.
    max_train_seconds (`float`, *optional*): stop training cleanly once this much wall-clock time has passed.
    """

    sft_references: str = field(
        default="all", metadata={"help": "Rows per image: all references or one random.", "choices": ["all", "random"]}
    )
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Stop training cleanly after this many seconds of wall-clock time."}
    )

    def __post_init__(self):
        if self.sft_references not in ("all", "random"):
            raise ValueError(f"sft_references must be 'all' or 'random', got {self.sft_references!r}.")
        super().__post_init__()


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


SFT_CONFIG_TYPES = (CaptionDataConfig, CaptionSFTConfig, CaptionModelConfig)
# Where a LoRA stage 1 keeps its adapter, beside the merged checkpoint in output_dir.
LORA_ADAPTER_SUBFOLDER = "adapter"


def main(argv: Sequence[str] | None = None):
    """Run the SFT stage of a recipe; returns the trainer."""
    # 1. parse
    data_args, training_args, model_args = parse_config(SFT_CONFIG_TYPES, argv)
    require(model_args.model_name_or_path, "model_name_or_path")
    require(data_args.dataset, "dataset")
    check_before_weights(data_args, training_args, model_args)  # balcaprl.preflight's cheap checks

    from trl import SFTTrainer

    from balcaprl.data import resize_images, to_sft
    from balcaprl.models import image_resize_for, load_dtype, load_policy, merge_adapter, peft_config

    # 2. seed, threads, logging, checkpoint detection
    checkpoint = prepare_run(training_args)

    # 3. data, and the processor: images resized once, as in RL; one row per (image, reference), loss on the caption
    train_dataset, eval_dataset = load_training_data(data_args, training_args.seed)
    family, processor = load_family_and_processor(model_args)
    image_resize = image_resize_for(processor)
    train_dataset = to_sft(
        resize_images(train_dataset, image_resize), references=training_args.sft_references, form="prompt_completion"
    )
    if eval_dataset is not None:
        eval_dataset = to_sft(resize_images(eval_dataset, image_resize), references="random", form="prompt_completion")

    # 4. model
    model = load_policy(model_args, family)

    # 5. trainer
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=CaptionSFTCollator(
            processor,
            max_length=training_args.max_length,
            completion_only_loss=training_args.completion_only_loss is not False,
        ),
        peft_config=peft_config(model_args, family),
        callbacks=time_limit_callbacks(training_args),
    )
    print_parameter_breakdown(trainer, family)

    # 6. train, then save a full checkpoint for the RL stage. With LoRA the adapter is saved first (Trainer.save_model
    #    gathers its weights under ZeRO-3 too), then the main process merges it into the base from disk: the same
    #    merged checkpoint under DDP, ZeRO-2 and ZeRO-3, loadable by every command and by vLLM.
    trainer.train(resume_from_checkpoint=checkpoint)
    if model_args.use_peft:
        adapter_dir = os.path.join(training_args.output_dir, LORA_ADAPTER_SUBFOLDER)
        trainer.save_model(adapter_dir)
        if trainer.accelerator.is_main_process:
            processor.save_pretrained(adapter_dir)
            merge_adapter(adapter_dir, training_args.output_dir, dtype=load_dtype(model_args))
    else:
        trainer.save_model(training_args.output_dir)  # ZeRO-3 gathers the weights here
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(training_args.output_dir)
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
    trainer.accelerator.wait_for_everyone()
    return trainer


if __name__ == "__main__":
    try:
        main()
    except RecipeError as error:
        sys.exit(f"balcaprl: error: {error}")
    end_process_group()
