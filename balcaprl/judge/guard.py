"""Never train blind: a judge health check before training, and a judge failure budget during it.

When the judge is down every judge request fails after its retries, every judge reward is None, every advantage is
0, and a run would spend GPU-hours on steps that learn nothing. Two guards, both configured in `BalCapConfig`:

- `check_judges` (``judge_health_check``, on by default): before training — in `balcaprl.train` before any model
  weights load — one real request per judge reward, built like the reward's own (the precision check sends a
  dataset image), must come back as schema-valid JSON. Otherwise the run fails with one line naming the reward, the
  judge URL and the fault (connection refused, HTTP 401, an answer that does not match the schema, ...).
- `JudgeFailureBudget` (a `transformers.TrainerCallback`): after every optimizer step it reads the judge clients'
  cumulative ``calls`` and ``failures`` (not `JudgeClient.pop_metrics`, which the trainer consumes for the
  ``judge/*`` metrics), summed over processes. When more than ``judge_max_failure_rate`` of the judge calls of the
  last ``judge_failure_window`` steps that called the judge failed, it saves a checkpoint, stops training and
  raises `JudgeUnavailableError` (the message names the judge, the rate, the step and the checkpoint). Re-running the
  same command resumes from that checkpoint once the judge is back.

  Why stop rather than wait: a stopped run holds no GPUs while the judge is repaired, resumes for free, and the
  client's retries (backoff up to ``judge_backoff_max_s``) already ride out blips inside a step. Where a short outage
  is expected (a judge server restarting), ``judge_outage_wait_seconds`` > 0 first waits, bounded, probing the judge
  with the health-check requests; if it answers, the window restarts and training goes on, else the run stops as
  above. The steps already scored while the judge was down (at most ``judge_failure_window``) are not repeated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class JudgeUnavailableError(RuntimeError):
    """The judge did not answer: at the health check before training, or too often during it."""


def judge_rewards(reward_funcs: Sequence[Any]) -> list[Any]:
    """The reward functions that call a judge and can check it (they have ``judge`` and ``health_check``)."""
    return [fn for fn in reward_funcs if hasattr(fn, "health_check") and hasattr(fn, "judge")]


def judge_clients(reward_funcs: Sequence[Any]) -> list[Any]:
    """The distinct judge clients (with cumulative ``calls`` / ``failures`` counters) of ``reward_funcs``."""
    clients = (getattr(fn, "judge", None) for fn in reward_funcs)
    return list({id(c): c for c in clients if hasattr(c, "calls") and hasattr(c, "failures")}.values())


def _describe(reward: Any) -> str:
    judge = reward.judge
    return f"{getattr(reward, '__name__', type(reward).__name__)!r} judge at {judge.base_url} (model {judge.model!r})"


def judge_faults(reward_funcs: Sequence[Any], row: Mapping[str, Any]) -> list[str]:
    """Run every judge reward's health check on ``row`` at once; the faults, each naming reward, URL and model."""
    return [fault for _, fault in judge_faults_by_reward(reward_funcs, row)]


def judge_faults_by_reward(reward_funcs: Sequence[Any], row: Mapping[str, Any]) -> list[tuple[Any, str]]:
    """`judge_faults` with the reward each fault belongs to: ``(reward, fault)`` for each failing judge reward (for
    callers that tell the faults apart, e.g. an image request failing where the text ones pass)."""
    rewards = judge_rewards(reward_funcs)
    if not rewards:
        return []

    async def run() -> list[Any]:
        try:
            return await asyncio.gather(*(reward.health_check(row) for reward in rewards), return_exceptions=True)
        finally:
            for client in judge_clients(rewards):
                await client.aclose()  # this event loop ends here; its HTTP client must not outlive it

    faults = []
    for reward, outcome in zip(rewards, asyncio.run(run())):
        if isinstance(outcome, BaseException):
            outcome = f"{type(outcome).__name__}: {' '.join(str(outcome).split())}"
        if outcome is not None:
            faults.append((reward, f"{_describe(reward)}: {outcome}"))
    return faults


def check_judges(reward_funcs: Sequence[Any], row: Mapping[str, Any]) -> None:
    """One real request per judge reward of ``reward_funcs`` (built from the dataset ``row``), before training.

    Raises `JudgeUnavailableError` with a one-line message naming each failing reward, its judge URL and the fault.
    Rewards without a judge are not checked. The requests bypass the answer cache (a cached answer proves nothing).
    """
    faults = judge_faults(reward_funcs, row)
    if faults:
        raise JudgeUnavailableError(
            f"judge health check failed before training: {'; '.join(faults)}. Start the judge server or fix "
            "judge_base_url / judge_model (set judge_health_check: false to skip this check)."
        )
    names = [getattr(fn, "__name__", "?") for fn in judge_rewards(reward_funcs)]
    if names:
        logger.info("Judge health check passed for %s.", names)


