"""Captions of the shapes world: `describe` writes them in the world's grammar, `parse_caption` reads them back into
claims (the grammar is in the package docstring, `balcaprl.world`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from balcaprl.world.scene import (
    CLAUSE_SEPARATORS,
    COLOURS,
    NUMBER_WORDS,
    OPENERS,
    PLACE_PHRASES,
    RELATION_PHRASES,
    RELATION_WORDS,
    SENTENCE_END,
    SHAPES,
    SIZES,
    STYLES,
    Fact,
    Scene,
    WorldObject,
    relations_between,
)


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


OMISSION_KINDS = ("object", "size", "position")


def describe(
    scene: Scene,
    style: str = "full",
    rng: random.Random | None = None,
    omit: bool = False,
    omission_kinds: Sequence[str] = OMISSION_KINDS,
    large_first: bool = False,
) -> str:
    """A caption of ``scene`` in one of `STYLES`; every claim it makes is true.

    - ``terse``: the objects with their sizes, one sentence ("a small red circle and a large blue square.");
    - ``located``: the same with regions ("There is a small red circle on the left and a large blue square ...");
    - ``sentences``: the count, then one sentence per object with size and region;
    - ``relational``: objects with sizes, chained by one relation per consecutive pair (no regions);
    - ``full``: the count, every object with size and region, and every relation — all of `Scene.facts`.

    ``omit`` leaves out one object (with its relations), one size or one region that the style would state, of the
    kinds in ``omission_kinds`` (nothing when the caption has none of them, e.g. an object of a one-object scene).
    The objects come in random order, or with ``large_first`` the large ones before the small ones (in random order
    within a size), as people name the most salient thing first.
    """
    if style not in STYLES:
        raise ValueError(f"Unknown caption style {style!r}; choose one of {list(STYLES)}.")
    rng = rng or random.Random(0)
    objects = list(scene.objects)
    rng.shuffle(objects)
    if large_first:
        objects.sort(key=lambda obj: obj.size != "large")  # stable: the shuffle still orders each size
    sized = {obj.name for obj in objects}
    shows_place = style in ("located", "sentences", "full") or (style == "relational" and len(objects) == 1)
    placed = {obj.name for obj in objects} if shows_place else set()
    choices = []
    if omit:
        choices = [("object", obj.name) for obj in objects] if len(objects) > 1 else []
        choices += [("size", name) for name in sorted(sized)] + [("position", name) for name in sorted(placed)]
        choices = [(kind, name) for kind, name in choices if kind in omission_kinds]
    if choices:
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
