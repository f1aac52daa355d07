"""End-to-end: the real TRL GRPO path on both tiny models, LoRA on the language model, every estimator."""

import math

import numpy as np
import pytest
import torch

from balcaprl.advantages import compute_advantages
from balcaprl.completions import completion_text
from balcaprl.length import length_conditional_mask, word_length
from balcaprl.monitors import MONITOR_NAMES, caption_monitors
from tests.helpers import REFERENCE_WORDS, linguistic, make_trainer, mentions_colour, sometimes_unscorable

CONTRACT_METRICS = ["length/ratio_mean", "length/masked_frac", "advantages/distinct_per_group"]
REWARDS = [mentions_colour, linguistic, sometimes_unscorable]


def lora_and_base_parameters(model):
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora = {name: value for name, value in parameters.items() if "lora_" in name}
    base = {name: value for name, value in parameters.items() if "lora_" not in name}
    return lora, base


@pytest.fixture(
    scope="module",
    params=[(family, estimator) for family in ("qwen2_5_vl", "llava") for estimator in ("c_gdpo", "grpo", "scst")],
    ids=lambda param: "-".join(param),
)
def trained(request, tiny_models, tmp_path_factory):
    """Two RL steps on a tiny model (LoRA), per family and estimator; with the parameters before training."""
    family, estimator = request.param
    output_dir = tmp_path_factory.mktemp(f"{family}-{estimator}")
    trainer = make_trainer(tiny_models[family], output_dir, REWARDS, advantage_estimator=estimator, max_steps=2)
    lora_before, base_before = lora_and_base_parameters(trainer.model)
    trainer.train()
    return trainer, estimator, lora_before, base_before


def test_lora_on_the_language_model_trains_and_the_base_does_not(trained):
    trainer, _, lora_before, base_before = trained
    assert lora_before and all("language_model" in name for name in lora_before)
    lora_after, base_after = lora_and_base_parameters(trainer.model)
    # LoRA B starts at zero and receives the gradient; base weights, vision tower included, stay bit-identical.
    assert any("lora_B" in name and not torch.equal(lora_before[name], lora_after[name]) for name in lora_before)
    assert [name for name in base_before if not torch.equal(base_before[name], base_after[name])] == []


def test_contract_metrics_are_logged_every_step(trained):
    trainer = trained[0]
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(step_logs) == 2
    for log in step_logs:
        for name in CONTRACT_METRICS + [f"rewards/{fn.__name__}/mean" for fn in REWARDS[:2]]:
            assert name in log and math.isfinite(log[name]), (name, log)
        assert 0.0 <= log["length/masked_frac"] <= 1.0
        assert 1.0 <= log["advantages/distinct_per_group"] <= 4.0


def test_reward_hacking_monitors_are_those_of_the_step_captions(trained):
    trainer = trained[0]
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(name in log for log in step_logs for name in MONITOR_NAMES)
    # TRL's completions table holds the last step's sampled captions (every process's: one here)
    captions = [completion_text(c) for c in trainer._logs["completion"]]
    expected = caption_monitors(captions, [REFERENCE_WORDS] * len(captions))
    assert {name: step_logs[-1][name] for name in MONITOR_NAMES} == pytest.approx(expected)


def test_the_loss_receives_compute_advantages_of_the_reward_matrix(trained):
    trainer, estimator = trained[:2]
    samples = trainer.reward_matrices[::2] if estimator == "scst" else trainer.reward_matrices
    baselines = trainer.baseline_matrices if estimator == "scst" else [None, None]
    assert len(samples) == len(baselines) == len(trainer.generated_advantages) == len(trainer.loss_advantages) == 2
    for rewards, baseline, generated, received in zip(
        samples, baselines, trainer.generated_advantages, trainer.loss_advantages
    ):
        expected = compute_advantages(rewards, 4, estimator=estimator, baseline_rewards=baseline)
        torch.testing.assert_close(generated, expected)
        torch.testing.assert_close(received.sort().values, expected.sort().values)  # TRL shuffles the batch
    # The completions table shows the advantages the loss received, not TRL's own.
    torch.testing.assert_close(torch.tensor(list(trainer._logs["advantages"])), trainer.generated_advantages[-1])


