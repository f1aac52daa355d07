"""Run by tests/test_lora_launch.py under `accelerate launch` (2 processes; DDP, ZeRO-2 or ZeRO-3): the LoRA chain.

Stage 1 with LoRA (`balcaprl.sft`) → its merged checkpoint → RL with LoRA (`balcaprl.train`, 2 steps, a checkpoint
at step 2) → the same RL command again with max_steps 3, which resumes from that checkpoint. One launch runs all
three, so that each backend costs one process start-up. The main process writes what the test checks to
OUTPUT_DIR/report.json: the weights of every stage compared with where it started.
"""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from balcaprl import sft, train
from balcaprl.models.loading import _plain_loading
from balcaprl.models.paths import resolve_model_path
from tests.helpers import exit_launched_script


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights under the loaded model's parameter names (the names PEFT's state dict extends)."""
    from transformers import AutoModelForImageTextToText

    with _plain_loading():  # the main process alone, inside a ZeRO-3 run: no partitioned loading
        return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def base_key(peft_key: str) -> str:
    """A PEFT model's name for a base weight → the checkpoint's (``base_model.model.`` and ``.base_layer`` gone)."""
    return peft_key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def compare_base(start: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict:
    """How a trained PEFT model's base weights (its full state dict) compare with the checkpoint it started from."""
    base = {base_key(key): value for key, value in state.items() if "lora_" not in key}
    # The saved checkpoint may tie lm_head to the embeddings (then one of the two is absent): compare what both have.
    shared = sorted(set(base) & set(start))
    changed = [key for key in shared if not torch.equal(base[key].float(), start[key].float())]
    return {"compared": len(shared), "changed": changed}


def main(family: str, accelerate_backend: str, data: str, output_dir: str, estimator: str) -> None:
    torch.set_num_threads(1)
    output = Path(output_dir)
    common = ["--dataset", data, "--use_peft", "true", "--logging_steps", "1", "--report_to", "none"]
    timings = {}

    # Stage 1 with LoRA: a merged checkpoint in output/sft, the adapter in output/sft/adapter
    started = time.monotonic()
    start_model = resolve_model_path(f"tiny:{family}")
    sft_trainer = sft.main(
        ["--config", f"recipes/demo/{family}_sft.yaml", *common, "--model_name_or_path", start_model,
         "--output_dir", str(output / "sft"), "--max_steps", "3", "--learning_rate", "1e-2",
         "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8"]
    )  # fmt: skip
    timings["sft"] = time.monotonic() - started

    # RL with LoRA from the merged stage-1 checkpoint; then the same command with one more step resumes from step 2
    rl = [
        "--config", f"recipes/demo/{family}_balcaprl.yaml", *common, "--model_name_or_path", str(output / "sft"),
        "--output_dir", str(output / "rl"), "--advantage_estimator", estimator, "--max_completion_length", "8",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--learning_rate", "1e-2",
        "--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "steps", "--save_steps", "2",
    ]  # fmt: skip
    # Rewards that give an almost untrained model a signal (the world's exact rewards are all 0 for its captions); the
    # demo recipe masks world_linguistic outside the length window. A constant learning rate: with the default linear
    # decay, the restored schedule of the 2-step run gives the resumed step a learning rate of 0.
    rl += ["--reward_funcs", "length_penalty", "world_linguistic", "--lr_scheduler_type", "constant"]
    started = time.monotonic()
    rl_trainer = train.main([*rl, "--max_steps", "2"])
    timings["rl"] = time.monotonic() - started
    # Collective under ZeRO-3 (every process takes part); the full state dict lands on the main process.
    rl_state = rl_trainer.accelerator.get_state_dict(rl_trainer.model_wrapped)
    started = time.monotonic()
    resumed = train.main([*rl, "--max_steps", "3"])
    timings["resumed_rl"] = time.monotonic() - started
    resumed_state = resumed.accelerator.get_state_dict(resumed.model_wrapped)

    if not resumed.accelerator.is_main_process:
        return
    start = model_weights(Path(start_model))
    merged = model_weights(output / "sft")
    sft_adapter = adapter_weights(output / "sft" / "adapter")
    report = {
        "world_size": resumed.accelerator.num_processes,
        "deepspeed": resumed.is_deepspeed_enabled,
        "zero_stage": resumed.accelerator.state.deepspeed_plugin.zero_stage if resumed.is_deepspeed_enabled else 0,
        "timings": timings,
        "sft_is_full_checkpoint": (output / "sft" / "config.json").is_file()
        and not (output / "sft" / "adapter_config.json").exists(),
        "sft_adapter_keys": sorted(sft_adapter),
        # the adapter trained: PEFT starts lora_B at zero
        "sft_lora_b_norm": sum(float(v.norm()) for k, v in sft_adapter.items() if "lora_B" in k),
        # what the merge changed, relative to the model stage 1 started from
        "sft_changed": sorted(k for k in start if k in merged and not torch.equal(start[k], merged[k])),
        "sft_compared": len(set(start) & set(merged)),
        "sft_steps": sft_trainer.state.global_step,
        "rl_adapter_files": sorted(p.name for p in (output / "rl").iterdir()),
        "rl_lora_b_norm": sum(float(v.norm()) for k, v in rl_state.items() if "lora_B" in k),
        "rl_base": compare_base(merged, rl_state),
        "resumed_base": compare_base(merged, resumed_state),
        "rl_steps": rl_trainer.state.global_step,
        "resumed_steps": resumed.state.global_step,
        "resumed_logged_steps": [log["step"] for log in resumed.state.log_history if "loss" in log],
        # the resumed run's adapter moved on from the one saved at step 2
        "resumed_adapter_moved": any(
            not torch.equal(rl_state[k].float(), resumed_state[k].float()) for k in rl_state if "lora_" in k
        ),
        "families": [rl_trainer.model.__class__.__name__],
    }
    (output / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_launched_script()
