"""Run by tests/test_distributed.py under `accelerate launch` with 2 processes: a few BalCapGRPOTrainer steps.

Each process writes, per generation step, the full advantage vector it computed from the gathered reward matrix
and the slice it kept, to OUTPUT_DIR/rank{i}.json.
"""

import json
import sys

import torch

from balcaprl.advantages import compute_advantages
from tests.helpers import REWARDS_FOR_DISTRIBUTED, exit_launched_script, make_trainer


def main(model_path: str, output_dir: str, estimator: str) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(
        model_path,
        output_dir,
        REWARDS_FOR_DISTRIBUTED,
        advantage_estimator=estimator,
        # 2 processes x 6 = 12 completions = 3 prompts x G=4: the middle prompt's group straddles the processes.
        per_device_train_batch_size=6,
        max_steps=3,
    )
    trainer.train()
    matrices = trainer.reward_matrices[::2] if estimator == "scst" else trainer.reward_matrices
    baselines = trainer.baseline_matrices if estimator == "scst" else [None] * len(matrices)
    steps = []
    for rewards, baseline, local in zip(matrices, baselines, trainer.generated_advantages):
        full = compute_advantages(rewards, 4, estimator=estimator, baseline_rewards=baseline)
        step = {"rewards": rewards.nan_to_num(-99.0).tolist(), "full": full.tolist(), "local": local.tolist()}
        if baseline is not None:
            step["baseline"] = baseline.nan_to_num(-99.0).tolist()
        steps.append(step)
    metrics = [
        {key: value for key, value in log.items() if key.startswith(("length/", "advantages/", "rewards/"))}
        for log in trainer.state.log_history
        if "loss" in log
    ]
    rank = trainer.accelerator.process_index
    with open(f"{output_dir}/rank{rank}.json", "w") as handle:
        json.dump({"world_size": trainer.accelerator.num_processes, "steps": steps, "metrics": metrics}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_launched_script()