def _summed_over_processes(values: list[float], device: Any) -> list[float]:
    """``values`` summed over the processes of a distributed run (every process must call this at the same step)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class JudgeFailureBudget(TrainerCallback):
    """Saves a checkpoint and stops training when the judge fails too often (see the module docstring).

    Args:
        reward_funcs: the run's reward functions; their judge clients are watched.
        max_failure_rate: stop when failed / all judge calls over the window exceeds this (1.0 never stops).
        window: number of the most recent steps that called the judge over which the rate is taken; the budget is
            checked once the window is full.
        outage_wait_seconds: > 0: before stopping, wait up to this long for the judge to pass the health check.
        probe_row: the dataset row the health-check requests are built from (needed when waiting).
        probe_interval_seconds: pause between two health checks while waiting.

    After stopping, ``error`` holds the message, and `JudgeUnavailableError` is raised at the end of training, after
    the checkpoint has been saved.
    """

    def __init__(
        self,
        reward_funcs: Sequence[Any],
        *,
        max_failure_rate: float = 0.5,
        window: int = 3,
        outage_wait_seconds: float = 0.0,
        probe_row: Mapping[str, Any] | None = None,
        probe_interval_seconds: float = 10.0,
    ):
        if not 0.0 <= max_failure_rate <= 1.0 or window < 1 or outage_wait_seconds < 0:
            raise ValueError(
                "judge_max_failure_rate must be in [0, 1], judge_failure_window >= 1 and judge_outage_wait_seconds "
                f">= 0; got {max_failure_rate}, {window}, {outage_wait_seconds}."
            )
        if outage_wait_seconds > 0 and probe_row is None:
            raise ValueError(
                "Waiting for the judge (judge_outage_wait_seconds > 0) needs a probe_row to check it with."
            )
        self.rewards = judge_rewards(reward_funcs)
        self.clients = judge_clients(reward_funcs)
        self.max_failure_rate = max_failure_rate
        self.window = window
        self.outage_wait_seconds = outage_wait_seconds
        self.probe_row = probe_row
        self.probe_interval_seconds = probe_interval_seconds
        self.history: deque[tuple[float, float]] = deque(maxlen=window)
        self.error: str | None = None
        self.outages_survived = 0
        self._last = (0, 0)

    def _totals(self) -> tuple[int, int]:
        return sum(c.calls for c in self.clients), sum(c.failures for c in self.clients)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._totals()  # the health check's requests, or a previous train() call, are not this run's
        self.history.clear()
        self.error = None

    def on_step_end(self, args, state, control, **kwargs):
        calls, failures = self._totals()
        step_calls, step_failures = _summed_over_processes(
            [calls - self._last[0], failures - self._last[1]], args.device
        )
        self._last = (calls, failures)
        if step_calls == 0:  # no judge call this step (TRL reuses one generation for several steps)
            return control
        self.history.append((step_calls, step_failures))
        if len(self.history) < self.window:
            return control
        window_calls = sum(c for c, _ in self.history)
        window_failures = sum(f for _, f in self.history)
        rate = window_failures / window_calls
        if rate <= self.max_failure_rate:
            return control
        summary = (
            f"{int(window_failures)} of {int(window_calls)} judge calls failed ({rate:.0%}) over the last "
            f"{len(self.history)} judged steps, above judge_max_failure_rate={self.max_failure_rate:g}, at step "
            f"{state.global_step}; judge at {', '.join(sorted({c.base_url for c in self.clients}))}"
        )
        if self.outage_wait_seconds > 0 and self._wait_for_judge(args, summary):
            # A fresh window; the probes' own calls are not training steps' (they do show in the next judge/* logs).
            self.history.clear()
            self._last = self._totals()
            self.outages_survived += 1
            return control
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.error = (
            f"{summary}. Saved {checkpoint} and stopped rather than train on unscored captions (zero advantages). "
            "Bring the judge back and run the same command again: it resumes from that checkpoint."
        )
        logger.error(self.error)
        control.should_log = True  # the failing steps' judge/* metrics reach the log history and the checkpoint
        control.should_save = True
        control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.error is not None:
            raise JudgeUnavailableError(self.error)

    def _wait_for_judge(self, args, summary: str) -> bool:
        """Probe the judge until it passes the health check (True) or ``outage_wait_seconds`` pass (False).

        Every process probes, and all take the same decision each round (faults and "time is up" are combined over
        processes), so that none leaves the loop while another still waits in a collective.
        """
        logger.warning("%s. Waiting up to %g s for the judge to answer.", summary, self.outage_wait_seconds)
        deadline = time.monotonic() + self.outage_wait_seconds
        while True:
            faults = judge_faults(self.rewards, self.probe_row)
            out_of_time = time.monotonic() + self.probe_interval_seconds > deadline
            still_failing, out_of_time = _summed_over_processes([float(bool(faults)), float(out_of_time)], args.device)
            if not still_failing:
                logger.warning("The judge answers again; training continues.")
                return True
            if out_of_time:
                return False
            time.sleep(self.probe_interval_seconds)


def judge_guard_callbacks(reward_funcs: Sequence[Any], training_args: Any, probe_row: Mapping[str, Any]) -> list:
    """The `JudgeFailureBudget` of a run configured by ``training_args`` (a `BalCapConfig`); none without judges."""
    if not judge_clients(reward_funcs) or training_args.judge_max_failure_rate >= 1.0:
        return []
    return [
        JudgeFailureBudget(
            reward_funcs,
            max_failure_rate=training_args.judge_max_failure_rate,
            window=training_args.judge_failure_window,
            outage_wait_seconds=training_args.judge_outage_wait_seconds,
            probe_row=probe_row,
            probe_interval_seconds=min(10.0, max(1.0, training_args.judge_outage_wait_seconds / 10)),
        )
    ]
