"""Caption datasets → rows ``{prompt, image, references}`` for TRL's `GRPOTrainer`, and their SFT form.

Five sources, one entry point (`load_caption_dataset`):

- a Hugging Face dataset: a Hub name, a ``save_to_disk`` folder, a data folder (e.g. ``imagefolder`` with a
  ``metadata.jsonl``) or a `datasets.Dataset` object, with configurable image and caption columns;
- a Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``) and the folder of its images, the data of
  the GRPO-captioning paper (arXiv 2503.01333): COCO's ``restval`` counts as training data by default;
- a JSONL file, one ``{"image": path, "references": [...], ...}`` object per line; relative image paths are relative to
  the file's folder, extra keys (e.g. a ``scene`` dict) become columns;
- COCO captions annotations (``captions_train2014.json``: ``images`` + ``annotations``), one row per image with all its
  captions;
- LLaVA / ShareGPT4V conversations (a JSON list or JSONL of ``{"image", "conversations"}``), the first assistant turn
  as the reference.

Every row is ``prompt`` (``[{"role": "user", "content": instruction}]``, into which TRL inserts the image), ``image``
(a `PIL.Image.Image` in 8-bit RGB, converted by `to_rgb`: 16-bit grey scaled to 8 bits, not clipped; transparency
composited on white) and ``references`` (a non-empty ``list[str]``), plus the source's extra columns.

Images are opened lazily: the dataset stores paths (or the source's bytes) under a ``datasets.Image(decode=False)``
feature, and a ``with_transform`` formatter opens each image when its row is read — so ``dataset.features["image"]``
says ``decode=False`` while rows hold PIL images. Read text columns with ``dataset.select_columns([...])`` or
`corpus_references`: in `datasets` 5, ``dataset["references"]`` is a lazy `Column` that formats whole rows, images
included.

Bad rows. Rows are named by their place in the source ("row 4 (images[4]) of dataset_coco.json", "row 2 (line 3)
of captions.jsonl", "row 7 of split 'train' of <dataset>"), which stays true after shuffling or selecting. (An image
stored as bytes inside a Hugging Face dataset has no path to find its row by once loaded: an error reading it names
the dataset.) Malformed sources always raise, naming the file and line (JSONL, JSON syntax) or entry and key
(Karpathy).

Rows are checked at load, within a bounded budget, whatever the policy: every row must have references and an
existing image file whose header PIL reads (format and size), with an aspect ratio of at most 200:1
(`MAX_ASPECT_RATIO`: Qwen2-VL's resize refuses wider images, and LLaVA's centre crop keeps a sliver of them). Images
are also decoded in full and converted to RGB, as reading their row does: all of them when at most
`DECODE_CHECK_ROWS` (512) rows are examined, else a seeded random sample of 512, plus the dataset's first row. (The
cost, measured: docs/performance.md.) A row that fails a check follows ``on_bad_image``:

- ``"error"`` (default): one `ValueError` line (`FileNotFoundError` for a missing file) naming the first such row,
  its image path and the source.
- ``"skip"``: the row is dropped. Every image is then also verified (``PIL.Image.verify``: PNG checksums, which reads
  each PNG whole). The rows skipped, with their paths and reasons, are logged (a warning listing the first few) and
  returned in a `LoadReport` by `load_caption_dataset_with_report`.

Damage the budget leaves unseen (e.g. a truncated JPEG body outside the decode sample) surfaces when its row is read,
at any step of a run, as one `ValueError` line naming the row and the file, whatever the policy: a row already drawn
into a batch cannot be skipped.

Image size. With an `ImageResize` (``image_resize=``, or `resize_images` on a loaded dataset;
`balcaprl.models.image_resize_for` derives it from the policy's processor), each image is resized once, when its row
is read, to the size the Qwen2.5-VL processor would resize it to (``smart_resize`` within the recipe's
``min_pixels`` / ``max_pixels``). The trainer's processor, vLLM (which processes the raw image with the checkpoint's
own defaults, not the recipe's bounds) and the judge rewards then all receive the same pixels and agree on the number
of image tokens.

`to_sft` turns a loaded dataset into what TRL's `SFTTrainer` takes for vision-language models, and
`corpus_references` lists the references per image, e.g. for CIDEr-D document frequencies.
"""

from balcaprl._lazy import lazy_exports

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DEFAULT_INSTRUCTION",
    "FORMATS",
    "ImageResize",
    "LoadReport",
    "SkippedRow",
    "corpus_references",
    "load_caption_dataset",
    "load_caption_dataset_with_report",
    "resize_images",
    "to_rgb",
    "to_sft",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "load_caption_dataset": "loading",
        "load_caption_dataset_with_report": "loading",
        "LoadReport": "loading",
        "SkippedRow": "loading",
        "corpus_references": "loading",
        "ImageResize": "images",
        "resize_images": "images",
        "to_rgb": "images",
        "to_sft": "sft",
        "FORMATS": "constants",
        "BAD_IMAGE_POLICIES": "constants",
        "DEFAULT_INSTRUCTION": "constants",
    },
)
