"""Scenes of the shapes world: objects, their facts and relations, rendering (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


COLOURS = ("red", "green", "blue", "yellow")


SIZES = ("small", "large")


POSITIONS = ("left", "right", "top", "bottom", "center")


FACT_KINDS = ("object", "size", "position", "relation", "count")


STYLES = ("terse", "located", "sentences", "relational", "full")


SPLITS = ("train", "validation", "test")


PROMPT = "Describe this image in detail."


IMAGE_SIZE = 112


BACKGROUND = (122, 116, 104)  # ≈ the image processors' mean colour: on white, a tiny VLM did not learn colours


PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


# Geometry, as fractions of the image side. Region centres are 0.32 apart on each axis and a shape's half-extent is
# at most 0.13, so with a jitter of at most 0.02 two objects' bounding boxes never touch (0.32 − 2·0.02 > 2·0.13).
GRID = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}


GRID_STEP = 0.32


# A small shape's half-extent was 0.08 until the demo measured it: at 168 px (13 px, two 14 px patches across) the
# tiny demo model named small shapes rightly 57-69 % of the time, large ones 87-96 %; at 0.09 it names 96 % of the
# first objects rightly, and sizes stay easy to tell apart (docs/demo.md, "What RL needed")
RADIUS = {"small": 0.09, "large": 0.13}


MAX_JITTER = 0.02


HELD_OUT_SHARE = {"validation": 0.1, "test": 0.1}  # of all scene graphs; train gets the rest


NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


PLACE_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}


# phrase → (relation, swapped): "A is to the right of B" is the fact relation(B, left of, A).
RELATION_PHRASES = {
    "to the left of": ("left of", False),
    "to the right of": ("left of", True),
    "above": ("above", False),
    "below": ("above", True),
}


RELATION_WORDS = {reading: phrase for phrase, reading in RELATION_PHRASES.items()}


OPENERS = ("there is", "the image shows")


SENTENCE_END = ".!?"


CLAUSE_SEPARATORS = (",", "and")


@dataclass(frozen=True, order=True)
class Fact:
    """One atomic fact of a scene, or one claim of a caption.

    ``kind`` is one of `FACT_KINDS`; ``subject`` names an object ("red circle"); ``value`` is the size, the region,
    the relation ("left of" or "above") or the count (a digit string); ``target`` is the relation's second object.
    """

    kind: str
    subject: str = ""
    value: str = ""
    target: str = ""

    def __str__(self) -> str:
        if self.kind == "object":
            return f"there is a {self.subject}"
        if self.kind == "size":
            return f"the {self.subject} is {self.value}"
        if self.kind == "position":
            return f"the {self.subject} is {PLACE_PHRASES[self.value][0]}"
        if self.kind == "relation":
            return (
                f"the {self.subject} is {'to the left of' if self.value == 'left of' else 'above'} the {self.target}"
            )
        return f"there are {self.value} objects"


@dataclass(frozen=True)
class WorldObject:
    """One shape of a scene. ``offset`` (jitter inside the region, in image-side fractions) is drawing detail only."""

    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown object {name} {getattr(self, name)!r}; choose one of {list(allowed)}.")
        if any(abs(value) > MAX_JITTER + 1e-6 for value in self.offset):  # tolerance: float32 storage
            raise ValueError(f"Object offset {self.offset} exceeds ±{MAX_JITTER}: shapes could overlap.")

    @property
    def name(self) -> str:
        """How captions refer to the object: "red circle" (unique within a scene)."""
        return f"{self.colour} {self.shape}"

    def center(self, image_size: int = IMAGE_SIZE) -> tuple[float, float]:
        """Pixel coordinates (x, y) of the object's centre in an ``image_size`` square image."""
        column, row = GRID[self.position]
        return (
            (0.5 + (column - 1) * GRID_STEP + self.offset[0]) * image_size,
            (0.5 + (row - 1) * GRID_STEP + self.offset[1]) * image_size,
        )

    def radius(self, image_size: int = IMAGE_SIZE) -> float:
        """Half-extent in pixels: the circle's radius, the square's and the triangle's half-side."""
        return RADIUS[self.size] * image_size

    def facts(self) -> list[Fact]:
        """object, size and position facts."""
        return [
            Fact("object", self.name),
            Fact("size", self.name, self.size),
            Fact("position", self.name, self.position),
        ]


