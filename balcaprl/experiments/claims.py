"""Confidence intervals and computed verdicts for `balcaprl.experiments.reproduce`: a two-level bootstrap over scenes
and seeds.

An arm of an experiment is several RL seeds evaluated on the same held-out scenes, so its per-scene scores form a
``seeds × scenes`` array per column (``precision``, ``recall``, ``linguistic``, ``cider_d``, ...). A metric is a
function of the per-seed column means (`METRICS`; b-CapScore is the harmonic mean of the three means, as in
BalCapRL), and an arm's value is the mean of that metric over its seeds.

The bootstrap resamples both sources of variation: the held-out scenes (with replacement; the same draw for every
arm of a comparison, since all arms caption the same scenes — a paired design) and, independently per arm, the
seeds (with replacement). A comparison's 95 % interval is the percentile interval of the difference over the draws.
``scipy.stats.bootstrap`` resamples all samples with one index (or independently) but not this nested, partly
paired scheme, and our statistic needs the per-seed means first; the draws are a few lines of numpy.

A verdict is computed from the interval of the difference in the claimed direction, never written by hand:
"does not hold" when the interval lies inside ±``margin`` (the smallest difference that would matter) or below 0,
"holds" when it is above 0 (and not inside ±margin), "cannot tell at this scale" otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "METRICS",
    "Interval",
    "bootstrap_difference",
    "bootstrap_value",
    "harmonic_mean_rows",
    "seed_bootstrap",
    "verdict",
]

Columns = Mapping[str, np.ndarray]  # column -> (seeds, scenes) per-scene scores, or (seeds, draws) means


def harmonic_mean_rows(*values: np.ndarray) -> np.ndarray:
    """Elementwise harmonic mean of equally shaped arrays (0 where any is 0), as b-CapScore is defined."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    positive = (stacked > 0).all(axis=0)
    safe = np.where(stacked > 0, stacked, 1.0)
    return np.where(positive, len(values) / (1.0 / safe).sum(axis=0), 0.0)


# A metric maps per-seed column means (arrays of any shape) to per-seed values of the same shape.
METRICS: dict[str, Callable[[Columns], np.ndarray]] = {
    "precision": lambda m: m["precision"],
    "recall": lambda m: m["recall"],
    "linguistic": lambda m: m["linguistic"],
    "b_capscore": lambda m: harmonic_mean_rows(m["precision"], m["recall"], m["linguistic"]),
    "cider_d": lambda m: m["cider_d"],
    "length_ratio": lambda m: m["length_ratio"],
    "masked_fraction": lambda m: m["outside_window"],
}


@dataclass(frozen=True)
class Interval:
    """A point estimate (on the data as observed) and its 95 % bootstrap percentile interval."""

    estimate: float
    low: float
    high: float

    def format(self, digits: int = 3, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.estimate:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


def _check(arm: Columns, name: str) -> tuple[int, int]:
    shapes = {column: np.shape(values) for column, values in arm.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"Arm {name!r}: every column must be one (seeds, scenes) array; got shapes {shapes}.")
    return next(iter(shapes.values()))


def _scene_weights(num_scenes: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, scenes) resampling weights: how often each scene is drawn, divided by the number of scenes."""
    return rng.multinomial(num_scenes, np.full(num_scenes, 1.0 / num_scenes), size=draws) / num_scenes


def _arm_draws(arm: Columns, metric: str, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The arm's metric on each bootstrap draw: scenes reweighted by ``weights``, seeds resampled."""
    means = {column: np.asarray(values, dtype=np.float64) @ weights.T for column, values in arm.items()}
    per_seed = METRICS[metric](means)  # (seeds, draws)
    num_seeds, draws = per_seed.shape
    picks = rng.integers(0, num_seeds, size=(draws, num_seeds))
    return per_seed[picks, np.arange(draws)[:, None]].mean(axis=1)


def observed_value(arm: Columns, metric: str) -> float:
    """The arm's ``metric`` on the data as observed (mean over seeds of the metric of per-seed column means)."""
    means = {column: np.asarray(values, dtype=np.float64).mean(axis=1) for column, values in arm.items()}
    return float(METRICS[metric](means).mean())


def _interval(estimate: float, draws: np.ndarray) -> Interval:
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(estimate, float(low), float(high))


def bootstrap_value(arm: Columns, metric: str, draws: int = 4000, seed: int = 0) -> Interval:
    """The arm's ``metric`` (mean over seeds) with its interval over scenes and seeds."""
    _, num_scenes = _check(arm, "arm")
    rng = np.random.default_rng(seed)
    return _interval(observed_value(arm, metric), _arm_draws(arm, metric, _scene_weights(num_scenes, draws, rng), rng))


def bootstrap_difference(first: Columns, second: Columns, metric: str, draws: int = 4000, seed: int = 0) -> Interval:
    """``metric(first) − metric(second)``: scenes resampled jointly (paired), seeds independently per arm."""
    shape_first, shape_second = _check(first, "first"), _check(second, "second")
    if shape_first[1] != shape_second[1]:
        raise ValueError(f"The arms were evaluated on different scenes ({shape_first[1]} vs {shape_second[1]}).")
    rng = np.random.default_rng(seed)
    weights = _scene_weights(shape_first[1], draws, rng)
    differences = _arm_draws(first, metric, weights, rng) - _arm_draws(second, metric, weights, rng)
    return _interval(observed_value(first, metric) - observed_value(second, metric), differences)


def seed_bootstrap(
    first: np.ndarray,
    second: np.ndarray | None = None,
    statistic: Callable[[np.ndarray], np.ndarray] = lambda values: values.mean(axis=-1),
    draws: int = 4000,
    seed: int = 0,
) -> Interval:
    """For per-seed quantities with no per-scene split (caption diversity, seed spread, training-reward noise):
    ``statistic`` over resampled seeds, or its difference between two arms. ``statistic`` maps (draws, seeds) to
    (draws,)."""
    rng = np.random.default_rng(seed)

    def resampled(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return statistic(values[rng.integers(0, len(values), size=(draws, len(values)))])

    observed = float(statistic(np.asarray(first, dtype=np.float64)[None, :])[0])
    if second is None:
        return _interval(observed, resampled(first))
    observed -= float(statistic(np.asarray(second, dtype=np.float64)[None, :])[0])
    return _interval(observed, resampled(first) - resampled(second))


def verdict(claim: str, difference: Interval, margin: float, what: str) -> str:
    """One line: the claim, "holds" / "does not hold" / "cannot tell at this scale", and the interval it rests on.

    ``difference`` is oriented so that the claim predicts a positive value; ``margin`` is the smallest difference
    that would matter (an interval inside ±margin means "no difference that matters").
    """
    if -margin <= difference.low and difference.high <= margin:  # even if it excludes 0: too small to matter
        outcome = f"does not hold (no difference beyond ±{margin:g})"
    elif difference.low > 0:
        outcome = "holds"
    elif difference.high < 0:
        outcome = "does not hold (the opposite holds)"
    else:
        outcome = "cannot tell at this scale"
    return f"**{claim}: {outcome}** — {what} {difference.format(signed=True)} (95 % bootstrap interval)."
