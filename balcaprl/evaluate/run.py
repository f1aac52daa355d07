"""The generation half: caption a dataset split with a checkpoint (resumable), then score the captions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from balcaprl.evaluate.checks import check_judge, check_output_dir, judge_probes
from balcaprl.evaluate.harness import EvaluationOptions, evaluate_captions
from balcaprl.evaluate.records import EvaluationDataError

__all__ = ["generate_and_evaluate"]


def generate_and_evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    split: str = "test",
    format: str = "auto",
    image_root: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "references",
    instruction: str | None = None,
    max_samples: int | None = None,
    on_bad_image: str = "error",
    data_seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    dtype: Any = None,
    device: str | None = None,
    overwrite: bool = False,
    judge_text_only: bool = False,
    progress: bool = True,
    options: EvaluationOptions | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Caption a dataset split with a model, then evaluate the captions (``balcaprl evaluate --model ...``).

    0. ``output_dir`` must be writable (`OutputDirError`), and, unless ``options.judge_health_check`` is False, the
       judge must answer one request of each kind the scoring will send, built from the split's first row
       (`JudgeUnavailableError`): both before the model is loaded. The judge is checked again before scoring.
    1. The split is loaded by `balcaprl.data.load_caption_dataset` (``format``, ``split``, ``image_root``,
       ``image_column``, ``caption_column``, ``instruction``, ``max_samples``, ``on_bad_image``; ``data_seed`` seeds
       the ``max_samples`` draw).
    2. `balcaprl.generation.caption_dataset` captions it into ``output_dir/captions.jsonl`` (batched; greedy, or
       ``do_sample`` with ``temperature`` and ``seed``), appending every batch as it is produced; a rerun with the
       same folder generates only the captions that are missing, and refuses (`GenerationSettingsError`) when the
       model, data or decoding settings differ from those recorded in ``output_dir/generation.json`` — unless
       ``overwrite``. ``dtype`` / ``device`` place the model (``device=None``: CUDA when available).
    3. `evaluate_captions` scores every caption as ``options`` (`EvaluationOptions`) and ``settings`` (its fields
       as keywords: ``judge=``, ``classic=``, ``balcap_rewards=``, ...) say, the report named after the model folder
       unless ``name`` is given, and writes the report into ``output_dir``. The records it scores carry the
       image (path, or the bytes stored in the dataset) and the dataset's extra columns, e.g. the ``scene`` the
       exact world rewards read. ``judge_text_only`` leaves the images out (for a judge that cannot see them:
       precision is then not asked, DCScore checks against the references, CapArena judges from text).

    Returns the report; its ``generation`` entry says which model and settings made the captions and how many were
    generated in this run or reused.
    """
    import torch

    from balcaprl.data.constants import DEFAULT_INSTRUCTION
    from balcaprl.data.loading import load_caption_dataset_with_report
    from balcaprl.generation import caption_dataset

    options = EvaluationOptions.build(options, **settings)
    check_output_dir(output_dir)
    instruction = instruction or DEFAULT_INSTRUCTION
    data_options = {"format": format, "split": split, "image_root": image_root, "max_samples": max_samples}
    data_options.update(image_column=image_column, caption_column=caption_column, on_bad_image=on_bad_image)
    try:
        dataset, loaded = load_caption_dataset_with_report(
            data, instruction=instruction, seed=data_seed, **data_options
        )
    except (ValueError, FileNotFoundError) as error:  # the loader's errors name the file, row and key
        raise EvaluationDataError(str(error)) from error
    if options.judge_health_check and len(dataset):
        first = dataset[0]
        image = None if judge_text_only else first.get("image")
        probes, row = judge_probes(options, image=image, references=first.get("references") or [])
        check_judge(probes, row, before="generating captions")
    source = Path(data)
    data_settings = {
        "source": str(source.resolve()) if source.exists() else str(data),
        "format": loaded.format,
        "split": None if loaded.format == "jsonl" else split,  # one JSONL file is one split
        "image_root": None if image_root is None else str(Path(image_root).resolve()),
        "image_column": image_column,
        "caption_column": caption_column,
        "max_samples": max_samples,
        "on_bad_image": on_bad_image,
        "data_seed": data_seed if max_samples is not None else None,
    }
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    run = caption_dataset(
        model,
        dataset,
        output_dir,
        instruction=instruction,
        data=data_settings,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        progress=progress,
        image_bytes=options.judge is not None and not judge_text_only,
    )
    records = []
    for row, written in zip(run.rows, run.records):
        record = {**row["extra"], "id": written["id"], "caption": written["caption"], "references": row["references"]}
        image = row["image_path"] or row["image_bytes"]
        if image is not None and not judge_text_only:
            record["image"] = image
        records.append(record)
    generation = {
        **run.settings,
        "captions_file": str(run.path),
        "generated": run.generated,
        "reused": run.reused,
        "dropped_partial_line": run.dropped_partial_line,
        "judge_text_only": judge_text_only,
    }
    name = options.name or Path(str(model)).name or str(model)
    return evaluate_captions(records, output_dir=output_dir, options=options, name=name, generation=generation)
