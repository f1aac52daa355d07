"""``balcaprl data inspect SPEC``: what a captioning dataset holds, before a run reads it.

    balcaprl data inspect SPEC [--recipe R [--model-config DIR] [--key value ...]] [--output-dir DIR] [--max-rows N]

Rows read; bad rows (not JSON, no image, no references, image missing / unreadable / wider than `MAX_ASPECT_RATIO`),
the first `LISTED_BAD_ROWS` by line and all of them counted; the images (sizes, PIL modes, 16-bit and alpha ones,
images shared by several rows); references per row and their word lengths; the share of rows whose references differ
in length by more than the length window allows; with a recipe, image tokens at its pixel bounds and the rows whose
prompt + completion would not fit in ``vllm_max_model_length``. Writes ``DIR/report.json`` (every number) and
``DIR/lengths.png``; exit code 0 without bad rows, 1 with some, 2 for a missing file or bad arguments.

SPEC is a JSONL file (``{"image": path relative to the file, "references": [captions]}`` per line), read line by
line, or a Karpathy JSON (one JSON document: read whole, every split). Each image file's header is read once (PIL's
``open``: format, size, mode; no decode); per-row state is a few numbers in compact arrays, so memory stays flat.

The checks are the loader's (`too_wide` and the image modes of `balcaprl.data.constants`, `word_length` and
`DEFAULT_WINDOW` of `balcaprl.text`), from the light modules that define them: `balcaprl.length` and
`balcaprl.data.images` pull in datasets, transformers and torch, ~400 MB before the first row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from balcaprl.data.constants import ALPHA_MODES, IMAGE_NOT_FOUND, MAX_ASPECT_RATIO, NO_REFERENCES, WIDE_MODES, too_wide
from balcaprl.text import DEFAULT_WINDOW, word_length

# How many bad rows the report lists (all are counted).
LISTED_BAD_ROWS = 20
LENGTH_WINDOW = DEFAULT_WINDOW
PERCENTILES = (5, 25, 50, 75, 95)


class Row:
    """One source row: its line (JSONL) or index (Karpathy), image path, references, or why it is unusable."""

    __slots__ = ("line", "image", "references", "problem")

    def __init__(self, line: int, image: str | None = None, references=None, problem: str | None = None):
        self.line, self.image, self.references, self.problem = line, image, references, problem


def _references(value) -> tuple[list[str], str | None]:
    """The loader's `_clean_references`: a string or a list of strings → the stripped non-empty ones."""
    if value is None:
        return [], None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(text, str) for text in values):
        return [], f"references must be a string or a list of strings, got {type(value).__name__}"
    return [text.strip() for text in values if text.strip()], None


def _row(line: int, record, root: Path, image_key: str, caption_key: str) -> Row:
    if not isinstance(record, dict):
        return Row(line, problem=f"expected a JSON object, got {type(record).__name__}")
    image = record.get(image_key)
    if image is not None and not isinstance(image, str):
        return Row(line, problem=f"{image_key!r} must be an image path, got {type(image).__name__}")
    references, problem = _references(record.get(caption_key))
    path = os.path.join(root, os.path.expanduser(image)) if image else None
    if problem is None and not image:
        problem = f"no {image_key!r} image path"
    return Row(line, path, references, problem or (None if references else NO_REFERENCES))


def read_jsonl(path: Path, root: Path, image_key: str, caption_key: str, progress) -> Iterator[Row]:
    """The rows of a JSONL file, one line at a time (blank lines skipped); ``progress`` counts the bytes read."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            progress.update(len(raw))
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                yield Row(line_number, problem=f"not valid JSON ({getattr(error, 'msg', error)})")
                continue
            yield _row(line_number, record, root, image_key, caption_key)


def read_karpathy(path: Path, root: Path, progress) -> Iterator[Row]:
    """The entries of a Karpathy JSON (every split; ``line`` is the index in ``images``), read whole."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a Karpathy-split JSON (an object with an 'images' list).")
    progress.update(path.stat().st_size)
    for index, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry:
            yield Row(index, problem="expected an object with a 'filename'")
            continue
        sentences = [sentence for sentence in entry.get("sentences") or [] if isinstance(sentence, dict)]
        texts = [sentence.get("raw") or " ".join(map(str, sentence.get("tokens") or [])) for sentence in sentences]
        image = os.path.join(root, entry.get("filepath", ""), entry["filename"])
        references = [text.strip() for text in texts if isinstance(text, str) and text.strip()]
        yield Row(index, image, references, None if references else NO_REFERENCES)


