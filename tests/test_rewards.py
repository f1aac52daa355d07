"""BalCapRL judge rewards against real loopback servers, the reward registry, and a training run with judges."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from PIL import Image

from balcaprl.judge.client import JudgeClient
from balcaprl.rewards import get_reward_funcs, get_reward_weights
from balcaprl.rewards.judged import PROMPT_SETS, LinguisticReward, PrecisionReward, RecallReward, load_prompt
from tests.judge_servers import FaultInjectingServer, ScriptedJudge, body_bytes, photo
from tests.loopback_server import prompt_text


def run(coroutine):
    return asyncio.run(coroutine)


def judge_for(server, **kwargs) -> JudgeClient:
    return JudgeClient(server.base_url, "scripted", backoff_base_s=0.001, backoff_max_s=0.01, max_retries=1, **kwargs)


def image():
    return Image.new("RGB", (32, 32), (200, 30, 30))


class TestPrecision:
    def test_exact_score_image_sent_and_subscores_logged(self, scripted_server):
        reward = PrecisionReward(judge_for(scripted_server))
        extras = {}
        captions = ["a red circle and a blue square and a warm atmosphere", "a red circle", ""]
        scores = run(
            reward(
                prompts=[None] * 3,
                completions=[[{"role": "assistant", "content": c}] for c in captions],
                image=[image()] * 3,
                log_extra=lambda column, values: extras.setdefault(column, values),
            )
        )
        assert scores == [pytest.approx(1 / 3), 1.0, 0.0]
        assert extras == {"precision/assertions": [3, 1, 0], "precision/passing": [1, 1, 0]}
        assert scripted_server.judge.calls["precision"] == 2  # the empty caption costs no call
        assert scripted_server.fault_counts["bad_image"] == 0  # the server validated the OpenAI image parts
        content = scripted_server.bodies[0]["messages"][-1]["content"]
        assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png")

    def test_missing_image_column_is_named(self, scripted_server):
        reward = PrecisionReward(judge_for(scripted_server))
        with pytest.raises(ValueError, match="'image'.*references"):
            run(reward(prompts=[None], completions=["a red circle"], references=[["x"]]))

    def test_identical_captions_of_a_group_share_one_call(self, scripted_server):
        """E.g. SCST's greedy caption, repeated over its group: one judge call, whatever G is."""
        judge = judge_for(scripted_server)
        scores = run(PrecisionReward(judge)(prompts=[None] * 8, completions=["a red circle"] * 8, image=[image()] * 8))
        assert scores == [1.0] * 8
        assert scripted_server.judge.calls["precision"] == 1 and judge.calls == 1 and judge.cache_hits == 0

    def test_g8_captions_of_a_12_megapixel_image_cost_one_encoding(self, scripted_server, tmp_path):
        big = photo(4000, 3000)
        path = tmp_path / "big.jpg"
        big.save(path, quality=95)
        captions = [f"a red circle number {index}" for index in range(8)]

        def timed(count: int, images: list) -> tuple[float, JudgeClient]:
            judge = judge_for(scripted_server)  # a fresh client: nothing encoded yet
            started = time.perf_counter()
            scores = run(PrecisionReward(judge)(prompts=[None] * count, completions=captions[:count], image=images))
            assert scores == [1.0] * count
            return time.perf_counter() - started, judge

        one = min(timed(1, [big])[0] for _ in range(2))
        eight, judge = min((timed(8, [big] * 8) for _ in range(2)), key=lambda result: result[0])
        assert judge.images.encodings == 1
        assert eight <= 2 * one, f"8 captions took {eight:.2f} s, 1 caption {one:.2f} s"  # was 16.5 s vs 2.1 s

        # The data path decodes the image once per row: eight decoded copies, still one encoding.
        copies = []
        for _ in range(8):
            with Image.open(path) as decoded:
                decoded.load()
                copies.append(decoded)
        _, judge = timed(8, copies)
        assert judge.images.encodings == 1
        sizes = [body_bytes(body) for body in scripted_server.bodies]
        assert max(sizes) <= 1_000_000, sizes
        assert scripted_server.fault_counts["bad_image"] == 0

    def test_failed_judge_call_is_none_and_counted(self, scripted_server):
        judge = judge_for(scripted_server)
        scores = run(
            PrecisionReward(judge)(prompts=[None] * 2, completions=["a red circle", "FAIL"], image=[image()] * 2)
        )
        assert scores == [1.0, None]
        assert judge.failures == 1


