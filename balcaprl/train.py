"""RL stage: ``python -m balcaprl.train --config recipes/<model>/<method>.yaml [--key value ...]``.

The entry point `accelerate launch` runs (``balcaprl train CONFIG`` is the same from the console script). Any
recipe key can be overridden on the command line (TRL's ``TrlParser``); unknown keys and bad values fail while
parsing, before any data or model is loaded. Stages, top to bottom: parse → seed / checkpoint detection → data →
rewards → processor (images resized once) → model → trainer → train → save.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from balcaprl.checkpoints import run_identity
from balcaprl.preflight.run import check_before_weights
from balcaprl.runtime import (
    RL_CONFIG_TYPES,
    RecipeError,
    build_reward_funcs,
    check_resume_identity,
    check_vllm_image_bounds,
    end_process_group,
    load_family_and_processor,
    load_training_data,
    parse_config,
    prepare_run,
    print_parameter_breakdown,
    require,
    require_one_step_of_data,
    store_run_identity,
    time_limit_callbacks,
)


def main(argv: Sequence[str] | None = None):
    """Run the RL stage of a recipe; returns the trainer."""
    # 1. parse (fails on unknown keys or bad values before anything heavy)
    data_args, reward_args, training_args, model_args = parse_config(RL_CONFIG_TYPES, argv)
    require(model_args.model_name_or_path, "model_name_or_path")
    require(data_args.dataset, "dataset")
    # packages, output folder, token budget (balcaprl.preflight): one error listing every problem, before loading
    check_before_weights(data_args, training_args, model_args)

    from balcaprl.data.images import resize_images
    from balcaprl.data.loading import corpus_references
    from balcaprl.judge.guard import check_judges, judge_clients, judge_guard_callbacks
    from balcaprl.models.loading import load_policy, peft_config
    from balcaprl.models.processors import image_resize_for
    from balcaprl.trainer.grpo import BalCapGRPOTrainer

    # 2. seed, threads, logging, checkpoint detection (resume from the newest complete checkpoint in output_dir, if it
    #    belongs to this run)
    checkpoint = prepare_run(training_args)
    identity = run_identity("train", model_args, data_args, training_args, reward_args)  # before paths resolve
    check_resume_identity(training_args, identity, checkpoint)

    # 3. data, then rewards (CIDEr-D's document frequencies come from the training references); the judges must
    #    answer before any weights load, or the run would train on zero advantages
    train_dataset, eval_dataset = load_training_data(data_args, training_args.seed)
    require_one_step_of_data(train_dataset, training_args)
    reward_funcs = build_reward_funcs(
        reward_args, training_args, corpus_references(train_dataset), train_dataset.column_names
    )
    # the first row's image opens only for a run with judges, which need a real row to check them on
    probe_row = train_dataset[0] if judge_clients(reward_funcs) else {}
    if training_args.judge_health_check:
        check_judges(reward_funcs, probe_row)

    # 4. processor; images resized once, for the policy, so that the trainer, vLLM and the judge see the same pixels
    family, processor = load_family_and_processor(model_args)
    image_resize = image_resize_for(processor)
    if training_args.use_vllm:
        check_vllm_image_bounds(model_args, image_resize)
    train_dataset = resize_images(train_dataset, image_resize)
    if eval_dataset is not None:
        eval_dataset = resize_images(eval_dataset, image_resize)

    # 5. model
    model = load_policy(model_args, family)

    # 6. trainer
    trainer = BalCapGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config(model_args, family),
        # the judge failure budget: a checkpoint and a clear error when the judge goes down mid-run
        callbacks=[
            *time_limit_callbacks(training_args),
            *judge_guard_callbacks(reward_funcs, training_args, probe_row),
        ],
    )
    print_parameter_breakdown(trainer, family)

    # 7. train and save
    store_run_identity(training_args, identity)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(training_args.output_dir)
        # the log history (reward curves, metrics) next to the final model, also when no checkpoint was saved
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
    return trainer


if __name__ == "__main__":
    from balcaprl.judge.guard import JudgeUnavailableError

    try:
        main()
    except (RecipeError, JudgeUnavailableError) as error:
        sys.exit(f"balcaprl: error: {error}")
    end_process_group()
