"""`balcaprl data inspect`: bad rows by line, exact statistics, the recipe's token budget, flat memory on 100k rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from balcaprl.data.inspect import LISTED_BAD_ROWS

BALCAPRL = [str(Path(sys.executable).parent / "balcaprl"), "data", "inspect"]
if not Path(BALCAPRL[0]).is_file():  # not installed as a console script: the same entry point through Python
    BALCAPRL = [sys.executable, "-c", "import sys; from balcaprl.cli import main; sys.exit(main())", "data", "inspect"]

# Runs the command given as arguments as its child and prints the child's peak resident memory (KB on Linux): a fresh
# process whose only child is the inspection, so no earlier subprocess of the test session counts.
MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('PEAK_RSS_KB', code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def inspect(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([*BALCAPRL, *map(str, arguments)], capture_output=True, text=True, timeout=600)


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def test_100k_rows_report_seeded_bad_rows_by_line_in_flat_memory(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for index in range(200):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(folder / f"{index}.png")
    Image.new("RGB", (1, 300)).save(folder / "wide.png")
    (folder / "broken.png").write_bytes(b"not an image")
    seeded = {
        10: "{not json",
        20: {"image": "img/0.png"},
        30: {"image": "img/missing.png", "references": ["a b c"]},
        40: {"image": "img/1.png", "references": []},
        50: {"image": "img/wide.png", "references": ["a b c"]},
        60: {"references": ["a b c"]},
        70: {"image": "img/broken.png", "references": ["a b c"]},
    }
    seeded |= {1000 * k: {"image": f"img/gone{k}.png", "references": ["a b c"]} for k in range(1, 16)}
    short, middle, long = "one two three", "one two three four five six", " ".join(["word"] * 13)
    rows = []
    for line in range(1, 100_001):
        if line in seeded:
            rows.append(seeded[line])
        else:
            references = [short, middle, long] if line % 100 == 0 else [short, middle]
            rows.append({"image": f"img/{line % 200}.png", "references": references})
    data = tmp_path / "big.jsonl"
    write_jsonl(data, rows)

    run = subprocess.run(
        [sys.executable, "-c", MEASURE, *BALCAPRL, data, "--output-dir", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    _, code, peak_kb = run.stdout.strip().splitlines()[-1].split()
    assert int(code) == 1, run.stdout + run.stderr
    assert int(peak_kb) < 300 * 1024, f"peak RSS {int(peak_kb) // 1024} MB"

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"] == 100_000
    bad = report["bad_rows"]
    assert bad["count"] == len(seeded) == 22
    assert [row["line"] for row in bad["first"]] == sorted(seeded)[:LISTED_BAD_ROWS]
    assert bad["by_problem"] == {
        "image file not found": 16,
        "no reference caption": 2,
        "not valid JSON": 1,
        "aspect ratio over 200:1": 1,
        "no 'image' image path": 1,
        "unreadable image": 1,
    }
    images = report["images"]
    assert images["readable"] == 200 and images["modes"] == {"RGB": 201}  # the wide one opens, then is refused
    assert images["width"] == {"min": 8.0, "median": 8.0, "max": 8.0}
    references = report["references"]
    with_references = 100_000 - 3  # not JSON, no references, empty references
    assert references["rows_with_references"] == with_references
    over = sum(1 for line in range(100, 100_001, 100) if line not in seeded)
    assert references["rows_over_window"] == over
    assert references["share_over_window"] == pytest.approx(over / with_references)
    assert references["per_row"]["max"] == 3 and references["word_lengths"]["max"] == 13


def test_clean_file_numbers_match_hand_computed_ones(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGBA", (16, 4)).save(tmp_path / "b.png")
    Image.new("L", (20, 10)).save(tmp_path / "c.png")
    data = tmp_path / "clean.jsonl"
    write_jsonl(
        data,
        [
            {"image": "a.png", "references": ["a dog runs", "a brown dog runs fast on grass"]},  # 3, 7 words
            {"image": "a.png", "references": ["cat", "a small grey cat sleeps on the sofa"]},  # 1, 8: 8x > 4x
            {"image": "b.png", "references": "two birds on a wire"},  # 5
            {"image": "c.png", "references": ["red car", "a red car parked — on the street"]},  # 2, 7 ("—" no word)
        ],
    )
    result = inspect(data)
    assert result.returncode == 0, result.stderr

    output = tmp_path / "clean.jsonl.inspect"  # the default folder, next to the data
    report = json.loads((output / "report.json").read_text())
    assert report["rows"] == 4 and report["bad_rows"]["count"] == 0
    lengths = report["references"]["word_lengths"]  # sorted: 1 2 3 5 7 7 8; numpy's linear percentiles
    expected = {"count": 7, "min": 1, "mean": 33 / 7, "median": 5, "max": 8}
    assert lengths == pytest.approx(expected | {"p5": 1.3, "p25": 2.5, "p50": 5, "p75": 7, "p95": 7.7})
    assert report["references"]["per_row"] == pytest.approx(
        {"count": 4, "min": 1, "mean": 1.75, "median": 2, "max": 2}
    )
    assert report["references"]["rows_over_window"] == 1
    assert report["references"]["share_over_window"] == 0.25
    assert report["references"]["first_lines_over_window"] == [2]
    images = report["images"]
    assert (images["distinct"], images["readable"], images["rows_reusing_an_image"]) == (3, 3, 1)
    assert images["width"] == {"min": 8, "median": 16, "max": 20}
    assert images["height"] == {"min": 4, "median": 8, "max": 10}
    assert images["modes"] == {"RGB": 1, "RGBA (alpha)": 1, "L": 1} and images["with_alpha"] == 1
    assert (output / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 rows (25.0%) have references whose lengths differ by more than 4x" in result.stdout


def test_recipe_reports_image_tokens_and_rows_over_the_length_limit(tmp_path):
    from balcaprl.data.images import ImageResize

    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    Image.new("RGB", (280, 280)).save(tmp_path / "large.png")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"image": name, "references": ["a b c"]} for name in ("small.png", "large.png", "large.png")])
    bounds = (3136, 100_352)
    result = inspect(
        data, "--recipe", "recipes/demo/qwen2_5_vl_balcaprl.yaml", "--output-dir", tmp_path / "out",
        "--model_name_or_path", "tiny:qwen2_5_vl", "--min_pixels", bounds[0], "--max_pixels", bounds[1],
        "--vllm_max_model_length", 120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    budget = json.loads((tmp_path / "out" / "report.json").read_text())["budget"]
    resize = ImageResize(*bounds)
    small, large = resize.num_image_tokens(8, 8), resize.num_image_tokens(280, 280)
    assert (small, large) == (4, 100)
    assert budget["pixel_bounds"] == list(bounds)
    assert budget["image_tokens"] == {"min": small, "median": (small + large) / 2, "max": large}
    other = budget["prompt_tokens"] + budget["completion_tokens"]
    assert budget["completion_tokens"] == 32 and small + other <= 120 < large + other
    assert (budget["limit"], budget["longest_sequence"], budget["rows_over_limit"]) == (120, large + other, 2)
    assert "image tokens 4/52.0/100" in result.stdout


def test_missing_file_is_exit_2_in_one_line(tmp_path):
    result = inspect(tmp_path / "nothing.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr
    assert inspect(tmp_path / "nothing.jsonl", "--max-rows", "x").returncode == 2


def test_karpathy_json_is_read_whole_and_names_entries_by_index(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    entries = [
        {"filename": "a.png", "split": "train", "sentences": [{"raw": "a cat"}, {"tokens": ["a", "b", "c"]}]},
        {"filename": "gone.png", "split": "val", "sentences": [{"raw": "a dog"}]},
    ]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    result = inspect(tmp_path / "karpathy.json")
    assert result.returncode == 1
    report = json.loads((tmp_path / "karpathy.json.inspect" / "report.json").read_text())
    assert report["position"] == "images index" and report["rows"] == 2
    assert [(row["line"], row["problem"]) for row in report["bad_rows"]["first"]] == [(1, "image file not found")]
    assert report["references"]["word_lengths"]["count"] == 3


def test_inspect_shares_the_data_paths_definitions_without_importing_torch():
    from balcaprl.data import images, inspect
    from balcaprl.length import DEFAULT_WINDOW, word_length

    assert inspect.LENGTH_WINDOW is DEFAULT_WINDOW and inspect.word_length is word_length
    assert inspect.too_wide is images.too_wide and inspect.WIDE_MODES is images.WIDE_MODES
    code = "import sys, balcaprl.data.inspect; print(sorted({'torch', 'datasets', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
