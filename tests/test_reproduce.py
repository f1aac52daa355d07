"""`make reproduce`: the arms' recipes, the report's quantities and verdicts, and (slow) two identical quick runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from balcaprl.experiments.demo import DemoSettings
from balcaprl.experiments.reproduce import arm_recipe
from balcaprl.experiments.reproduce_arms import (
    ARMS,
    ARMS_BY_NAME,
    SCENE_COLUMNS,
    ReproduceSettings,
    full_settings,
    quick_settings,
    settings_from_dict,
)
from balcaprl.experiments.reproduce_verdicts import compute_verdicts, reward_noise
from balcaprl.monitors import distinct_ngrams
from balcaprl.runtime import RL_CONFIG_TYPES, parse_config
from balcaprl.world.splits import read_jsonl

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def recipe_of(arm: str, tmp_path: Path, lr: float | None = None) -> dict:
    settings = full_settings(str(tmp_path))
    return arm_recipe(settings, ARMS_BY_NAME[arm].overrides, tmp_path / "train.jsonl", tmp_path / "sft",
                      tmp_path / arm, 0, lr)  # fmt: skip


def test_arms_differ_only_in_what_they_isolate(tmp_path):
    recipes = {arm.name: recipe_of(arm.name, tmp_path) for arm in ARMS}
    base = full_settings(str(tmp_path)).base  # every arm has the demo's RL budget: 60 steps of 4 prompts
    assert (base.rl_steps, base.rl_prompts_per_step) == (60, 4)
    for recipe in recipes.values():
        assert "max_train_seconds" not in recipe  # step budgets only: the same numbers on a busy machine
        assert recipe["max_steps"] == 60 and recipe["logging_steps"] == 1
        assert recipe["per_device_train_batch_size"] == recipe["num_generations"] * 4  # 4 prompts per step

    def differences(first: str, second: str) -> dict:
        a, b = recipes[first], recipes[second]
        return {
            key: (a.get(key), b.get(key))
            for key in set(a) | set(b)
            if key != "output_dir" and a.get(key) != b.get(key)
        }

    # SCST vs GRPO: the estimator only (same G, β, loss, reward, steps; the learning rate comes from each sweep)
    assert differences("scst", "grpo_beta0") == {"advantage_estimator": ("scst", "grpo")}
    assert differences("grpo_paper", "grpo_beta0") == {"beta": (0.04, 0.0)}
    assert differences("grpo_paper", "grpo_dapo") == {"loss_type": ("grpo", "dapo")}
    assert recipes["scst"]["num_generations"] == 5 and recipes["scst"]["reward_funcs"] == ["cider_d"]
    assert differences("grpo_sum", "c_gdpo") == {"advantage_estimator": ("grpo", "c_gdpo")}
    rated = {"name": "world_linguistic", "rating_scale": [1, 5]}
    exact = ["world_precision", "world_recall", "world_linguistic"]
    assert differences("c_gdpo", "c_gdpo_judged") == {"reward_funcs": (exact, [*exact[:2], rated])}
    assert differences("c_gdpo", "no_length_control") == {"length_mask_rewards": (["world_linguistic"], [])}
    assert differences("c_gdpo", "length_mask") == {}  # reused, not rerun
    assert recipe_of("scst", tmp_path, lr=2e-5)["learning_rate"] == 2e-5


@pytest.mark.parametrize("arm", [arm.name for arm in ARMS])
def test_arm_recipes_parse_with_the_training_parser(arm, tmp_path):
    path = tmp_path / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(recipe_of(arm, tmp_path)))
    _, _, config, _ = parse_config(RL_CONFIG_TYPES, ["--config", str(path)])
    assert config.max_steps == 60 and config.max_train_seconds is None
    loss_types = {"scst": "grpo", "grpo_paper": "grpo", "grpo_beta0": "grpo", "grpo_dapo": "dapo"}
    if arm in loss_types:  # the CIDEr-D arms set it; the others keep the trainer's default
        assert config.loss_type == loss_types[arm]


def test_settings_round_trip_through_the_run_summary():
    for settings in (full_settings("out"), quick_settings("out")):
        assert settings_from_dict(json.loads(json.dumps(settings.__dict__, default=lambda o: o.__dict__))) == settings


def test_distinct_ngrams_and_reward_noise_by_hand():
    assert distinct_ngrams(["a red circle.", "a red square."], 1) == 4 / 6  # a, red, circle., square.
    assert distinct_ngrams(["a red circle.", "a red square."], 2) == 3 / 4  # (a red) twice
    assert distinct_ngrams([""], 2) == 0.0
    history = [{"step": step, "rewards/cider_d/mean": value} for step, value in enumerate([0.0, 1.0, 0.0, 1.0], 1)]
    # differences +1, -1, +1: sample std = sqrt(4/3); noise = that / sqrt(2)
    assert reward_noise(history, "rewards/cider_d/mean") == pytest.approx(np.sqrt(4 / 3) / np.sqrt(2))
    trend = [{"step": step, "rewards/cider_d/mean": 0.1 * step} for step in range(1, 20)]
    assert reward_noise(trend, "rewards/cider_d/mean") == pytest.approx(0.0, abs=1e-12)  # a trend is not noise


def fake_runs(settings: ReproduceSettings, offsets: dict[str, float]) -> dict:
    """Per-scene scores of each arm = a shared scene pattern + the arm's offset + small seed noise."""
    rng = np.random.default_rng(0)
    pattern = rng.uniform(0.3, 0.7, 40)
    runs = {}
    for arm in settings.arms:
        for seed in settings.seeds:
            value = np.clip(pattern + offsets.get(arm, 0.0) + rng.normal(0, 0.002), 0, 1)
            evaluation = {column: value.tolist() for column in SCENE_COLUMNS}
            evaluation["captions"] = [f"a caption number {i} of {arm}" for i in range(40)]
            history = [{"step": s, "rewards/cider_d/mean": float(rng.normal())} for s in range(1, 10)]
            runs[(arm, seed)] = {"evaluation": evaluation, "log_history": history}
    return runs


