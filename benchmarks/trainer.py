"""Step time of `BalCapGRPOTrainer` (c-GDPO + length mask) over TRL's plain `GRPOTrainer`
(``normalize_then_sum``) at the same config on a tiny model. Runs are interleaved (A B B A ...) and the ratio is
that of the median step times, so drift of the machine hits both sides alike. The learning rate is 0 so that both
sample identical captions: the difference is the cost of our hooks (masking, advantages, metrics) alone.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch


def _rewards():
    from balcaprl.completions import completion_text

    def names_colour(prompts, completions, references, **kwargs):
        return [float(refs[0].split()[1] in completion_text(c)) for c, refs in zip(completions, references)]

    def linguistic(prompts, completions, **kwargs):
        return [len(set(completion_text(c).split())) / 16 for c in completions]

    return [names_colour, linguistic]


def _step_times(trainer_kind: str, model_path: Path, output_dir: Path, steps: int, warmup: int) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from balcaprl.config import BalCapConfig
    from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
    from balcaprl.models.processors import load_processor
    from balcaprl.models.tiny import tiny_caption_rows
    from balcaprl.trainer.grpo import BalCapGRPOTrainer

    common = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=16,
        max_steps=steps + warmup,
        # lr 0: both trainers then sample the very same captions step after step, so the timing difference is
        # the overhead of our hooks alone and not a difference in caption lengths after diverging updates.
        learning_rate=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=0,
        disable_tqdm=True,
    )
    if trainer_kind == "balcap":
        trainer_class, args = BalCapGRPOTrainer, BalCapConfig(advantage_estimator="c_gdpo", **common)
    else:
        trainer_class = GRPOTrainer
        args = GRPOConfig(multi_objective_aggregation="normalize_then_sum", **common)
    trainer = trainer_class(
        model=str(model_path),
        reward_funcs=_rewards(),
        args=args,
        train_dataset=Dataset.from_list(tiny_caption_rows(64)),
        processing_class=load_processor(str(model_path)),
        peft_config=LoraConfig(r=8, target_modules=LANGUAGE_MODEL_LORA_TARGETS),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    times = [log["step_time"] for log in trainer.state.log_history if "step_time" in log]
    return times[warmup:]


def bench_trainer(rounds: int = 6, steps: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median step time of BalCapGRPOTrainer and TRL's GRPOTrainer, interleaved; returns the times and the ratio."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    times = {"trl": [], "balcap": []}
    with tempfile.TemporaryDirectory() as tmp:
        from balcaprl.models.tiny import build_tiny_model

        model_path = build_tiny_model("qwen2_5_vl", Path(tmp) / "model")
        for round_index in range(rounds):
            order = ("trl", "balcap") if round_index % 2 == 0 else ("balcap", "trl")
            for kind in order:
                times[kind] += _step_times(kind, model_path, Path(tmp) / f"{kind}{round_index}", steps, warmup)
    trl_median, balcap_median = statistics.median(times["trl"]), statistics.median(times["balcap"])
    return {
        "steps_each": len(times["trl"]),
        "trl_step_s": trl_median,
        "balcap_step_s": balcap_median,
        "ratio": balcap_median / trl_median,
    }
