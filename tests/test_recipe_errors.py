"""Every recipe-level mistake ends before the weights load, as one error naming the key (issue: "errors after the
weights load, as tracebacks"). The table runs `balcaprl.train.main` / `balcaprl.sft.main` in this process: a
`RecipeError` is raised only by the checks that run before the policy loads (errors after it are the trainer's own
ValueErrors), so the type is the proof. A few cases go through the console script for the exit code and the one line.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from balcaprl.recipe_file import RecipeError
from tests.paths import REPO

BALCAPRL = str(Path(sys.executable).parent / "balcaprl")
DEMO_RECIPE = REPO / "recipes" / "demo" / "qwen2_5_vl_balcaprl.yaml"
SFT_RECIPE = REPO / "recipes" / "demo" / "qwen2_5_vl_sft.yaml"


@pytest.fixture(scope="module")
def world_jsonl(tmp_path_factory):
    from balcaprl.world.splits import make_split, write_jsonl

    folder = tmp_path_factory.mktemp("world") / "train"
    write_jsonl(make_split("train", 24, seed=0), folder)
    return folder / "data.jsonl"


@pytest.fixture(scope="module")
def reward_modules(tmp_path_factory):
    """A folder on sys.path with a reward module that does not parse and one whose reward has the wrong signature."""
    folder = tmp_path_factory.mktemp("reward_modules")
    (folder / "broken_rewards.py").write_text("def brevity(:\n    return []\n")
    (folder / "narrow_rewards.py").write_text(
        "def only_completions(completions):\n    return [1.0 for _ in completions]\n\n\n"
        "def takes_kwargs(completions, **kwargs):\n    return [1.0 for _ in completions]\n"
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def write_recipe(path: Path, base: Path = DEMO_RECIPE, drop=(), **changes) -> Path:
    recipe = yaml.safe_load(base.read_text())
    for key in drop:
        recipe.pop(key)
    recipe.update(changes)
    path.write_text(yaml.safe_dump(recipe))
    return path


# (id, recipe changes, extra command-line items, text the error must hold)
RL_CASES = [
    ("default mask, no such reward named", {"reward_funcs": ["cider_d"], "length_mask_rewards": ["linguistic"]}, [],
     "length_mask_rewards names ['linguistic']"),
    ("temperature 0", {}, ["--temperature", "0"], "temperature must be > 0"),
    ("max_completion_length 0", {}, ["--max_completion_length", "0"], "max_completion_length must be >= 1"),
    ("negative learning rate", {"learning_rate": -1.0e-4}, [], "learning_rate must be >= 0"),
    ("zero max_steps", {"max_steps": 0}, [], "max_steps must be a positive number"),
    ("duplicate rewards", {"reward_funcs": ["world_precision", "world_precision", "world_linguistic"]}, [],
     "distinct names; ['world_precision']"),
    ("weight not a number", {"reward_funcs": [{"name": "world_precision", "weight": "abc"}, "world_linguistic"]}, [],
     "has weight 'abc', not a number"),
    ("unknown reward kwarg", {"reward_funcs": [{"name": "world_precision", "colour": 3}, "world_linguistic"]}, [],
     "unexpected keyword argument 'colour'"),
    ("empty reward_funcs", {"reward_funcs": []}, [], "reward_funcs is empty"),
    ("reward module with a SyntaxError", {"reward_funcs": ["broken_rewards:brevity", "world_linguistic"]}, [],
     "cannot import 'broken_rewards' for 'broken_rewards:brevity': SyntaxError"),
    ("reward with the wrong signature", {"reward_funcs": ["narrow_rewards:only_completions", "world_linguistic"]}, [],
     "'only_completions' cannot be called as TRL calls it: got an unexpected keyword argument 'prompts'"),
    ("reward weights of another length", {"reward_weights": [1.0, 2.0]}, [], "reward_weights has 2 value(s) for 3"),
    ("judge price a single number", {"judge_price_per_million_tokens": 0.15}, [],
     "judge_price_per_million_tokens must be [input_price, output_price], two finite numbers >= 0"),
    ("negative judge price", {}, ["--judge_price_per_million_tokens", "0.15", "-0.6"],
     "judge_price_per_million_tokens must be [input_price, output_price]"),
    ("unknown key", {}, ["--num_generation", "4"], "--list-keys"),
    ("model folder that does not exist", {}, ["--model_name_or_path", "/nonexistent/qwen"], "no such folder"),
    ("Hub model missing offline", {}, ["--model_name_or_path", "Qwen/Qwen2.5-VL-3B-Instruct"],
     "not in the Hugging Face cache"),
    ("too little data for one step", {"max_train_samples": 1}, [], "fewer than the 2 prompts"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "argv", "message"), [case[1:] for case in RL_CASES], ids=[c[0] for c in RL_CASES])
def test_rl_recipe_errors_end_before_the_weights_load(tmp_path, world_jsonl, reward_modules, changes, argv, message):
    from balcaprl.train import main

    recipe = write_recipe(tmp_path / "recipe.yaml", **changes)
    output_dir = tmp_path / "out"
    base = ["--config", str(recipe), "--dataset", str(world_jsonl), "--output_dir", str(output_dir)]
    if "--model_name_or_path" not in argv:
        base += ["--model_name_or_path", "tiny:qwen2_5_vl"]
    with pytest.raises(RecipeError) as error:
        main([*base, "--max_steps", str(changes.get("max_steps", 1)), *argv])
    assert message in str(error.value)
    assert not output_dir.exists()  # nothing written: the run never started


def test_default_mask_in_a_run_without_linguistic_masks_nothing(tmp_path, world_jsonl):
    """The first plain CIDEr-D recipe a user writes leaves length_mask_rewards at its default: it trains."""
    from balcaprl.train import main

    recipe = write_recipe(
        tmp_path / "recipe.yaml", drop=["length_mask_rewards"], reward_funcs=["cider_d"], advantage_estimator="grpo"
    )
    trainer = main([
        "--config", str(recipe), "--dataset", str(world_jsonl), "--output_dir", str(tmp_path / "out"),
        "--model_name_or_path", "tiny:qwen2_5_vl", "--max_steps", "1", "--logging_steps", "1",
    ])  # fmt: skip
    assert trainer.args.length_mask_rewards == ["linguistic"] and trainer._masked_reward_columns == []
    assert trainer.state.global_step == 1


SFT_CASES = [
    ("negative learning rate", {"learning_rate": -1.0}, "learning_rate must be >= 0"),
    ("zero batch", {"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
    ("model folder that does not exist", {"model_name_or_path": "./runs/nope/sft"}, "no such folder"),
]


@pytest.mark.parametrize(("changes", "message"), [case[1:] for case in SFT_CASES], ids=[c[0] for c in SFT_CASES])
def test_sft_recipe_errors_end_before_the_weights_load(tmp_path, world_jsonl, changes, message):
    from balcaprl.sft import main

    recipe = write_recipe(
        tmp_path / "recipe.yaml", base=SFT_RECIPE, **{"model_name_or_path": "tiny:qwen2_5_vl", **changes}
    )
    output_dir = tmp_path / "out"
    with pytest.raises(RecipeError, match=message):
        main(
            [
                "--config",
                str(recipe),
                "--dataset",
                str(world_jsonl),
                "--output_dir",
                str(output_dir),
                "--max_steps",
                "1",
            ]
        )
    assert not output_dir.exists()


def test_resume_into_another_run_ends_before_the_weights_load(tmp_path, world_jsonl):
    """A checkpoint of a real run (lora_r 8), then the same output_dir with lora_r 4: refused, naming the key."""
    from balcaprl.train import main

    common = [
        "--config", str(DEMO_RECIPE), "--dataset", str(world_jsonl), "--output_dir", str(tmp_path / "out"),
        "--model_name_or_path", "tiny:qwen2_5_vl", "--max_steps", "1",
    ]  # fmt: skip
    main([*common, "--save_strategy", "steps", "--save_steps", "1"])
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    with pytest.raises(RecipeError, match=r"lora_r.*--output_dir"):
        main([*common, "--max_steps", "2", "--lora_r", "4"])


def run_cli(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([BALCAPRL, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_yaml_error_is_one_line_with_file_line_and_column(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model_name_or_path: tiny:qwen2_5_vl\nreward_funcs: [cider_d, length_penalty\nseed: 1\n")
    result = run_cli("train", recipe)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    where = "not valid YAML at line 3, column 5: expected ',' or ']', but got ':'."
    assert result.stderr.strip().splitlines() == [f"balcaprl train: error: recipe {recipe}: {where}"]


@pytest.mark.parametrize("content", ["- a list\n- of items\n", "just text\n"])
def test_a_recipe_that_is_not_a_mapping_is_one_line(tmp_path, content):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    result = run_cli("sft", recipe)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a mapping of keys" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_recipe_error_exits_non_zero_with_one_line(tmp_path, world_jsonl):
    result = run_cli(
        "train", DEMO_RECIPE, "--dataset", world_jsonl, "--output_dir", tmp_path / "out",
        "--model_name_or_path", "tiny:qwen2_5_vl", "--temperature", "0",
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("balcaprl train: error: temperature must be > 0")
    assert "Trainable parameters" not in result.stdout


def test_list_keys_prints_every_key_with_its_help():
    result = run_cli("train", "--list-keys")
    assert result.returncode == 0, result.stderr
    for key in ("advantage_estimator", "length_mask_rewards", "judge_base_url", "lora_r", "dataset", "temperature"):
        assert f"--{key} (" in result.stdout
    judge_keys = run_cli("train", "--list-keys", "judge").stdout
    assert (
        "--judge_price_per_million_tokens (list[float] | None, default None): [input_price, output_price]"
        in judge_keys
    )
    filtered = run_cli("train", "--list-keys", "lora").stdout
    assert "--lora_r (" in filtered and "--temperature (" not in filtered and "--entropy_coef" not in filtered
    assert "--sft_references (" in run_cli("sft", "--list-keys").stdout


@pytest.mark.parametrize("damage", ["truncated", "too wide"])
def test_a_bad_image_ends_before_the_weights_load_naming_row_and_file(tmp_path, damage):
    """Data found bad at start-up, not hours in: a truncated PNG, or a 1x300 strip Qwen2-VL's resize refuses."""
    from PIL import Image

    from balcaprl.train import main
    from balcaprl.world.splits import make_split, write_jsonl

    write_jsonl(make_split("train", 24, seed=0), tmp_path / "data")
    image = tmp_path / "data" / "images" / "000005.png"
    if damage == "truncated":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    else:
        Image.new("RGB", (300, 1), (200, 30, 30)).save(image)
    with pytest.raises(RecipeError) as error:
        main([
            "--config", str(DEMO_RECIPE), "--dataset", str(tmp_path / "data" / "data.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--model_name_or_path", "tiny:qwen2_5_vl", "--max_steps", "1",
        ])  # fmt: skip
    message = str(error.value)
    assert "row 5" in message and "000005.png" in message and len(message.splitlines()) == 1
    assert ("unreadable image" if damage == "truncated" else "aspect ratio over 200:1") in message
    assert not (tmp_path / "out").exists()
