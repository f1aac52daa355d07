"""The labelled captions of a judge audit (`balcaprl.judge.audit`): built from the shapes world, or read from JSONL.

**Built from the shapes world** (`build_audit_set`). Each scene has three objects (so three objects can be perturbed)
and is rendered at a realistic size (448 px by default). Its reference is the world's ``full`` description (every
fact of the scene, `balcaprl.world.describe`). Its *correct caption* states every fact too, one sentence each: the
count, each object with its size and region, then every relation::

    There are three objects. There is a large red triangle near the bottom. ... The red triangle is to the left of
    the blue circle. The blue square is above the red triangle. ...

Each perturbation changes the correct caption at severity 1, 2 and 3; severities are nested (severity 2 keeps the
change of severity 1 and adds one), so the exact score falls as the severity rises.

============  =========  ========================================================================================
type          audits     one step of severity
============  =========  ========================================================================================
colour        precision  one object renamed with a colour not in the scene (every mention of it)
shape         precision  one object renamed with another shape (every mention of it)
size          precision  one object's size flipped (small ↔ large)
position      precision  one object placed in a wrong, unoccupied region
relation      precision  one relation sentence reversed ("to the left of" → "to the right of", "above" → "below")
omit_object   recall     one object left out, with the relation sentences that name it (severities 1 and 2)
omit_detail   recall     one object's size or region left out (alternating)
repetition    linguistic one sentence repeated right after itself
grammar       linguistic one sentence broken: its articles dropped and its verb moved to the end
                         ("There small red circle on left is.")
run_on        linguistic one more sentence run on into the first with "and" ("There are three objects and there
                         is a small red circle on the left and ...")
============  =========  ========================================================================================

Expected scores. Precision and recall are the world's exact rewards (`balcaprl.rewards.world.precision_score` and
`recall_score`, what ``world_precision`` / ``world_recall`` compute in training) of the caption against the scene.
So a misnamed object makes *all* of its claims false (the caption names an object that is not there), while a wrong
size, region or relation costs one claim: 1 of 13 claims wrong gives 12/13. Linguistic quality has no exact value in
the world (``world_linguistic`` parses claims and cannot see that a run-on sentence reads badly), so it is defined:
the correct caption 1.0, and each step of severity costs one point of the judge's mean 1–5 rating, i.e. 0.25 on the
reward's [0, 1] scale (`LINGUISTIC_STEP`): 0.75, 0.5, 0.25 at severities 1, 2, 3.

An item's ``expected`` holds the rewards it audits: the correct caption all three, a perturbed caption the reward
of its type (a broken sentence is not a false claim, and an omission does not make a caption less fluent).

**Read from JSONL** (`read_audit_data`), one item per line::

    {"image": "images/cat.jpg", "reference": "A grey cat sleeps on a red sofa.", "caption": "A cat on a sofa.",
     "expected": {"precision": 1.0, "recall": 0.5, "linguistic": 1.0},
     "perturbation": "omission", "severity": 1, "group": "cat", "id": "cat-1"}

``caption`` and ``expected`` (an object with at least one of ``precision``, ``recall``, ``linguistic``: a number in
[0, 1], or null) are required; ``image`` (a path, relative to the JSONL file's folder) is required when
``expected.precision`` is given, ``reference`` (a string or a list of strings) when ``expected.recall`` is.
``perturbation`` (absent, null or "none" for a correct caption), ``severity`` (an integer >= 0; 0 for a correct
caption) and ``group`` (the items describing the same image; default: the image path, else the reference) enable
the detection and monotonicity sections. `write_audit_set` writes the built-in set in this format.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from balcaprl.rewards.world import precision_score, recall_score
from balcaprl.world.captions import describe, parse_caption
from balcaprl.world.scene import (
    COLOURS,
    NUMBER_WORDS,
    PLACE_PHRASES,
    POSITIONS,
    SHAPES,
    Scene,
)
from balcaprl.world.splits import WorldConfig, make_split

__all__ = [
    "AUDITED_REWARDS",
    "AuditDataError",
    "AuditItem",
    "CORRECT",
    "DEFAULT_IMAGE_SIZE",
    "LINGUISTIC_STEP",
    "PERTURBATIONS",
    "build_audit_set",
    "expected_linguistic",
    "read_audit_data",
    "write_audit_set",
]

AUDITED_REWARDS = ("precision", "recall", "linguistic")


CORRECT = "none"  # the perturbation of a correct caption


# perturbation type → (the reward it audits, its severities)
PERTURBATIONS: dict[str, tuple[str, tuple[int, ...]]] = {
    "colour": ("precision", (1, 2, 3)),
    "shape": ("precision", (1, 2, 3)),
    "size": ("precision", (1, 2, 3)),
    "position": ("precision", (1, 2, 3)),
    "relation": ("precision", (1, 2, 3)),
    "omit_object": ("recall", (1, 2)),
    "omit_detail": ("recall", (1, 2, 3)),
    "repetition": ("linguistic", (1, 2, 3)),
    "grammar": ("linguistic", (1, 2, 3)),
    "run_on": ("linguistic", (1, 2, 3)),
}


DEFAULT_IMAGE_SIZE = 448  # a realistic judge input (the world's training images are 112 px)


LINGUISTIC_STEP = 0.25  # one point of the mean 1–5 rating on the reward's [0, 1] scale


OBJECTS_PER_SCENE = 3


def expected_linguistic(severity: int) -> float:
    """The defined linguistic score of a caption with ``severity`` linguistic perturbations: 1 − 0.25 · severity."""
    return max(0.0, 1.0 - LINGUISTIC_STEP * severity)


class AuditDataError(ValueError):
    """A labelled item that cannot be used; the message names the file, the line and the key."""


@dataclass(frozen=True)
class AuditItem:
    """One labelled caption.

    ``image`` is a PIL image (built-in set) or a path (``--data``); ``perturbation`` is `CORRECT` for a correct
    caption; ``expected`` maps each audited reward to its exact score; ``scene`` is the world's scene graph (built-in
    set only).
    """

    id: str
    group: str
    caption: str
    expected: dict[str, float]
    image: Any = None
    reference: tuple[str, ...] = ()
    perturbation: str = CORRECT
    severity: int = 0
    scene: dict[str, Any] | None = field(default=None, compare=False)


# ------------------------------------------------------------------------------------------- the world's captions
@dataclass(frozen=True)
class _Described:
    """How a caption describes one object: possibly wrongly (another colour), possibly partly (no size)."""

    colour: str
    shape: str
    size: str | None
    position: str | None

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class _Description:
    """The content of a caption: described objects and relation sentences (subject index, phrase, target index)."""

    objects: tuple[_Described | None, ...]  # None: the object is left out
    relations: tuple[tuple[int, str, int], ...]

    def sentences(self) -> list[str]:
        # The count is the scene's, also when an object is left out: an omission says less, not something false.
        count = len(self.objects)
        plural = "s" if count > 1 else ""
        sentences = [f"There {'are' if count > 1 else 'is'} {NUMBER_WORDS[count]} object{plural}."]
        for obj in (obj for obj in self.objects if obj is not None):
            words = ["There is a", *([obj.size] if obj.size else []), obj.colour, obj.shape]
            if obj.position:
                words.append(PLACE_PHRASES[obj.position][0])
            sentences.append(" ".join(words) + ".")
        for subject, phrase, target in self.relations:
            first, second = self.objects[subject], self.objects[target]
            if first is not None and second is not None:
                sentences.append(f"The {first.name} is {phrase} the {second.name}.")
        return sentences


_REVERSED = {"to the left of": "to the right of", "above": "below"}


def _correct_description(scene: Scene) -> _Description:
    objects = tuple(_Described(o.colour, o.shape, o.size, o.position) for o in scene.objects)
    index = {obj.name: position for position, obj in enumerate(scene.objects)}
    relations = tuple(
        (index[fact.subject], "to the left of" if fact.value == "left of" else "above", index[fact.target])
        for fact in scene.relations()
    )
    return _Description(objects, relations)


def _renamed(description: _Description, index: int, attribute: str, rng: random.Random) -> _Description:
    """Object ``index`` given another colour or shape, one that no object of the description has (names stay unique,
    and the new name is false of the scene)."""
    obj = description.objects[index]
    taken = {o.name for o in description.objects if o is not None}
    values = COLOURS if attribute == "colour" else SHAPES
    choices = [value for value in values if value != getattr(obj, attribute)]
    choices = [value for value in choices if replace(obj, **{attribute: value}).name not in taken]
    objects = list(description.objects)
    objects[index] = replace(obj, **{attribute: rng.choice(choices)})
    return replace(description, objects=tuple(objects))


def _perturbed(description: _Description, kind: str, target: int, step: int, rng: random.Random) -> _Description:
    """Step ``step`` (1, 2, ...) of a content perturbation, on object (or relation) number ``target``."""
    objects = list(description.objects)
    obj = objects[target] if kind != "relation" else None
    if kind in ("colour", "shape"):
        return _renamed(description, target, kind, rng)
    if kind == "size":
        objects[target] = replace(obj, size="large" if obj.size == "small" else "small")
    elif kind == "position":
        occupied = {o.position for o in objects if o is not None}
        objects[target] = replace(obj, position=rng.choice([p for p in POSITIONS if p not in occupied]))
    elif kind == "relation":
        relations = list(description.relations)
        subject, phrase, other = relations[target]
        relations[target] = (subject, _REVERSED[phrase], other)
        return replace(description, relations=tuple(relations))
    elif kind == "omit_object":
        objects[target] = None
    elif kind == "omit_detail":  # the size at odd steps, the region at even ones
        objects[target] = replace(obj, size=None) if step % 2 else replace(obj, position=None)
    return replace(description, objects=tuple(objects))


def _broken(sentence: str) -> str:
    """The sentence without its articles and with its verb moved to the end: "There small red circle on left is."."""
    words = [word for word in sentence.rstrip(".").split() if word.lower() not in ("a", "an", "the")]
    verbs = [word for word in words if word in ("is", "are")]
    if verbs:
        words.remove(verbs[0])
        words.append(verbs[0])
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _run_on(sentences: list[str], count: int) -> list[str]:
    """The first ``count`` + 1 sentences joined by "and" into one."""
    joined = [sentences[0].rstrip(".")] + [s[0].lower() + s[1:].rstrip(".") for s in sentences[1 : count + 1]]
    return [" and ".join(joined) + "."] + sentences[count + 1 :]


def _linguistic(sentences: list[str], kind: str, severity: int, order: Sequence[int]) -> str:
    if kind == "run_on":
        return " ".join(_run_on(sentences, severity))
    chosen = set(order[:severity])
    out = []
    for index, sentence in enumerate(sentences):
        if kind == "grammar" and index in chosen:
            out.append(_broken(sentence))
        else:
            out.append(sentence)
            if kind == "repetition" and index in chosen:
                out.append(sentence)
    return " ".join(out)


def _exact(caption: str, scene: Scene) -> dict[str, float]:
    parsed = parse_caption(caption)
    return {"precision": precision_score(parsed, scene)[0], "recall": recall_score(parsed, scene)[0]}


def build_audit_set(num_scenes: int = 20, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE) -> list[AuditItem]:
    """The labelled items of ``num_scenes`` test-split scenes of three objects (see the module docstring)."""
    if num_scenes < 1:
        raise ValueError(f"An audit needs at least one scene, got {num_scenes}.")
    config = WorldConfig(min_objects=OBJECTS_PER_SCENE, max_objects=OBJECTS_PER_SCENE, min_references=1)
    # A scene whose three objects share a colour has no shape to rename one to (all three names are taken): skipped.
    # make_split draws one seeded stream, so a longer draw starts with the same scenes.
    candidates = make_split("test", 2 * num_scenes + 10, seed, config)
    scenes = [scene for scene in candidates if len({obj.colour for obj in scene.objects}) > 1][:num_scenes]
    items = []
    for number, scene in enumerate(scenes):
        rng = random.Random(f"balcaprl.judge.audit/{seed}/{number}")
        group = f"scene-{number:03d}"
        reference = describe(scene, "full", rng)
        image = scene.render(image_size)
        shared = {"group": group, "image": image, "reference": (reference,), "scene": scene.to_dict()}
        base = _correct_description(scene)
        correct = " ".join(base.sentences())
        exact = _exact(correct, scene)
        if exact != {"precision": 1.0, "recall": 1.0}:  # the writer and the world's grammar disagree: a bug here
            raise AssertionError(f"The correct caption of {group} scores {exact}: {correct!r}")

        def item(caption: str, kind: str, severity: int, expected: dict[str, float], shared=shared) -> AuditItem:
            return AuditItem(
                id=f"{shared['group']}/{kind}/{severity}",
                caption=caption,
                perturbation=kind,
                severity=severity,
                expected=expected,
                **shared,
            )

        items.append(item(correct, CORRECT, 0, {**exact, "linguistic": 1.0}))
        for kind, (reward, severities) in PERTURBATIONS.items():
            if reward == "linguistic":
                order = rng.sample(range(len(base.sentences())), max(severities))
                for severity in severities:
                    caption = _linguistic(base.sentences(), kind, severity, order)
                    items.append(item(caption, kind, severity, {"linguistic": expected_linguistic(severity)}))
                continue
            targets = list(range(len(base.relations) if kind == "relation" else OBJECTS_PER_SCENE))
            rng.shuffle(targets)
            description = base
            for severity in severities:
                description = _perturbed(description, kind, targets[severity - 1], severity, rng)
                caption = " ".join(description.sentences())
                items.append(item(caption, kind, severity, {reward: _exact(caption, scene)[reward]}))
    return items


# --------------------------------------------------------------------------------------------------------- JSONL
def write_audit_set(items: Sequence[AuditItem], directory: str | Path) -> Path:
    """Write ``images/<group>.png`` and ``audit_set.jsonl`` (the `read_audit_data` format) into ``directory``."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    path = directory / "audit_set.jsonl"
    written: dict[str, str] = {}
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            image = None
            if isinstance(item.image, Image.Image):
                if item.group not in written:
                    written[item.group] = f"images/{item.group.replace('/', '_')}.png"
                    item.image.save(directory / written[item.group])
                image = written[item.group]
            elif item.image is not None:
                image = str(item.image)
            line = {
                "id": item.id,
                "group": item.group,
                "image": image,
                "reference": list(item.reference),
                "caption": item.caption,
                "perturbation": item.perturbation,
                "severity": item.severity,
                "expected": item.expected,
                **({"scene": item.scene} if item.scene is not None else {}),
            }
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def _fail(path: Path, line: int, message: str) -> AuditDataError:
    return AuditDataError(f"{path}:{line}: {message}")