@pytest.mark.parametrize(
    "trained", [("qwen2_5_vl", "scst"), ("llava", "scst")], indirect=True, ids=["qwen2_5_vl-scst", "llava-scst"]
)
def test_scst_scores_one_greedy_caption_per_prompt(trained):
    trainer = trained[0]
    # 8 samples = 2 prompts x G=4: 2 greedy captions scored, each baseline repeated over its group
    for scored_once, baseline in zip(trainer.reward_matrices[1::2], trainer.baseline_matrices, strict=True):
        assert scored_once.shape == (2, 3)
        torch.testing.assert_close(baseline, scored_once.repeat_interleave(4, dim=0), equal_nan=True)


def test_the_logged_linguistic_reward_is_masked_by_length(trained):
    trainer, estimator = trained[:2]
    # Every toy reference has REFERENCE_WORDS words: "linguistic" is 0 exactly where the caption's ratio is outside
    # [0.5, 2], and > 0 wherever it was scored inside.
    completions = [completion_text(c) for c in trainer._logs["completion"]]
    logged = torch.tensor(list(trainer._logs["rewards"]["linguistic"]))
    keep = length_conditional_mask(torch.tensor([word_length(c) / REFERENCE_WORDS for c in completions]))
    assert (logged[~keep] == 0).all()
    assert (logged[keep & ~torch.isnan(logged)] > 0).all()
    last_samples = (trainer.reward_matrices[::2] if estimator == "scst" else trainer.reward_matrices)[-1]
    torch.testing.assert_close(logged, last_samples[:, 1], equal_nan=True)


def test_token_length_unit_counts_policy_tokens(tiny_models, tmp_path):
    from peft import LoraConfig

    from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
    from balcaprl.models.processors import load_processor
    from tests.helpers import RecordingTrainer, make_config, toy_dataset

    reference = "a red circle here."
    dataset = toy_dataset().map(lambda row: {"references": [reference]})
    path = str(tiny_models["qwen2_5_vl"])
    trainer = RecordingTrainer(
        model=path,
        reward_funcs=REWARDS,
        args=make_config(tmp_path, length_unit="tokens", max_steps=1),
        train_dataset=dataset,
        processing_class=load_processor(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LORA_TARGETS),
    )
    trainer.train()
    tokenizer = trainer.processing_class.tokenizer

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    completions = [completion_text(c) for c in trainer._logs["completion"]]
    expected = [tokens(completion) / tokens(reference) for completion in completions]
    by_words = [word_length(completion) / word_length(reference) for completion in completions]
    assert expected != by_words  # the check below tells tokens from words
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert log["length/ratio_mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-9)


def test_masking_off_without_reference_column_is_allowed(tiny_models, tmp_path):
    trainer = make_trainer(
        tiny_models["qwen2_5_vl"], tmp_path, REWARDS, length_mask_rewards=[], reference_column="refs", max_steps=1
    )
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert "length/ratio_mean" not in log and "advantages/distinct_per_group" in log


def test_masking_without_reference_column_names_the_column(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, REWARDS, reference_column="refs", max_steps=1)
    with pytest.raises(ValueError, match="'refs'.*references"):
        trainer.train()


def returns_nan(prompts, completions, **kwargs):
    return [0.5] * (len(completions) - 1) + [float("nan")]


def returns_too_few(prompts, completions, **kwargs):
    return [0.5] * (len(completions) - 1)


def raises_inside(prompts, completions, **kwargs):
    raise KeyError("no such column")


async def async_raises_inside(prompts, completions, **kwargs):
    raise ConnectionError("judge unreachable")


async def async_length(prompts, completions, **kwargs):
    return [float(len(completion_text(c))) for c in completions]


class TestRewardChecks:
    @pytest.mark.parametrize(
        ("bad_reward", "message"),
        [
            (returns_nan, r"'returns_nan' returned nan for completion 7 at step 0, on a batch of 8 completions"),
            (returns_too_few, r"'returns_too_few' returned 7 values at step 0"),
            (raises_inside, r"'raises_inside' raised KeyError at step 0, on a batch of 8 completions"),
            (async_raises_inside, r"'async_raises_inside' raised ConnectionError at step 0.*judge unreachable"),
        ],
    )
    def test_bad_reward_fails_naming_the_reward_and_step(self, tiny_models, tmp_path, bad_reward, message):
        from balcaprl.trainer.reward_checks import RewardFunctionError

        trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [linguistic, bad_reward], max_steps=1)
        with pytest.raises(RewardFunctionError, match=message):
            trainer.train()

    def test_async_reward_keeps_its_name_and_runs(self, tiny_models, tmp_path):
        trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [linguistic, async_length], max_steps=1)
        assert trainer.reward_func_names == ["linguistic", "async_length"]
        trainer.train()
        log = next(log for log in trainer.state.log_history if "loss" in log)
        assert log["rewards/async_length/mean"] > 0


