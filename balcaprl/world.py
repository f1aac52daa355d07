"""A verifiable captioning world: seeded scenes of coloured shapes, their scene graphs, references and a parser.

A scene holds 1–3 objects. Each object has a shape (circle, square, triangle), a colour (red, green, blue, yellow),
a size (small, large) and a region (left, right, top, bottom, center); no two objects share a region or a
(colour, shape) pair, so "the red circle" always names one object. Regions sit on a 3 × 3 grid,

    left = (0, 1), right = (2, 1), top = (1, 0), bottom = (1, 2), center = (1, 1)   (column, row),

and the pairwise relations follow from it: A is *left of* B when A's column is smaller, A is *above* B when its row
is smaller ("right of" and "below" are the same facts read the other way). A diagonal pair (left, top) has two
relations, an aligned pair one.

Facts (`Fact`, hashable) are what a caption can claim and what the rewards of `balcaprl.rewards.world` check:

    object(red circle)                          there is a red circle
    size(red circle, small)                     the red circle is small
    position(red circle, left)                  the red circle is on the left
    relation(red circle, left of, blue square)  the red circle is to the left of the blue square
    count(2)                                    there are two objects

`Scene.facts()` is every true fact of the scene: one object, size and position fact per object, every relation,
and the count. A claim is true exactly when it is one of them.

The grammar (captions are lower-cased and immediately repeated words collapsed before parsing)::

    caption    := sentence (" " sentence)*          each sentence ends with "."
    sentence   := clause (("," | "and" | ", and") clause)*
    clause     := count | [opener] item | np "is" (place | size | relation np)
    count      := ("there is" | "the image shows") "one" ("object" | "shape")
                | ("there are" | "the image shows") ("two" | "three") ("objects" | "shapes")
    opener     := "there is" | "the image shows"
    item       := np [place]
    np         := ("a" | "the") [size] colour shape
    place      := "on the left" ["side"] | "on the right" ["side"] | "at the top" | "near the top"
                | "at the bottom" | "near the bottom" | "in the center" | "in the middle"
    relation   := "to the left of" | "to the right of" | "above" | "below"

`parse_caption` maps a caption to its claims (every noun phrase claims its object, and its size when it gives one)
and keeps each clause outside the grammar as an unparseable claim. `describe` writes captions in the same grammar:
five reference styles (terse, located, sentences, relational, full), the last stating every fact. As human
references do, a configurable share of references omits an object or a detail (`WorldConfig.omission_rate`).

Images: `Scene.render` draws the objects with PIL on a gray equal to the image processors' mean colour (which lets
a tiny VLM learn colours fast, see ENVIRONMENT.md), 112 × 112 by default. Splits (`make_split`) are seeded and
disjoint by scene graph: a stable hash of the graph assigns every possible scene to exactly one of train,
validation and test, so no test graph ever appears in train, whatever the sizes and seeds.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "FACT_KINDS",
    "IMAGE_SIZE",
    "POSITIONS",
    "PROMPT",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "STYLES",
    "Clause",
    "Fact",
    "ParsedCaption",
    "Scene",
    "WorldConfig",
    "WorldObject",
    "describe",
    "generate_scene",
    "make_split",
    "parse_caption",
    "read_jsonl",
    "split_of",
    "to_dataset",
    "to_rows",
    "world_corpus",
    "write_jsonl",
]

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
RADIUS = {"small": 0.08, "large": 0.13}
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


# ---------------------------------------------------------------------------------------------------- scene graph
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


# ---------------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class WorldConfig:
    """How scenes and their references are generated.

    Args:
        min_objects, max_objects: objects per scene, drawn uniformly (1 ≤ min ≤ max ≤ 5).
        min_references, max_references: references per scene, drawn uniformly.
        omission_rate: probability that a reference leaves out one object, one size or one position it would
            otherwise state — as human captions do; the exact rewards still see the whole scene.
        styles: reference styles to draw from (each scene uses distinct styles while it can); see `describe`.
        jitter: maximum offset of a shape inside its region, as a fraction of the image side (≤ 0.02).
    """

    min_objects: int = 1
    max_objects: int = 3
    min_references: int = 3
    max_references: int = 5
    omission_rate: float = 0.25
    styles: tuple[str, ...] = STYLES
    jitter: float = MAX_JITTER

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"Need 1 <= min_objects <= max_objects <= {len(POSITIONS)}, got {self}.")
        if not 1 <= self.min_references <= self.max_references:
            raise ValueError(f"Need 1 <= min_references <= max_references, got {self}.")
        if not 0.0 <= self.omission_rate <= 1.0:
            raise ValueError(f"omission_rate must lie in [0, 1], got {self.omission_rate}.")
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
    return tuple(describe(scene, style, rng, omit=rng.random() < config.omission_rate) for style in styles[:count])


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


# ---------------------------------------------------------------------------------------------------- captions
def _noun_phrase(obj: WorldObject, definite: bool, with_size: bool) -> str:
    return " ".join(["the" if definite else "a", *([obj.size] if with_size else []), obj.colour, obj.shape])


def _place(obj: WorldObject, rng: random.Random) -> str:
    return rng.choice(PLACE_PHRASES[obj.position])


def _join_items(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    last_separator = ", and " if len(items) > 2 and rng.random() < 0.3 else " and "
    return ", ".join(items[:-1]) + last_separator + items[-1]


def _count_clause(count: int, rng: random.Random) -> str:
    noun = rng.choice(("object", "shape")) + ("s" if count > 1 else "")
    opener = rng.choice(("there is" if count == 1 else "there are", "the image shows"))
    return f"{opener} {NUMBER_WORDS[count]} {noun}"


def _relation_clause(relation: Fact, rng: random.Random) -> str:
    """A relation fact in one of its two readings, with definite noun phrases."""
    if rng.random() < 0.5:
        return f"the {relation.subject} is {RELATION_WORDS[(relation.value, False)]} the {relation.target}"
    return f"the {relation.target} is {RELATION_WORDS[(relation.value, True)]} the {relation.subject}"


def _sentences(clauses: list[str], lowercase: bool = False) -> str:
    return " ".join((clause if lowercase else clause[0].upper() + clause[1:]) + "." for clause in clauses)


def describe(scene: Scene, style: str = "full", rng: random.Random | None = None, omit: bool = False) -> str:
    """A caption of ``scene`` in one of `STYLES`; every claim it makes is true.

    - ``terse``: the objects with their sizes, one sentence ("a small red circle and a large blue square.");
    - ``located``: the same with regions ("There is a small red circle on the left and a large blue square ...");
    - ``sentences``: the count, then one sentence per object with size and region;
    - ``relational``: objects with sizes, chained by one relation per consecutive pair (no regions);
    - ``full``: the count, every object with size and region, and every relation — all of `Scene.facts`.

    ``omit`` leaves out one object (with its relations), one size or one region that the style would state.
    """
    if style not in STYLES:
        raise ValueError(f"Unknown caption style {style!r}; choose one of {list(STYLES)}.")
    rng = rng or random.Random(0)
    objects = list(scene.objects)
    rng.shuffle(objects)
    sized = {obj.name for obj in objects}
    shows_place = style in ("located", "sentences", "full") or (style == "relational" and len(objects) == 1)
    placed = {obj.name for obj in objects} if shows_place else set()
    if omit:
        choices = [("object", obj.name) for obj in objects] if len(objects) > 1 else []
        choices += [("size", name) for name in sorted(sized)] + [("position", name) for name in sorted(placed)]
        kind, name = rng.choice(choices)
        if kind == "object":
            objects = [obj for obj in objects if obj.name != name]
        else:
            (sized if kind == "size" else placed).discard(name)

    def item(obj: WorldObject) -> str:
        text = _noun_phrase(obj, definite=False, with_size=obj.name in sized)
        return f"{text} {_place(obj, rng)}" if obj.name in placed else text

    def predication(obj: WorldObject) -> str:
        if obj.name in placed and rng.random() < 0.5:
            return f"{_noun_phrase(obj, definite=False, with_size=obj.name in sized)} is {_place(obj, rng)}"
        return f"there is {item(obj)}"

    count = len(scene.objects)
    if style in ("terse", "located"):
        opener = rng.choice(("", "there is ", "the image shows "))
        return _sentences([opener + _join_items([item(obj) for obj in objects], rng)], lowercase=rng.random() < 0.5)
    if style == "sentences":
        return _sentences([_count_clause(count, rng)] + [predication(obj) for obj in objects])
    if style == "relational":
        if len(objects) == 1:
            return _sentences([predication(objects[0])])
        clauses, mentioned = [], set()
        for first, second in zip(objects, objects[1:]):
            relation = rng.choice(relations_between(first, second))
            reverse = rng.random() < 0.5
            subject, target = (first, second) if relation.subject == first.name else (second, first)
            if reverse:
                subject, target = target, subject
            phrase = RELATION_WORDS[(relation.value, reverse)]
            noun_phrases = []
            for obj in (subject, target):
                noun_phrases.append(_noun_phrase(obj, obj.name in mentioned, obj.name in sized - mentioned))
                mentioned.add(obj.name)
            clauses.append(f"{noun_phrases[0]} is {phrase} {noun_phrases[1]}")
        return _sentences(clauses)
    # full
    names = {obj.name for obj in objects}
    relations = [r for r in Scene(tuple(objects)).relations() if r.subject in names and r.target in names]
    opener = rng.choice(("", "there is ", "the image shows "))
    listing = opener + _join_items([item(obj) for obj in objects], rng)
    return _sentences([_count_clause(count, rng), listing] + [_relation_clause(r, rng) for r in relations])


# ---------------------------------------------------------------------------------------------------- parser
@dataclass(frozen=True)
class Clause:
    """One clause of a parsed caption: its normalised text, its claims (None when outside the grammar), its words."""

    text: str
    claims: tuple[Fact, ...] | None
    num_words: int


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says under the world's grammar.

    ``claims`` are the distinct claims in order of first mention; ``unparseable`` the distinct non-empty clause
    texts outside the grammar; ``clauses`` every clause (an empty one marks a stray separator); ``sentences`` the raw
    sentences as written; ``num_words`` the words of the caption; ``repeated_words`` the words equal to the word
    just before them ("the the"), which are dropped before parsing.
    """

    claims: tuple[Fact, ...]
    unparseable: tuple[str, ...]
    clauses: tuple[Clause, ...]
    sentences: tuple[str, ...]
    num_words: int
    repeated_words: int


