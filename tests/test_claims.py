"""The bootstrap and verdicts of `make reproduce` (balcaprl.experiments.claims): hand-computed cases and a coverage
check."""

import numpy as np
import pytest

from balcaprl.evaluate import harmonic_mean
from balcaprl.experiments.claims import (
    Interval,
    bootstrap_difference,
    bootstrap_value,
    harmonic_mean_rows,
    seed_bootstrap,
    verdict,
)


def arm(precision, recall=None, linguistic=None, cider=None):
    """Columns of one arm from (seeds, scenes) arrays; unspecified columns copy precision."""
    precision = np.asarray(precision, dtype=float)
    columns = {"precision": precision, "recall": recall, "linguistic": linguistic, "cider_d": cider}
    columns = {key: precision if value is None else np.asarray(value, dtype=float) for key, value in columns.items()}
    return {**columns, "length_ratio": np.ones_like(precision), "outside_window": np.zeros_like(precision)}


def test_harmonic_mean_rows_matches_the_b_capscore_definition():
    values = harmonic_mean_rows(np.array([0.5, 0.3, 0.0]), np.array([0.25, 0.6, 0.9]), np.array([1.0, 0.9, 0.9]))
    assert values[0] == pytest.approx(3 / (2 + 4 + 1))  # by hand
    assert values[1] == pytest.approx(harmonic_mean([0.3, 0.6, 0.9]))
    assert values[2] == 0.0  # a zero objective gives 0, not a division error


def test_b_capscore_of_an_arm_is_the_seed_mean_of_harmonic_means_of_scene_means():
    rng = np.random.default_rng(0)
    p, r, ling = rng.uniform(0.1, 1, (3, 3, 20))
    interval = bootstrap_value(arm(p, r, ling), "b_capscore", draws=200)
    by_hand = np.mean([harmonic_mean([p[s].mean(), r[s].mean(), ling[s].mean()]) for s in range(3)])
    assert interval.estimate == pytest.approx(by_hand)
    assert interval.low <= interval.estimate <= interval.high


def test_seeds_are_resampled():
    # two seeds, each constant over scenes: only the seed draw varies, so the interval spans the two seed values
    interval = bootstrap_value(arm([[0.4] * 10, [0.6] * 10]), "cider_d", draws=2000)
    assert interval.estimate == pytest.approx(0.5)
    assert interval.low == pytest.approx(0.4) and interval.high == pytest.approx(0.6)


def test_scenes_are_resampled_and_paired_across_arms():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 2, (1, 50))
    alone = bootstrap_value(arm(scores), "cider_d", draws=2000)
    assert alone.high - alone.low > 0.1  # scene resampling spreads a one-seed arm
    # the same per-scene scores plus a constant: paired scene draws cancel the scene variation exactly
    difference = bootstrap_difference(arm(scores + 0.1), arm(scores), "cider_d", draws=2000)
    assert difference.estimate == pytest.approx(0.1)
    assert difference.low == pytest.approx(0.1) and difference.high == pytest.approx(0.1)


def test_difference_intervals_cover_the_true_difference():
    # 5 seeds × 100 scenes; per-scene noise and a seed effect; true difference 0.05
    rng = np.random.default_rng(2)
    covered = 0
    trials = 60
    for trial in range(trials):
        scene_effect = rng.normal(0, 0.3, 100)

        def sample(mean, scene_effect=scene_effect):
            return mean + scene_effect + rng.normal(0, 0.05, (5, 1)) + rng.normal(0, 0.2, (5, 100))

        interval = bootstrap_difference(arm(sample(1.05)), arm(sample(1.0)), "cider_d", draws=1000, seed=trial)
        covered += interval.low <= 0.05 <= interval.high
    assert 0.8 <= covered / trials <= 1.0  # nominal 0.95; a few seeds make percentile intervals a little narrow


def test_arms_on_different_scenes_are_refused():
    with pytest.raises(ValueError, match="different scenes"):
        bootstrap_difference(arm(np.ones((2, 10))), arm(np.ones((2, 11))), "cider_d")
    with pytest.raises(ValueError, match="shapes"):
        bootstrap_value({"precision": np.ones((2, 3)), "recall": np.ones((2, 4))}, "precision")


def test_seed_bootstrap_of_a_statistic_and_of_a_difference():
    first, second = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    spread = seed_bootstrap(first, second, statistic=lambda v: v.std(axis=-1, ddof=1), draws=2000)
    assert spread.estimate == pytest.approx(1.0)  # std of (1, 2, 3) minus std of a constant
    assert spread.low == pytest.approx(0.0)  # a draw of one repeated seed has no spread
    mean = seed_bootstrap(first, draws=2000)
    assert mean.estimate == pytest.approx(2.0) and 1.0 <= mean.low < 2.0 < mean.high <= 3.0


@pytest.mark.parametrize(
    ("interval", "outcome"),
    [
        (Interval(0.05, 0.01, 0.09), "holds"),
        (Interval(-0.05, -0.09, -0.01), "does not hold (the opposite holds)"),
        (Interval(0.001, -0.004, 0.006), "does not hold (no difference beyond ±0.01)"),
        (Interval(0.005, 0.001, 0.009), "does not hold (no difference beyond ±0.01)"),  # real but too small
        (Interval(0.01, -0.03, 0.05), "cannot tell at this scale"),
    ],
)
def test_verdict_is_computed_from_the_interval(interval, outcome):
    line = verdict("X beats Y", interval, margin=0.01, what="score difference")
    assert line.startswith(f"**X beats Y: {outcome}**")
    assert interval.format(signed=True) in line
