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

from balcaprl._lazy import lazy_exports

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "Clause",
    "FACT_KINDS",
    "Fact",
    "IMAGE_SIZE",
    "POSITIONS",
    "PROMPT",
    "ParsedCaption",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "STYLES",
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

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BACKGROUND": "scene",
        "COLOURS": "scene",
        "FACT_KINDS": "scene",
        "IMAGE_SIZE": "scene",
        "POSITIONS": "scene",
        "PROMPT": "scene",
        "SHAPES": "scene",
        "SIZES": "scene",
        "SPLITS": "scene",
        "STYLES": "scene",
        "Fact": "scene",
        "Scene": "scene",
        "WorldObject": "scene",
        "Clause": "captions",
        "ParsedCaption": "captions",
        "describe": "captions",
        "parse_caption": "captions",
        "WorldConfig": "splits",
        "generate_scene": "splits",
        "make_split": "splits",
        "read_jsonl": "splits",
        "split_of": "splits",
        "to_dataset": "splits",
        "to_rows": "splits",
        "world_corpus": "splits",
        "write_jsonl": "splits",
    },
)
