"""Every recipe in the repo parses with the real parsers, names known keys and rewards, and points at real files."""

from pathlib import Path

import pytest
import yaml

from balcaprl.rewards import REWARD_BUILDERS, get_reward_funcs
from balcaprl.sft import SFT_CONFIG_TYPES
from balcaprl.train import RL_CONFIG_TYPES, RecipeError, parse_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
ACCELERATE = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
MODELS = ("llava_1_5_7b", "qwen2_5_vl_3b", "qwen2_5_vl_7b")
METHODS = ("sft", "scst", "grpo_cider", "balcaprl")


def is_sft(path: Path) -> bool:
    return path.stem.endswith("sft")


def parse_recipe(path: Path):
    recipe = yaml.safe_load(path.read_text())
    # GPU recipes say bf16: true, which transformers refuses on a machine without a GPU; everything else is parsed
    # exactly as `accelerate launch ... --config RECIPE` would.
    overrides = [] if recipe.get("use_cpu") else ["--bf16", "false", "--use_cpu", "true"]
    types = SFT_CONFIG_TYPES if is_sft(path) else RL_CONFIG_TYPES
    return recipe, parse_config(types, ["--config", str(path), *overrides])


def test_every_model_has_every_method():
    for model in MODELS:
        for method in METHODS:
            assert (REPO / "recipes" / model / f"{method}.yaml").is_file(), f"missing recipes/{model}/{method}.yaml"
    assert len(RECIPES) == len(MODELS) * len(METHODS) + 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_parses_and_resolves(path):
    recipe, configs = parse_recipe(path)
    header = path.read_text().splitlines()[:12]
    assert header[0].startswith("#"), "a recipe starts with a comment saying what it is"
    assert any("balcaprl" in line and ("launch" in line or "balcaprl sft" in line or "balcaprl train" in line)
               for line in header), "the header gives the exact launch command"  # fmt: skip
    if is_sft(path):
        data_args, training_args, model_args = configs
    else:
        data_args, reward_args, training_args, model_args = configs
        context = {**reward_args.judge_context(), "corpus_references": [["a caption"]]}
        spec_names = {spec if isinstance(spec, str) else spec["name"] for spec in reward_args.reward_funcs}
        if spec_names & {"precision", "recall", "linguistic"}:
            assert reward_args.judge_base_url and reward_args.judge_model, "judge rewards need a judge"
            assert "vllm serve" in path.read_text(), "a BalCapRL recipe names the command that serves its judge"
        funcs = get_reward_funcs(reward_args.reward_funcs, **context)
        names = [f.__name__ for f in funcs]
        assert set(training_args.length_mask_rewards) <= set(names)
        assert recipe.get("judge_api_key_env") is None or recipe["judge_api_key_env"].isupper()
        # An RL recipe starts from a hub model or from the output of the same folder's stage-1 recipe.
        start = model_args.model_name_or_path
        sibling_sft = [p for p in RECIPES if p.parent == path.parent and is_sft(p)]
        if not ("/" in start and not start.startswith("runs/")):
            outputs = [yaml.safe_load(p.read_text())["output_dir"] for p in sibling_sft]
            assert start in outputs, f"{start} is not produced by {sibling_sft}"
    assert model_args.model_name_or_path and data_args.dataset
    # API keys never live in recipes, only the name of the variable that holds one
    assert [key for key in recipe if "key" in key] in ([], ["judge_api_key_env"])
    assert "sk-" not in path.read_text()


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs(path):
    config = yaml.safe_load(path.read_text())
    assert config["num_machines"] == 1 and config["num_processes"] >= 1
    if config["distributed_type"] == "DEEPSPEED":
        deepspeed_file = REPO / config["deepspeed_config"]["deepspeed_config_file"]
        assert deepspeed_file.is_file()
        import json

        stage = json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in path.name
        assert "mixed_precision" not in config  # it must come from the DeepSpeed JSON ("auto" -> the recipe)


class TestErrors:
    DEMO = str(REPO / "recipes" / "demo" / "qwen2_5_vl_balcaprl.yaml")

    def test_unknown_command_line_key_is_named(self):
        with pytest.raises(RecipeError):
            parse_config(RL_CONFIG_TYPES, ["--config", self.DEMO, "--learning_rte", "1e-4"])

    def test_unknown_recipe_key_is_named(self, tmp_path):
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(Path(self.DEMO).read_text() + "num_generation: 4\n")
        with pytest.raises(RecipeError, match="num_generation"):
            parse_config(RL_CONFIG_TYPES, ["--config", str(recipe)])

    def test_bad_value_names_the_field(self):
        with pytest.raises(RecipeError, match="advantage_estimator"):
            parse_config(RL_CONFIG_TYPES, ["--config", self.DEMO, "--advantage_estimator", "ppo"])

    def test_missing_recipe_file(self, tmp_path):
        with pytest.raises(RecipeError, match="existing recipe file"):
            parse_config(RL_CONFIG_TYPES, ["--config", str(tmp_path / "nope.yaml")])

    def test_overrides_win_over_the_recipe(self):
        *_, training_args, _ = parse_config(RL_CONFIG_TYPES, ["--config", self.DEMO, "--learning_rate", "3e-5"])
        assert training_args.learning_rate == 3e-5


def test_registry_names_documented():
    # every registered reward is mentioned in the rewards package docstring
    import balcaprl.rewards as rewards

    assert all(name in rewards.__doc__ for name in REWARD_BUILDERS)