class Inspection:
    """The running totals of an inspection: everything `report` needs, a few bytes per row."""

    def __init__(self):
        self.rows = 0
        self.bad_rows = 0
        self.listed_bad: list[dict] = []
        self.problems: Counter[str] = Counter()
        self.image_ids: dict[str, int] = {}  # path → index into the per-image arrays
        self.widths, self.heights = array("I"), array("I")
        self.uses = array("I")  # rows per image
        self.image_problems: dict[int, str] = {}
        self.modes: Counter[str] = Counter()
        self.references_per_row = array("H")
        self.lengths = array("I")  # word length of every reference
        self.rows_over_window = 0
        self.listed_over_window: list[int] = []

    def add(self, row: Row) -> None:
        self.rows += 1
        if row.references:
            self._add_references(row)
        problem = row.problem
        if row.image is not None:  # read even for a row without references: the image's numbers stay complete
            image_problem = self._add_image(row.image)
            problem = problem or image_problem
        if problem is not None:
            self.bad_rows += 1
            kind = problem.split(" (")[0]
            self.problems[kind] += 1
            if len(self.listed_bad) < LISTED_BAD_ROWS:
                self.listed_bad.append({"line": row.line, "image": row.image, "problem": problem})

    def _add_references(self, row: Row) -> None:
        lengths = [word_length(text) for text in row.references]
        self.references_per_row.append(min(len(lengths), 65535))
        self.lengths.extend(lengths)
        low, high = LENGTH_WINDOW
        shortest, longest = min(lengths), max(lengths)
        if longest * low > shortest * high:  # longest / shortest > high / low, without dividing by zero
            self.rows_over_window += 1
            if len(self.listed_over_window) < LISTED_BAD_ROWS:
                self.listed_over_window.append(row.line)

    def _add_image(self, path: str) -> str | None:
        """The image's problem (its header read on first use only), counting the row as one of its users."""
        index = self.image_ids.get(path)
        if index is None:
            index = self.image_ids[path] = len(self.widths)
            width, height, problem = _read_header(path, self.modes)
            self.widths.append(width)
            self.heights.append(height)
            self.uses.append(0)
            if problem is not None:
                self.image_problems[index] = problem
        self.uses[index] += 1
        return self.image_problems.get(index)

    def readable_sizes(self) -> list[tuple[int, int, int]]:
        """(width, height, rows using it) of every image whose header reads and whose aspect ratio is fine."""
        return [
            (self.widths[i], self.heights[i], self.uses[i])
            for i in range(len(self.widths))
            if i not in self.image_problems
        ]


def _read_header(path: str, modes: Counter) -> tuple[int, int, str | None]:
    """(width, height, problem or None) from the image's header; counts its mode (16-bit / alpha flags included)."""
    from PIL import Image

    if not os.path.isfile(path):
        return 0, 0, IMAGE_NOT_FOUND
    try:
        with Image.open(path) as image:
            width, height = image.size
            alpha = image.mode in ALPHA_MODES or "transparency" in image.info
            modes[image.mode + (" (16-bit or wider)" if image.mode in WIDE_MODES else "") + (" (alpha)" * alpha)] += 1
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        return 0, 0, f"unreadable image ({type(error).__name__}: {' '.join(str(error).split())[:120]})"
    if too_wide(width, height):
        return width, height, f"aspect ratio over {MAX_ASPECT_RATIO}:1 ({width}x{height} pixels)"
    return width, height, None


def _distribution(values, percentiles: Sequence[int] = ()) -> dict:
    """min / mean / median / max (and percentiles) of ``values``; None each when there are none."""
    import numpy as np

    data = np.frombuffer(values, dtype=np.dtype(values.typecode))  # numpy's type codes are array's
    if data.size == 0:
        return {"count": 0, "min": None, "mean": None, "median": None, "max": None}
    result = {"count": int(data.size), "min": float(data.min()), "mean": float(data.mean())}
    result |= {"median": float(np.median(data)), "max": float(data.max())}
    result |= {f"p{p}": float(np.percentile(data, p)) for p in percentiles}
    return result


