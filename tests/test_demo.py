"""The demo pipeline end to end, with a tiny budget (the full budget is measured in docs/demo.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_generate_captions_greedy_is_deterministic_and_batch_independent(tiny_models):
    from balcaprl.generation import generate_captions, load_for_generation

    model, processor = load_for_generation(tiny_models["qwen2_5_vl"])
    images = [Image.new("RGB", (56, 56), colour) for colour in ("red", "blue", "green")]
    one_batch = generate_captions(model, processor, images, batch_size=3, max_new_tokens=6)
    one_by_one = generate_captions(model, processor, images, batch_size=1, max_new_tokens=6)
    assert one_batch == one_by_one  # left padding does not change greedy captions
    assert len(one_batch) == 3 and all(isinstance(caption, str) for caption in one_batch)


def test_smooth_is_a_trailing_moving_average():
    from balcaprl.experiments.demo_report import smooth

    # element i averages the last `window` values up to i (fewer at the start), by hand:
    # window 3: 1, (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4+5)/3 ; window 2 on 4, 0, 2, 8: 4, (4+0)/2, (0+2)/2, (2+8)/2
    assert smooth([1, 2, 3, 4, 5], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0])
    assert smooth([4.0, 0.0, 2.0, 8.0], 2) == pytest.approx([4.0, 2.0, 1.0, 5.0])
    assert smooth([0.3, 0.1], 1) == [0.3, 0.1]
    assert smooth([2, 4], 10) == pytest.approx([2.0, 3.0])  # a window longer than the curve: running means
    assert smooth([], 5) == []
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


def test_objects_named_counts_distinct_objects_and_those_in_the_scene():
    from balcaprl.experiments.demo import objects_named
    from balcaprl.world.scene import Scene, WorldObject

    scene = Scene((WorldObject("circle", "red", "small", "left"), WorldObject("square", "blue", "large", "right")))
    graph = scene.to_dict()
    assert objects_named("a small red circle.", graph) == (1, 1)
    assert objects_named("a small red circle and a large blue square.", graph) == (2, 2)
    assert objects_named("a small red circle and a large blue circle.", graph) == (2, 1)  # the second is wrong
    assert objects_named("a small red circle and a small red circle.", graph) == (1, 1)  # a repeat is one object
    assert objects_named("There is a large green triangle.", graph) == (1, 0)
    assert objects_named("", graph) == (0, 0)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `balcaprl demo --quick` run (stage 1, 2 RL seeds of 4 steps, evaluations), shared by the tests below."""
    output = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "balcaprl"), "demo", "--quick", "--output-dir", str(output)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output, result


