"""Chat messages for a judge: image parts, the JSON-schema instruction, strict JSON extraction, and the canonical
form of a request that the answer cache keys on.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Any

from balcaprl.judge.config import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_PIXELS
from balcaprl.judge.images import ImageEncoder, ImageLike

SCHEMA_INSTRUCTION = (
    "Answer with one JSON object and nothing else. It must validate against this JSON schema:\n{schema}"
)


Message = dict[str, Any]

_DEFAULT_ENCODERS: dict[tuple[int | None, int], ImageEncoder] = {}


_DEFAULT_ENCODERS_LOCK = threading.Lock()


def _shared_encoder(max_pixels: int | None, jpeg_quality: int) -> ImageEncoder:
    with _DEFAULT_ENCODERS_LOCK:
        encoder = _DEFAULT_ENCODERS.get((max_pixels, jpeg_quality))
        if encoder is None:
            encoder = _DEFAULT_ENCODERS[(max_pixels, jpeg_quality)] = ImageEncoder(max_pixels, jpeg_quality)
    return encoder


def image_to_data_url(
    image: ImageLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, jpeg_quality: int = DEFAULT_JPEG_QUALITY
) -> str:
    """A ``data:image/jpeg;base64,...`` (or ``image/png``) URL of ``image`` (a PIL image, a file path or bytes).

    Resized to ``max_pixels`` and encoded as `balcaprl.judge.images` describes, once per distinct image (a shared
    in-memory cache). A string that already is a ``data:image/...`` URL is returned unchanged.
    """
    if isinstance(image, str) and image.startswith("data:image/"):
        return image
    return _shared_encoder(max_pixels, jpeg_quality).encode(image).url


def image_message_part(
    image: ImageLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, jpeg_quality: int = DEFAULT_JPEG_QUALITY
) -> dict[str, Any]:
    """An OpenAI vision content part ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}``.

    `JudgeClient.image_part` is the same with the client's ``max_pixels`` / ``jpeg_quality``, off the event loop.
    """
    return {
        "type": "image_url",
        "image_url": {"url": image_to_data_url(image, max_pixels=max_pixels, jpeg_quality=jpeg_quality)},
    }


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")  # NaN / Infinity would turn into a NaN reward


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def extract_json_object(text: str | None) -> dict[str, Any] | None:
    """The first JSON object in ``text``, tolerating ```json fences and prose around it; None if there is none."""
    if not text:
        return None
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except ValueError:
            pass
        else:
            if isinstance(value, dict):
                return value
        start = text.find("{", start + 1)
    return None


def _with_schema_instruction(messages: Sequence[Message], schema: dict[str, Any]) -> list[Message]:
    """A copy of ``messages`` whose last user turn ends with the JSON-schema instruction (a new turn if none)."""
    instruction = SCHEMA_INSTRUCTION.format(schema=json.dumps(schema, sort_keys=True))
    messages = [dict(message) for message in messages]
    user_turns = [index for index, message in enumerate(messages) if message.get("role") == "user"]
    if not user_turns:
        return [*messages, {"role": "user", "content": instruction}]
    last = messages[user_turns[-1]]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = f"{content}\n\n{instruction}"
    elif isinstance(content, list):
        last["content"] = [*content, {"type": "text", "text": instruction}]
    else:
        last["content"] = instruction
    return messages


def _canonical_messages(messages: Sequence[Message]) -> list[Message]:
    """``messages`` with every data-URL image replaced by the sha256 of its URL (keys stay small and stable)."""
    canonical = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [_canonical_part(part) for part in content]
        canonical.append({**message, "content": content})
    return canonical


def _canonical_part(part: Any) -> Any:
    if not (isinstance(part, dict) and part.get("type") == "image_url"):
        return part
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if isinstance(url, str) and url.startswith("data:"):
        return {"type": "image_url", "image_sha256": hashlib.sha256(url.encode()).hexdigest()}
    return part
