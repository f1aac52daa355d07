"""Which checkpoint a run resumes from: the newest *complete* ``checkpoint-N`` in its ``output_dir``.

A process killed inside a save (a preempted job) or a full disk leaves the newest checkpoint half-written, and
resuming from it fails every time. transformers' `Trainer` writes a checkpoint's files in a fixed order — weights,
optimizer and scheduler, RNG states, and ``trainer_state.json`` last — so a checkpoint is taken as complete when:

- ``trainer_state.json`` parses and names its ``global_step``;
- its weights are there and whole: a ``*.safetensors`` file (full model or adapter) whose header-declared size equals
  the file's size, every shard of a ``*.safetensors.index.json``, or a DeepSpeed ``latest`` tag whose folder exists.

`newest_complete_checkpoint` skips incomplete ones (newest first) and says why; `balcaprl train` / `sft` resume from
what it returns and log a warning naming each one skipped, and `balcaprl preflight` reports the same.

A run's identity (`run_identity`: stage, model and LoRA settings, data, estimator, reward specs) is stored in
``output_dir/balcaprl_run.json``; resuming into the same folder with another identity is refused before any weights
load (`balcaprl.runtime.check_resume_identity`), naming the keys that differ.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def _safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is not whole (its header states the data size), or None."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            return f"{path.name} is truncated (its header alone is {header_size} bytes, the file {size})"
        try:
            header = json.loads(file.read(header_size))
        except ValueError:
            return f"{path.name} has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def _weights_problem(folder: Path) -> str | None:
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return f"{index.name} is unreadable"
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                return f"{shard}, listed in {index.name}, is missing"
            if problem := _safetensors_problem(folder / shard):
                return problem
        return None
    weights = sorted(folder.glob("*.safetensors"))
    for path in weights:
        if problem := _safetensors_problem(path):
            return problem
    if weights:
        return None
    latest = folder / "latest"  # DeepSpeed's engine checkpoint: its tag names the folder of the shards
    if latest.is_file() and (folder / latest.read_text().strip()).is_dir():
        return None
    return "no model weights (*.safetensors or a DeepSpeed checkpoint)"


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint to resume from (one sentence), or None when it is."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save did not finish)"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (ValueError, AttributeError):
        return f"{TRAINER_STATE} is truncated or not JSON (the save did not finish)"
    if not isinstance(step, int):
        return f"{TRAINER_STATE} names no global_step"
    return _weights_problem(folder)


def newest_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete ``checkpoint-N`` of ``output_dir`` or None, [(newer incomplete checkpoint, why), ...]).

    Older incomplete checkpoints than the one returned are not looked at: they are never resumed from.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None, []
    numbered = [(int(m.group(1)), path) for path in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(path.name))]
    skipped = []
    for _, path in sorted(numbered, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


# ------------------------------------------------------------------------------------------------------ run identity
RUN_IDENTITY = "balcaprl_run.json"
# Recipe keys that make a checkpoint belong to one run: resuming with another value would load weights, adapters or
# optimizer states of another shape, or silently continue another experiment.
MODEL_IDENTITY_KEYS = (
    "model_name_or_path",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_preset",
    "freeze_vision_tower",
    "freeze_projector",
)
DATA_IDENTITY_KEYS = ("dataset", "dataset_split")
TRAINING_IDENTITY_KEYS = ("advantage_estimator", "reward_weights")
REWARD_IDENTITY_KEYS = ("reward_funcs",)


def run_identity(stage: str, *configs) -> dict:
    """The identity of a run (``stage`` and the identity keys each config has), as plain JSON values."""
    identity = {"stage": stage}
    keys = MODEL_IDENTITY_KEYS + DATA_IDENTITY_KEYS + TRAINING_IDENTITY_KEYS + REWARD_IDENTITY_KEYS
    for config in configs:
        for key in keys:
            if hasattr(config, key):
                identity[key] = json.loads(json.dumps(getattr(config, key), default=str))
    return identity


def identity_differences(output_dir: str | Path, identity: dict) -> list[str]:
    """``key: stored -> now`` for each identity key whose value differs from the one stored in ``output_dir``."""
    stored_file = Path(output_dir) / RUN_IDENTITY
    if not stored_file.is_file():
        return []
    stored = json.loads(stored_file.read_text())
    return [
        f"{key}: {stored.get(key)!r} -> {identity.get(key)!r}"
        for key in sorted(set(stored) | set(identity))
        if stored.get(key) != identity.get(key)
    ]


def write_run_identity(output_dir: str | Path, identity: dict) -> None:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{RUN_IDENTITY}.tmp"
    temporary.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    temporary.replace(folder / RUN_IDENTITY)  # whole or absent, like a checkpoint should be