def report(inspection: Inspection, source: str, position: str = "line") -> dict:
    """Every number of the inspection, as written to report.json."""
    import numpy as np

    sizes = inspection.readable_sizes()
    widths = np.array([w for w, _, _ in sizes], dtype=np.float64)
    heights = np.array([h for _, h, _ in sizes], dtype=np.float64)

    def stats(values):
        if values.size == 0:
            return {"min": None, "median": None, "max": None}
        return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}

    uses = np.frombuffer(inspection.uses, dtype=np.uint32)
    with_references = len(inspection.references_per_row)
    low, high = LENGTH_WINDOW
    return {
        "source": source,
        "position": position,  # what a row's "line" counts: the JSONL line, or the index in a Karpathy JSON's images
        "rows": inspection.rows,
        "bad_rows": {
            "count": inspection.bad_rows,
            "by_problem": dict(inspection.problems.most_common()),
            "first": inspection.listed_bad,
        },
        "images": {
            "distinct": len(inspection.widths),
            "readable": len(sizes),
            "width": stats(widths),
            "height": stats(heights),
            "megapixels": stats(widths * heights / 1e6),
            "modes": dict(inspection.modes.most_common()),
            "sixteen_bit_or_wider": sum(n for mode, n in inspection.modes.items() if "16-bit" in mode),
            "with_alpha": sum(n for mode, n in inspection.modes.items() if "alpha" in mode),
            "rows_reusing_an_image": int((uses[uses > 1] - 1).sum()) if uses.size else 0,
            "images_used_by_several_rows": int((uses > 1).sum()),
            "most_rows_per_image": int(uses.max()) if uses.size else 0,
        },
        "references": {
            "rows_with_references": with_references,
            "per_row": _distribution(inspection.references_per_row),
            "word_lengths": _distribution(inspection.lengths, PERCENTILES),
            "length_window": [low, high],
            "rows_over_window": inspection.rows_over_window,
            "share_over_window": inspection.rows_over_window / with_references if with_references else None,
            "first_lines_over_window": inspection.listed_over_window,
        },
    }


def recipe_budget(recipe: str, overrides: Sequence[str], model_config: str | None, inspection: Inspection) -> dict:
    """Image tokens at the recipe's pixel bounds (over the readable images) and the rows whose image + prompt +
    completion tokens exceed ``vllm_max_model_length`` (else the model's positions): preflight's budget functions.
    """
    import numpy as np
    import yaml
    from transformers import AutoConfig

    from balcaprl.models.paths import adapter_base, model_source_problem, resolve_model_path
    from balcaprl.preflight.budget import completion_tokens, image_resize_bounds, image_tokens, prompt_tokens
    from balcaprl.preflight.hardware import text_config
    from balcaprl.preflight.run import is_sft_recipe
    from balcaprl.runtime import RL_CONFIG_TYPES, SFT_CONFIG_TYPES, parse_config

    raw = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
    argv = ["--config", recipe, *overrides]
    if raw.get("bf16") or raw.get("fp16"):  # as preflight: parse for the CPU, where transformers refuses bf16
        argv += ["--bf16", "false", "--fp16", "false", "--use_cpu", "true"]
    sft = is_sft_recipe(recipe)
    configs = parse_config(SFT_CONFIG_TYPES if sft else RL_CONFIG_TYPES, argv)
    data_args, training_args, model_args = configs[0], configs[-2], configs[-1]
    source = model_config or model_args.model_name_or_path
    if problem := model_source_problem(source):
        raise ValueError(f"{problem} Pass --model-config DIR or --model_name_or_path tiny:qwen2_5_vl.")
    source = resolve_model_path(source)
    source = adapter_base(source) or source
    config = AutoConfig.from_pretrained(source)
    family = config.model_type
    resize = image_resize_bounds(family, model_args, source)
    sizes = inspection.readable_sizes()
    if resize is None:  # LLaVA: a fixed crop, the same count for every image
        fixed, _ = image_tokens(family, config, model_args, source, [])
        tokens = np.full(len(sizes), fixed, dtype=np.int64)
    else:
        counted: dict[tuple[int, int], int] = {}
        tokens = np.array(
            [counted.setdefault((w, h), resize.num_image_tokens(w, h)) for w, h, _ in sizes], dtype=np.int64
        )
    uses = np.array([n for _, _, n in sizes], dtype=np.int64)
    prompt, exact = prompt_tokens(source, data_args.instruction, family)
    completion = completion_tokens(training_args)
    limit = getattr(training_args, "vllm_max_model_length", None)
    limit_name = "vllm_max_model_length"
    if not limit:
        limit, limit_name = text_config(config).max_position_embeddings, "the model's max_position_embeddings"
    totals = tokens + prompt + completion
    return {
        "recipe": recipe,
        "model": source,
        "family": family,
        "pixel_bounds": [resize.min_pixels, resize.max_pixels] if resize else None,
        "image_tokens": {
            "min": int(tokens.min()) if tokens.size else None,
            "median": float(np.median(tokens)) if tokens.size else None,
            "max": int(tokens.max()) if tokens.size else None,
        },
        "prompt_tokens": prompt,
        "prompt_tokens_exact": exact,
        "completion_tokens": completion,
        "longest_sequence": int(totals.max()) if totals.size else None,
        "limit": int(limit),
        "limit_name": limit_name,
        "rows_over_limit": int(uses[totals > limit].sum()),
    }


