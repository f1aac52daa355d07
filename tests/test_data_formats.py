"""Published caption dataset layouts (LLaVA / ShareGPT4V conversations, COCO captions annotations, Flickr Karpathy
splits) written as the releases lay them out, loaded through `load_caption_dataset`, and the format detection."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from balcaprl.config import CaptionDataConfig
from balcaprl.data.loading import load_caption_dataset, load_caption_dataset_with_report

SIDE = 56


def write_image(path, colour) -> str:
    """A tiny real image, JPEG or PNG by its suffix (the published datasets' images are JPEGs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIDE, SIDE), colour).save(path)
    return str(path)


def stored_paths(dataset) -> list[str]:
    """Each row's image path, without opening the images."""
    return [row["image"]["path"] for row in dataset.with_format(None)]


def close_to(pixel, colour) -> bool:
    return all(abs(a - b) <= 3 for a, b in zip(pixel, colour))  # JPEG rounds flat colours by a unit or two


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA / ShareGPT4V conversations

LLAVA_ENTRIES = [
    {
        "id": "000000000009",
        "image": "coco/train2017/000000000009.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
            {"from": "gpt", "value": "The image shows a lunch box with broccoli and bread.\n"},
        ],
    },
    {
        "id": "sa_545504",
        "image": "sam/images/sa_545504.jpg",
        "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"},
            {"from": "gpt", "value": "A street with parked cars."},
            {"from": "human", "value": "How many cars are there?"},
            {"from": "gpt", "value": "Three."},
        ],
    },
    {
        "id": "000000000009_2",
        "image": "coco/train2017/000000000009.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWrite a caption."},
            {"from": "gpt", "value": "Food in a plastic container."},
        ],
    },
]


@pytest.fixture
def llava_root(tmp_path):
    """ShareGPT4V's layout: the annotations JSON beside a ``data`` folder of its source datasets' images."""
    data = tmp_path / "ShareGPT4V" / "data"
    write_image(data / "coco" / "train2017" / "000000000009.jpg", (200, 40, 40))
    write_image(data / "sam" / "images" / "sa_545504.jpg", (40, 40, 200))
    return tmp_path / "ShareGPT4V"


class TestLlava:
    def test_json_list_first_answer_is_the_reference_and_shared_images_stay_separate_rows(self, llava_root):
        path = llava_root / "sharegpt4v_instruct_gpt4-vision_cap100k.json"
        path.write_text(json.dumps(LLAVA_ENTRIES))
        dataset, report = load_caption_dataset_with_report(
            path, format="auto", split="train", image_root=llava_root / "data"
        )
        assert report.format == "llava"
        assert dataset.column_names == ["prompt", "image", "references", "id"]
        rows = [dataset[index] for index in range(3)]
        assert [row["references"] for row in rows] == [
            ["The image shows a lunch box with broccoli and bread."],
            ["A street with parked cars."],  # the first answer only: later turns answer follow-up questions
            ["Food in a plastic container."],
        ]
        assert [row["id"] for row in rows] == ["000000000009", "sa_545504", "000000000009_2"]
        data = llava_root / "data"
        assert stored_paths(dataset) == [
            str(data / "coco/train2017/000000000009.jpg"),
            str(data / "sam/images/sa_545504.jpg"),
            str(data / "coco/train2017/000000000009.jpg"),
        ]
        assert close_to(rows[1]["image"].getpixel((0, 0)), (40, 40, 200))

    def test_jsonl_defaults_image_root_to_the_file_folder(self, llava_root):
        path = llava_root / "data" / "llava.jsonl"
        path.write_text("\n".join(json.dumps(entry) for entry in LLAVA_ENTRIES[:2]) + "\n\n")
        dataset, report = load_caption_dataset_with_report(path, format="auto")
        assert report.format == "llava"
        assert stored_paths(dataset) == [
            str(llava_root / "data/coco/train2017/000000000009.jpg"),
            str(llava_root / "data/sam/images/sa_545504.jpg"),
        ]
        assert dataset.with_format(None)["references"] == [
            [LLAVA_ENTRIES[0]["conversations"][1]["value"].strip()],
            ["A street with parked cars."],
        ]

    def test_entries_without_image_or_answer_are_bad_rows(self, llava_root):
        entries = [
            *LLAVA_ENTRIES[:1],
            {
                "id": "text-only",
                "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
            },
            {
                "id": "no-answer",
                "image": "sam/images/sa_545504.jpg",
                "conversations": [{"from": "human", "value": "?"}],
            },
        ]
        path = llava_root / "data" / "mix.json"
        path.write_text(json.dumps(entries))
        with pytest.raises(ValueError, match=r"row 1 \(entry 1\) of .*mix\.json: no 'image' path"):
            load_caption_dataset(path)
        dataset, report = load_caption_dataset_with_report(path, format="llava", on_bad_image="skip")
        assert len(dataset) == 1
        assert [(row.origin.split(" of ")[0], row.reason) for row in report.skipped] == [
            ("row 1 (entry 1)", "no 'image' path"),
            ("row 2 (entry 2)", "no reference caption"),
        ]

    @pytest.mark.parametrize(
        ("entry", "message"),
        [
            ({"id": "x", "image": "a.jpg", "conversations": "gpt: a cat"}, r"'conversations' must be a list"),
            ({"id": "x", "image": "a.jpg", "conversations": [{"from": "gpt"}]}, r"conversations\[0\] is not a turn"),
            ({"id": "x", "image": ["a.jpg", "b.jpg"], "conversations": []}, r"'image' must be one image path"),
            ({"id": "x", "image": "a.jpg"}, r"missing key 'conversations'"),
        ],
        ids=["conversations-not-a-list", "turn-without-value", "several-images", "no-conversations"],
    )
    def test_malformed_entry_names_file_and_entry(self, tmp_path, entry, message):
        path = tmp_path / "llava.json"
        path.write_text(json.dumps([LLAVA_ENTRIES[0], entry]))
        with pytest.raises(ValueError, match=r"entry 1 \(id 'x'\) of .*llava\.json: " + message):
            load_caption_dataset(path, format="auto")
        lines = tmp_path / "llava.jsonl"
        lines.write_text(json.dumps(LLAVA_ENTRIES[0]) + "\n" + json.dumps(entry) + "\n")
        with pytest.raises(ValueError, match=r"line 2 \(id 'x'\) of .*llava\.jsonl: " + message):
            load_caption_dataset(lines, format="auto")