class TestRecall:
    def test_exact_recall_and_reference_decomposed_once(self, scripted_server):
        judge = judge_for(scripted_server)
        reward = RecallReward(judge)
        references = [["a red circle and a gray background"]] * 4 + [["one blue square and a small dot"]] * 4
        captions = ["a red circle", "circle on background", "nothing", ""] + ["blue square", "dot", "square dot", "x"]
        extras = {}
        first = run(
            reward(
                prompts=[None] * 8,
                completions=captions,
                references=references,
                log_extra=lambda c, v: extras.setdefault(c, v),
            )
        )
        assert first == [0.5, 1.0, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0]
        assert extras["recall/units"] == [2] * 8 and extras["recall/covered"] == [1, 2, 0, 0, 1, 1, 2, 0]
        calls = scripted_server.judge.calls
        decompositions = {key: n for key, n in calls.items() if key.startswith("decompose:")}
        assert list(decompositions.values()) == [1, 1]  # once per distinct reference, not once per rollout
        assert calls["recall_verify"] == 7  # the empty caption covers nothing without a call

        # The same G x N captions again: zero new decomposition calls.
        second = run(reward(prompts=[None] * 8, completions=captions, references=references))
        assert second == first
        assert {key: n for key, n in calls.items() if key.startswith("decompose:")} == decompositions

    def test_one_request_per_caption_for_all_references_with_the_meaning_of_v1(self, scripted_server):
        """COCO-like rows: 5 references each. v2 asks captions + distinct references requests, v1 captions x 5 more."""
        colours = ["red", "blue", "green", "gray"]
        references = []
        for row in range(2):
            row_references = [
                f"a {colours[(row + k) % 4]} circle and a {colours[k % 4]} square and one dot number{row}{k}"
                for k in range(5)
            ]
            references += [row_references] * 4
        captions = ["a red circle", "blue square dot", "circle square", "", "green gray", "a red circle", "x", "dot"]
        scores = {}
        for version in ("v1", "v2"):
            scripted_server.judge.calls.clear()
            before = scripted_server.request_count
            judge = judge_for(scripted_server)
            scores[version] = run(
                RecallReward(judge, prompt_version=version)(
                    prompts=[None] * 8, completions=captions, references=references
                )
            )
            requests = scripted_server.request_count - before
            decompositions = sum(n for key, n in scripted_server.judge.calls.items() if key.startswith("decompose:"))
            assert decompositions == 10  # the distinct references, once each
            non_empty = 7  # the empty caption costs no call, identical captions of a row share one
            verifications = non_empty if version == "v2" else non_empty * 5
            assert scripted_server.judge.calls["recall_verify"] == verifications, version
            assert requests == decompositions + verifications
        assert requests <= len(captions) + 10  # captions + distinct references
        assert scores["v1"] == scores["v2"]
        assert scores["v2"][0] > 0 and scores["v2"][3] == 0.0
        prompt = scripted_server.bodies[-1]["messages"][0]["content"]
        assert "From reference 1:\n1. " in prompt and "From reference 5:" in prompt and "exactly 15 booleans" in prompt

    def test_several_references_average(self, scripted_server):
        reward = RecallReward(judge_for(scripted_server))
        scores = run(reward(prompts=[None], completions=["red circle"], references=[["a red circle", "a blue dot"]]))
        assert scores == [0.5]

    def test_failed_decomposition_makes_the_rows_unscorable(self, scripted_server):
        judge = judge_for(scripted_server)
        reward = RecallReward(judge)
        scores = run(
            reward(prompts=[None] * 3, completions=["a", "b", "red"], references=[["FAIL unit"]] * 2 + [["a red"]])
        )
        assert scores == [None, None, 1.0]
        assert judge.failures == 1  # the failing reference was asked once for the batch, not once per rollout
        assert "FAIL unit" not in reward.units_by_reference


