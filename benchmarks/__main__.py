"""Benchmarks, printed as ratios measured in one run: ``python -m benchmarks [trainer] [cider] [judge]``.

``make bench`` runs them all:

- ``trainer``: step time of `BalCapGRPOTrainer` (c-GDPO + length mask) over TRL's `GRPOTrainer` (goal ≤ 1.02);
- ``cider``: speed of `balcaprl.rewards.CiderD` over pycocoevalcap's CIDEr-D on GRPO-shaped groups (goal ≥ 20×);
- ``judge``: judge-client throughput against a loopback server with 50 ms latency, as a fraction of the
  concurrency bound (goal ≥ 0.8); then the judge rewards on one GRPO step at real image sizes (8 prompts x G = 8,
  5 references, COCO-size and 12 MP images, 500 ms server latency, concurrency 64), before and after issue 11:
  client time, requests and bytes per step, with their ratios.
"""

from __future__ import annotations

import argparse
import time

BENCHMARKS = ["trainer", "cider", "judge"]


def _trainer(args) -> None:
    from benchmarks.trainer import bench_trainer

    result = bench_trainer(rounds=args.rounds, steps=args.steps)
    print(
        f"trainer step time, tiny Qwen2.5-VL, G=8 x 2 prompts, 16 new tokens, LoRA, {result['steps_each']} steps"
        " each, interleaved:\n"
        f"  TRL GRPOTrainer (normalize_then_sum)      median {result['trl_step_s'] * 1000:7.1f} ms\n"
        f"  BalCapGRPOTrainer (c_gdpo + length mask)  median {result['balcap_step_s'] * 1000:7.1f} ms\n"
        f"  ratio BalCap / TRL = {result['ratio']:.3f}   (goal <= 1.02)"
    )


def _cider(args) -> None:
    from benchmarks.cider import cider_speedup

    result = cider_speedup()
    print(
        "CIDEr-D, 64 images x 8 candidates x 5 references, median of 5 interleaved runs:\n"
        f"  pycocoevalcap {result['pycocoevalcap_s'] * 1000:7.1f} ms,"
        f" balcaprl CiderD {result['ours_s'] * 1000:6.1f} ms (max |difference| {result['max_abs_diff']:.1e})\n"
        f"  speed-up = {result['speedup']:.1f}x   (goal >= 20x)"
    )


def _judge(args) -> None:
    from benchmarks.judge import judge_throughput

    result = judge_throughput()
    print(
        f"judge client, {result['num_requests']} requests, concurrency {result['concurrency']}, server latency"
        f" {result['latency_s'] * 1000:.0f} ms:\n"
        f"  {result['requests_per_s']:.0f} req/s of a {result['bound_requests_per_s']:.0f} req/s bound,"
        f" {result['failures']} failures\n"
        f"  fraction of the concurrency bound = {result['fraction_of_bound']:.3f}   (goal >= 0.8)\n"
    )
    from benchmarks.judge import format_judge_step, judge_step

    latency, concurrency = 0.5, 64
    print(format_judge_step(judge_step(latency, concurrency), latency, concurrency))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    # No `choices=` here: argparse (< 3.12) checks an empty `nargs="*"` list against them and rejects it.
    parser.add_argument("which", nargs="*", help=f"benchmarks to run, any of {BENCHMARKS} (default: all)")
    parser.add_argument("--rounds", type=int, default=6, help="trainer: interleaved rounds per trainer")
    parser.add_argument("--steps", type=int, default=20, help="trainer: timed steps per round")
    args = parser.parse_args(argv)
    args.which = args.which or list(BENCHMARKS)
    unknown = sorted(set(args.which) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    runners = {"trainer": _trainer, "cider": _cider, "judge": _judge}
    for name in args.which:
        started = time.perf_counter()
        runners[name](args)
        print(f"({name} took {time.perf_counter() - started:.0f} s)\n")


if __name__ == "__main__":
    main()
