"""Caption datasets → rows ``{prompt, image, references}`` for TRL's `GRPOTrainer`, and their SFT form.

Three sources, one entry point (`load_caption_dataset`):

- a Hugging Face dataset: a Hub name, a ``save_to_disk`` folder, a data folder (e.g. ``imagefolder`` with a
  ``metadata.jsonl``) or a `datasets.Dataset` object, with configurable image and caption columns;
- a Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``) and the folder of its images, the data of
  the GRPO-captioning paper (arXiv 2503.01333): COCO's ``restval`` counts as training data by default;
- a JSONL file, one ``{"image": path, "references": [...], ...}`` object per line; relative image paths are relative to
  the file's folder, extra keys (e.g. a ``scene`` dict) become columns.

Every row is ``prompt`` (``[{"role": "user", "content": instruction}]``, into which TRL inserts the image), ``image``
(a `PIL.Image.Image` in RGB) and ``references`` (a non-empty ``list[str]``), plus the source's extra columns.

Images are opened lazily: the dataset stores paths (or the source's bytes) under a ``datasets.Image(decode=False)``
feature, and a ``with_transform`` formatter opens each image when its row is read — so ``dataset.features["image"]``
says ``decode=False`` while rows hold PIL images. Read text columns with ``dataset.select_columns([...])`` or
`corpus_references`: in `datasets` 5, ``dataset["references"]`` is a lazy `Column` that formats whole rows, images
included.

Bad rows. Rows are named by their place in the source ("row 4 (images[4]) of dataset_coco.json", "row 2 (line 3)
of captions.jsonl", "row 7 of split 'train' of <dataset>"), which stays true after shuffling or selecting. (An image
stored as bytes inside a Hugging Face dataset has no path to find its row by: its decoding error names the dataset.)

- ``on_bad_image="error"`` (default): at load, a row without references (no key, an empty list, blank strings) is a
  `ValueError` and a missing image file a `FileNotFoundError`, naming the first such row, its image path and the
  source. Files are not decoded at load: one that cannot be decoded raises a `ValueError` naming row, path and source
  when its row is read — never an error deep inside a processor.
- ``on_bad_image="skip"``: such rows, and files that fail ``PIL.Image.verify()``, are dropped. The rows skipped, with
  their paths and reasons, are logged (a warning listing the first few) and returned in a `LoadReport` by
  `load_caption_dataset_with_report`. ``verify`` misses some damage (e.g. a truncated JPEG body); such a file still
  raises, with its row, when read.
- Malformed sources always raise, naming the file and line (JSONL, JSON syntax) or entry and key (Karpathy).

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
        "to_sft": "sft",
        "FORMATS": "constants",
        "BAD_IMAGE_POLICIES": "constants",
        "DEFAULT_INSTRUCTION": "constants",
    },
)
