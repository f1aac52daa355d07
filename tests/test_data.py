"""Dataset loaders: every source format on real files, bad rows (error / skip), lazy images, SFT form on TRL."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
from datasets import Dataset, DatasetDict
from PIL import Image
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from balcaprl.data.loading import corpus_references, load_caption_dataset, load_caption_dataset_with_report
from balcaprl.data.sft import to_sft
from balcaprl.models.processors import load_processor

INSTRUCTION = "Describe this image in detail."
SIDE = 56  # the tiny Qwen2.5-VL processor's image size: 4 image tokens


def write_png(path, colour=(200, 40, 40), mode="RGB") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (SIDE, SIDE), colour if mode == "RGB" else 128).save(path)
    return str(path)


def corrupt(path) -> None:
    """Overwrite a file with bytes that are no image, keeping its .png name."""
    path.write_bytes(os.urandom(256))


def user_prompt(instruction: str = INSTRUCTION) -> list[dict]:
    return [{"role": "user", "content": instruction}]


def karpathy_entry(index: int, split: str, *, folder: str | None = "val2014", sentences: int = 2) -> dict:
    entry = {
        "filename": f"img{index}.png",
        "imgid": index,
        "cocoid": 1000 + index,
        "split": split,
        "sentences": [{"raw": f" A red square number {index} view {s}. ", "tokens": ["a"]} for s in range(sentences)],
    }
    if folder is not None:
        entry["filepath"] = folder
    return entry


KARPATHY_SPLITS = ["train", "restval", "val", "test", "train", "restval", "test", "train"]


@pytest.fixture
def karpathy(tmp_path):
    """A COCO-style Karpathy JSON (filepath/filename) next to its images: 3 train, 2 restval, 1 val, 2 test."""
    entries = [karpathy_entry(index, split) for index, split in enumerate(KARPATHY_SPLITS)]
    for index in range(len(entries)):
        write_png(tmp_path / "coco" / "val2014" / f"img{index}.png", (30 * index, 100, 50))
    path = tmp_path / "coco" / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


@pytest.fixture
def jsonl(tmp_path):
    """A JSONL with a relative path, an absolute path, a string reference, a blank line and extra keys."""
    folder = tmp_path / "world"
    write_png(folder / "images" / "a.png")
    absolute = write_png(tmp_path / "elsewhere" / "b.png", (20, 200, 20))
    write_png(folder / "images" / "c.png", mode="L")
    lines = [
        {"image": "images/a.png", "references": ["a red square.", "one red square "], "scene": {"objects": 1}},
        {"image": absolute, "references": "a green square.", "scene": {"objects": 2}},
        {"image": "images/c.png", "references": ["a gray image."], "scene": {"objects": 0}, "difficulty": "easy"},
    ]
    path = folder / "captions.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + "\n")
    return path


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Each source format


class TestKarpathy:
    def test_train_split_includes_restval_and_rows_have_the_contract_columns(self, karpathy):
        dataset = load_caption_dataset(karpathy)
        assert len(dataset) == 5  # 3 train + 2 restval
        assert dataset.column_names[:3] == ["prompt", "image", "references"]
        assert dataset["image_id"] == [1000, 1001, 1004, 1005, 1007]
        assert dataset["split"] == ["train", "restval", "train", "restval", "train"]
        row = dataset[0]
        assert row["prompt"] == user_prompt()
        assert row["references"] == ["A red square number 0 view 0.", "A red square number 0 view 1."]
        assert isinstance(row["image"], Image.Image)
        assert row["image"].mode == "RGB" and row["image"].size == (SIDE, SIDE)

    @pytest.mark.parametrize(
        ("split", "restval_as_train", "image_ids"),
        [
            ("train", False, [1000, 1004, 1007]),
            ("restval", True, [1001, 1005]),
            ("val", True, [1002]),
            ("validation", True, [1002]),
            ("test", True, [1003, 1006]),
        ],
    )
    def test_splits(self, karpathy, split, restval_as_train, image_ids):
        dataset = load_caption_dataset(karpathy, split=split, restval_as_train=restval_as_train)
        assert dataset["image_id"] == image_ids

    def test_custom_instruction_and_image_root(self, karpathy, tmp_path):
        # Flickr8k-style entries have no filepath: images sit directly in image_root.
        entries = [karpathy_entry(index, "test", folder=None) for index in range(2)]
        path = tmp_path / "dataset_flickr8k.json"
        path.write_text(json.dumps({"images": entries}))
        dataset = load_caption_dataset(
            path, format="karpathy", split="test", image_root=karpathy.parent / "val2014", instruction="Caption it."
        )
        assert dataset["prompt"] == [user_prompt("Caption it.")] * 2
        assert dataset[1]["image"].getpixel((0, 0)) == (30, 100, 50)

    def test_missing_key_names_file_entry_and_key(self, karpathy):
        data = json.loads(karpathy.read_text())
        del data["images"][3]["sentences"]
        karpathy.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"images\[3\] of .*dataset_coco\.json: missing key 'sentences'"):
            load_caption_dataset(karpathy)

    def test_not_a_karpathy_json(self, tmp_path):
        path = tmp_path / "other.json"
        path.write_text(json.dumps({"annotations": []}))
        with pytest.raises(ValueError, match=r"other\.json is not a Karpathy-split JSON"):
            load_caption_dataset(path)
        path.write_text('{"images": [\n  {"filename": "a.png",\n  oops}\n]}')
        with pytest.raises(ValueError, match=r"other\.json:3: not valid JSON"):
            load_caption_dataset(path)

    def test_unknown_split(self, karpathy):
        with pytest.raises(ValueError, match=r"splits \['train', 'val', 'test', 'restval'\].*'dev'"):
            load_caption_dataset(karpathy, split="dev")


class TestJsonl:
    def test_rows_paths_and_extra_columns(self, jsonl):
        dataset = load_caption_dataset(jsonl)
        assert len(dataset) == 3
        assert dataset.column_names == ["prompt", "image", "references", "scene", "difficulty"]
        rows = [dataset[index] for index in range(3)]
        assert [row["references"] for row in rows] == [
            ["a red square.", "one red square"],
            ["a green square."],
            ["a gray image."],
        ]
        assert [row["scene"] for row in rows] == [{"objects": 1}, {"objects": 2}, {"objects": 0}]
        assert [row["difficulty"] for row in rows] == [None, None, "easy"]  # a key of a later line only
        assert rows[1]["image"].getpixel((0, 0)) == (20, 200, 20)  # the absolute path
        assert rows[2]["image"].mode == "RGB"  # a grayscale file comes out RGB
        assert all(row["prompt"] == user_prompt() for row in rows)

    def test_invalid_json_line_names_file_and_line(self, jsonl):
        jsonl.write_text(jsonl.read_text() + '{"image": "images/a.png", "references": [\n')
        with pytest.raises(ValueError, match=r"captions\.jsonl:5: not valid JSON"):
            load_caption_dataset(jsonl)

    def test_references_of_the_wrong_type(self, tmp_path):
        write_png(tmp_path / "a.png")
        path = write_jsonl(tmp_path / "rows.jsonl", [{"image": "a.png", "references": [{"raw": "x"}]}])
        with pytest.raises(ValueError, match=r"row 0 \(line 1\) of .*rows\.jsonl: 'references' must be a string"):
            load_caption_dataset(path)

    def test_custom_keys(self, tmp_path):
        write_png(tmp_path / "a.png")
        path = write_jsonl(tmp_path / "rows.jsonl", [{"file": "a.png", "caption": "x y", "image": "kept?"}])
        with pytest.raises(ValueError, match=r"keys \['image'\] would overwrite"):
            load_caption_dataset(path, image_column="file", caption_column="caption")
        write_jsonl(path, [{"file": "a.png", "caption": "x y"}])
        assert load_caption_dataset(path, image_column="file", caption_column="caption")["references"] == [["x y"]]

    def test_extra_key_of_mixed_types_is_named(self, tmp_path):
        write_png(tmp_path / "a.png")
        rows = [{"image": "a.png", "references": "x", "scene": {"objects": 1}}, {"image": "a.png", "references": "y"}]
        rows.append({"image": "a.png", "references": "z", "scene": "three objects"})
        with pytest.raises(ValueError, match=r"rows\.jsonl: the values of key 'scene' do not share one type"):
            load_caption_dataset(write_jsonl(tmp_path / "rows.jsonl", rows))


class TestHuggingFace:
    def test_save_to_disk_dataset_dict_with_string_captions(self, tmp_path):
        def rows(count):
            return [
                {"picture": Image.new("RGB", (SIDE, SIDE), (i, 0, 0)), "caption": f"cap {i}"} for i in range(count)
            ]

        folder = tmp_path / "saved"
        DatasetDict({"train": Dataset.from_list(rows(3)), "test": Dataset.from_list(rows(2))}).save_to_disk(folder)
        dataset = load_caption_dataset(folder, split="test", image_column="picture", caption_column="caption")
        assert dataset.column_names == ["prompt", "image", "references"]
        assert dataset["references"] == [["cap 0"], ["cap 1"]]
        assert dataset[1]["image"].getpixel((0, 0)) == (1, 0, 0)
        with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['train', 'test'\]"):
            load_caption_dataset(folder, split="validation", image_column="picture", caption_column="caption")
        with pytest.raises(ValueError, match=r"no column 'references' \(caption_column\).*\['picture', 'caption'\]"):
            load_caption_dataset(folder, image_column="picture")

    def test_image_folder_with_metadata(self, tmp_path):
        folder = tmp_path / "folder"
        for index in range(3):
            write_png(folder / f"img{index}.png", (0, 60 * index, 0))
        write_jsonl(
            folder / "metadata.jsonl",
            [{"file_name": f"img{index}.png", "captions": [f"caption {index}", "another"]} for index in range(3)],
        )
        dataset = load_caption_dataset(folder, caption_column="captions")
        assert len(dataset) == 3
        assert sorted(dataset["references"]) == [[f"caption {index}", "another"] for index in range(3)]
        assert all(isinstance(dataset[index]["image"], Image.Image) for index in range(3))

    def test_dataset_object_with_path_column_and_image_root(self, tmp_path):
        write_png(tmp_path / "images" / "a.png")
        source = Dataset.from_dict({"path": ["a.png"], "references": [["a red square."]], "prompt": ["replaced"]})
        dataset = load_caption_dataset(source, image_column="path", image_root=tmp_path / "images")
        assert dataset[0]["prompt"] == user_prompt()
        assert dataset[0]["image"].size == (SIDE, SIDE)


# ---------------------------------------------------------------------------------------------------------------------
# Bad rows


@pytest.mark.parametrize("fmt", ["karpathy", "jsonl"])
def test_missing_image_error_names_row_path_and_file(karpathy, tmp_path, fmt):
    if fmt == "karpathy":
        (karpathy.parent / "val2014" / "img4.png").unlink()  # images[4], the third training row
        source, origin = karpathy, r"row 4 \(images\[4\]\) of .*dataset_coco\.json"
    else:
        write_png(tmp_path / "a.png")
        source = write_jsonl(tmp_path / "rows.jsonl", [{"image": "a.png", "references": "x"}] * 2)
        source.write_text(source.read_text() + json.dumps({"image": "gone.png", "references": "y"}) + "\n")
        origin = r"row 2 \(line 3\) of .*rows\.jsonl"
    with pytest.raises(FileNotFoundError, match=origin + r": image file '.*(img4|gone)\.png' not found"):
        load_caption_dataset(source)


def test_corrupt_image_skip_mode_counts_logs_and_drops(karpathy, caplog):
    corrupt(karpathy.parent / "val2014" / "img1.png")
    (karpathy.parent / "val2014" / "img5.png").unlink()
    with caplog.at_level(logging.WARNING, logger="balcaprl.data"):
        dataset, report = load_caption_dataset_with_report(karpathy, on_bad_image="skip")
    assert dataset["image_id"] == [1000, 1004, 1007]
    assert (report.num_rows, report.num_skipped, report.num_candidates) == (3, 2, 5)
    corrupt_row, missing_row = report.skipped
    assert corrupt_row.path.endswith("img1.png") and corrupt_row.reason.startswith("unreadable image")
    assert corrupt_row.origin.startswith("row 1 (images[1]) of ")
    assert missing_row.path.endswith("img5.png") and missing_row.reason == "image file not found"
    assert "2 of 5 skipped" in caplog.text and "img1.png" in caplog.text and "img5.png" in caplog.text
    assert all(dataset[index]["image"].size == (SIDE, SIDE) for index in range(3))


def test_corrupt_image_error_mode_fails_at_load_naming_row_and_file(karpathy):
    corrupt(karpathy.parent / "val2014" / "img1.png")
    with pytest.raises(
        ValueError, match=r"row 1 \(images\[1\]\) of .*dataset_coco\.json: unreadable image .*img1\.png"
    ) as raised:
        load_caption_dataset(karpathy)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "record",
    [{"references": []}, {}, {"references": ["", "   "]}, {"references": "  "}],
    ids=["empty-list", "missing-key", "blank-strings", "blank-string"],
)
def test_row_without_references(tmp_path, record):
    write_png(tmp_path / "a.png")
    rows = [{"image": "a.png", "references": ["ok"]}, {"image": "a.png", **record}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"row 1 \(line 2\) of .*rows\.jsonl: no reference caption \(image '.*a\.png'\)"
    ):
        load_caption_dataset(path)
    dataset, report = load_caption_dataset_with_report(path, on_bad_image="skip")
    assert len(dataset) == 1 and report.num_skipped == 1
    assert report.skipped[0].reason == "no reference caption"


def test_karpathy_entry_without_sentences_is_a_row_without_references(karpathy):
    data = json.loads(karpathy.read_text())
    data["images"][4]["sentences"] = []
    karpathy.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"row 4 \(images\[4\]\) of .*: no reference caption"):
        load_caption_dataset(karpathy)


def test_no_usable_row_at_all(tmp_path):
    corrupt_path = tmp_path / "bad.png"
    corrupt(corrupt_path)
    path = write_jsonl(tmp_path / "rows.jsonl", [{"image": "bad.png", "references": "x"}])
    with pytest.raises(ValueError, match=r"No usable row in .*rows\.jsonl.*0 rows.*1 of 1 skipped"):
        load_caption_dataset(path, on_bad_image="skip")


def test_invalid_arguments(jsonl):
    for kwargs, message in [
        ({"format": "csv"}, r"format must be one of \['auto', 'hf', 'karpathy', 'jsonl', 'coco', 'llava'\]"),
        ({"on_bad_image": "ignore"}, r"on_bad_image must be one of \['error', 'skip'\]"),
        ({"max_samples": 0}, r"max_samples must be a positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_caption_dataset(jsonl, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Lazy images


def test_images_are_opened_only_when_rows_are_read(karpathy, monkeypatch):
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    dataset = load_caption_dataset(karpathy)
    assert dataset.features["image"].decode is False  # the rows hold paths: the load's image check kept no pixels
    opened.clear()  # that check opened every file (tests/test_data_images.py)
    assert corpus_references(dataset)[0] == ["A red square number 0 view 0.", "A red square number 0 view 1."]
    # Read columns through select_columns: `dataset["references"]` (a datasets 5 `Column`) formats whole rows.
    assert dataset.select_columns(["references"])[1]["references"][0].startswith("A red square number 1")
    assert opened == []
    dataset[2]
    assert len(opened) == 1 and opened[0].endswith("img4.png")


def test_error_at_access_names_the_source_row_after_shuffling(karpathy):
    dataset = load_caption_dataset(karpathy).shuffle(seed=3)
    position = list(dataset["image_id"]).index(1005)
    (karpathy.parent / "val2014" / "img5.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"row 5 \(images\[5\]\) of .*dataset_coco\.json: image file '.*img5"):
        dataset[position]
    with pytest.raises(FileNotFoundError, match=r"row 5 \(images\[5\]\)"):
        dataset.__getitems__([position])  # what a DataLoader calls


def test_max_samples_is_a_seeded_subset_in_source_order(karpathy, tmp_path):
    first = load_caption_dataset(karpathy, max_samples=3, seed=1)["image_id"]
    assert len(first) == 3 and first == sorted(first)
    assert load_caption_dataset(karpathy, max_samples=3, seed=1)["image_id"] == first
    corrupt(karpathy.parent / "val2014" / "img0.png")
    dataset, report = load_caption_dataset_with_report(karpathy, max_samples=4, on_bad_image="skip")
    assert len(dataset) == 4 and 1000 not in dataset["image_id"] and report.num_skipped == 1


# ---------------------------------------------------------------------------------------------------------------------
# SFT form and corpus


def test_to_sft_messages_one_row_per_reference(karpathy):
    dataset = load_caption_dataset(karpathy, split="test")
    sft = to_sft(dataset)
    assert sft.column_names == ["images", "messages"]
    assert len(sft) == 4  # 2 images x 2 references
    row = sft[1]
    assert row["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square number 3 view 1."}]},
    ]
    assert len(row["images"]) == 1 and row["images"][0].size == (SIDE, SIDE)


def test_to_sft_random_reference_and_prompt_completion(karpathy):
    dataset = load_caption_dataset(karpathy)
    sft = to_sft(dataset, references="random", form="prompt_completion", seed=5)
    assert len(sft) == len(dataset)
    assert sft.column_names == ["images", "prompt", "completion"]
    assert sft["completion"] == to_sft(dataset, references="random", form="prompt_completion", seed=5)["completion"]
    for row, references in zip(sft, dataset["references"]):
        assert row["prompt"] == user_prompt()
        assert row["completion"][0]["role"] == "assistant" and row["completion"][0]["content"] in references
    with pytest.raises(ValueError, match=r"references must be one of \['all', 'random'\]"):
        to_sft(dataset, references="first")


def test_to_sft_keeps_errors_naming_the_row(karpathy):
    sft = to_sft(load_caption_dataset(karpathy, split="test"))
    corrupt(karpathy.parent / "val2014" / "img6.png")
    with pytest.raises(ValueError, match=r"row 6 \(images\[6\]\) of .*dataset_coco\.json: cannot decode image"):
        sft[3]


def test_corpus_references_one_list_per_image(jsonl):
    assert corpus_references(load_caption_dataset(jsonl)) == [
        ["a red square.", "one red square"],
        ["a green square."],
        ["a gray image."],
    ]


# ---------------------------------------------------------------------------------------------------------------------
# TRL consumes the rows


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("form", ["messages", "prompt_completion"])
def test_sft_trainer_trains_on_the_sft_form(tiny_models, karpathy, tmp_path, family, form):
    path = str(tiny_models[family])
    processor = load_processor(path)
    sft = to_sft(load_caption_dataset(karpathy, split="train"), form=form)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        max_length=None,  # truncation could cut image placeholder tokens
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=path, args=args, train_dataset=sft, processing_class=processor)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

    batch = trainer.data_collator(sft.__getitems__([0, 1]))
    is_image_token = batch["input_ids"] == image_token_id(processor)
    image_tokens_per_row = is_image_token.sum(dim=1)
    assert image_tokens_per_row[0] > 0 and bool((image_tokens_per_row == image_tokens_per_row[0]).all())
    labelled = batch["labels"] != -100
    if form == "messages":  # TRL's default for this form: the loss covers every token, image placeholders included
        assert bool(labelled[is_image_token].all())
    else:  # prompt-completion: the loss covers the caption only
        assert not bool(labelled[is_image_token].any())
        caption_tokens = processor.tokenizer(sft[0]["completion"][0]["content"], add_special_tokens=False)
        assert int(labelled[0].sum()) >= len(caption_tokens["input_ids"])


def test_grpo_trainer_reads_prompt_image_and_references(tiny_models, jsonl, tmp_path):
    seen = []

    def reference_overlap(prompts, completions, references, image, **kwargs):
        seen.append((references, image))
        return [float(len(refs)) for refs in references]

    path = str(tiny_models["qwen2_5_vl"])
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    dataset = load_caption_dataset(jsonl, instruction="Describe the image.")
    trainer = GRPOTrainer(
        model=path,
        reward_funcs=reference_overlap,
        args=args,
        train_dataset=dataset,
        processing_class=load_processor(path),
    )
    trainer.train()
    references, images = seen[0]
    assert all(refs in corpus_references(dataset) for refs in references)
    assert all(isinstance(image, Image.Image) for image in images)