class TestLinguistic:
    def test_exact_rescaled_mean(self, scripted_server):
        reward = LinguisticReward(judge_for(scripted_server))
        extras = {}
        scores = run(
            reward(
                prompts=[None] * 3,
                completions=["a red circle", "the the red red", ""],
                log_extra=lambda c, v: extras.setdefault(c, v),
            )
        )
        assert scores == [pytest.approx((13 / 3 - 1) / 4), pytest.approx((3 - 1) / 4), 0.0]
        assert extras["linguistic/fluency"] == [5, 1, 1]

    def test_thirty_percent_faults_only_permanent_failures_are_none(self):
        judge = ScriptedJudge()
        with FaultInjectingServer(
            judge, fault_rate=0.3, seed=3, hang_s=3.0, max_consecutive_faults=3,
            fails_permanently=lambda m: "FAIL" in prompt_text(m),
        ) as server:  # fmt: skip
            client = JudgeClient(
                server.base_url, "scripted", timeout=1.0, max_retries=4, max_concurrency=16,
                backoff_base_s=0.001, backoff_max_s=0.01,
            )  # fmt: skip
            captions = [f"caption number {i}" if i % 20 else f"FAIL {i}" for i in range(200)]
            scores = run(LinguisticReward(client)(prompts=[None] * 200, completions=captions))
        assert [i for i, s in enumerate(scores) if s is None] == list(range(0, 200, 20))
        assert all(s == pytest.approx((13 / 3 - 1) / 4) for s in scores if s is not None)
        assert client.failures == 10 and client.retries > 0


def test_prompts_ship_with_the_package():
    for version, files in PROMPT_SETS.items():
        for name, file_version in files.items():
            assert "JSON" in load_prompt(name, file_version), (version, name)
    assert load_prompt("recall_verify", "v1") != load_prompt("recall_verify", "v2")  # old versions stay
    with pytest.raises(FileNotFoundError, match="v9"):
        load_prompt("precision", "v9")
    with pytest.raises(ValueError, match="prompt sets are"):
        RecallReward(JudgeClient("http://127.0.0.1:9/v1", "m"), prompt_version="v9")


class TestRegistry:
    JUDGE = {"judge_base_url": "http://127.0.0.1:9/v1", "judge_model": "judge"}

    def test_builtins_share_one_judge_client(self):
        funcs = get_reward_funcs(["precision", "recall", "linguistic"], **self.JUDGE)
        assert [f.__name__ for f in funcs] == ["precision", "recall", "linguistic"]
        assert funcs[0].judge is funcs[1].judge is funcs[2].judge

    def test_per_reward_judge_override(self):
        funcs = get_reward_funcs([{"name": "precision", "judge_model": "vision-judge"}, "linguistic"], **self.JUDGE)
        assert funcs[0].judge.model == "vision-judge" and funcs[1].judge.model == "judge"

    def test_dotted_path_and_factory_with_kwargs_and_weights(self):
        specs = [
            "tests.helpers:mentions_colour",
            {"name": "tests.test_rewards:make_brevity", "max_words": 3, "weight": 0.5},
            {"name": "length_penalty", "scale": 2.0, "weight": 2},
        ]
        funcs = get_reward_funcs(specs)
        assert [f.__name__ for f in funcs] == ["mentions_colour", "brevity", "length_penalty"]
        assert funcs[1](prompts=None, completions=["a b", "a b c d e f"]) == [1.0, 0.5]
        assert funcs[2](prompts=None, completions=["a b c d"], references=[["w w"]]) == [-2.0]
        assert get_reward_weights(specs) == [1.0, 0.5, 2.0]

    def test_unknown_name_lists_known_ones(self):
        with pytest.raises(ValueError, match=r"Unknown reward 'bleu'.*\['cider_d', 'length_penalty'"):
            get_reward_funcs(["bleu"])

    def test_bad_import_and_bad_kwargs(self):
        with pytest.raises(ValueError, match="cannot import 'no_such_pkg.rewards' for 'no_such_pkg.rewards:fn'"):
            get_reward_funcs(["no_such_pkg.rewards:fn"])
        with pytest.raises(ValueError, match="module 'balcaprl.rewards.cider' has no 'nope'"):
            get_reward_funcs(["balcaprl.rewards.cider:nope"])
        with pytest.raises(ValueError, match="'linguistic'.*bad keyword"):
            get_reward_funcs([{"name": "linguistic", "colour": "red"}], **self.JUDGE)

    def test_judge_rewards_need_judge_keys(self):
        with pytest.raises(ValueError, match="judge_base_url"):
            get_reward_funcs(["recall"])

    def test_cider_d_needs_the_training_references(self):
        with pytest.raises(ValueError, match="corpus_references"):
            get_reward_funcs(["cider_d"])
        (cider,) = get_reward_funcs(["cider_d"], corpus_references=[["a red circle"], ["a blue square"]])
        assert cider.__name__ == "cider_d"


