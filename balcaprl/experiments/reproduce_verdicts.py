"""The quantities and computed verdicts of the reproduction study: per-scene columns, training-curve statistics and
one verdict per claim from bootstrap intervals (`compute_verdicts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from balcaprl.experiments.claims import (
    Interval,
    bootstrap_difference,
    seed_bootstrap,
    verdict,
)
from balcaprl.experiments.demo_report import WINDOW_TEXT
from balcaprl.experiments.reproduce_arms import (
    SCENE_COLUMNS,
    ReproduceSettings,
)
from balcaprl.monitors import distinct_ngrams

# The smallest differences that would matter, per quantity (an interval inside ±margin: "no difference").
METRIC_LABELS = {"cider_d": "CIDEr-D", "b_capscore": "b-CapScore"}
STAGE1 = "stage 1"  # the stage-1 model, as a one-seed arm of the comparisons against it
MARGINS = {
    "cider_d": 0.02,
    "b_capscore": 0.01,
    "masked_fraction": 0.02,
    "seed_std": 0.01,
    "distinct_2": 0.01,
    "noise": 0.005,
    "train_reward": 0.01,
}


SEED_LEVEL = {
    "seed_std",
    "noise",
    "distinct_2",
    "train_reward",
}  # one value per seed: intervals come from the seeds alone


MIN_SEEDS_PER_ARM = 3


def arm_columns(runs: dict, arm: str, seeds: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-scene scores of an arm, ``column -> (seeds, scenes)``."""
    return {column: np.array([runs[(arm, seed)]["evaluation"][column] for seed in seeds]) for column in SCENE_COLUMNS}


def stage1_columns(sft: dict) -> dict[str, np.ndarray]:
    return {column: np.array([sft[column]]) for column in SCENE_COLUMNS}


def curve(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(log["step"], log[key]) for log in log_history if key in log]
    return [step for step, _ in points], [value for _, value in points]


def reward_noise(log_history: list[dict], key: str) -> float:
    """Step-to-step noise of a logged training reward: std of its first differences / √2 (trend-free)."""
    _, values = curve(log_history, key)
    return float(np.std(np.diff(values), ddof=1) / np.sqrt(2)) if len(values) > 2 else float("nan")


def late_training_mean(log_history: list[dict], keys: tuple[str, ...], share: float = 1 / 3) -> float:
    """Sum over ``keys`` of each logged training reward's mean over the last ``share`` of the steps."""
    total = 0.0
    for key in keys:
        _, values = curve(log_history, key)
        if not values:
            return float("nan")  # the run did not log this reward
        total += float(np.mean(values[-max(1, round(len(values) * share)) :]))
    return total


def training_mean(log_history: list[dict], key: str) -> float:
    _, values = curve(log_history, key)
    return float(np.mean(values)) if values else float("nan")