def numpy_and_tensor_scalars(prompts, completions, **kwargs):
    """Scalar types TRL accepts from a reward: numpy floats and ints, 0-d tensors, plain floats."""
    kinds = [np.float32(0.25), np.int64(1), torch.tensor(0.5), 0.75]
    return [kinds[index % 4] for index in range(len(completions))]


def test_numpy_and_tensor_scalars_are_accepted_as_floats(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [linguistic, numpy_and_tensor_scalars], max_steps=1)
    trainer.train()
    column = trainer.reward_matrices[0][:, 1]
    assert column.tolist() == [0.25, 1.0, 0.5, 0.75] * 2


def test_two_reward_functions_of_one_name_are_an_error(tiny_models, tmp_path):
    def make(offset):
        def mentions(prompts, completions, **kwargs):
            return [offset] * len(completions)

        return mentions

    with pytest.raises(ValueError, match=r"distinct names; \['mentions'\] appear more than once"):
        make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [make(0.0), make(1.0)], length_mask_rewards=[])


def test_a_batch_of_images_of_different_sizes_trains(tiny_models, tmp_path):
    # Different image sizes give prompts of different lengths. TRL left-pads the prompt ids but pads Qwen2.5-VL's
    # mm_token_type_ids with the processor's padding side: right padding crashed get_rope_index (shape mismatch).
    import json

    from peft import LoraConfig
    from PIL import Image

    from balcaprl.data.loading import load_caption_dataset
    from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
    from balcaprl.models.processors import image_resize_for, load_processor
    from tests.helpers import RecordingTrainer, make_config

    path = str(tiny_models["qwen2_5_vl"])
    processor = load_processor(path, min_pixels=112 * 112, max_pixels=168 * 168)
    assert processor.tokenizer.padding_side == "right"  # as saved: the trainer must not rely on it
    lines = []
    for index, (size, colour) in enumerate([((56, 56), "red"), ((300, 200), "blue"), ((90, 250), "green")] * 3):
        Image.new("RGB", size, colour).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "references": [f"a {colour} square here."]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines[:8]) + "\n")
    dataset = load_caption_dataset(tmp_path / "data.jsonl", image_resize=image_resize_for(processor))
    trainer = RecordingTrainer(
        model=path,
        reward_funcs=[mentions_colour, linguistic],
        args=make_config(tmp_path / "out", max_steps=1),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LORA_TARGETS),
    )
    trainer.train()
    assert processor.tokenizer.padding_side == "left"
    assert len(trainer.loss_advantages) == 1