def make_brevity(max_words: int):
    """A user's reward factory, referenced by dotted path with keyword arguments."""

    def brevity(prompts, completions, **kwargs):
        return [min(1.0, max_words / max(1, len(str(c).split()))) for c in completions]

    return brevity


# ------------------------------------------------------------------------------------------------ real llama.cpp


class TestAgainstLlamaCpp:
    def test_recall_and_linguistic_end_to_end(self, llama_cpp_base_url, tmp_path):
        recall, linguistic = get_reward_funcs(
            ["recall", "linguistic"], judge_base_url=llama_cpp_base_url, judge_model="smollm2",
            judge_cache_dir=str(tmp_path / "cache"), judge_timeout=60, judge_max_retries=1,
        )  # fmt: skip
        judge = recall.judge
        captions = ["A red circle on a gray background.", "Two dogs play in a park."]
        references = [["A red circle in the middle of a gray image."]] * 2
        recall_scores = run(recall(prompts=[None] * 2, completions=captions, references=references))
        linguistic_scores = run(linguistic(prompts=[None] * 2, completions=captions))
        # SmolLM2-135M is no judge of quality; what is checked is the protocol: schema-constrained answers parse.
        for score in recall_scores + linguistic_scores:
            assert score is None or (0.0 <= score <= 1.0 and math.isfinite(score))
        assert sum(score is not None for score in linguistic_scores) >= 1
        metrics = judge.pop_metrics()
        assert metrics["judge/requests"] >= 3
        assert metrics["judge/failures"] >= sum(score is None for score in linguistic_scores)
        # Cached on disk: the same scoring again asks the server nothing.
        run(linguistic(prompts=[None] * 2, completions=captions))
        again = judge.pop_metrics()
        assert again["judge/requests"] == 0 and again["judge/cache_hits"] >= sum(
            s is not None for s in linguistic_scores
        )


def test_balcaprl_training_run_with_judges(tiny_models, tmp_path, llama_cpp_base_url, scripted_server):
    """precision on the (vision-checking) loopback judge, recall + linguistic on real llama.cpp; c-GDPO + mask."""
    from tests.helpers import make_trainer

    specs = [
        {"name": "precision", "judge_base_url": scripted_server.base_url, "judge_model": "scripted"},
        "recall",
        "linguistic",
    ]
    rewards = get_reward_funcs(
        specs, judge_base_url=llama_cpp_base_url, judge_model="smollm2", judge_timeout=60, judge_max_retries=1
    )
    trainer = make_trainer(
        tiny_models["qwen2_5_vl"], tmp_path, rewards, max_steps=2, per_device_train_batch_size=4,
        max_completion_length=6,
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        for name in ("judge/requests", "judge/retries", "judge/failures", "judge/cache_hits"):
            assert name in log and math.isfinite(log[name])
        assert log["judge/requests"] > 0
        assert "rewards/precision/mean" in log and "length/masked_frac" in log
    assert scripted_server.judge.calls["precision"] > 0
    assert "precision/assertions" in trainer._logs["extra"]


def test_training_logs_the_judge_tokens_and_their_cost(tiny_models, tmp_path, scripted_server):
    """Every judge reward on the loopback judge, priced: each step logs the tokens of its judge answers (the server's
    usage) and their cost; over the run they add up to what the server answered."""
    from tests.helpers import make_trainer

    price = [0.5, 2.0]
    rewards = get_reward_funcs(
        ["precision", "recall", "linguistic"], judge_base_url=scripted_server.base_url, judge_model="scripted",
        judge_max_retries=1, judge_backoff_base_s=0.001, judge_backoff_max_s=0.01,
        judge_price_per_million_tokens=price,
    )  # fmt: skip
    assert rewards[0].judge.price_per_million_tokens == (0.5, 2.0)
    trainer = make_trainer(
        tiny_models["qwen2_5_vl"], tmp_path, rewards, max_steps=2, per_device_train_batch_size=4,
        max_completion_length=6,
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert log["judge/prompt_tokens"] > 0 and log["judge/completion_tokens"] > 0
        expected = (log["judge/prompt_tokens"] * price[0] + log["judge/completion_tokens"] * price[1]) / 1e6
        assert log["judge/cost"] == pytest.approx(expected, rel=1e-12)
    assert sum(log["judge/prompt_tokens"] for log in logs) == scripted_server.prompt_tokens
    assert sum(log["judge/completion_tokens"] for log in logs) == scripted_server.completion_tokens
    assert sum(log["judge/requests"] for log in logs) == scripted_server.request_count
