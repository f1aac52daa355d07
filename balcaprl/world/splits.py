"""Seeded scene splits of the shapes world (disjoint by scene graph), their references, and their export as the
project's JSONL or a `datasets.Dataset`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from balcaprl.world.captions import OMISSION_KINDS, describe
from balcaprl.world.scene import (
    COLOURS,
    HELD_OUT_SHARE,
    IMAGE_SIZE,
    MAX_JITTER,
    NUMBER_WORDS,
    PLACE_PHRASES,
    POSITIONS,
    PROMPT,
    RELATION_PHRASES,
    SHAPES,
    SIZES,
    SPLITS,
    STYLES,
    Scene,
    WorldObject,
)


@dataclass(frozen=True)
class WorldConfig:
    """How scenes and their references are generated.

    Args:
        min_objects, max_objects: objects per scene, drawn uniformly (1 ≤ min ≤ max ≤ 5).
        min_references, max_references: references per scene, drawn uniformly.
        omission_rate: probability that a reference leaves out one object, one size or one position it would
            otherwise state — as human captions do; the exact rewards still see the whole scene.
        omission_kinds: what an omission may leave out, a subset of ("object", "size", "position"); with
            ("object",) an omitting reference of a one-object scene leaves nothing out.
        styles: reference styles to draw from (each scene uses distinct styles while it can); see `describe`.
        jitter: maximum offset of a shape inside its region, as a fraction of the image side (≤ 0.02).
        large_first: references name large objects before small ones, as people name the most salient thing
            first (`describe`); False: in random order.
    """

    min_objects: int = 1
    max_objects: int = 3
    min_references: int = 3
    max_references: int = 5
    omission_rate: float = 0.25
    omission_kinds: tuple[str, ...] = OMISSION_KINDS
    styles: tuple[str, ...] = STYLES
    jitter: float = MAX_JITTER
    large_first: bool = False

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"Need 1 <= min_objects <= max_objects <= {len(POSITIONS)}, got {self}.")
        if not 1 <= self.min_references <= self.max_references:
            raise ValueError(f"Need 1 <= min_references <= max_references, got {self}.")
        if not 0.0 <= self.omission_rate <= 1.0:
            raise ValueError(f"omission_rate must lie in [0, 1], got {self.omission_rate}.")
        if not self.omission_kinds or set(self.omission_kinds) - set(OMISSION_KINDS):
            raise ValueError(f"omission_kinds must be a non-empty subset of {list(OMISSION_KINDS)}, got {self}.")
        unknown = [style for style in self.styles if style not in STYLES]
        if unknown or not self.styles:
            raise ValueError(f"Unknown reference styles {unknown} (or none given); choose from {list(STYLES)}.")
        if not 0.0 <= self.jitter <= MAX_JITTER:
            raise ValueError(f"jitter must lie in [0, {MAX_JITTER}] so that shapes never overlap, got {self.jitter}.")


def _sample_objects(rng: random.Random, config: WorldConfig) -> tuple[WorldObject, ...]:
    count = rng.randint(config.min_objects, config.max_objects)
    kinds = rng.sample([(shape, colour) for shape in SHAPES for colour in COLOURS], count)
    positions = rng.sample(POSITIONS, count)
    return tuple(
        WorldObject(
            shape,
            colour,
            rng.choice(SIZES),
            position,
            (
                round(rng.uniform(-config.jitter, config.jitter), 4),
                round(rng.uniform(-config.jitter, config.jitter), 4),
            ),
        )
        for (shape, colour), position in zip(kinds, positions)
    )


def reference_captions(scene: Scene, rng: random.Random, config: WorldConfig | None = None) -> tuple[str, ...]:
    """References of ``scene``: distinct styles (in random order, cycling when more are asked than configured),
    each omitting something with probability ``config.omission_rate``."""
    config = config or WorldConfig()
    count = rng.randint(config.min_references, config.max_references)
    styles: list[str] = []
    while len(styles) < count:
        styles += rng.sample(config.styles, len(config.styles))
    return tuple(
        describe(
            scene,
            style,
            rng,
            omit=rng.random() < config.omission_rate,
            omission_kinds=config.omission_kinds,
            large_first=config.large_first,
        )
        for style in styles[:count]
    )


def generate_scene(rng: random.Random, config: WorldConfig | None = None) -> Scene:
    """One random scene with its references."""
    config = config or WorldConfig()
    scene = Scene(_sample_objects(rng, config))
    return Scene(scene.objects, reference_captions(scene, rng, config))


def split_of(scene: Scene) -> str:
    """The split that owns ``scene``'s graph: a stable hash of `Scene.key` (independent of seeds and sizes)."""
    digest = hashlib.sha256(json.dumps(scene.key()).encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    if fraction < HELD_OUT_SHARE["test"]:
        return "test"
    if fraction < HELD_OUT_SHARE["test"] + HELD_OUT_SHARE["validation"]:
        return "validation"
    return "train"


def make_split(name: str, num_scenes: int, seed: int = 0, config: WorldConfig | None = None) -> list[Scene]:
    """``num_scenes`` seeded scenes of split ``name`` (train, validation or test).

    Each split draws from its own random stream (seeded by split name and ``seed``) and keeps only the scenes whose
    graph `split_of` assigns to it, so the splits never share a scene graph. Within a split a graph may repeat
    (there are only 120 one-object graphs), drawn with a different jitter and references.
    """
    if name not in SPLITS:
        raise ValueError(f"Unknown split {name!r}; choose one of {list(SPLITS)}.")
    if num_scenes < 0:
        raise ValueError(f"num_scenes must be >= 0, got {num_scenes}.")
    config = config or WorldConfig()
    rng = random.Random(f"balcaprl.world/{name}/{seed}")  # str seeds are hashed with SHA-512: stable across runs
    scenes: list[Scene] = []
    while len(scenes) < num_scenes:
        objects = _sample_objects(rng, config)
        if split_of(Scene(objects)) == name:
            scenes.append(Scene(objects, reference_captions(Scene(objects), rng, config)))
    return scenes


def _references(scene: Scene) -> list[str]:
    if not scene.references:
        raise ValueError("A scene without references cannot be exported; build scenes with make_split.")
    return list(scene.references)


def to_rows(scenes: Iterable[Scene], image_size: int = IMAGE_SIZE, prompt: str = PROMPT) -> list[dict[str, Any]]:
    """TRL GRPO rows ``{prompt (conversational), image (PIL), references, scene (dict)}``, one per scene."""
    return [
        {
            "prompt": [{"role": "user", "content": prompt}],
            "image": scene.render(image_size),
            "references": _references(scene),
            "scene": scene.to_dict(),
        }
        for scene in scenes
    ]


def write_jsonl(scenes: Iterable[Scene], directory: str | Path, image_size: int = IMAGE_SIZE) -> Path:
    """Write ``images/NNNNNN.png`` and ``data.jsonl`` (``{image: relative path, references, scene}``) into
    ``directory``; returns the path of ``data.jsonl``."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    path = directory / "data.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for index, scene in enumerate(scenes):
            image_path = Path("images") / f"{index:06d}.png"
            scene.render(image_size).save(directory / image_path)
            line = {"image": image_path.as_posix(), "references": _references(scene), "scene": scene.to_dict()}
            handle.write(json.dumps(line) + "\n")
    return path


def read_jsonl(path: str | Path, prompt: str = PROMPT) -> list[dict[str, Any]]:
    """Rows as `to_rows` makes them, from a ``data.jsonl`` file or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "data.jsonl"
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image_file = path.parent / record["image"]
                with Image.open(image_file) as image:
                    loaded = image.convert("RGB")
                row = {"references": list(record["references"]), "scene": record["scene"]}
            except (json.JSONDecodeError, KeyError, OSError) as error:
                raise ValueError(f"{path}:{number}: cannot read this row ({error}).") from error
            rows.append({"prompt": [{"role": "user", "content": prompt}], "image": loaded, **row})
    return rows


def to_dataset(scenes: Iterable[Scene], image_size: int = IMAGE_SIZE, prompt: str = PROMPT):
    """A `datasets.Dataset` of `to_rows` (``image`` as a `datasets.Image` column), ready for `GRPOTrainer`."""
    import datasets

    return datasets.Dataset.from_list(to_rows(scenes, image_size, prompt))


def world_corpus(num_scenes: int = 2000, seed: int = 0, config: WorldConfig | None = None) -> list[str]:
    """Many captions covering the whole grammar, e.g. to train a tiny BPE tokenizer.

    The references of ``num_scenes`` training scenes, one full caption per scene, and a fixed list that uses every
    word and phrase of the grammar at least once (so rare variants are never missing from the vocabulary).
    """
    captions = []
    rng = random.Random(f"balcaprl.world/corpus/{seed}")
    for scene in make_split("train", num_scenes, seed, config):
        captions += [*scene.references, describe(scene, "full", rng)]
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                captions += [f"a {size} {colour} {shape}.", f"The {colour} {shape} is {size}."]
    places = [phrase for phrases in PLACE_PHRASES.values() for phrase in phrases]
    captions += [f"There is a red circle {place}." for place in places]
    captions += [f"The image shows a blue square {place}." for place in places]
    captions += [f"The green triangle is {phrase} the yellow square." for phrase in RELATION_PHRASES]
    for count, number in NUMBER_WORDS.items():
        for noun in ("object", "shape"):
            plural = noun + ("s" if count > 1 else "")
            captions += [
                f"There {'is' if count == 1 else 'are'} {number} {plural}.",
                f"The image shows {number} {plural}.",
            ]
    return captions