def test_scst_greedy_baseline_is_decoded_without_dropout(tiny_models, tmp_path):
    # LoRA dropout (TRL's default 0.05 with use_peft) made three "greedy" decodes with three seeds differ.
    from peft import LoraConfig

    from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
    from balcaprl.models.processors import load_processor
    from tests.helpers import RecordingTrainer, make_config, toy_dataset

    path = str(tiny_models["qwen2_5_vl"])
    trainer = RecordingTrainer(
        model=path,
        reward_funcs=REWARDS,
        args=make_config(tmp_path, advantage_estimator="scst"),
        train_dataset=toy_dataset(),
        processing_class=load_processor(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.9, target_modules=LANGUAGE_MODEL_LORA_TARGETS),
    )
    with torch.no_grad():  # non-zero adapters, so that their dropout matters
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    trainer.model.train()
    prompts = [toy_dataset()[index]["prompt"] for index in range(2)]
    decodes = []
    for seed in range(3):
        torch.manual_seed(seed)
        decodes.append(trainer._generate_greedy(prompts))
    assert decodes[0] == decodes[1] == decodes[2]
    assert trainer.model.training  # the training mode is restored


def test_frac_reward_zero_std_counts_groups_without_signal():
    from balcaprl.trainer.grpo import _fraction_in_constant_groups

    nan = float("nan")
    rewards = torch.tensor(
        [
            [0.3, 1.0], [0.3, 1.0], [0.3, 1.0],  # group 1: every reward constant → no signal
            [0.3, 0.0], [0.3, 1.0], [0.3, 1.0],  # group 2: the second reward varies
            [0.1, nan], [0.1, 2.0], [0.1, nan],  # group 3: one scored value of the second reward → no spread
        ]
    )  # fmt: skip
    assert _fraction_in_constant_groups(rewards, 3) == pytest.approx(2 / 3)


def test_c_gdpo_logs_the_per_group_frac_reward_zero_std(tiny_models, tmp_path):
    from balcaprl.trainer.grpo import _fraction_in_constant_groups

    trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [mentions_colour, linguistic], max_steps=1)
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert log["frac_reward_zero_std"] == pytest.approx(_fraction_in_constant_groups(trainer.reward_matrices[0], 4))


def test_rows_without_references_do_not_stop_a_run_without_masking(tiny_models, tmp_path):
    from peft import LoraConfig

    from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
    from balcaprl.models.processors import load_processor
    from tests.helpers import RecordingTrainer, make_config, toy_dataset

    dataset = toy_dataset().map(lambda row: {"references": []})  # e.g. unlabelled images; the reward needs none
    path = str(tiny_models["qwen2_5_vl"])
    trainer = RecordingTrainer(
        model=path,
        reward_funcs=[linguistic],
        args=make_config(tmp_path, length_mask_rewards=[], max_steps=1),
        train_dataset=dataset,
        processing_class=load_processor(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LORA_TARGETS),
    )
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert "length/ratio_mean" not in log  # a metric only: skipped, the run goes on


def test_the_trainer_logs_monitors_of_hand_made_captions(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, REWARDS)
    captions = [
        "A red circle is on the left. A blue square is on the right. A red circle is on the left.",  # repeats
        "A red circle is on the left. A red circle is on the right.",  # no repeated sentence; 3 of 11 4-grams are
        "a red circle and a red circle and a red circle and a red circle",  # one sentence: a repeated 4-gram
        "A blue square.",
    ]
    references = ["a b c d", ["a b", "a b c d e f"], "a b c d", ["a b c d"]]  # mean lengths 4, 4, 4, 4 words
    trainer._log_monitors("train", captions, references, with_references=True)
    logged = {name: trainer._metrics["train"][name][-1] for name in MONITOR_NAMES}
    assert logged["monitor/repeated_sentence"] == 0.25  # only the first caption
    assert logged["monitor/repeated_4gram"] == pytest.approx((4 / 18 + 3 / 11 + 8 / 12 + 0) / 4)
    assert logged["monitor/length_words"] == (21 + 14 + 15 + 3) / 4
    assert logged["monitor/length_drift"] == (21 + 14 + 15 + 3) / 4 - 4
    words = [word for caption in captions for word in caption.lower().replace(".", "").split()]
    assert logged["monitor/distinct_1"] == len(set(words)) / len(words)
    # without references the drift is not logged (a run whose rows have none)
    trainer._metrics["train"].clear()
    trainer._log_monitors("train", captions[:1], [None], with_references=False)
    assert "monitor/length_drift" not in trainer._metrics["train"]
    assert trainer._metrics["train"]["monitor/repeated_sentence"] == [1.0]
