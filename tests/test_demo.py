"""The demo pipeline end to end, with a tiny budget (the full budget is measured in the README)."""

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


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "balcaprl"), "demo", "--quick", "--output-dir", str(tmp_path)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = (tmp_path / "report.md").read_text()
    for needle in ("| b-CapScore |", "| CIDEr-D |", "| mean length ratio |", "b-CapScore gain of the RL stage",
                   "## Sample captions", "reward_curves.png"):  # fmt: skip
        assert needle in report
    for plot in ("reward_curves.png", "before_after.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.format == "PNG"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rl"]) == {"0", "1"}
    assert len(results["b_capscore_gain"]["per_seed"]) == 2
    # the stages ran through the real entry points with recipes written beside the results
    assert (tmp_path / "recipes" / "sft.yaml").is_file() and (tmp_path / "recipes" / "balcaprl_seed1.yaml").is_file()
    assert "[demo" in result.stdout and "5/5 report" in result.stdout