def _match(tokens: Sequence[str], start: int, phrase: str) -> int | None:
    words = phrase.split()
    return start + len(words) if tuple(tokens[start : start + len(words)]) == tuple(words) else None


def _parse_noun_phrase(tokens: Sequence[str], start: int) -> tuple[str, list[Fact], int] | None:
    """np := ("a" | "the") [size] colour shape → (name, claims, next index)."""
    if start >= len(tokens) or tokens[start] not in ("a", "the"):
        return None
    index, size = start + 1, None
    if index < len(tokens) and tokens[index] in SIZES:
        size, index = tokens[index], index + 1
    if index + 1 < len(tokens) and tokens[index] in COLOURS and tokens[index + 1] in SHAPES:
        name = f"{tokens[index]} {tokens[index + 1]}"
        return name, [Fact("object", name)] + ([Fact("size", name, size)] if size else []), index + 2
    return None


# Longest phrase first: "on the left side" before "on the left".
_PLACES_LONGEST_FIRST = sorted(
    ((position, phrase) for position, phrases in PLACE_PHRASES.items() for phrase in phrases),
    key=lambda pair: -len(pair[1]),
)


def _parse_place(tokens: Sequence[str], start: int) -> tuple[str, int] | None:
    for position, phrase in _PLACES_LONGEST_FIRST:
        end = _match(tokens, start, phrase)
        if end is not None:
            return position, end
    return None


