import pytest

from tests.helpers import make_config, make_trainer, mentions_colour


class TestBalCapConfig:
    def test_defaults_follow_the_contract(self, tmp_path):
        config = make_config(tmp_path)
        assert config.advantage_estimator == "c_gdpo"
        assert config.length_mask_rewards == ["linguistic"]
        assert config.length_mask_window == [0.5, 2.0]
        assert config.length_unit == "words"
        assert config.reference_column == "references"
        assert config.multi_objective_aggregation == "normalize_then_sum"

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("advantage_estimator", "ppo", "advantage_estimator must be one of"),
            ("length_unit", "chars", "length_unit must be one of"),
            ("length_mask_window", [2.0, 0.5], "length_mask_window"),
            ("length_mask_window", [0.5], "length_mask_window"),
            ("reference_column", "", "reference_column"),
        ],
    )
    def test_invalid_values_name_the_field(self, tmp_path, field, value, message):
        with pytest.raises(ValueError, match=message):
            make_config(tmp_path, **{field: value})

    def test_grpo_sets_trl_aggregation_and_needs_group_scaling(self, tmp_path):
        assert make_config(tmp_path, advantage_estimator="grpo").multi_objective_aggregation == "sum_then_normalize"
        with pytest.raises(ValueError, match="scale_rewards"):
            make_config(tmp_path, advantage_estimator="grpo", scale_rewards="batch")

    @pytest.mark.parametrize("estimator", ["c_gdpo", "scst"])
    @pytest.mark.parametrize("scale_rewards", ["batch", "none"])
    def test_scale_rewards_the_estimator_ignores_is_an_error(self, tmp_path, estimator, scale_rewards):
        with pytest.raises(ValueError, match=f"scale_rewards='{scale_rewards}' has no effect: .*{estimator}"):
            make_config(tmp_path, advantage_estimator=estimator, scale_rewards=scale_rewards)

    def test_an_aggregation_the_estimator_overrides_is_an_error(self, tmp_path):
        with pytest.raises(ValueError, match="multi_objective_aggregation='normalize_then_sum' has no effect"):
            make_config(tmp_path, advantage_estimator="grpo", multi_objective_aggregation="normalize_then_sum")
        # the aggregation the estimator itself uses is fine to state
        config = make_config(tmp_path, advantage_estimator="c_gdpo", multi_objective_aggregation="normalize_then_sum")
        assert config.multi_objective_aggregation == "normalize_then_sum"

    def test_single_string_mask_reward_becomes_a_list(self, tmp_path):
        assert make_config(tmp_path, length_mask_rewards="precision").length_mask_rewards == ["precision"]


class TestTrainerValidation:
    def test_masked_reward_must_be_a_reward_function(self, tiny_models, tmp_path):
        with pytest.raises(ValueError, match=r"length_mask_rewards names \['linguistic'\].*mentions_colour"):
            make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [mentions_colour], length_mask_rewards=["linguistic"])
        # left at its default, ["linguistic"] masks nothing in a run without a linguistic reward
        trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [mentions_colour])
        assert trainer.args.length_mask_rewards == ["linguistic"] and trainer._masked_reward_columns == []

    def test_trainer_needs_a_balcap_config(self, tiny_models, tmp_path):
        from trl import GRPOConfig

        from balcaprl.models.processors import load_processor
        from balcaprl.trainer.grpo import BalCapGRPOTrainer
        from tests.helpers import toy_dataset

        args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=2)
        with pytest.raises(TypeError, match="BalCapConfig"):
            BalCapGRPOTrainer(
                model=str(tiny_models["qwen2_5_vl"]),
                reward_funcs=[mentions_colour],
                args=args,
                train_dataset=toy_dataset(),
                processing_class=load_processor(str(tiny_models["qwen2_5_vl"])),
            )


def test_every_judge_client_argument_is_a_recipe_key_and_back():
    import inspect
    from dataclasses import fields

    from balcaprl.config import RewardConfig
    from balcaprl.judge.client import JudgeClient

    client_arguments = set(inspect.signature(JudgeClient.__init__).parameters) - {"self"}
    recipe_keys = {item.name for item in fields(RewardConfig) if item.name.startswith("judge_")}
    assert {f"judge_{name}" for name in client_arguments} == recipe_keys


def test_a_recipe_with_every_judge_key_reaches_the_client(tmp_path):
    import yaml

    from balcaprl.rewards import get_reward_funcs
    from balcaprl.runtime import RL_CONFIG_TYPES, parse_config

    judge_keys = {
        "judge_base_url": "http://127.0.0.1:9/v1",
        "judge_model": "judge",
        "judge_api_key_env": "JUDGE_KEY",
        "judge_max_concurrency": 3,
        "judge_timeout": 7.5,
        "judge_max_retries": 2,
        "judge_cache_dir": str(tmp_path / "cache"),
        "judge_temperature": 0.25,
        "judge_max_tokens": 99,
        "judge_response_format": "none",
        "judge_schema_in_prompt": False,
        "judge_backoff_base_s": 0.125,
        "judge_backoff_max_s": 4.0,
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"reward_funcs": ["recall"], "output_dir": str(tmp_path), **judge_keys}))
    _, reward_args, _, _ = parse_config(RL_CONFIG_TYPES, ["--config", str(recipe), "--use_cpu", "true"])
    (recall,) = get_reward_funcs(reward_args.reward_funcs, **reward_args.judge_context())
    for key, value in judge_keys.items():
        got = getattr(recall.judge, key.removeprefix("judge_"))
        assert str(got) == str(value) if key == "judge_cache_dir" else got == value, key


@pytest.mark.parametrize("stage", ["rl", "sft"])
def test_help_lists_the_recipe_keys_and_exits_cleanly(stage, capsys):
    from balcaprl.runtime import RL_CONFIG_TYPES, SFT_CONFIG_TYPES, RecipeError, parse_config

    with pytest.raises(SystemExit) as exit_info:
        parse_config(RL_CONFIG_TYPES if stage == "rl" else SFT_CONFIG_TYPES, ["--help"])
    assert exit_info.value.code == 0
    assert "--model_name_or_path" in capsys.readouterr().out
    # a bad value is still a recipe error, one line naming the key (not argparse's usage and exit)
    with pytest.raises(RecipeError, match="argument --advantage_estimator.*expected one argument"):
        parse_config(RL_CONFIG_TYPES, ["--advantage_estimator"])
    with pytest.raises(RecipeError, match="Unknown recipe key.*num_generation'"):  # no abbreviation of a key
        parse_config(RL_CONFIG_TYPES, ["--use_cpu", "true", "--bf16", "false", "--num_generation", "4"])
