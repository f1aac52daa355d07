"""`to_sft`: loaded caption rows -> what TRL's `SFTTrainer` takes for vision-language models."""

from __future__ import annotations

import random
from collections.abc import Sequence

import datasets
from datasets import Dataset, Features, List

from balcaprl.data.constants import SFT_FORMS, SFT_REFERENCE_MODES
from balcaprl.data.formats import MESSAGES_FEATURE, PROMPT_FEATURE, STORED_IMAGE
from balcaprl.data.images import _RowDecoder


def to_sft(
    dataset: Dataset,
    *,
    references: str = "all",
    form: str = "messages",
    seed: int = 0,
) -> Dataset:
    """The SFT form of a dataset from `load_caption_dataset`, as TRL's `SFTTrainer` takes vision-language data.

    ``form="messages"`` (default): rows ``{messages, images}`` with
    ``messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
    {"role": "assistant", "content": [{"type": "text", "text": caption}]}]`` and ``images = [PIL.Image]``. TRL puts the
    image into the ``{"type": "image"}`` part. The loss then covers the whole sequence (instruction and image
    placeholder tokens too) unless ``SFTConfig(assistant_only_loss=True)``, which needs a chat template with
    ``{% generation %}`` markers.

    ``form="prompt_completion"``: rows ``{prompt, completion, images}`` with the ``prompt`` of ``dataset`` and
    ``completion = [{"role": "assistant", "content": caption}]``; `SFTTrainer` then computes the loss on the caption
    only (``completion_only_loss`` defaults to on for this form), whatever the chat template.

    Args:
        dataset: rows ``{prompt, image, references}`` (other columns are dropped).
        references: ``"all"``: one row per (image, reference) pair, the cross-entropy stage of captioning papers;
            ``"random"``: one row per image with one of its references, drawn with ``seed`` (the same draw every
            time; shuffle references per epoch by calling `to_sft` again with another seed).
        form: ``"messages"`` or ``"prompt_completion"``.
        seed: seed of the ``"random"`` draw.

    Images stay lazy (opened when a row is read). Rows are written once: paths are cheap to repeat, but image bytes
    stored inside a Hugging Face dataset are copied once per row.
    """
    if references not in SFT_REFERENCE_MODES:
        raise ValueError(f"references must be one of {list(SFT_REFERENCE_MODES)}, got {references!r}.")
    if form not in SFT_FORMS:
        raise ValueError(f"form must be one of {list(SFT_FORMS)}, got {form!r}.")
    missing = [name for name in ("prompt", "image", "references") if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"to_sft needs a dataset with columns prompt, image, references (from load_caption_dataset); "
            f"missing {missing} among {dataset.column_names}."
        )
    decoder = dataset.format.get("format_kwargs", {}).get("transform")
    if not isinstance(decoder, _RowDecoder):
        decoder = _RowDecoder("the dataset given to to_sft")
    raw = dataset.select_columns(["prompt", "image", "references"]).with_format(None)
    if isinstance(raw.features["image"], datasets.Image):
        raw = raw.cast_column("image", STORED_IMAGE)
    features = {"images": List(STORED_IMAGE)}
    if form == "messages":
        features["messages"] = MESSAGES_FEATURE
    else:
        features.update(prompt=PROMPT_FEATURE, completion=PROMPT_FEATURE)
    sft = raw.map(
        _sft_rows,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=Features(features),
        fn_kwargs={"references": references, "form": form, "seed": seed},
        desc="SFT rows",
    )
    return sft.with_transform(decoder)


def _sft_rows(batch: dict[str, list], indices: Sequence[int], *, references: str, form: str, seed: int) -> dict:
    """Batched ``map`` function of `to_sft`: GRPO rows → SFT rows (one per reference, or one random reference)."""
    output = {"images": [], "messages": []} if form == "messages" else {"images": [], "prompt": [], "completion": []}
    for index, prompt, image, row_references in zip(indices, batch["prompt"], batch["image"], batch["references"]):
        row_references = [row_references] if isinstance(row_references, str) else list(row_references or [])
        if not row_references:
            raise ValueError(f"Row {index} has no reference caption; every SFT row needs one.")
        if references == "random":
            # One generator per row, seeded by (seed, row): the draw does not depend on map's batching.
            row_references = [random.Random(f"{seed}-{index}").choice(row_references)]
        for caption in row_references:
            output["images"].append([image])
            if form == "messages":
                output["messages"].append([*_with_image_part(prompt), _assistant(caption, structured=True)])
            else:
                output["prompt"].append(prompt)
                output["completion"].append([_assistant(caption, structured=False)])
    return output


def _with_image_part(prompt: list[dict]) -> list[dict]:
    """The prompt messages with structured content and a ``{"type": "image"}`` part opening the first user turn."""
    messages, image_placed = [], False
    for message in prompt:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        if message["role"] == "user" and not image_placed:
            parts = [{"type": "image"}, *parts]
            image_placed = True
        messages.append({"role": message["role"], "content": parts})
    return messages


def _assistant(caption: str, *, structured: bool) -> dict:
    content = [{"type": "text", "text": caption}] if structured else caption
    return {"role": "assistant", "content": content}
