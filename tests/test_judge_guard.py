"""Never train blind: the judge health check before training, and the failure budget during it, against real
loopback judges that are down, answer garbage, or go down (and come back) in the middle of a real TRL run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from transformers import TrainerCallback

from balcaprl.judge.guard import JudgeFailureBudget, JudgeUnavailableError, check_judges, judge_guard_callbacks
from balcaprl.rewards import get_reward_funcs
from tests.helpers import make_config, make_trainer, mentions_colour, toy_dataset
from tests.judge_servers import FaultInjectingServer, ScriptedJudge, free_port

REPO = Path(__file__).resolve().parents[1]
FAST = {"judge_max_retries": 1, "judge_backoff_base_s": 0.001, "judge_backoff_max_s": 0.01, "judge_timeout": 10}
ROW = {
    "image": Image.new("RGB", (64, 48), (200, 30, 30)),
    "references": ["a red circle and a gray background"],
    "prompt": [{"role": "user", "content": "Describe this image in detail."}],
}


def judge_rewards(base_url: str, names=("precision", "recall", "linguistic")) -> list:
    return get_reward_funcs(list(names), judge_base_url=base_url, judge_model="scripted", **FAST)


class TestHealthCheck:
    def test_one_real_request_per_judge_reward_with_the_image_for_precision(self, scripted_server, tmp_path):
        rewards = get_reward_funcs(
            ["precision", "recall", "linguistic"], judge_base_url=scripted_server.base_url, judge_model="scripted",
            judge_cache_dir=str(tmp_path), **FAST,
        )  # fmt: skip
        for _ in range(2):  # the second time, a disk cache holds every answer: the check still asks the server
            check_judges([*rewards, mentions_colour], ROW)  # a reward without a judge is not checked
        assert scripted_server.request_count == 6
        calls = scripted_server.judge.calls
        assert calls["precision"] == calls["linguistic"] == 2 and calls[f"decompose:{ROW['references'][0]}"] == 2
        precision_bodies = [
            body for body in scripted_server.bodies if isinstance(body["messages"][0]["content"], list)
        ]
        assert len(precision_bodies) == 2 and precision_bodies[0]["messages"][0]["content"][0]["type"] == "image_url"
        assert scripted_server.fault_counts["bad_image"] == 0  # the server decoded the image it was sent

    def test_a_down_judge_fails_in_one_line_naming_the_url_and_the_fault(self):
        url = f"http://127.0.0.1:{free_port()}/v1"
        started = time.perf_counter()
        with pytest.raises(JudgeUnavailableError) as raised:
            check_judges(judge_rewards(url), ROW)
        message = str(raised.value)
        assert "\n" not in message and time.perf_counter() - started < 10
        assert message.startswith("judge health check failed before training: 'precision' judge at " + url)
        for name in ("'recall'", "'linguistic'", "connection error (ConnectError), after 2 attempts"):
            assert name in message
        assert "judge_health_check: false" in message

    def test_an_answer_off_the_schema_fails_the_check(self):
        with FaultInjectingServer(lambda messages: '{"verdict": "looks fine"}') as server:
            with pytest.raises(JudgeUnavailableError, match=r"'linguistic' judge .*does not match the schema"):
                check_judges(judge_rewards(server.base_url, ["linguistic"]), ROW)

    def test_judge_down_at_start_fails_before_loading_weights(self, tmp_path):
        """Through the console script, as a user runs it: a one-line error, no model touched, nothing written."""
        from balcaprl.world.splits import make_split, write_jsonl

        write_jsonl(make_split("train", 4, seed=0), tmp_path / "data")
        url = f"http://127.0.0.1:{free_port()}/v1"
        output_dir = tmp_path / "out"
        command = [
            str(Path(sys.executable).parent / "balcaprl"), "train", "recipes/demo/qwen2_5_vl_balcaprl.yaml",
            "--dataset", str(tmp_path / "data" / "data.jsonl"), "--output_dir", str(output_dir),
            "--model_name_or_path", "tiny:qwen2_5_vl",
            "--reward_funcs", "precision", "recall", "linguistic", "--length_mask_rewards", "linguistic",
            "--judge_base_url", url, "--judge_model", "judge", "--judge_max_retries", "1",
            "--judge_backoff_base_s", "0.01",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-3000:]
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line.startswith(
            f"balcaprl train: error: judge health check failed before training: 'precision' judge at {url}"
        )
        assert "connection error" in last_line and "Traceback" not in result.stderr
        assert "Loading weights" not in result.stderr and "Trainable parameters" not in result.stdout
        assert not output_dir.exists() or not any(output_dir.iterdir())


class JudgeGoesDown(TrainerCallback):
    """Stops the judge server at the end of ``at_step``; with ``back_after_s``, starts it again (same port) later."""

    def __init__(self, server: FaultInjectingServer, at_step: int, back_after_s: float | None = None):
        self.server, self.at_step, self.back_after_s = server, at_step, back_after_s

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            self.server.stop()
            if self.back_after_s is not None:
                threading.Timer(self.back_after_s, self.server.start).start()


def test_guard_callbacks_follow_the_config(tmp_path):
    rewards = judge_rewards("http://127.0.0.1:9/v1")
    (budget,) = judge_guard_callbacks(
        rewards, make_config(tmp_path, judge_max_failure_rate=0.25, judge_failure_window=4), ROW
    )
    assert (budget.max_failure_rate, budget.window, budget.outage_wait_seconds) == (0.25, 4, 0.0)
    assert len(budget.clients) == 1  # the three rewards share one client
    assert judge_guard_callbacks(rewards, make_config(tmp_path, judge_max_failure_rate=1.0), ROW) == []
    assert judge_guard_callbacks([mentions_colour], make_config(tmp_path), ROW) == []
    with pytest.raises(ValueError, match="judge_failure_window"):
        make_config(tmp_path, judge_failure_window=0)


def test_judge_down_mid_run_saves_a_checkpoint_and_stops(tiny_models, tmp_path):
    server = FaultInjectingServer(ScriptedJudge()).start()
    url = server.base_url
    try:
        rewards = judge_rewards(url, ["linguistic"])
        trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [mentions_colour, *rewards], max_steps=8)
        budget = JudgeFailureBudget(rewards, max_failure_rate=0.6, window=2)
        trainer.add_callback(JudgeGoesDown(server, at_step=2))
        trainer.add_callback(budget)
        with pytest.raises(JudgeUnavailableError) as raised:
            trainer.train()
    finally:
        server.stop()
    # Steps 3 and 4 scored nothing: the window [step 3, step 4] is 100 % failures > 60 %; [2, 3] was about 50 % (an
    # empty caption asks the judge nothing, so the exact share depends on the tiny model's captions: 8/16 or 8/15).
    message = str(raised.value)
    assert "at step 4" in message and url in message and "checkpoint-4" in message
    assert trainer.state.global_step == 4
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    logs = [log for log in trainer.state.log_history if "judge/failures" in log]
    assert [log["judge/failures"] > 0 for log in logs] == [False, False, True, True]


def test_judge_down_mid_run_with_a_bounded_wait_resumes_when_it_returns(tiny_models, tmp_path):
    server = FaultInjectingServer(ScriptedJudge()).start()
    try:
        rewards = judge_rewards(server.base_url, ["linguistic"])
        trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [mentions_colour, *rewards], max_steps=6)
        budget = JudgeFailureBudget(
            rewards, max_failure_rate=0.5, window=2, outage_wait_seconds=60, probe_row=toy_dataset()[0],
            probe_interval_seconds=0.2,
        )  # fmt: skip
        trainer.add_callback(JudgeGoesDown(server, at_step=2, back_after_s=2.0))
        trainer.add_callback(budget)
        started = time.perf_counter()
        trainer.train()
    finally:
        server.stop()
    assert trainer.state.global_step == 6 and budget.outages_survived == 1 and budget.error is None
    assert time.perf_counter() - started < 60
    failures = [log["judge/failures"] for log in trainer.state.log_history if "judge/failures" in log]
    assert failures[:2] == [0, 0] and failures[2] > 0 and failures[3] > 0 and failures[-1] == 0