def plot_lengths(lengths: array, path: Path) -> None:
    """Histogram of the references' word lengths, on matplotlib's Agg canvas without pyplot (as
    `balcaprl.evaluate.plots`, whose module imports torch through the length mask)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    import numpy as np

    values = np.frombuffer(lengths, dtype=np.dtype(lengths.typecode))
    top = int(values.max()) if values.size else 1
    step = max(1, int(top) // 30 + 1)
    axis.hist(values, bins=list(range(0, int(top) + step + 1, step)), alpha=0.7, label="references")
    axis.set(xlabel="words", ylabel="references", title=f"Reference length ({values.size} references)")
    axis.legend()
    figure.savefig(path, dpi=100)


def render(result: dict) -> str:
    """The text summary printed on stdout."""
    bad, images, references = result["bad_rows"], result["images"], result["references"]
    lengths, per_row = references["word_lengths"], references["per_row"]
    low, high = references["length_window"]

    def three(stats):
        return "/".join("-" if stats[k] is None else f"{stats[k]:g}" for k in ("min", "median", "max"))

    lines = [f"{result['source']}: {result['rows']} rows, {bad['count']} bad"]
    lines += [f"  {count:>8}  {problem}" for problem, count in bad["by_problem"].items()]
    for row in bad["first"]:
        lines.append(
            f"  {result['position']} {row['line']}: {row['problem']}" + (f" ({row['image']})" * bool(row["image"]))
        )
    if bad["count"] > len(bad["first"]):
        lines.append(f"  ... and {bad['count'] - len(bad['first'])} more (counted in report.json)")
    lines += [
        f"images: {images['distinct']} distinct, {images['readable']} readable; width {three(images['width'])}, "
        f"height {three(images['height'])}, megapixels {three(images['megapixels'])} (min/median/max)",
        f"  modes {images['modes'] or '-'}; {images['sixteen_bit_or_wider']} 16-bit or wider, "
        f"{images['with_alpha']} with alpha (composited on white when read)",
        f"  {images['rows_reusing_an_image']} rows reuse an image of an earlier row "
        f"({images['images_used_by_several_rows']} images shared, up to {images['most_rows_per_image']} rows each)",
        f"references: {references['rows_with_references']} rows with references, per row "
        + ("-" if per_row["min"] is None else f"{per_row['min']:g}/{per_row['mean']:.2f}/{per_row['max']:g}")
        + " (min/mean/max)",
    ]
    if lengths["count"]:
        shown = ", ".join(f"p{p} {lengths[f'p{p}']:g}" for p in PERCENTILES)
        lines.append(f"  word lengths: min {lengths['min']:g}, mean {lengths['mean']:.1f}, max {lengths['max']:g}; "
                     f"{shown}")  # fmt: skip
        share = references["share_over_window"] or 0.0
        lines.append(
            f"  {references['rows_over_window']} rows ({100 * share:.1f}%) have references whose lengths differ by "
            f"more than {high / low:g}x (window [{low:g}, {high:g}]): no caption length is inside the window of both "
            "the shortest and the longest, so matching one reference's length masks the rewards against another"
        )
    if budget := result.get("budget"):
        tokens = budget["image_tokens"]
        lines += [
            f"budget ({budget['family']}, pixel bounds {budget['pixel_bounds']}): image tokens "
            f"{tokens['min']}/{tokens['median']}/{tokens['max']} (min/median/max) + prompt {budget['prompt_tokens']}"
            f"{'' if budget['prompt_tokens_exact'] else ' (bound)'} + completion {budget['completion_tokens']}",
            f"  longest {budget['longest_sequence']} vs {budget['limit_name']} {budget['limit']}: "
            f"{budget['rows_over_limit']} rows over",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balcaprl data inspect",
        description="Rows, bad rows, images, reference lengths and (with --recipe) the token budget of a dataset. "
        "Recipe keys after the options override the recipe (--model_name_or_path tiny:qwen2_5_vl). Exit code 0 "
        "without bad rows, 1 with bad rows, 2 for a missing file or bad arguments.",
    )
    parser.add_argument("spec", help="a JSONL file, or a Karpathy JSON (*.json, read whole)")
    parser.add_argument("--recipe", help="recipe YAML: image tokens at its pixel bounds and its token budget")
    parser.add_argument("--model-config", help="folder with the model's config.json (default: the recipe's model)")
    parser.add_argument("--output-dir", help="where report.json and lengths.png go (default: SPEC.inspect/)")
    parser.add_argument("--max-rows", type=int, help="read at most this many rows")
    parser.add_argument("--image-root", help="folder image paths are relative to (default: SPEC's folder)")
    parser.add_argument("--image-key", default="image", help="JSONL key of the image path")
    parser.add_argument("--caption-key", default="references", help="JSONL key of the references")
    return parser


def _fail(message: str) -> int:
    print(f"balcaprl data inspect: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``balcaprl data inspect``: print the summary, write the report; 0 clean, 1 bad rows, 2 usage errors."""
    parser = build_parser()
    parser.error = lambda message: sys.exit(_fail(message))  # one line, not argparse's usage block
    arguments, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if overrides and not arguments.recipe:
        return _fail(f"unrecognized arguments: {' '.join(overrides)} (recipe keys need --recipe)")
    if arguments.max_rows is not None and arguments.max_rows < 1:
        return _fail(f"--max-rows must be a positive number of rows, got {arguments.max_rows}.")
    spec = Path(arguments.spec)
    if not spec.is_file():
        return _fail(f"no such file: {spec}")
    if arguments.recipe and not Path(arguments.recipe).is_file():
        return _fail(f"no such recipe: {arguments.recipe}")
    from tqdm import tqdm

    root = Path(arguments.image_root) if arguments.image_root else spec.parent
    inspection = Inspection()
    with tqdm(total=spec.stat().st_size, unit="B", unit_scale=True, disable=None, file=sys.stderr) as progress:
        if spec.suffix == ".json":
            rows = read_karpathy(spec, root, progress)
        else:
            rows = read_jsonl(spec, root, arguments.image_key, arguments.caption_key, progress)
        try:
            for row in rows:
                inspection.add(row)
                if inspection.rows == arguments.max_rows:
                    break
        except ValueError as error:  # a Karpathy JSON that is not one
            return _fail(" ".join(str(error).split()))
    result = report(inspection, str(spec), "images index" if spec.suffix == ".json" else "line")
    if arguments.recipe:
        from balcaprl.runtime import RecipeError

        try:
            result["budget"] = recipe_budget(arguments.recipe, overrides, arguments.model_config, inspection)
        except (RecipeError, OSError, ValueError) as error:
            return _fail(f"recipe {arguments.recipe}: {' '.join(str(error).split())}")
    output = Path(arguments.output_dir) if arguments.output_dir else spec.with_name(spec.name + ".inspect")
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot_lengths(inspection.lengths, output / "lengths.png")
    print(render(result))
    print(f"report: {output / 'report.json'}, histogram: {output / 'lengths.png'}")
    return 1 if inspection.bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
