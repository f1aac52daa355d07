"""Run by tests/test_vllm_path.py under `accelerate launch` (2 processes, PYTHONPATH with tests/vllm_standin):
SCST steps with TRL's colocated vLLM. Each process writes what it computed to OUTPUT_DIR/rank{i}.json."""

import json
import sys

import torch
import vllm

from balcaprl.advantages import compute_advantages
from tests.helpers import REWARDS_FOR_DISTRIBUTED, exit_launched_script, make_trainer


def main(model_path: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(
        model_path,
        output_dir,
        REWARDS_FOR_DISTRIBUTED,
        advantage_estimator="scst",
        # 2 processes x 6 = 12 completions = 3 prompts x G=4: the middle prompt's group straddles the processes.
        per_device_train_batch_size=6,
        max_steps=2,
        use_vllm=True,
        vllm_mode="colocate",
    )
    trainer.train()
    greedy_requests = [params for params, _ in trainer.vllm_generation.llm.requests if params[0].temperature == 0.0]
    steps = []
    for rewards, baseline, local, greedy in zip(
        trainer.reward_matrices[::2], trainer.baseline_matrices, trainer.generated_advantages, greedy_requests
    ):
        full = compute_advantages(rewards, 4, estimator="scst", baseline_rewards=baseline)
        steps.append(
            {
                "full": full.tolist(),
                "local": local.tolist(),
                "baseline": baseline.nan_to_num(-99.0).tolist(),
                "greedy_prompts": len(greedy),
            }
        )
    rank = trainer.accelerator.process_index
    with open(f"{output_dir}/rank{rank}.json", "w") as handle:
        json.dump({"vllm": vllm.__version__, "steps": steps}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_launched_script()