def _parse_count(tokens: Sequence[str]) -> list[Fact] | None:
    for opener in ("there is", "there are", "the image shows"):
        index = _match(tokens, 0, opener)
        if index is None or len(tokens) != index + 2:
            continue
        number, noun = tokens[index], tokens[index + 1]
        count = next((value for value, word in NUMBER_WORDS.items() if word == number), None)
        if count is None or opener == ("there are" if count == 1 else "there is"):
            return None
        if noun in (("object", "shape") if count == 1 else ("objects", "shapes")):
            return [Fact("count", value=str(count))]
        return None
    return None


def _parse_clause(tokens: Sequence[str]) -> list[Fact] | None:
    """The claims of one clause, or None if the clause is outside the grammar."""
    if not tokens:
        return None
    count = _parse_count(tokens)
    if count is not None:
        return count
    # [opener] item
    for opener in ("", *OPENERS):
        start = _match(tokens, 0, opener) if opener else 0
        noun_phrase = None if start is None else _parse_noun_phrase(tokens, start)
        if noun_phrase is None:
            continue
        name, claims, index = noun_phrase
        if index == len(tokens):
            return claims
        place = _parse_place(tokens, index)
        if place is not None and place[1] == len(tokens):
            return claims + [Fact("position", name, place[0])]
        if opener:
            return None
    # np "is" (place | size | relation np)
    noun_phrase = _parse_noun_phrase(tokens, 0)
    if noun_phrase is None or noun_phrase[2] >= len(tokens) or tokens[noun_phrase[2]] != "is":
        return None
    name, claims, index = noun_phrase[0], noun_phrase[1], noun_phrase[2] + 1
    place = _parse_place(tokens, index)
    if place is not None and place[1] == len(tokens):
        return claims + [Fact("position", name, place[0])]
    if index + 1 == len(tokens) and tokens[index] in SIZES:
        return claims + [Fact("size", name, tokens[index])]
    for phrase, (relation, swapped) in RELATION_PHRASES.items():
        end = _match(tokens, index, phrase)
        target = None if end is None else _parse_noun_phrase(tokens, end)
        if target is not None and target[2] == len(tokens):
            subject, other = (target[0], name) if swapped else (name, target[0])
            return claims + target[1] + [Fact("relation", subject, relation, other)]
    return None


