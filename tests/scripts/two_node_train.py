"""Run by tests/test_multinode.py once per "node" under `accelerate launch --num_machines 2 --machine_rank R`.

A few BalCapGRPOTrainer steps with checkpoints; each process writes OUTPUT_DIR/node{rank}-{tag}.json with, per
generation step, the full advantage vector computed from the gathered reward matrix and the slice it kept, and the
step training resumed from.
"""

import json
import sys

import torch
from transformers.trainer_utils import get_last_checkpoint

from balcaprl.advantages import compute_advantages
from tests.helpers import REWARDS_FOR_DISTRIBUTED, exit_launched_script, make_trainer


def main(model_path: str, output_dir: str, max_steps: str, tag: str) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(
        model_path,
        output_dir,
        REWARDS_FOR_DISTRIBUTED,
        # 2 nodes x 6 = 12 completions = 3 prompts x G=4: the middle prompt's group straddles the nodes.
        per_device_train_batch_size=6,
        max_steps=int(max_steps),
        save_strategy="steps",
        save_steps=2,
    )
    checkpoint = get_last_checkpoint(output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    steps = []
    for rewards, local in zip(trainer.reward_matrices, trainer.generated_advantages):
        full = compute_advantages(rewards, 4, estimator="c_gdpo")
        steps.append({"full": full.tolist(), "local": local.tolist()})
    rank = trainer.accelerator.process_index
    record = {
        "world_size": trainer.accelerator.num_processes,
        "resumed_from": checkpoint,
        "global_step": trainer.state.global_step,
        "steps": steps,
    }
    with open(f"{output_dir}/node{rank}-{tag}.json", "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_launched_script()