def compute_verdicts(
    runs: dict, settings: ReproduceSettings, draws: int, sft: dict | None = None
) -> list[dict[str, Any]]:
    """Every claim's interval and verdict line (only for the arms that ran; gains over stage 1 when ``sft``)."""
    seeds, arms = settings.seeds, set(settings.arms)
    columns = {arm: arm_columns(runs, arm, seeds) for arm in arms}
    if sft is not None:
        columns[STAGE1] = stage1_columns(sft)
        arms.add(STAGE1)
    claims: list[dict[str, Any]] = []

    def add(claim: str, first: str, second: str, quantity: str, what: str, compute: Callable[[], Interval]) -> None:
        if not {first, second} <= arms:
            return
        entry = {"claim": claim, "arms": [first, second], "quantity": quantity}
        if quantity in SEED_LEVEL and len(seeds) < MIN_SEEDS_PER_ARM:
            # resampling one or two seeds gives a degenerate interval that would read as a finding
            line = (
                f"**{claim}: cannot tell at this scale** — needs {MIN_SEEDS_PER_ARM} seeds per arm, {len(seeds)} ran."
            )
            claims.append({**entry, "interval": None, "line": line})
            return
        interval = compute()
        claims.append(
            {**entry, "interval": asdict(interval), "line": verdict(claim, interval, MARGINS[quantity], what)}
        )

    def metric(first: str, second: str, name: str) -> Callable[[], Interval]:
        return lambda: bootstrap_difference(columns[first], columns[second], name, draws)

    def per_seed(arm: str, value: Callable[[dict], float]) -> np.ndarray:
        return np.array([value(runs[(arm, seed)]) for seed in seeds])

    def distinct2(run: dict) -> float:
        return distinct_ngrams(run["evaluation"]["captions"], 2)

    def noise(run: dict) -> float:
        return reward_noise(run["log_history"], "rewards/cider_d/mean")

    def cider(run: dict) -> float:
        return float(np.mean(run["evaluation"]["cider_d"]))

    def std(values: np.ndarray) -> np.ndarray:
        return values.std(axis=-1, ddof=1)

    def late_precision_recall(run: dict) -> float:
        return late_training_mean(run["log_history"], ("rewards/world_precision/mean", "rewards/world_recall/mean"))

    # RL over its stage-1 start (both papers' premise)
    for arm, name, label in (
        ("scst", "cider_d", "SCST raises held-out CIDEr-D over stage 1"),
        ("grpo_paper", "cider_d", "GRPO (paper's) raises held-out CIDEr-D over stage 1"),
        ("c_gdpo", "b_capscore", "BalCapRL (c-GDPO + length mask) raises b-CapScore over stage 1"),
    ):
        add(label, arm, STAGE1, name, f"{METRIC_LABELS[name]} gain", metric(arm, STAGE1, name))

    # GRPO for captioning (arXiv 2503.01333)
    add(
        "GRPO (paper's β 0.04, per-sequence loss) beats SCST on held-out CIDEr-D",
        "grpo_paper",
        "scst",
        "cider_d",
        "CIDEr-D difference",
        metric("grpo_paper", "scst", "cider_d"),
    )
    add(
        "With β and loss equal, GRPO's group baseline beats SCST's greedy baseline on CIDEr-D",
        "grpo_beta0",
        "scst",
        "cider_d",
        "CIDEr-D difference",
        metric("grpo_beta0", "scst", "cider_d"),
    )
    add(
        "Dropping the KL term (β 0 vs 0.04) raises GRPO's CIDEr-D at this budget",
        "grpo_beta0",
        "grpo_paper",
        "cider_d",
        "CIDEr-D difference",
        metric("grpo_beta0", "grpo_paper", "cider_d"),
    )
    add(
        "TRL's per-sequence loss (`grpo`, the paper's) beats `dapo` on CIDEr-D",
        "grpo_paper",
        "grpo_dapo",
        "cider_d",
        "CIDEr-D difference",
        metric("grpo_paper", "grpo_dapo", "cider_d"),
    )
    add(
        "GRPO is more stable across seeds than SCST",
        "grpo_paper",
        "scst",
        "seed_std",
        "seed std of CIDEr-D, SCST minus GRPO",
        lambda: seed_bootstrap(per_seed("scst", cider), per_seed("grpo_paper", cider), std, draws),
    )
    add(
        "GRPO's training reward is less noisy than SCST's",
        "grpo_paper",
        "scst",
        "noise",
        "step-to-step noise of the training CIDEr-D, SCST minus GRPO",
        lambda: seed_bootstrap(per_seed("scst", noise), per_seed("grpo_paper", noise), draws=draws),
    )
    add(
        "GRPO's captions are more diverse than SCST's",
        "grpo_paper",
        "scst",
        "distinct_2",
        "distinct-2 of the held-out captions, GRPO minus SCST",
        lambda: seed_bootstrap(per_seed("grpo_paper", distinct2), per_seed("scst", distinct2), draws=draws),
    )
    # BalCapRL (arXiv 2605.07394)
    add(
        "c-GDPO beats summed GRPO on b-CapScore, exact rewards",
        "c_gdpo",
        "grpo_sum",
        "b_capscore",
        "b-CapScore difference",
        metric("c_gdpo", "grpo_sum", "b_capscore"),
    )
    add(
        "c-GDPO beats summed GRPO on b-CapScore, linguistic rated 1–5 like a judge",
        "c_gdpo_judged",
        "grpo_sum_judged",
        "b_capscore",
        "b-CapScore difference",
        metric("c_gdpo_judged", "grpo_sum_judged", "b_capscore"),
    )
    add(
        "Rating linguistic 1–5 hurts summed GRPO (the rating dominates the sum)",
        "grpo_sum",
        "grpo_sum_judged",
        "b_capscore",
        "b-CapScore, exact minus rated",
        metric("grpo_sum", "grpo_sum_judged", "b_capscore"),
    )
    add(
        "Rating linguistic 1–5 hurts c-GDPO",
        "c_gdpo",
        "c_gdpo_judged",
        "b_capscore",
        "b-CapScore, exact minus rated",
        metric("c_gdpo", "c_gdpo_judged", "b_capscore"),
    )
    for exact in (True, False):
        first, second = ("c_gdpo", "grpo_sum") if exact else ("c_gdpo_judged", "grpo_sum_judged")
        add(
            "c-GDPO trains precision + recall faster than summed GRPO, "
            + ("exact rewards" if exact else "linguistic rated 1–5"),
            first,
            second,
            "train_reward",
            "training precision + recall (mean reward, last third of the steps), c-GDPO minus summed GRPO",
            lambda first=first, second=second: seed_bootstrap(
                per_seed(first, late_precision_recall), per_seed(second, late_precision_recall), draws=draws
            ),
        )
    # length control (BalCapRL ablation)
    add(
        f"The length mask keeps more captions inside {WINDOW_TEXT} than no length control",
        "no_length_control",
        "length_mask",
        "masked_fraction",
        f"share outside {WINDOW_TEXT}, none minus mask",
        metric("no_length_control", "length_mask", "masked_fraction"),
    )
    add(
        "The length mask beats no length control on b-CapScore",
        "length_mask",
        "no_length_control",
        "b_capscore",
        "b-CapScore difference",
        metric("length_mask", "no_length_control", "b_capscore"),
    )
    add(
        "The length mask beats a linear length penalty on b-CapScore",
        "length_mask",
        "length_penalty",
        "b_capscore",
        "b-CapScore difference",
        metric("length_mask", "length_penalty", "b_capscore"),
    )
    return claims