# ---------------------------------------------------------------------------------------------------------------------
# COCO captions annotations


def coco_captions() -> dict:
    """captions_val2014.json's layout: two images with captions (unordered, one with a trailing newline as in the
    release), one image without any."""
    images = [
        {"license": 3, "file_name": "COCO_val2014_000000391895.jpg", "coco_url": "http://images.cocodataset.org/x",
         "height": SIDE, "width": SIDE, "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://farm9/x",
         "id": 391895},
        {"license": 4, "file_name": "COCO_val2014_000000522418.jpg", "coco_url": "http://images.cocodataset.org/y",
         "height": SIDE, "width": SIDE, "date_captured": "2013-11-14 11:38:44", "flickr_url": "http://farm1/y",
         "id": 522418},
        {"license": 3, "file_name": "COCO_val2014_000000184613.jpg", "coco_url": "http://images.cocodataset.org/z",
         "height": SIDE, "width": SIDE, "date_captured": "2013-11-14 12:36:29", "flickr_url": "http://farm3/z",
         "id": 184613},
    ]  # fmt: skip
    annotations = [
        {"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a small moped on a dirt road. "},
        {"image_id": 522418, "id": 681330, "caption": "A woman wearing a net on her head cutting a cake. "},
        {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike on a dirt road on the countryside.\n"},
    ]
    return {
        "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "year": 2014},
        "images": images,
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution"}],
        "type": "captions",
        "annotations": annotations,
    }


@pytest.fixture
def coco(tmp_path):
    """COCO's layout: ``annotations/captions_val2014.json`` beside the ``val2014`` image folder."""
    for index, image in enumerate(coco_captions()["images"]):
        write_image(tmp_path / "coco" / "val2014" / image["file_name"], (60 * index, 120, 30))
    path = tmp_path / "coco" / "annotations" / "captions_val2014.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco_captions()))
    return path


class TestCoco:
    def test_one_row_per_image_with_all_its_captions(self, coco):
        image_root = coco.parent.parent / "val2014"
        dataset, report = load_caption_dataset_with_report(
            coco, format="auto", split="train", image_root=image_root, on_bad_image="skip"
        )
        assert report.format == "coco"
        assert dataset.column_names == ["prompt", "image", "references", "image_id"]
        assert dataset.with_format(None)["image_id"] == [391895, 522418]
        assert dataset.with_format(None)["references"] == [
            [
                "A man with a red helmet on a small moped on a dirt road.",
                "Man riding a motor bike on a dirt road on the countryside.",
            ],
            ["A woman wearing a net on her head cutting a cake."],
        ]
        assert stored_paths(dataset) == [
            str(image_root / "COCO_val2014_000000391895.jpg"),
            str(image_root / "COCO_val2014_000000522418.jpg"),
        ]
        assert close_to(dataset[1]["image"].getpixel((0, 0)), (60, 120, 30))
        assert [(row.origin.split(" of ")[0], row.reason) for row in report.skipped] == [
            ("row 2 (images[2], id 184613)", "no reference caption")
        ]

    def test_image_without_captions_is_an_error_by_default_and_image_root_defaults_to_the_file_folder(self, coco):
        with pytest.raises(ValueError, match=r"row 2 \(images\[2\], id 184613\) of .*captions_val2014\.json: no ref"):
            load_caption_dataset(coco, image_root=coco.parent.parent / "val2014")
        with pytest.raises(FileNotFoundError, match=r"annotations/COCO_val2014_000000391895\.jpg' not found"):
            load_caption_dataset(coco, format="coco")

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (lambda data: data["annotations"][1].pop("caption"), r"annotation id 681330 .*: missing key 'caption'"),
            (
                lambda data: data["annotations"][2].update(image_id=7),
                r"annotation id 771687 .*: image_id 7 is not the id of any of the file's images",
            ),
            (lambda data: data["images"][1].pop("file_name"), r"images\[1\] of .*: missing key 'file_name'"),
        ],
        ids=["annotation-without-caption", "unknown-image-id", "image-without-file-name"],
    )
    def test_malformed_file_names_file_and_entry(self, coco, change, message):
        data = coco_captions()
        change(data)
        coco.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message.replace(".*", r".*captions_val2014\.json", 1)):
            load_caption_dataset(coco, format="auto")