def _split_clauses(tokens: list[str]) -> list[list[str]]:
    """Split a sentence's tokens at "," / "and" / ", and"; a stray separator leaves an empty clause."""
    clauses: list[list[str]] = [[]]
    previous = None
    for token in tokens:
        if token in CLAUSE_SEPARATORS:
            if not (token == "and" and previous == "," and clauses[-1] == []):
                clauses.append([])
        else:
            clauses[-1].append(token)
        previous = token
    return clauses


def split_sentences(text: str) -> list[str]:
    """The caption's sentences as written: runs of text each closed by . ! or ? (the last may be unclosed)."""
    return [piece.strip() for piece in re.findall(r"[^.!?]*[.!?]+|[^.!?]+$", text) if piece.strip()]


@lru_cache(maxsize=8192)
def parse_caption(caption: str) -> ParsedCaption:
    """Parse ``caption`` under the world's grammar (see the module docstring); cached, as GRPO groups repeat."""
    sentences = split_sentences(caption)
    clauses: list[Clause] = []
    num_words = repeated_words = 0
    for sentence in sentences:
        tokens = re.findall(r"[a-z]+|[^\sa-z]", sentence.lower().rstrip(SENTENCE_END))
        kept: list[str] = []
        for token in tokens:
            if token not in CLAUSE_SEPARATORS or token == "and":
                num_words += 1
            if kept and token == kept[-1] and token.isalpha():
                repeated_words += 1
                continue
            kept.append(token)
        for clause_tokens in _split_clauses(kept):
            claims = _parse_clause(clause_tokens)
            clauses.append(
                Clause(" ".join(clause_tokens), None if claims is None else tuple(claims), len(clause_tokens))
            )
    claims = tuple(dict.fromkeys(fact for clause in clauses if clause.claims for fact in clause.claims))
    unparseable = tuple(dict.fromkeys(clause.text for clause in clauses if clause.claims is None and clause.text))
    return ParsedCaption(claims, unparseable, tuple(clauses), tuple(sentences), num_words, repeated_words)


# ---------------------------------------------------------------------------------------------------- export
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