def relations_between(first: WorldObject, second: WorldObject) -> list[Fact]:
    """The relation facts of a pair: one per grid axis on which their regions differ."""
    relations = []
    (first_column, first_row), (second_column, second_row) = GRID[first.position], GRID[second.position]
    if first_column != second_column:
        left, right = (first, second) if first_column < second_column else (second, first)
        relations.append(Fact("relation", left.name, "left of", right.name))
    if first_row != second_row:
        upper, lower = (first, second) if first_row < second_row else (second, first)
        relations.append(Fact("relation", upper.name, "above", lower.name))
    return relations


@dataclass(frozen=True)
class Scene:
    """A scene graph (its objects; relations are derived) and its reference captions."""

    objects: tuple[WorldObject, ...]
    references: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.objects:
            raise ValueError("A scene needs at least one object.")
        for attribute, what in ((lambda o: o.position, "region"), (lambda o: o.name, "(colour, shape)")):
            values = [attribute(o) for o in self.objects]
            if len(set(values)) != len(values):
                raise ValueError(f"Two objects of a scene share a {what}: {values}.")

    def relations(self) -> list[Fact]:
        """Every relation fact, pair by pair in object order."""
        return [
            relation
            for index, first in enumerate(self.objects)
            for second in self.objects[index + 1 :]
            for relation in relations_between(first, second)
        ]

    def facts(self) -> frozenset[Fact]:
        """Every true fact: object, size, position per object, the relations and the count."""
        facts = [fact for obj in self.objects for fact in obj.facts()]
        return frozenset([*facts, *self.relations(), Fact("count", value=str(len(self.objects)))])

    def key(self) -> tuple[tuple[str, str, str, str], ...]:
        """The scene graph without drawing details or references: what makes two scenes "the same scene"."""
        return tuple(sorted((o.shape, o.colour, o.size, o.position) for o in self.objects))

    def object_named(self, name: str) -> WorldObject | None:
        """The object called ``name`` ("red circle"), or None."""
        return next((obj for obj in self.objects if obj.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable scene graph; ``relations`` are derived and ignored by `from_dict`."""
        return {
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "position": o.position,
                    "offset": list(o.offset),
                }
                for o in self.objects
            ],
            "relations": [{"subject": r.subject, "relation": r.value, "target": r.target} for r in self.relations()],
        }

    @classmethod
    def from_dict(cls, graph: dict[str, Any] | Scene, references: Sequence[str] = ()) -> Scene:
        """Inverse of `to_dict` (a `Scene` is returned as is)."""
        if isinstance(graph, Scene):
            return graph
        if not isinstance(graph, dict) or "objects" not in graph:
            raise ValueError(f"A scene graph must be a dict with an 'objects' list, got {graph!r:.200}.")
        objects = []
        for index, item in enumerate(graph["objects"]):
            try:
                offset = tuple(float(value) for value in item.get("offset") or (0.0, 0.0))
                objects.append(WorldObject(item["shape"], item["colour"], item["size"], item["position"], offset))
            except (KeyError, TypeError) as error:
                raise ValueError(f"Scene object #{index} ({item!r}) is malformed: {error}") from error
        return cls(tuple(objects), tuple(references))

    def render(self, image_size: int = IMAGE_SIZE, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
        """The scene drawn as an RGB ``image_size`` × ``image_size`` image."""
        image = Image.new("RGB", (image_size, image_size), background)
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            (x, y), r, colour = obj.center(image_size), obj.radius(image_size), PALETTE[obj.colour]
            if obj.shape == "circle":
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            elif obj.shape == "square":
                draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
            else:
                draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)
        return image