# ---------------------------------------------------------------------------------------------------------------------
# Flickr30k / Flickr8k Karpathy splits


def flickr_entry(imgid: int, filename: str, split: str) -> dict:
    """An entry of dataset_flickr30k.json: no ``filepath`` and no ``cocoid``, sentences with tokens and raw text."""
    raws = [f"Two young guys number {imgid} look at their hands .", f"A picture number {imgid} of men ."]
    sentences = [
        {"tokens": raw.lower().rstrip(" .").split(), "raw": raw, "imgid": imgid, "sentid": 2 * imgid + number}
        for number, raw in enumerate(raws)
    ]
    return {"sentids": [2 * imgid, 2 * imgid + 1], "imgid": imgid, "sentences": sentences, "split": split,
            "filename": filename}  # fmt: skip


def test_flickr30k_karpathy_file_loads_as_published(tmp_path):
    folder = tmp_path / "flickr30k-images"
    names = ["1000092795.jpg", "10002456.jpg", "1000268201.jpg", "1000344755.jpg"]
    for index, name in enumerate(names):
        write_image(folder / name, (50 * index, 80, 160))
    splits = ["train", "val", "test", "train"]
    path = tmp_path / "dataset_flickr30k.json"
    entries = [flickr_entry(index, name, split) for index, (name, split) in enumerate(zip(names, splits))]
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    dataset, report = load_caption_dataset_with_report(path, format="auto", split="train", image_root=folder)
    assert report.format == "karpathy"
    assert dataset.with_format(None)["image_id"] == [0, 3]  # imgid: Flickr entries have no cocoid
    assert dataset.with_format(None)["references"][1] == [
        "Two young guys number 3 look at their hands .",
        "A picture number 3 of men .",
    ]
    assert stored_paths(dataset) == [str(folder / "1000092795.jpg"), str(folder / "1000344755.jpg")]
    assert close_to(dataset[1]["image"].getpixel((0, 0)), (150, 80, 160))
    for split, expected in [("val", [1]), ("validation", [1]), ("test", [2])]:
        loaded = load_caption_dataset(path, format="karpathy", split=split, image_root=folder)
        assert loaded.with_format(None)["image_id"] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Detection and recipes


def test_json_of_another_shape_names_the_file_and_the_shapes_expected(tmp_path):
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps({"categories": [], "info": {}}))
    with pytest.raises(
        ValueError,
        match=r"instances_val2014\.json is not .*expected a Karpathy split file .*COCO captions annotations "
        r"\(\{'images', 'annotations'\}\) or LLaVA conversations .*got an object with keys \['categories', 'info'\]",
    ):
        load_caption_dataset(path, format="auto")
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}]))
    with pytest.raises(ValueError, match=r"instances_val2014\.json is not .*got a list of 1 items"):
        load_caption_dataset(path)


def test_plain_jsonl_is_still_detected_as_jsonl(tmp_path):
    write_image(tmp_path / "a.png", (1, 2, 3))
    path = tmp_path / "captions.jsonl"
    path.write_text("\n" + json.dumps({"image": "a.png", "references": ["a dark square."]}) + "\n")
    dataset, report = load_caption_dataset_with_report(path)
    assert report.format == "jsonl" and dataset.with_format(None)["references"] == [["a dark square."]]


@pytest.mark.parametrize("dataset_format", ["coco", "llava"])
def test_recipes_accept_the_new_formats(dataset_format):
    assert CaptionDataConfig(dataset="x.json", dataset_format=dataset_format).dataset_format == dataset_format
    with pytest.raises(ValueError, match=r"dataset_format must be one of .*'coco', 'llava'"):
        CaptionDataConfig(dataset="x.json", dataset_format="sharegpt")
