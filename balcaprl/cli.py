"""The ``balcaprl`` console script.

    balcaprl sft   CONFIG [--key value ...]   stage 1: cross-entropy fine-tuning on the references
    balcaprl train CONFIG [--key value ...]   stage 2: RL (BalCapRL c-GDPO, GRPO or SCST)
    balcaprl preflight CONFIG [--gpus N --gpu-memory GB] [--accelerate-config FILE] [--key value ...]
                                              will the recipe run? (hardware, packages, data, judge; no weights)
    balcaprl evaluate --model M --data SPEC --output-dir DIR [...]   caption a split (resumable), then score it
    balcaprl evaluate score|compare ...       score captions (JSONL, or COCO results + --annotations) / compare reports
    balcaprl merge ADAPTER_DIR --output-dir DIR [--base-model B]   a LoRA adapter merged into its base, for serving
    balcaprl data inspect|recaption ...       look at a dataset before a run / write detailed reference captions
    balcaprl judge audit --judge-base-url URL --judge-model M [...]   can the judge be trusted? (agreement with
                                              exact scores on the shapes world or your labelled captions)
    balcaprl demo [--quick]                   the CPU demo on the synthetic world (runs/demo/report.md)
    balcaprl reproduce [--quick]              when the papers' claims hold at small scale (runs/reproduce/results.md)

Any recipe key can be overridden after the recipe (``--learning_rate 1e-6``); for several GPUs run the same
through accelerate: ``accelerate launch --config_file recipes/accelerate/zero2.yaml -m balcaprl.train --config
CONFIG``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _stage_parser(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"Every recipe key, with its default and help: balcaprl {name} --list-keys [TEXT].",
    )
    parser.add_argument("config", nargs="?", help="recipe YAML, e.g. recipes/qwen2_5_vl_3b/balcaprl.yaml")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="recipe keys to override: --key value ...")
    parser.add_argument(
        "--list-keys",
        nargs="?",
        const="",
        metavar="TEXT",
        help="list the recipe keys (with TEXT: those whose name contains it, or with a word of help starting with it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balcaprl", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _stage_parser(subparsers, "sft", "Stage 1: supervised (cross-entropy) fine-tuning on reference captions.")
    _stage_parser(subparsers, "train", "Stage 2: RL fine-tuning (BalCapRL c-GDPO, GRPO or SCST).")
    subparsers.add_parser(
        "preflight", help="Check a recipe before launching (see `balcaprl preflight --help`).", add_help=False
    )
    evaluate = subparsers.add_parser(
        "evaluate", help="Score captions and write reports (see `balcaprl evaluate --help`).", add_help=False
    )
    evaluate.add_argument("arguments", nargs=argparse.REMAINDER)
    merge = subparsers.add_parser(
        "merge",
        help="Merge a LoRA adapter folder into its base and save a full checkpoint (for vLLM serving or sharing).",
        description="Merge a LoRA adapter folder (a LoRA `balcaprl train` output, or `<sft output>/adapter`) into "
        "its base model and save the full checkpoint with its processor.",
    )
    merge.add_argument("adapter_dir", help="folder holding adapter_config.json and the adapter weights")
    merge.add_argument("--output-dir", required=True, help="where the merged checkpoint is written")
    merge.add_argument(
        "--base-model",
        help="the base checkpoint (folder or Hub name) when the one named in adapter_config.json is not on this "
        "machine (same as the BALCAPRL_ADAPTER_BASE environment variable)",
    )
    merge.add_argument("--dtype", default="auto", help="dtype to merge and save in (default: the base's own)")
    subparsers.add_parser(
        "data", help="Inspect a dataset, or recaption images (see `balcaprl data --help`).", add_help=False
    )
    subparsers.add_parser(
        "judge", help="Audit a judge against exact scores (see `balcaprl judge --help`).", add_help=False
    )
    for name, text in [("demo", "The CPU demo on the synthetic shapes world."), ("reproduce", "Both papers' claims.")]:
        subparsers.add_parser(name, help=f"{text} (see `balcaprl {name} --help`).", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:  # its own parser, --help included
        from balcaprl.evaluate.cli import main as evaluate

        sys.exit(evaluate(argv[1:]))
    if argv[:1] == ["preflight"]:  # its own parser; exit code 1 when any check fails
        from balcaprl.preflight.run import main as preflight

        sys.exit(preflight(argv[1:]))
    if argv[:1] == ["data"]:  # its own parser: data inspect | data recaption
        from balcaprl.data.cli import main as data

        sys.exit(data(argv[1:]))
    if argv[:1] == ["judge"]:  # its own parser: judge audit
        from balcaprl.judge.cli import main as judge

        sys.exit(judge(argv[1:]))
    if argv[:1] == ["demo"]:
        from balcaprl.experiments.demo import main as demo

        return demo(argv[1:])
    if argv[:1] == ["reproduce"]:
        from balcaprl.experiments.reproduce import main as reproduce

        return reproduce(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from balcaprl.recipe_file import RecipeError, read_recipe

    if args.command in ("train", "sft"):
        if args.list_keys is not None:
            from balcaprl.runtime import RL_CONFIG_TYPES, SFT_CONFIG_TYPES, list_keys

            print(list_keys(RL_CONFIG_TYPES if args.command == "train" else SFT_CONFIG_TYPES, args.list_keys or None))
            return
        if args.config is None:
            parser.error(f"balcaprl {args.command} needs a recipe: balcaprl {args.command} RECIPE [--key value ...]")
        try:  # a missing or broken recipe file fails here, before torch and TRL are imported
            read_recipe(args.config)
        except RecipeError as error:
            sys.exit(f"balcaprl {args.command}: error: {error}")

    from balcaprl.judge.guard import JudgeUnavailableError
    from balcaprl.runtime import end_process_group

    if args.command == "merge":
        from balcaprl.models.loading import merge_adapter

        try:
            output = merge_adapter(args.adapter_dir, args.output_dir, args.base_model, dtype=args.dtype)
        except (ValueError, OSError) as error:
            sys.exit(f"balcaprl merge: error: {error}")
        print(f"Merged checkpoint written to {output}")
        return
    try:
        if args.command == "train":
            from balcaprl.train import main as run
        else:
            from balcaprl.sft import main as run
        run(["--config", args.config, *args.overrides])
    except (RecipeError, JudgeUnavailableError) as error:
        sys.exit(f"balcaprl {args.command}: error: {error}")
    end_process_group()


if __name__ == "__main__":
    main()
