"""Where a model lives and which family it is: hub names, local folders, ``tiny:<family>`` (built offline on first
use), and the base checkpoint of an adapter folder.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

from transformers import AutoConfig

SUPPORTED_MODEL_TYPES = ("llava", "qwen2_5_vl")


def resolve_model_path(model_name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``tiny:<family>`` → a tiny offline model built (once) under ``cache_dir``; anything else is returned as is."""
    if not model_name_or_path.startswith("tiny:"):
        return model_name_or_path
    from balcaprl.models.tiny import FAMILIES, build_tiny_model

    family = model_name_or_path.removeprefix("tiny:")
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny model {model_name_or_path!r}; use one of {[f'tiny:{f}' for f in FAMILIES]}.")
    # Keyed by the code that builds and saves it: a model cached by an older balcaprl is not silently reused.
    folder = Path(cache_dir or Path.home() / ".cache" / "balcaprl" / "tiny") / f"{family}-{_builder_fingerprint()}"
    if not (folder / "config.json").is_file():
        # Several launched processes may get here at once: each builds aside, the first rename wins.
        staging = folder.with_name(f"{folder.name}.building-{os.getpid()}")
        build_tiny_model(family, staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first (same deterministic build)
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


@lru_cache(maxsize=1)
def _builder_fingerprint() -> str:
    import hashlib

    from balcaprl.models import tiny

    digest = hashlib.sha256()
    for path in sorted({tiny.__file__, __file__}):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


# Where an adapter's base checkpoint is when the path in its adapter_config.json is not on this machine.
ADAPTER_BASE_ENV = "BALCAPRL_ADAPTER_BASE"


def adapter_base(model_name_or_path: str, base_model: str | None = None) -> str | None:
    """The base checkpoint of a LoRA adapter folder, None for anything else (a full checkpoint, a Hub name).

    The base is ``base_model`` when given, else the ``BALCAPRL_ADAPTER_BASE`` environment variable, else the
    ``base_model_name_or_path`` of the folder's ``adapter_config.json``. A base given as a local path that does not
    exist here (e.g. trained on another machine) is an error that says which file names it and how to override it.
    """
    adapter_config = Path(model_name_or_path) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    override = base_model or os.environ.get(ADAPTER_BASE_ENV)
    if override:
        return resolve_model_path(override)
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    looks_local = base and (os.path.isabs(base) or base.startswith(".") or base.count("/") > 1)
    if not base or (looks_local and not os.path.isdir(base)):
        raise ValueError(
            f"{adapter_config} names the base model {base!r}, which is not a folder here. Point "
            f"{ADAPTER_BASE_ENV}=<base checkpoint or Hub name> at where the base is on this machine (`balcaprl merge` "
            "takes --base-model), or edit base_model_name_or_path in that file."
        )
    return base


def model_source_problem(model_name_or_path: str) -> str | None:
    """Why ``model_name_or_path`` cannot be loaded, when that is known without loading: a local path that is not a
    folder, a folder without a model, or a Hub name missing from the cache of an offline machine. None otherwise
    (a Hub name online is for loading to judge)."""
    name = model_name_or_path
    if name.startswith("tiny:"):
        return None
    if os.path.isdir(name):
        if not any((Path(name) / file).is_file() for file in ("config.json", "adapter_config.json")):
            return f"model_name_or_path {name}: the folder holds no config.json (nor a LoRA adapter_config.json)."
        return None
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name):
        return (
            f"model_name_or_path {name}: no such folder (a local path; a Hugging Face Hub name is 'org/name'). "
            "Point it at a checkpoint folder, e.g. the output_dir of `balcaprl sft`."
        )
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        return (
            f"model_name_or_path {name}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE "
            "is set. Download it where the Hub is reachable (`hf download NAME`), or give a local folder."
        )
    return None


def model_family(model_name_or_path: str) -> str:
    """``"qwen2_5_vl"`` or ``"llava"`` from a checkpoint's config, or a LoRA adapter folder's base's (a clear error
    for anything else)."""
    model_type = AutoConfig.from_pretrained(adapter_base(model_name_or_path) or model_name_or_path).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{model_name_or_path!r} is a {model_type!r} model; balcaprl supports {list(SUPPORTED_MODEL_TYPES)}."
        )
    return model_type