def test_verdicts_follow_the_data(tmp_path):
    settings = ReproduceSettings(DemoSettings(output_dir=str(tmp_path)), seeds=(0, 1, 2, 3, 4))
    runs = fake_runs(settings, {"grpo_paper": 0.1, "c_gdpo": -0.1})
    lines = {claim["claim"]: claim["line"] for claim in compute_verdicts(runs, settings, draws=500)}
    assert ": holds**" in lines["GRPO (paper's β 0.04, per-sequence loss) beats SCST on held-out CIDEr-D"]
    assert ": does not hold (the opposite holds)**" in lines["c-GDPO beats summed GRPO on b-CapScore, exact rewards"]
    assert (
        "no difference beyond ±0.01"
        in lines["c-GDPO beats summed GRPO on b-CapScore, linguistic rated 1–5 like a judge"]
    )  # noqa: E501
    few = ReproduceSettings(DemoSettings(output_dir=str(tmp_path)), seeds=(0, 1))
    lines = {c["claim"]: c for c in compute_verdicts(fake_runs(few, {"grpo_paper": 0.1}), few, draws=200)}
    stability = lines["GRPO is more stable across seeds than SCST"]
    assert stability["interval"] is None and "needs 3 seeds per arm, 2 ran" in stability["line"]
    subset = ReproduceSettings(DemoSettings(output_dir=str(tmp_path)), seeds=(0, 1, 2), arms=("scst", "grpo_paper"))
    claims = compute_verdicts(fake_runs(subset, {}), subset, draws=200)
    assert {tuple(claim["arms"]) for claim in claims} == {("grpo_paper", "scst")}  # only claims whose arms ran


QUICK_ARMS = ["scst", "grpo_paper", "c_gdpo", "grpo_sum_judged", "length_mask"]


def run_quick(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "balcaprl"), "reproduce", "--quick", "--output-dir", str(output_dir),
               "--seeds", "0", "--arms", *QUICK_ARMS, *extra]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_quick_reproduce_twice_gives_identical_results(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_quick(first)
    run_quick(second)
    results = [json.loads((folder / "results.json").read_text()) for folder in (first, second)]
    for document in results:
        for key in ("seconds", "cpu_seconds", "date"):
            document.pop(key)
        document["settings"]["base"].pop("output_dir")
    assert results[0] == results[1]  # every number, interval and verdict
    for run in ("runs/scst_seed0", "runs/c_gdpo_seed0", "sweep/grpo_lr5e-05_seed100"):
        captions = [
            json.loads((folder / run / "evaluation.json").read_text())["captions"] for folder in (first, second)
        ]
        assert captions[0] == captions[1]

    # the sweep's validation scenes come from the demo's world, at its image size, like the train and test scenes
    validation = read_jsonl(first / "data" / "validation")
    assert validation and all(len(row["scene"]["objects"]) == 2 for row in validation)
    assert {row["image"].size for row in validation} == {(168, 168)}

    report = (first / "results.md").read_text()
    assert "## Verdicts" in report and "**c-GDPO beats summed GRPO" not in report  # grpo_sum did not run
    assert "GRPO (paper's β 0.04, per-sequence loss) beats SCST on held-out CIDEr-D:" in report
    for label in ("SCST (sample − greedy), β 0", "c-GDPO, exact rewards", "summed GRPO, linguistic rated 1–5"):
        assert f"| {label} |" in report
    assert "Learning-rate sweep" in report and "| scst | " in report
    sweep = json.loads((first / "results.json").read_text())["sweeps"]["scst"]
    scst_recipe = yaml.safe_load((first / "recipes" / "scst_seed0.yaml").read_text())
    assert (
        scst_recipe["learning_rate"]
        == sweep["chosen"]
        == max(
            (float(lr) for lr in sweep["validation_cider_d"]), key=lambda lr: sweep["validation_cider_d"][f"{lr:g}"]
        )
    )
    for plot in ("reward_curves.png", "objective_gains.png", "length_ratios.png"):
        with Image.open(first / plot) as image:
            assert image.format == "PNG"
    # the report is rebuilt from the run folders alone
    (first / "results.md").unlink()
    subprocess.run([sys.executable, "-m", "balcaprl.experiments.reproduce", "--report-only", "--output-dir",
    str(first)],
                   cwd=REPO, env=ENV, check=True, capture_output=True)  # fmt: skip
    assert (first / "results.md").read_text() == report


def test_update_results_page_replaces_only_the_marked_block(tmp_path):
    from balcaprl.experiments.reproduce_report import RESULTS_MARKERS, update_results_page

    start, end = RESULTS_MARKERS
    readme = tmp_path / "reproduction.md"
    readme.write_text(f"# title\n\nintro\n{start}\nold numbers\n{end}\n\nwhat changed, by hand\n")
    update_results_page(readme, "new numbers\n")
    assert readme.read_text() == f"# title\n\nintro\n{start}\nnew numbers\n{end}\n\nwhat changed, by hand\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="reproduce:start"):
        update_results_page(readme, "x")
    assert readme.read_text() == "no markers"  # nothing lost on error


def test_the_results_page_has_one_reproduce_block():
    from balcaprl.experiments.reproduce_report import RESULTS_MARKERS

    text = (REPO / "docs" / "reproduction.md").read_text()
    assert all(text.count(marker) == 1 for marker in RESULTS_MARKERS)
    assert RESULTS_MARKERS[0] not in (REPO / "README.md").read_text()
