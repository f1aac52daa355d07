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

import os
import sys
from collections.abc import Sequence

from balcaprl.checkpoints import run_identity
from balcaprl.preflight.run import check_before_weights
from balcaprl.runtime import (
    LORA_ADAPTER_SUBFOLDER,
    SFT_CONFIG_TYPES,
    RecipeError,
    check_resume_identity,
    end_process_group,
    load_family_and_processor,
    load_training_data,
    parse_config,
    prepare_run,
    print_parameter_breakdown,
    require,
    store_run_identity,
    time_limit_callbacks,
)
from balcaprl.trainer.sft_collator import CaptionSFTCollator


def main(argv: Sequence[str] | None = None):
    """Run the SFT stage of a recipe; returns the trainer."""
    # 1. parse
    data_args, training_args, model_args = parse_config(SFT_CONFIG_TYPES, argv)
    require(model_args.model_name_or_path, "model_name_or_path")
    require(data_args.dataset, "dataset")
    check_before_weights(data_args, training_args, model_args)  # balcaprl.preflight's cheap checks

    from trl import SFTTrainer

    from balcaprl.data.images import resize_images
    from balcaprl.data.sft import to_sft
    from balcaprl.models.loading import load_dtype, load_policy, merge_adapter, peft_config
    from balcaprl.models.processors import image_resize_for

    # 2. seed, threads, logging, checkpoint detection
    checkpoint = prepare_run(training_args)
    identity = run_identity("sft", model_args, data_args, training_args)  # before the model path resolves
    check_resume_identity(training_args, identity, checkpoint)

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
    store_run_identity(training_args, identity)
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
