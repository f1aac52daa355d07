"""``balcaprl evaluate [run|score|compare] ...`` (also ``python -m balcaprl.evaluate``).

Data problems (a missing file or image, a file of another shape, a row without references, ...) and an
``--output-dir`` that cannot be written end the command with one ``error:`` line naming the file, the line or row and
the field, and exit status 2 — no traceback, nothing scored. A judge that fails its health check (before any caption
is generated or scored), or a judged metric that no caption could be scored for, ends it with one ``error:`` line
and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from balcaprl.evaluate.checks import OutputDirError
from balcaprl.evaluate.compare import compare_reports
from balcaprl.evaluate.harness import EvaluationOptions, evaluate_captions
from balcaprl.evaluate.inputs import read_caption_input
from balcaprl.evaluate.records import EvaluationDataError, default_name
from balcaprl.evaluate.run import generate_and_evaluate
from balcaprl.judge.client import JudgeClient, quiet_request_logs
from balcaprl.judge.config import add_judge_arguments
from balcaprl.rewards.world import WORLD_REWARDS

__all__ = ["build_parser", "main"]


def _add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name", help="the system's name in the report (default: the model folder's or the captions file's name)"
    )
    parser.add_argument("--no-classic", action="store_true", help="skip pycocoevalcap metrics")
    parser.add_argument("--no-balcap", action="store_true", help="skip BalCapRL precision / recall / linguistic")
    parser.add_argument("--dcscore", action="store_true", help="add DCScore-style P/R/F1 (needs a judge)")
    parser.add_argument("--captionqa", metavar="QUESTIONS.jsonl", help="add CaptionQA-style accuracy (needs a judge)")
    parser.add_argument(
        "--baseline-captions",
        "--baseline",
        dest="baseline",
        metavar="CAPTIONS",
        help="add CapArena-style battles against these captions of the same ids, in the format of the captions "
        "(needs a judge)",
    )
    parser.add_argument("--baseline-name", default="baseline")
    parser.add_argument("--no-plots", action="store_true")
    scorers = parser.add_mutually_exclusive_group()
    scorers.add_argument(
        "--exact-world-judges",
        action="store_true",
        help=f"score BalCapRL P/R/L with the synthetic world's exact rewards ({', '.join(WORLD_REWARDS)}; they read "
        "each record's `scene`) instead of judges",
    )
    scorers.add_argument(
        "--balcap-rewards",
        nargs=3,
        metavar=("PRECISION", "RECALL", "LINGUISTIC"),
        help="three reward specs (registered names or 'package.module:function') that score BalCapRL P/R/L instead "
        "of the judges",
    )
    parser.add_argument(
        "--judge-text-only",
        action="store_true",
        help="the judge cannot see images: send none (precision is not asked; DCScore and CapArena use text only)",
    )
    parser.add_argument(
        "--no-judge-health-check",
        dest="judge_health_check",
        action="store_false",
        help="skip the judge health check (one real request of each kind the evaluation sends, before generating "
        "or scoring: the check of `balcaprl train`, whose recipes turn it off with judge_health_check: false)",
    )
    add_judge_arguments(parser)


def _evaluation_options(arguments: argparse.Namespace, parser: argparse.ArgumentParser) -> EvaluationOptions:
    """The `EvaluationOptions` of the scoring flags (a judge when --judge-base-url is given)."""
    needs_judge = {
        "--dcscore": arguments.dcscore,
        "--captionqa": arguments.captionqa,
        "--baseline": arguments.baseline,
    }
    wanted = [flag for flag, value in needs_judge.items() if value]
    if wanted and not arguments.judge_base_url:
        parser.error(f"{' '.join(wanted)} need a judge: give --judge-base-url URL --judge-model NAME.")
    if bool(arguments.judge_base_url) != bool(arguments.judge_model):
        parser.error("a judge needs both --judge-base-url URL and --judge-model NAME.")
    judge = None
    if arguments.judge_base_url:
        try:
            judge = JudgeClient.from_config(vars(arguments))  # the judge_* recipe keys; None keeps a default
        except ValueError as error:  # a bad value (a negative price, ...): the message names the key
            parser.error(str(error))
    specs = list(WORLD_REWARDS) if arguments.exact_world_judges else arguments.balcap_rewards
    balcap_rewards = None
    if specs and not arguments.no_balcap:
        from balcaprl.rewards import get_reward_funcs

        judge_keys = {key: value for key, value in vars(arguments).items() if key.startswith("judge_")}
        balcap_rewards = get_reward_funcs(specs, **judge_keys)
    return EvaluationOptions(
        judge=judge,
        classic=not arguments.no_classic,
        balcap=not arguments.no_balcap,
        balcap_rewards=balcap_rewards,
        dcscore=arguments.dcscore,
        captionqa_questions=arguments.captionqa,
        baseline_captions=arguments.baseline,
        name=arguments.name,
        baseline_name=arguments.baseline_name,
        plots=not arguments.no_plots,
        judge_health_check=arguments.judge_health_check,
    )


def _score_input(path: str, arguments: argparse.Namespace) -> list:
    """The records of a `score` input (JSONL, or COCO results with --annotations), without images if the judge
    cannot see them."""
    records = read_caption_input(
        path, annotations=arguments.annotations, split=arguments.split, image_root=arguments.image_root
    )
    if arguments.judge_text_only:
        records = [dataclasses.replace(record, image=None) for record in records]
    return records


def build_parser(prog: str = "balcaprl evaluate") -> argparse.ArgumentParser:
    """The parser of `main`: ``run`` (the default), ``score`` and ``compare``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Caption a dataset split with a model and score the captions (run), score captions already "
        "made (score), or compare reports (compare).",
        epilog=f"`{prog} --model M --data D --output-dir DIR ...` (options first) means `{prog} run ...`.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="caption a dataset split with a model (resumable), then score the captions")
    run.add_argument("--model", required=True, help="checkpoint or LoRA adapter folder, Hub name, or tiny:<family>")
    run.add_argument(
        "--base-model",
        help="with a LoRA adapter folder as --model: its base checkpoint, when the one named in adapter_config.json "
        "is not on this machine (same as the BALCAPRL_ADAPTER_BASE environment variable)",
    )
    run.add_argument("--data", required=True, help="JSONL file, Karpathy JSON, or Hugging Face dataset (name/folder)")
    run.add_argument("--output-dir", required=True, help="captions.jsonl, generation.json and the report go here")
    data = run.add_argument_group("data (see balcaprl.data.load_caption_dataset)")
    data.add_argument("--split", default="test", help="default: test (a JSONL file is one split: ignored)")
    data.add_argument("--format", default="auto", help="auto (default), hf, karpathy, jsonl, coco or llava")
    data.add_argument("--image-root", help="folder relative image paths are resolved against")
    data.add_argument("--image-column", default="image")
    data.add_argument("--caption-column", default="references")
    data.add_argument("--instruction", help="the user turn (default: 'Describe this image in detail.')")
    data.add_argument("--max-samples", type=int, help="caption a random subset of this many rows")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the --max-samples draw")
    data.add_argument("--on-bad-image", default="error", help="error (default) or skip")
    generation = run.add_argument_group("generation")
    generation.add_argument("--batch-size", type=int, default=16, help="images per generate call (default: 16)")
    generation.add_argument("--max-new-tokens", type=int, default=512, help="caption length limit (default: 512)")
    generation.add_argument(
        "--sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding"
    )
    generation.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    generation.add_argument("--seed", type=int, default=0, help="with --sample")
    generation.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    generation.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    generation.add_argument(
        "--overwrite", action="store_true", help="delete the captions already in --output-dir and start again"
    )
    generation.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_scoring_arguments(run.add_argument_group("scoring"))

    score = commands.add_parser(
        "score",
        help="score captions: a JSONL file of caption records, or a COCO results file with --annotations",
        description="Score captions already made: a JSONL file of {id, caption, references, image?, ...} records, "
        "or a COCO results file ([{image_id, caption}]) with its references from --annotations (a COCO captions "
        "JSON, or a Karpathy JSON with --split).",
    )
    score.add_argument("captions", help="captions JSONL, or COCO results JSON (with --annotations)")
    score.add_argument("--output-dir", required=True)
    references = score.add_argument_group("references of a COCO results file")
    references.add_argument(
        "--annotations", metavar="JSON", help="COCO captions JSON (captions_val2014.json) or Karpathy JSON"
    )
    references.add_argument("--split", help="with a Karpathy JSON: the split the results caption (e.g. test)")
    references.add_argument(
        "--image-root",
        help="image folder for a judge: COCO file_name / Karpathy filepath/filename are resolved against it "
        "(Karpathy default: the JSON's folder)",
    )
    _add_scoring_arguments(score)

    compare = commands.add_parser("compare", help="compare reports (report.json files or their folders)")
    compare.add_argument("reports", nargs="+")
    compare.add_argument("--output-dir", required=True)
    compare.add_argument("--names", nargs="+")
    return parser


