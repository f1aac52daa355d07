"""The arms, sweeps and settings of `balcaprl.experiments.reproduce` (what each run varies), and its file names."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from balcaprl.experiments.demo import (
    DemoSettings,
)
from balcaprl.rewards.world import WORLD_REWARDS

LINGUISTIC_AS_JUDGED = {"name": "world_linguistic", "rating_scale": [1, 5]}


CIDER = {"reward_funcs": ["cider_d"], "length_mask_rewards": [], "num_generations": 5}


@dataclass(frozen=True)
class Arm:
    """One RL configuration: ``overrides`` over the demo's RL recipe; ``sweep`` names the learning-rate sweep whose
    choice it uses (None: the demo's learning rate)."""

    name: str
    experiment: str
    label: str
    overrides: tuple
    sweep: str | None = None


def _items(**overrides: Any) -> tuple:
    return tuple(overrides.items())


SWEEPS = {  # name -> the configuration swept (CIDEr-D reward, validation scenes)
    "scst": _items(**CIDER, advantage_estimator="scst", beta=0.0, loss_type="grpo"),
    "grpo": _items(**CIDER, advantage_estimator="grpo", beta=0.04, loss_type="grpo"),
}


ARMS = [
    Arm("scst", "cider", "SCST (sample − greedy), β 0", SWEEPS["scst"], "scst"),
    Arm("grpo_paper", "cider", "GRPO, β 0.04, loss grpo (paper)", SWEEPS["grpo"], "grpo"),
    Arm("grpo_beta0", "cider", "GRPO, β 0, loss grpo", _items(**{**dict(SWEEPS["grpo"]), "beta": 0.0}), "grpo"),
    Arm(
        "grpo_dapo",
        "cider",
        "GRPO, β 0.04, loss dapo",
        _items(**{**dict(SWEEPS["grpo"]), "loss_type": "dapo"}),
        "grpo",
    ),
    Arm("grpo_sum", "balcap", "summed GRPO, exact rewards", _items(advantage_estimator="grpo")),
    Arm("c_gdpo", "balcap", "c-GDPO, exact rewards", _items(advantage_estimator="c_gdpo")),
    Arm(
        "grpo_sum_judged",
        "balcap",
        "summed GRPO, linguistic rated 1–5",
        _items(advantage_estimator="grpo", reward_funcs=[*WORLD_REWARDS[:2], LINGUISTIC_AS_JUDGED]),
    ),
    Arm(
        "c_gdpo_judged",
        "balcap",
        "c-GDPO, linguistic rated 1–5",
        _items(advantage_estimator="c_gdpo", reward_funcs=[*WORLD_REWARDS[:2], LINGUISTIC_AS_JUDGED]),
    ),
    Arm("no_length_control", "length", "no length control", _items(length_mask_rewards=[])),
    Arm(
        "length_penalty",
        "length",
        "linear length penalty",
        _items(reward_funcs=[*WORLD_REWARDS, "length_penalty"], length_mask_rewards=[]),
    ),
    # The same configuration as the c-GDPO arm (the demo's defaults): its runs are reused, not repeated.
    Arm("length_mask", "length", "length-conditional mask", ()),
]


REUSED = {"length_mask": "c_gdpo"}


ARMS_BY_NAME = {arm.name: arm for arm in ARMS}


EXPERIMENTS = {
    "cider": "GRPO vs SCST, CIDEr-D reward (arXiv 2503.01333)",
    "balcap": "c-GDPO vs summed GRPO, world precision / recall / linguistic (arXiv 2605.07394)",
    "length": "length control with c-GDPO (BalCapRL ablation)",
}


EVALUATION_FILE = "evaluation.json"


VALIDATION_FILE = "evaluation_validation.json"


SUMMARY_FILE = "run_summary.json"


SCENE_COLUMNS = ["precision", "recall", "linguistic", "cider_d", "length_ratio", "outside_window"]


@dataclass
class ReproduceSettings:
    """Budgets of ``make reproduce``; the defaults fit in about 45 minutes on 2 CPU cores."""

    base: DemoSettings
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sweep_learning_rates: tuple[float, ...] = (2e-5, 5e-5, 1e-4)
    sweep_seeds: tuple[int, ...] = (100, 101)
    sweep_steps: int = 30  # a short sweep: half the arms' steps (DemoSettings.rl_steps)
    validation_scenes: int = 100
    parallel: int = field(default_factory=lambda: os.cpu_count() or 1)  # one single-threaded run per core
    bootstrap_draws: int = 4000
    arms: tuple[str, ...] = field(default_factory=lambda: tuple(arm.name for arm in ARMS))


def full_settings(output_dir: str) -> ReproduceSettings:
    # Step budgets only: a wall-clock cap makes the result depend on how busy the machine is.
    return ReproduceSettings(DemoSettings(output_dir=output_dir, rl_max_seconds=None, sft_max_seconds=None))


def quick_settings(output_dir: str) -> ReproduceSettings:
    base = DemoSettings(
        output_dir=output_dir,
        train_scenes=128,
        test_scenes=24,
        sft_steps=30,
        sft_batch_size=16,
        rl_steps=4,
        max_completion_length=24,
        eval_batch_size=24,
        rl_max_seconds=None,
        sft_max_seconds=None,
    )
    return ReproduceSettings(
        base,
        seeds=(0, 1),
        sweep_learning_rates=(5e-5, 1e-4),
        sweep_seeds=(100,),
        sweep_steps=4,
        validation_scenes=16,
        bootstrap_draws=500,
    )


def settings_from_dict(document: dict[str, Any]) -> ReproduceSettings:
    """The settings a run recorded in its summary (JSON lists back to tuples)."""
    tuples = {key: tuple(value) for key, value in document.items() if isinstance(value, list)}
    tuple_fields = {item.name for item in dataclasses.fields(DemoSettings) if isinstance(item.default, tuple)}
    base = DemoSettings(**{k: tuple(v) if k in tuple_fields else v for k, v in document["base"].items()})
    return ReproduceSettings(**{**document, **tuples, "base": base})
