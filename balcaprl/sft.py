"""Stage 1: ``python -m balcaprl.sft --config recipes/<model>/sft.yaml [--key value ...]`` (``balcaprl sft``).

Cross-entropy fine-tuning on the reference captions with TRL's `SFTTrainer` (the GRPO-captioning paper's stage 1;
a random policy does not learn caption rewards by RL alone). The loss covers the caption only (TRL's
prompt-completion form). The checkpoint written to ``output_dir`` is a full model (LoRA adapters merged) with its
processor, which the RL recipes start from. Stages: parse → seed / checkpoint detection → data → processor (images
resized once) and model → trainer → train → save.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from trl import SFTConfig

from balcaprl.config import CaptionDataConfig, CaptionModelConfig
from balcaprl.train import (
    RecipeError,
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


SFT_CONFIG_TYPES = (CaptionDataConfig, CaptionSFTConfig, CaptionModelConfig)


def main(argv: Sequence[str] | None = None):
    """Run the SFT stage of a recipe; returns the trainer."""
    # 1. parse
    data_args, training_args, model_args = parse_config(SFT_CONFIG_TYPES, argv)
    require(model_args.model_name_or_path, "model_name_or_path")
    require(data_args.dataset, "dataset")

    from trl import SFTTrainer

    from balcaprl.data import resize_images, to_sft
    from balcaprl.models import image_resize_for, load_policy, peft_config

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
        peft_config=peft_config(model_args, family),
        callbacks=time_limit_callbacks(training_args),
    )
    print_parameter_breakdown(trainer, family)

    # 6. train, then save a full checkpoint (LoRA adapters merged) for the RL stage
    trainer.train(resume_from_checkpoint=checkpoint)
    if model_args.use_peft and not trainer.is_deepspeed_enabled:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(training_args.output_dir)
    else:
        # Full fine-tuning (ZeRO-3 gathers the weights here); with LoRA under DeepSpeed the adapter is saved and
        # must be merged offline (`PeftModel.from_pretrained(base, out).merge_and_unload()`) before RL.
        trainer.save_model(training_args.output_dir)
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
