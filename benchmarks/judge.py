"""The judge client against loopback servers with a fixed latency: throughput, and one GRPO step at real sizes.

`judge_throughput`: with ``concurrency`` requests in flight and a server that takes ``latency_s`` per request, no
client can do better than ``concurrency / latency_s`` requests per second. The benchmark reports the fraction of that
bound the client reaches; the client's own overhead (HTTP, JSON, schema validation, counters) is what keeps it below
1. Goal: ≥ 0.8.

`judge_step`: the three BalCapRL judge rewards on one GRPO step (8 prompts x G = 8 captions, 5 references per
image, COCO-size 640 x 480 and 12 MP 4000 x 3000 photo-like images), before and after issue 11, in one run:
client wall time, requests and bytes sent per step. "Before" is the v1 prompt set (one recall verification per
caption per reference) with the client's former image path (a full-resolution PNG encoded on the event loop for every
caption, `LegacyImageClient`); "after" is the current client and prompts. The server answers every prompt
schema-valid after ``latency_s`` from a process of its own (as a real judge, it takes no CPU from the client).

Run: ``python -m benchmarks.judge [--latency 0.05] [--concurrency 16] [--requests 320]`` (throughput) or
``python -m benchmarks.judge step`` (the GRPO step).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from balcaprl.judge.client import JudgeClient
from balcaprl.rewards.judged import LinguisticReward, PrecisionReward, RecallReward
from tests.judge_servers import photo
from tests.loopback_server import loopback_server_process, prompt_text

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


# ---------------------------------------------------------------------------------------------------- a GRPO step

IMAGE_SIZES = {"COCO 640x480": (640, 480), "12 MP 4000x3000": (4000, 3000)}


def step_responder(messages: list[dict[str, Any]]) -> str:
    """A schema-valid answer to every prompt the judge rewards send (imported by the server process)."""
    text = prompt_text(messages)
    if "atomic assertions" in text:
        assertion = {"text": "a thing", "verified": True, "pointable": True}
        return json.dumps({"assertions": [assertion] * 3})
    if "atomic units of information" in text:  # units of their own per reference, as a real judge's
        reference = re.search(r'"""(.*?)"""', text, flags=re.DOTALL).group(1)
        return json.dumps({"units": [f"{reference[:24]} (unit {index})" for index in range(4)]})
    if "numbered list of facts" in text:
        count = int(re.search(r"exactly (\d+) booleans", text).group(1))
        return json.dumps({"covered": [index % 2 == 0 for index in range(count)]})
    if "Rate the writing" in text:
        return json.dumps({"clarity": 4, "fluency": 5, "coherence": 4})
    raise ValueError(f"unexpected prompt {text[:80]!r}")


class _CountingClient(JudgeClient):
    """Counts calls per prompt and the largest image part sent (the benchmark's view; no other change)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.calls_by_prompt: Counter[str] = Counter()
        self.largest_image_url = 0

    async def complete_json(self, messages, schema, *, cache_key_extra: str = ""):
        self.calls_by_prompt[cache_key_extra.rsplit("_v", 1)[0]] += 1
        return await super().complete_json(messages, schema, cache_key_extra=cache_key_extra)

    async def image_part(self, image):
        part = await super().image_part(image)
        self.largest_image_url = max(self.largest_image_url, len(part["image_url"]["url"]))
        return part


class LegacyImageClient(_CountingClient):
    """The client's image path before issue 11: a full-resolution PNG, encoded on the event loop at every call."""

    async def image_part(self, image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        self.largest_image_url = max(self.largest_image_url, len(url))
        return {"type": "image_url", "image_url": {"url": url}}


def _step_rows(size: tuple[int, int], num_prompts: int, folder: Path) -> list[dict[str, Any]]:
    """One row per prompt: a photo-like JPEG (decoded as the data path decodes it) and 5 references."""
    rows = []
    for prompt in range(num_prompts):
        path = folder / f"{size[0]}x{size[1]}_{prompt}.jpg"
        if not path.exists():
            photo(*size, seed=prompt).save(path, quality=95)
        with Image.open(path) as image:
            image.load()
        references = [
            f"Reference {k} of image {prompt}: a person rides a red bicycle down a street." for k in range(5)
        ]
        rows.append({"image": image, "references": references})
    return rows


def _one_step(client: _CountingClient, prompt_version: str, rows: list[dict], num_generations: int) -> float:
    """Seconds the three rewards take (concurrently, as TRL runs async rewards) on one GRPO step of ``rows``."""
    images = [row["image"] for row in rows for _ in range(num_generations)]
    references = [row["references"] for row in rows for _ in range(num_generations)]
    captions = [f"Caption {index}: a person on a bike in a street." for index in range(len(images))]
    precision = PrecisionReward(client, prompt_version=prompt_version)
    recall = RecallReward(client, prompt_version=prompt_version)
    linguistic = LinguisticReward(client, prompt_version=prompt_version)

    async def step() -> None:
        try:
            if isinstance(client, LegacyImageClient):  # the former precision reward: one image part per caption
                scoring = [precision.score(caption, image) for caption, image in zip(captions, images)]
            else:
                scoring = [precision(prompts=None, completions=captions, image=images)]
            scoring += [
                recall(prompts=None, completions=captions, references=references),
                linguistic(prompts=None, completions=captions),
            ]
            await asyncio.gather(*scoring)
        finally:
            await client.aclose()

    started = time.perf_counter()
    asyncio.run(step())
    return time.perf_counter() - started


def judge_step(
    latency_s: float = 0.5,
    concurrency: int = 64,
    num_prompts: int = 8,
    num_generations: int = 8,
    legacy_prompts_at_12mp: int = 1,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """Per image size, "before" and "after" client time, requests and bytes of one GRPO step (see the docstring).

    The former client spends ~1-2 s of CPU per 12 MP caption, so at 12 MP "before" is measured on
    ``legacy_prompts_at_12mp`` prompts and scaled to ``num_prompts`` (its image work is serial on the event loop, so
    linear). Requests and bytes of "before" are scaled the same way.
    """
    results = []
    with loopback_server_process(latency_s=latency_s, responder="benchmarks.judge:step_responder") as base_url:
        with tempfile.TemporaryDirectory() as folder:
            for label, size in (sizes or IMAGE_SIZES).items():
                for phase, client_class, version in (
                    ("before", LegacyImageClient, "v1"),
                    ("after", _CountingClient, "v2"),
                ):
                    prompts = num_prompts
                    if phase == "before" and size[0] * size[1] > 4_000_000:
                        prompts = min(num_prompts, legacy_prompts_at_12mp)
                    rows = _step_rows(size, prompts, Path(folder))
                    client = client_class(base_url, "bench", max_concurrency=concurrency, timeout=600, max_retries=0)
                    seconds = _one_step(client, version, rows, num_generations)
                    scale = num_prompts / prompts
                    results.append(
                        {
                            "images": label,
                            "phase": phase,
                            "measured_prompts": prompts,
                            "seconds": seconds * scale,
                            "requests": client.requests * scale,
                            "bytes_sent": client.bytes_sent * scale,
                            "requests_by_prompt": {k: v * scale for k, v in sorted(client.calls_by_prompt.items())},
                            "largest_image_url_bytes": client.largest_image_url,
                            "failures": client.failures,
                            "captions": num_prompts * num_generations,
                            "distinct_references": num_prompts * 5,
                            "image_encodings": client.images.encodings
                            if phase == "after"
                            else len(rows) * num_generations,
                        }
                    )
    return results


def format_judge_step(results: list[dict[str, Any]], latency_s: float, concurrency: int) -> str:
    """The table `python -m benchmarks judge` prints, with after/before ratios."""
    lines = [
        f"judge rewards (precision + recall + linguistic) on one GRPO step, 8 prompts x G=8, 5 references, server "
        f"latency {latency_s * 1000:.0f} ms, concurrency {concurrency}:",
        f"  {'images':16} {'':6} {'client s':>9} {'requests':>9} {'MB sent':>9} {'largest image':>14}  "
        "requests by prompt",
    ]
    by_key = {(r["images"], r["phase"]): r for r in results}
    for label in dict.fromkeys(r["images"] for r in results):
        for phase in ("before", "after"):
            r = by_key[(label, phase)]
            note = (
                f" (scaled from {r['measured_prompts']} prompt)" if r["measured_prompts"] * 8 != r["captions"] else ""
            )
            note += f" FAILURES {r['failures']}" if r["failures"] else ""
            lines.append(
                f"  {label:16} {phase:6} {r['seconds']:9.2f} {r['requests']:9.0f} {r['bytes_sent'] / 1e6:9.2f} "
                f"{r['largest_image_url_bytes'] / 1e6:11.2f} MB  "
                + ", ".join(f"{k} {v:.0f}" for k, v in r["requests_by_prompt"].items())
                + note
            )
        before, after = by_key[(label, "before")], by_key[(label, "after")]
        recall_requests = sum(v for k, v in after["requests_by_prompt"].items() if k.startswith("recall"))
        lines.append(
            f"  {label:16} after/before: time {after['seconds'] / before['seconds']:.3f}, requests "
            f"{after['requests'] / before['requests']:.3f}, bytes {after['bytes_sent'] / before['bytes_sent']:.4f}; "
            f"recall requests {recall_requests:.0f} <= captions + distinct references = {after['captions']} + "
            f"{after['distinct_references']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="throughput", help="throughput (default) or step")
    parser.add_argument("--latency", type=float, default=None, help="server latency per request, seconds")
    parser.add_argument("--concurrency", type=int, default=None, help="judge_max_concurrency")
    parser.add_argument("--requests", type=int, default=320, help="throughput: number of distinct requests")
    arguments = parser.parse_args()
    if arguments.which == "step":
        latency, concurrency = arguments.latency or 0.5, arguments.concurrency or 64
        print(format_judge_step(judge_step(latency, concurrency), latency, concurrency))
        return
    latency, concurrency = arguments.latency or 0.05, arguments.concurrency or 16
    print(json.dumps(judge_throughput(latency, concurrency, arguments.requests), indent=2))


if __name__ == "__main__":
    main()