# Options of `run` that `generate_and_evaluate` takes under the same name (the parser's dest).
RUN_KEYWORDS = ("split", "format", "image_root", "image_column", "caption_column", "instruction", "max_samples")
RUN_KEYWORDS += ("data_seed", "on_bad_image", "batch_size", "max_new_tokens", "do_sample", "temperature", "seed")
RUN_KEYWORDS += ("device", "overwrite", "judge_text_only", "progress")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[run] --model M --data D --output-dir DIR [options]``, ``score CAPTIONS --output-dir DIR
    [--annotations JSON [--split S]] [options]`` or ``compare A B --output-dir DIR``. Data errors: one line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    prog = "balcaprl evaluate" if Path(sys.argv[0]).name == "balcaprl" else "python -m balcaprl.evaluate"
    parser = build_parser(prog)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_request_logs()
    try:
        report = _run_command(arguments, parser)
    except (EvaluationDataError, OutputDirError) as error:
        parser.exit(2, f"{prog}: error: {' '.join(str(error).splitlines())}\n")
    except RuntimeError as error:
        if not _judge_unavailable(error):
            raise
        parser.exit(1, f"{prog}: error: {' '.join(str(error).splitlines())}\n")
    unscored = report.get("unscored") if report is not None else None
    if unscored:
        failures = ", ".join(
            f"{name} ({entry['failed']} of {entry['attempted']} {entry['unit']})" for name, entry in unscored.items()
        )
        parser.exit(
            1,
            f"{prog}: error: no score for {failures}: all {'their' if len(unscored) > 1 else 'its'} judge calls "
            f"failed; {Path(arguments.output_dir) / 'report.md'} says why.\n",
        )
    return 0


