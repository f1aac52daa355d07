"""Throughput of :class:`balcaprl.judge.JudgeClient` against a loopback server with a fixed latency.

With ``concurrency`` requests in flight and a server that takes ``latency_s`` per request, no client can do better
than ``concurrency / latency_s`` requests per second. The benchmark reports the fraction of that bound the client
reaches; the client's own overhead (HTTP, JSON, schema validation, counters) is what keeps it below 1. Goal: ≥ 0.8.

Run: ``python -m benchmarks.judge [--latency 0.05] [--concurrency 16] [--requests 320]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from balcaprl.judge import JudgeClient
from tests.loopback_server import loopback_server_process

SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}


def judge_throughput(latency_s: float = 0.05, concurrency: int = 16, num_requests: int = 320) -> dict[str, float]:
    """Measure requests/s of ``num_requests`` distinct judge calls at ``concurrency`` against ``latency_s`` latency.

    Returns the elapsed time, the achieved and the ideal (``concurrency / latency_s``) requests per second, their
    ratio ``fraction_of_bound``, and the client's request and failure counts (failures must be 0).
    """
    with loopback_server_process(latency_s=latency_s) as base_url:
        client = JudgeClient(
            base_url, "loopback", max_concurrency=concurrency, timeout=max(10.0, 20 * latency_s), max_retries=0
        )

        async def batch(prefix: str, size: int) -> None:
            messages = ([{"role": "user", "content": f"Rate {prefix} caption {index}."}] for index in range(size))
            await asyncio.gather(*(client.complete_json(message, SCHEMA) for message in messages))

        async def run_batch() -> float:
            try:
                await batch("warm-up", concurrency)  # opens the HTTP client and its connections, untimed
                start = time.perf_counter()
                await batch("timed", num_requests)
                return time.perf_counter() - start
            finally:
                await client.aclose()

        elapsed = asyncio.run(run_batch())
    achieved = num_requests / elapsed
    bound = concurrency / latency_s
    return {
        "latency_s": latency_s,
        "concurrency": concurrency,
        "num_requests": num_requests,
        "elapsed_s": elapsed,
        "requests_per_s": achieved,
        "bound_requests_per_s": bound,
        "fraction_of_bound": achieved / bound,
        "requests": client.requests - concurrency,
        "failures": client.failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="judge_max_concurrency")
    parser.add_argument("--requests", type=int, default=320, help="number of distinct requests")
    arguments = parser.parse_args()
    print(json.dumps(judge_throughput(arguments.latency, arguments.concurrency, arguments.requests), indent=2))


if __name__ == "__main__":
    main()
