"""The checks of `balcaprl preflight` that need no model: environment (packages), output folder, data, judges."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import time
from pathlib import Path

from balcaprl.preflight.report import DATA_SAMPLE_ROWS, REPORT_TO_PACKAGES, PreflightReport


def extra_requirements(extra: str) -> list[str]:
    """Requirement strings balcaprl's ``extra`` installs (from the installed package's metadata)."""
    try:
        requires = importlib.metadata.requires("balcaprl") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    return [requirement.split(";")[0].strip() for requirement in requires if marker.search(requirement)]


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_environment(report: PreflightReport, training_args, zero_stage: int) -> None:
    """Every package the recipe needs is installed (and vLLM is one of the supported versions)."""
    from packaging.requirements import Requirement

    lines, needed = [], []
    report_to = training_args.report_to or []
    for backend in [report_to] if isinstance(report_to, str) else report_to:
        if backend in ("none", "all"):
            continue
        module, distribution = REPORT_TO_PACKAGES.get(backend, (backend, backend))
        needed.append((f"report_to {backend}", module, distribution, None))
    if zero_stage:
        needed.append((f"DeepSpeed ZeRO-{zero_stage}", "deepspeed", "deepspeed", 'pip install "balcaprl[deepspeed]"'))
    if getattr(training_args, "use_vllm", False):
        needed.append(("use_vllm", "vllm", "vllm", 'pip install "balcaprl[vllm]"'))
    for reason, module, distribution, hint in needed:
        version = _installed_version(distribution) if importlib.util.find_spec(module) else None
        lines.append(f"{reason:<24}{distribution:<14}{version or 'MISSING'}")
        if version is None:
            report.problem(
                "environment", f"{reason} needs the {distribution!r} package, which is not installed: "
                f"{hint or f'pip install {distribution}'}."
            )  # fmt: skip
    if getattr(training_args, "use_vllm", False):
        for requirement in map(Requirement, extra_requirements("vllm")):
            installed = _installed_version(requirement.name)
            if installed is None or requirement.specifier.contains(installed, prereleases=True):
                continue
            if requirement.name == "vllm":
                report.problem(
                    "environment", f"vllm {installed} is not a supported version ({requirement}): "
                    'pip install "balcaprl[vllm]".')  # fmt: skip
            else:  # the vLLM set's other pins (transformers): vLLM itself enforces them at install time
                lines.append(f"note: the vllm extra pins {requirement}; {requirement.name} {installed} is installed")
    report.add("environment", "\n".join(lines) or "no extra packages needed")


def check_output(report: PreflightReport, training_args) -> None:
    """``output_dir`` writable (its nearest existing folder, when it does not exist yet); the resume checkpoint."""
    from balcaprl.checkpoints import checkpoint_problem, newest_complete_checkpoint
    from balcaprl.runtime import explicit_resume_checkpoint

    folder = Path(training_args.output_dir).resolve()
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    lines = [f"output_dir {training_args.output_dir}"]
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        report.problem("output", f"output_dir {training_args.output_dir}: {existing} is not a writable folder.")
    explicit = explicit_resume_checkpoint(training_args)
    if explicit is not None:
        if problem := checkpoint_problem(explicit):
            report.problem("output", f"resume_from_checkpoint {explicit}: {problem}.")
        else:
            lines.append(f"resumes from {explicit}")
        report.add("output", "\n".join(lines))
        return
    checkpoint, skipped = newest_complete_checkpoint(training_args.output_dir)
    lines += [f"skips incomplete {path.name}: {problem}" for path, problem in skipped]
    if checkpoint is not None:
        lines.append(f"resumes from {checkpoint}")
    else:
        lines.append(f"no {'complete ' if skipped else ''}checkpoint: starts from step 0")
    report.add("output", "\n".join(lines))


def check_data(report: PreflightReport, data_args, seed: int) -> list[dict]:
    """Load a sample of the training rows and open their images; returns the rows (empty on failure).

    A bad image (unreadable, truncated, too wide for Qwen2-VL's resize) is a problem naming its row and file with
    ``on_bad_image: error``; with ``skip`` the loader's line about the rows it skipped is shown.
    """
    import copy
    import logging

    from balcaprl.runtime import load_training_data

    sample_args = copy.copy(data_args)
    sample_args.max_train_samples = min(data_args.max_train_samples or DATA_SAMPLE_ROWS, DATA_SAMPLE_ROWS)
    sample_args.eval_split = None
    skip_lines: list[str] = []

    class SkippedRows(logging.Handler):  # the loader logs the rows it skipped as one warning
        def emit(self, record: logging.LogRecord) -> None:
            skip_lines.append(record.getMessage())

    skipped, loader_log = SkippedRows(logging.WARNING), logging.getLogger("balcaprl.data.loading")
    loader_log.addHandler(skipped)
    try:
        dataset, _ = load_training_data(sample_args, seed)
        rows = [dataset[index] for index in range(len(dataset))]  # decoding opens every image
    except Exception as error:  # noqa: BLE001 -- the loader's own messages name the file, row and key
        report.problem("data", " ".join(str(error).split()))
        report.add("data", f"dataset {data_args.dataset}: failed to load")
        return []
    finally:
        loader_log.removeHandler(skipped)
    without_references = [index for index, row in enumerate(rows) if not row.get("references")]
    if without_references:
        report.problem("data", f"rows {without_references[:5]} of the sample have no references.")
    sizes = [row["image"].size for row in rows]
    largest = max(sizes, key=lambda size: size[0] * size[1])
    report.add(
        "data", f"dataset {data_args.dataset}: {len(rows)} sampled rows load, images open (largest "
        f"{largest[0]}x{largest[1]}), references present"
        + "".join(f"\non_bad_image skip: {line}" for line in skip_lines)
    )  # fmt: skip
    return rows


def probe_row() -> dict:
    """A stand-in dataset row for the judge check when the data cannot be read (a gray photo, one reference)."""
    from PIL import Image

    return {"image": Image.new("RGB", (448, 448), (122, 116, 104)), "references": ["A gray square."]}


def check_judge(report: PreflightReport, reward_args, training_args, rows: list[dict]) -> None:
    """Every judge reward's health check (`check_judges`: one real schema-checked request each), timed."""
    from balcaprl.data.loading import corpus_references
    from balcaprl.judge.guard import JudgeUnavailableError, check_judges, judge_rewards
    from balcaprl.runtime import RecipeError, build_reward_funcs

    try:
        from datasets import Dataset

        table = Dataset.from_list([{"references": row["references"]} for row in rows]) if rows else None
        references = corpus_references(table) if rows else [["a"]]
        funcs = build_reward_funcs(reward_args, training_args, references, list(rows[0]) if rows else ())
    except (RecipeError, ValueError) as error:
        report.problem("judge", str(error))
        return
    judged = [getattr(fn, "__name__", "?") for fn in judge_rewards(funcs)]
    if not judged:
        report.add("judge", "no judge rewards")
        return
    if not getattr(training_args, "judge_health_check", True):  # the recipe's own way to skip it, as in training
        report.add("judge", f"not checked (judge_health_check: false) for {judged}")
        return
    start = time.monotonic()
    try:
        check_judges(funcs, rows[0] if rows else probe_row())
    except JudgeUnavailableError as error:
        report.problem("judge", str(error))
        report.add("judge", f"{reward_args.judge_base_url}: FAILED for {judged}")
        return
    latency = time.monotonic() - start
    report.add("judge", f"{reward_args.judge_base_url} ({reward_args.judge_model}): schema-valid answers for "
               f"{judged} in {latency:.2f} s")  # fmt: skip