@pytest.mark.slow
def test_quick_demo_writes_the_report(quick_demo):
    from balcaprl.experiments.demo import RL_LOGGING_STEPS

    tmp_path, result = quick_demo
    report = (tmp_path / "report.md").read_text()
    for needle in ("| b-CapScore |", "| CIDEr-D |", "| mean length ratio |", "b-CapScore gain of the RL stage",
                   "## Sample captions", "reward_curves.png", "## Held-out scores during RL", "heldout_curve.png",
                   "| seed | step | precision | recall | linguistic | b-CapScore |",
                   "moving average over 2 steps", "| objects named per caption |",
                   "| objects named rightly per caption |", "World: 2 objects per scene"):  # fmt: skip
        assert needle in report
    # the demo's references name the large shape before the small one (DemoSettings.large_first)
    assert "large shapes named before small ones" in report
    from balcaprl.world.captions import parse_caption
    from balcaprl.world.scene import Scene
    from balcaprl.world.splits import read_jsonl

    orders = []
    for row in read_jsonl(tmp_path / "data" / "train" / "data.jsonl"):
        scene = Scene.from_dict(row["scene"])
        for reference in row["references"]:
            names = dict.fromkeys(c.subject for c in parse_caption(reference).claims if c.kind == "object")
            orders.append([scene.object_named(name).size for name in names])
    assert any(len(set(sizes)) == 2 for sizes in orders) and all(sizes == sorted(sizes) for sizes in orders)
    # the sample scenes are shown as the images the models saw, beside captions with their exact scores
    assert '<img src="samples/scene_0.png"' in report and "(P " in report
    with Image.open(tmp_path / "samples" / "scene_0.png") as image:
        assert image.size == (168, 168)
    for plot in ("reward_curves.png", "before_after.png", "heldout_curve.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.format == "PNG"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rl"]) == {"0", "1"}
    assert len(results["b_capscore_gain"]["per_seed"]) == 2
    # the stages ran through the real entry points with recipes written beside the results
    assert (tmp_path / "recipes" / "sft.yaml").is_file() and (tmp_path / "recipes" / "balcaprl_seed1.yaml").is_file()
    assert "[demo" in result.stdout and "5/5 report" in result.stdout
    # every RL step is logged (the smoothed training curves' raw points), and the progress bar counted them all
    history = json.loads((tmp_path / "balcaprl_seed0" / "trainer_state.json").read_text())["log_history"]
    assert [log["step"] for log in history if "rewards/world_precision/mean" in log] == [1, 2, 3, 4]
    # the reward-hacking monitors are logged beside the rewards, and the report's table has the held-out share
    step_logs = [log for log in history if "loss" in log]
    assert all("monitor/repeated_sentence" in log and "monitor/length_drift" in log for log in step_logs)
    assert "| captions with a repeated sentence |" in report and "| repeated 4-grams (seq-rep-4) |" in report
    for seed in (0, 1):  # what the progress bar of `wait_for` counts: 4 steps per seed
        assert (tmp_path / f"balcaprl_seed{seed}.log").read_text().count("'loss'") * RL_LOGGING_STEPS == 4


@pytest.mark.slow
def test_quick_demo_heldout_curve_is_scored_from_the_rl_checkpoints(quick_demo):
    from balcaprl.data.loading import corpus_references, load_caption_dataset
    from balcaprl.experiments.demo import CURVE_METRICS, evaluate_model
    from balcaprl.world.splits import read_jsonl

    tmp_path, _ = quick_demo
    curve = json.loads((tmp_path / "results.json").read_text())["heldout_curve"]
    assert curve["scenes"] == 8 and curve["checkpoint_steps"] == 1 and curve["checkpoint_megabytes"] > 0
    recipe = (tmp_path / "recipes" / "balcaprl_seed0.yaml").read_text()
    assert "save_strategy: steps" in recipe and "save_only_model: true" in recipe and "logging_steps: 1" in recipe
    # 4 RL steps, a model-only checkpoint every step: step 0 (stage 1), checkpoints 1-3, the final model at step 4
    assert set(curve["per_seed"]) == {"0", "1"}
    for points in curve["per_seed"].values():
        assert [point["step"] for point in points] == [0, 1, 2, 3, 4]
        assert [point["model"] for point in points] == ["stage 1", "checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                        "final"]  # fmt: skip
    # the checkpoints were deleted once scored (a rerun of the demo would otherwise resume from them)
    assert not list(tmp_path.glob("balcaprl_seed*/checkpoint-*"))

    # the end points, evaluated independently on the same first 8 held-out scenes
    rows = read_jsonl(tmp_path / "data" / "test" / "data.jsonl")[:8]
    corpus = corpus_references(load_caption_dataset(tmp_path / "data" / "train" / "data.jsonl"))
    stage1 = evaluate_model(tmp_path / "sft", rows, corpus, batch_size=16)
    for seed, points in curve["per_seed"].items():
        final = evaluate_model(tmp_path / f"balcaprl_seed{seed}", rows, corpus, batch_size=16)
        for key in CURVE_METRICS:
            assert points[0][key] == pytest.approx(stage1[key], abs=1e-9), (seed, key)
            assert points[-1][key] == pytest.approx(final[key], abs=1e-9), (seed, key)
    # RL moved the policy (lr 5e-3 in --quick), so the end points are different models: a curve that scored the
    # stage-1 model at every step would fail the last-point check above
    assert any(points[-1][key] != points[0][key] for points in curve["per_seed"].values() for key in CURVE_METRICS)