def _score(value: Any, path: Path, line: int, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 or math.isnan(value):
        raise _fail(path, line, f"key 'expected.{key}' must be a number in [0, 1] or null, got {value!r}.")
    return float(value)


def _item_from_record(record: Any, path: Path, line: int) -> AuditItem:
    if not isinstance(record, dict):
        raise _fail(path, line, f"an item must be a JSON object, got {type(record).__name__}.")
    caption = record.get("caption")
    if not isinstance(caption, str):
        raise _fail(path, line, f"key 'caption' must be a string, got {caption!r:.80}.")
    expected_record = record.get("expected")
    if not isinstance(expected_record, dict):
        raise _fail(path, line, 'key \'expected\' must be an object such as {"precision": 0.5, "recall": 1.0}.')
    unknown = sorted(set(expected_record) - set(AUDITED_REWARDS))
    if unknown:
        raise _fail(path, line, f"key 'expected.{unknown[0]}' is not a reward; they are {list(AUDITED_REWARDS)}.")
    expected = {key: _score(value, path, line, key) for key, value in expected_record.items()}
    expected = {key: value for key, value in expected.items() if value is not None}
    if not expected:
        raise _fail(path, line, f"key 'expected' gives no score; give at least one of {list(AUDITED_REWARDS)}.")

    image = record.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise _fail(path, line, f"key 'image' must be a path, got {image!r:.80}.")
        image = (path.parent / image).resolve()
        try:
            with Image.open(image) as opened:
                opened.verify()
        except (OSError, SyntaxError) as error:
            raise _fail(path, line, f"key 'image': cannot read {str(image)!r} ({type(error).__name__}).") from None
    elif "precision" in expected:
        raise _fail(path, line, "key 'image' is missing: the precision judge must see the image.")
    reference = record.get("reference")
    if isinstance(reference, str):
        reference = [reference]
    if reference is not None and (
        not isinstance(reference, list) or not reference or not all(isinstance(r, str) and r for r in reference)
    ):
        raise _fail(path, line, "key 'reference' must be a non-empty string or a list of them.")
    if reference is None and "recall" in expected:
        raise _fail(path, line, "key 'reference' is missing: recall is judged against the reference.")

    perturbation = record.get("perturbation")
    if perturbation is None:
        perturbation = CORRECT
    if not isinstance(perturbation, str) or not perturbation:
        raise _fail(
            path, line, f"key 'perturbation' must be a string (null: a correct caption), got {perturbation!r}."
        )
    severity = record.get("severity", 0 if perturbation == CORRECT else 1)
    if isinstance(severity, bool) or not isinstance(severity, int) or severity < 0:
        raise _fail(path, line, f"key 'severity' must be an integer >= 0, got {severity!r}.")
    if perturbation == CORRECT and severity != 0:
        raise _fail(path, line, f"key 'severity' is {severity} but the caption has no perturbation (a correct one).")
    group = record.get("group")
    if group is None:
        group = str(image) if image is not None else " / ".join(reference or [caption])
    if not isinstance(group, str):
        raise _fail(path, line, f"key 'group' must be a string, got {group!r:.80}.")
    identifier = record.get("id", f"line-{line}")
    return AuditItem(
        id=str(identifier),
        group=group,
        caption=caption,
        expected=expected,
        image=None if image is None else str(image),
        reference=tuple(reference or ()),
        perturbation=perturbation,
        severity=severity,
        scene=record.get("scene"),
    )


def read_audit_data(path: str | Path) -> list[AuditItem]:
    """The labelled items of a JSONL file (format in the module docstring); `AuditDataError` names line and key."""
    path = Path(path)
    if not path.is_file():
        raise AuditDataError(f"--data {str(path)!r} is not a file.")
    items, seen = [], set()
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise _fail(path, line, f"not JSON ({error.msg} at column {error.colno}).") from None
            item = _item_from_record(record, path, line)
            if item.id in seen:
                raise _fail(path, line, f"key 'id': {item.id!r} is used by an earlier line.")
            seen.add(item.id)
            items.append(item)
    if not items:
        raise AuditDataError(f"{path} holds no items.")
    return items