def _judge_unavailable(error: BaseException) -> bool:
    """Whether ``error`` is the judge health check's `JudgeUnavailableError`, without importing its module (and
    transformers with it) into runs that have no judge."""
    guard = sys.modules.get("balcaprl.judge.guard")
    return guard is not None and isinstance(error, guard.JudgeUnavailableError)


def _run_command(arguments: argparse.Namespace, parser: argparse.ArgumentParser) -> dict | None:
    """Run the command; the report of ``run`` and ``score``."""
    if arguments.command == "compare":
        compare_reports(arguments.reports, output_dir=arguments.output_dir, names=arguments.names)
        print(Path(arguments.output_dir) / "comparison.md")
        return None
    options = _evaluation_options(arguments, parser)
    if arguments.command == "score":
        if arguments.baseline is not None:
            options = dataclasses.replace(options, baseline_captions=_score_input(arguments.baseline, arguments))
        name = options.name or default_name(arguments.captions)
        captions = _score_input(arguments.captions, arguments)
        report = evaluate_captions(captions, output_dir=arguments.output_dir, options=options, name=name)
        print(json.dumps(report["summary"], indent=2))
        return report

    dtype = None
    if arguments.dtype != "auto":
        import torch

        dtype = getattr(torch, arguments.dtype, None)
        if not isinstance(dtype, torch.dtype):
            parser.error(f"--dtype must be auto, float32, bfloat16 or float16, got {arguments.dtype!r}.")
    from balcaprl.generation import GenerationSettingsError

    # --base-model is read wherever the adapter's base is resolved (family, processor, weights), through the
    # environment variable of that override, set for this command only.
    from balcaprl.models.paths import ADAPTER_BASE_ENV

    saved_base = os.environ.get(ADAPTER_BASE_ENV)
    if arguments.base_model:
        os.environ[ADAPTER_BASE_ENV] = arguments.base_model
    try:
        report = generate_and_evaluate(
            arguments.model,
            arguments.data,
            output_dir=arguments.output_dir,
            dtype=dtype,
            options=options,
            **{keyword: getattr(arguments, keyword) for keyword in RUN_KEYWORDS},
        )
    except GenerationSettingsError as error:  # the folder holds captions of other settings: say so in one line
        raise EvaluationDataError(str(error)) from error
    finally:
        if saved_base is None:
            os.environ.pop(ADAPTER_BASE_ENV, None)
        else:
            os.environ[ADAPTER_BASE_ENV] = saved_base
    print(json.dumps(report["summary"], indent=2))
    print(Path(arguments.output_dir) / "report.md")
    return report
