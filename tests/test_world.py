"""The shapes world (`balcaprl.world`) and its exact rewards (`balcaprl.rewards.world`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest
from PIL import Image

from balcaprl.rewards.world import WorldLinguistic, WorldPrecision, WorldRecall, score_caption
from balcaprl.world.captions import describe, parse_caption
from balcaprl.world.scene import (
    BACKGROUND,
    COLOURS,
    MAX_JITTER,
    NUMBER_WORDS,
    PALETTE,
    PLACE_PHRASES,
    POSITIONS,
    PROMPT,
    RADIUS,
    RELATION_PHRASES,
    SHAPES,
    SIZES,
    STYLES,
    Fact,
    Scene,
    WorldObject,
)
from balcaprl.world.splits import (
    WorldConfig,
    make_split,
    read_jsonl,
    split_of,
    to_dataset,
    to_rows,
    world_corpus,
    write_jsonl,
)

# red circle on the left, blue square at the top: a diagonal pair, so two relations.
TWO = Scene((WorldObject("circle", "red", "small", "left"), WorldObject("square", "blue", "large", "top")))
PERFECT = (
    "There are two objects. A small red circle is on the left. A large blue square is at the top. "
    "The red circle is to the left of the blue square. The blue square is above the red circle."
)


@pytest.fixture(scope="module")
def train_scenes():
    return make_split("train", 400, seed=0)


def scores(caption: str, scene: Scene = TWO) -> tuple[float, float, float]:
    result = score_caption(caption, scene)
    return result["precision"], result["recall"], result["linguistic"]


class TestSceneGraph:
    def test_facts_of_a_hand_built_scene(self):
        assert TWO.facts() == {
            Fact("object", "red circle"),
            Fact("size", "red circle", "small"),
            Fact("position", "red circle", "left"),
            Fact("object", "blue square"),
            Fact("size", "blue square", "large"),
            Fact("position", "blue square", "top"),
            Fact("relation", "red circle", "left of", "blue square"),
            Fact("relation", "blue square", "above", "red circle"),
            Fact("count", value="2"),
        }

    def test_aligned_pair_has_one_relation(self):
        scene = Scene((WorldObject("circle", "red", "small", "right"), WorldObject("square", "blue", "small", "left")))
        assert scene.relations() == [Fact("relation", "blue square", "left of", "red circle")]

    @pytest.mark.parametrize(
        "objects, message",
        [
            (
                (WorldObject("circle", "red", "small", "left"), WorldObject("square", "blue", "small", "left")),
                "region",
            ),
            ((WorldObject("circle", "red", "small", "left"), WorldObject("circle", "red", "large", "top")), "colour"),
            ((), "at least one object"),
        ],
    )
    def test_invalid_scenes_are_errors(self, objects, message):
        with pytest.raises(ValueError, match=message):
            Scene(objects)

    def test_unknown_attribute_lists_the_allowed_values(self):
        with pytest.raises(ValueError, match="purple.*'red'"):
            WorldObject("circle", "purple", "small", "left")

    def test_dict_round_trip_is_json_serialisable(self, train_scenes):
        for scene in train_scenes[:50]:
            graph = json.loads(json.dumps(scene.to_dict()))
            assert Scene.from_dict(graph).objects == scene.objects
            assert len(graph["relations"]) == len(scene.relations())

    def test_malformed_graph_names_the_object(self):
        with pytest.raises(ValueError, match="object #0"):
            Scene.from_dict({"objects": [{"shape": "circle"}]})

    def test_config_is_validated(self):
        with pytest.raises(ValueError, match="jitter"):
            WorldConfig(jitter=0.05)
        with pytest.raises(ValueError, match="styles"):
            WorldConfig(styles=("haiku",))


class TestSplits:
    def test_determinism_by_seed(self):
        first, again, other = make_split("train", 30, seed=3), make_split("train", 30, seed=3), make_split("train", 30)
        assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
        assert [s.references for s in first] == [s.references for s in again]
        assert [s.render().tobytes() for s in first] == [s.render().tobytes() for s in again]
        assert [s.to_dict() for s in first] != [s.to_dict() for s in other]

    def test_splits_share_no_scene_graph(self, train_scenes):
        validation, test = make_split("validation", 150), make_split("test", 150)
        train_keys = {scene.key() for scene in train_scenes}
        assert not train_keys & {scene.key() for scene in test}
        assert not train_keys & {scene.key() for scene in validation}
        assert not {s.key() for s in validation} & {s.key() for s in test}
        assert all(split_of(scene) == "test" for scene in test)
        # same seed, different split: a different random stream, not the same scenes filtered differently
        assert test[0].to_dict() != make_split("validation", 1)[0].to_dict()

    def test_object_counts_cover_one_to_three(self, train_scenes):
        assert {len(scene.objects) for scene in train_scenes} == {1, 2, 3}
        assert all(3 <= len(scene.references) <= 5 for scene in train_scenes)

    def test_unknown_split_is_an_error(self):
        with pytest.raises(ValueError, match="'train', 'validation', 'test'"):
            make_split("dev", 1)


class TestImages:
    def test_size_background_and_colour_at_each_object_centre(self, train_scenes):
        for scene in train_scenes[:100]:
            for image_size in (112, 224):
                image = scene.render(image_size)
                assert image.size == (image_size, image_size) and image.mode == "RGB"
                assert image.getpixel((0, 0)) == BACKGROUND
                for obj in scene.objects:
                    x, y = obj.center(image_size)
                    assert image.getpixel((round(x), round(y))) == PALETTE[obj.colour], (scene.to_dict(), obj)

    def test_object_is_drawn_in_its_region(self):
        image = Scene((WorldObject("triangle", "yellow", "large", "bottom"),)).render()
        assert image.getpixel((56, 92)) == PALETTE["yellow"]
        assert image.getpixel((56, 20)) == BACKGROUND and image.getpixel((20, 56)) == BACKGROUND

    def test_shapes_never_overlap_nor_leave_the_image(self):
        # worst case: large shapes pushed toward each other by the maximum jitter
        for first, second in itertools.combinations(POSITIONS, 2):
            boxes = []
            for position in (first, second):
                obj = WorldObject("square", "red", "large", position)
                (x, y), r = obj.center(1), RADIUS["large"]
                boxes.append((x - r - MAX_JITTER, y - r - MAX_JITTER, x + r + MAX_JITTER, y + r + MAX_JITTER))
            (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes
            assert a1 < c0 or c1 < a0 or b1 < d0 or d1 < b0, (first, second)
            assert all(0 <= value <= 1 for box in boxes for value in box)


class TestGrammar:
    def test_full_caption_round_trips_to_the_scene_facts(self, train_scenes):
        rng = random.Random(0)
        for scene in train_scenes:
            parsed = parse_caption(describe(scene, "full", rng))
            assert parsed.unparseable == ()
            assert set(parsed.claims) == scene.facts()

    def test_every_reference_parses_without_omission(self):
        for scene in make_split("train", 200, seed=1, config=WorldConfig(omission_rate=0.0)):
            for reference in scene.references:
                parsed = parse_caption(reference)
                assert parsed.unparseable == (), reference
                assert set(parsed.claims) <= scene.facts(), reference
                objects = {fact for fact in scene.facts() if fact.kind == "object"}
                assert objects <= set(parsed.claims), reference  # no object left out

    def test_every_style_without_omission_states_its_details(self):
        rng = random.Random(2)
        scene = Scene(TWO.objects + (WorldObject("triangle", "green", "small", "right"),))
        for style in STYLES:
            claims = set(parse_caption(describe(scene, style, rng)).claims)
            assert {f for f in scene.facts() if f.kind in ("object", "size")} <= claims, style
            if style in ("located", "sentences", "full"):
                assert {f for f in scene.facts() if f.kind == "position"} <= claims, style

    def test_references_with_omissions_parse_to_a_strict_subset(self):
        missing = 0
        for scene in make_split("train", 150, seed=2, config=WorldConfig(omission_rate=1.0)):
            for reference in scene.references:
                parsed = parse_caption(reference)
                assert parsed.unparseable == (), reference
                assert set(parsed.claims) < scene.facts(), reference
                missing += not {f for f in scene.facts() if f.kind == "object"} <= set(parsed.claims)
        assert missing > 0  # some references leave out a whole object

    def test_omission_kinds_limit_what_is_left_out(self):
        config = WorldConfig(max_objects=2, omission_rate=1.0, omission_kinds=("object",), styles=("located",))
        for scene in make_split("train", 100, seed=3, config=config):
            objects = {f for f in scene.facts() if f.kind == "object"}
            for reference in scene.references:
                claims = set(parse_caption(reference).claims)
                named = objects & claims
                # a whole object is left out of every reference of a two-object scene; nothing else is ever left out
                assert len(named) == (1 if len(scene.objects) == 2 else len(objects)), reference
                for fact in scene.facts():
                    if fact.kind in ("size", "position") and Fact("object", fact.subject) in named:
                        assert fact in claims, (reference, fact)
        with pytest.raises(ValueError, match="omission_kinds"):
            WorldConfig(omission_kinds=("colour",))

    def test_large_first_names_large_shapes_before_small_ones(self):
        """With large_first no reference names a small shape before a large one (random order does), and the rest of
        the world — scenes, styles, omissions — is drawn the same. (The relational style orders by its relations.)"""

        def named_sizes(config):
            scenes = make_split("train", 120, seed=4, config=config)
            orders = []
            for scene in scenes:
                for reference in scene.references:
                    names = dict.fromkeys(c.subject for c in parse_caption(reference).claims if c.kind == "object")
                    orders.append([scene.object_named(name).size for name in names])
            return scenes, orders

        config = WorldConfig(min_objects=2, omission_rate=0.5, styles=("terse", "located", "sentences", "full"))
        plain_scenes, plain = named_sizes(config)
        large_scenes, large = named_sizes(dataclasses.replace(config, large_first=True))
        assert [scene.key() for scene in large_scenes] == [scene.key() for scene in plain_scenes]
        assert [len(sizes) for sizes in large] == [len(sizes) for sizes in plain]  # the same omissions
        mixed = [sizes for sizes in large if len(set(sizes)) == 2]
        assert mixed and all(sizes == sorted(sizes) for sizes in mixed)  # "large" sorts before "small"
        assert any(sizes != sorted(sizes) for sizes in plain if len(set(sizes)) == 2)
        rng = random.Random(0)
        assert all(describe(TWO, "terse", rng, large_first=True).endswith("blue square and a small red circle.")
                   for _ in range(20))  # fmt: skip

    def test_omission_rate_is_respected(self):
        rng = random.Random(0)
        scene = Scene(TWO.objects)
        full = set(parse_caption(describe(scene, "full", rng)).claims)
        lossy = sum(set(parse_caption(describe(scene, "full", rng, omit=True)).claims) < full for _ in range(20))
        assert lossy == 20

    @pytest.mark.parametrize(
        "caption, claims",
        [
            (
                "The blue square is to the right of the red circle.",
                [
                    Fact("object", "blue square"),
                    Fact("object", "red circle"),
                    Fact("relation", "red circle", "left of", "blue square"),
                ],
            ),
            (
                "a small red circle is below a blue square",
                [
                    Fact("object", "red circle"),
                    Fact("size", "red circle", "small"),
                    Fact("object", "blue square"),
                    Fact("relation", "blue square", "above", "red circle"),
                ],
            ),
            ("The image shows three shapes.", [Fact("count", value="3")]),
            ("there is one object.", [Fact("count", value="1")]),
            ("The red circle is large.", [Fact("object", "red circle"), Fact("size", "red circle", "large")]),
            (
                "There is a red circle on the left side, a blue square, and a green triangle in the middle.",
                [
                    Fact("object", "red circle"),
                    Fact("position", "red circle", "left"),
                    Fact("object", "blue square"),
                    Fact("object", "green triangle"),
                    Fact("position", "green triangle", "center"),
                ],
            ),
        ],
    )
    def test_parser_on_hand_written_captions(self, caption, claims):
        parsed = parse_caption(caption)
        assert parsed.unparseable == ()
        assert list(parsed.claims) == claims

    @pytest.mark.parametrize(
        "caption, unparseable",
        [
            ("There are one objects.", ("there are one objects",)),
            ("A red circle and a purple star.", ("a purple star",)),
            ("a red circle a blue square.", ("a red circle a blue square",)),
            ("There is a red circle is on the left.", ("there is a red circle is on the left",)),
        ],
    )
    def test_clauses_outside_the_grammar_are_kept(self, caption, unparseable):
        assert parse_caption(caption).unparseable == unparseable

    def test_stray_separator_is_an_empty_clause(self):
        parsed = parse_caption("a red circle and , a blue square.")
        assert [clause.text for clause in parsed.clauses] == ["a red circle", "", "a blue square"]
        assert parsed.unparseable == ()

    def test_corpus_covers_the_whole_vocabulary(self):
        corpus = world_corpus(num_scenes=100)
        words = {word for caption in corpus for word in caption.lower().replace(".", " ").replace(",", " ").split()}
        phrases = [*itertools.chain(*PLACE_PHRASES.values()), *RELATION_PHRASES, "there is are the image shows a"]
        vocabulary = {*SHAPES, *COLOURS, *SIZES, *NUMBER_WORDS.values(), "object", "objects", "shape", "shapes"}
        vocabulary |= {word for phrase in phrases for word in phrase.split()} | {"and"}
        assert vocabulary <= words
        assert words <= vocabulary  # and nothing outside the grammar
        assert all(not parse_caption(caption).unparseable for caption in corpus)


class TestExactRewards:
    def test_perfect_caption_scores_one_one_one(self, train_scenes):
        assert scores(PERFECT) == (1.0, 1.0, 1.0)
        rng = random.Random(5)
        for scene in train_scenes[:100]:
            assert scores(describe(scene, "full", rng), scene) == (1.0, 1.0, 1.0)

    def test_references_are_exact_and_fluent_and_only_recall_varies(self):
        recalls = set()
        for scene in make_split("train", 150, seed=4, config=WorldConfig(omission_rate=0.5)):
            for reference in scene.references:
                precision, recall, linguistic = scores(reference, scene)
                assert (precision, linguistic) == (1.0, 1.0), reference
                recalls.add(recall)
        assert 1.0 in recalls and min(recalls) < 0.5

    def test_listing_hack_is_penalised(self):
        # the hack seen with precision + recall only: list guessed objects without grammar
        precision, recall, linguistic = scores("a small red circle a small red circle and a large blue square.")
        assert (precision, recall, linguistic) == (2 / 3, 2 / 9, 0.5)  # only "a large blue square" parses

    def test_hallucinated_object_lowers_precision_only(self):
        precision, recall, linguistic = scores(PERFECT + " There is a small green triangle on the right.")
        assert precision == 9 / 12  # 3 new claims (object, size, position), all false
        assert (recall, linguistic) == (1.0, 1.0)

    def test_wrong_detail_lowers_precision(self):
        precision, recall, linguistic = scores(PERFECT.replace("A large blue square", "A small blue square"))
        assert precision == 8 / 9 and recall == 8 / 9 and linguistic == 1.0  # the true size is no longer stated

    def test_missing_object_lowers_recall_only(self):
        precision, recall, linguistic = scores("There are two objects. A small red circle is on the left.")
        assert (precision, linguistic) == (1.0, 1.0)
        assert recall == 4 / 9  # count, object, size and position of the red circle

    def test_stutter_lowers_linguistic_only(self):
        caption = PERFECT.replace("A small red circle", "The the small red red circle")
        precision, recall, linguistic = scores(caption)
        assert (precision, recall) == (1.0, 1.0)
        assert linguistic == pytest.approx(1 - 2 / 41)  # 2 repeated words of 41
        assert scores("the the red red circle.")[2] < scores("the red circle.")[2]

    def test_repeated_clause_lowers_linguistic(self):
        result = score_caption("a red circle and a red circle and a red circle.", TWO)
        assert result["precision"] == 1.0  # repeated claims count once
        assert result["repetition"] == pytest.approx(1 - 6 / 11)
        assert result["linguistic"] == pytest.approx(1 - 6 / 11)

    def test_unparseable_clause_is_a_false_claim_and_ungrammatical(self):
        result = score_caption("a small red circle, a purple star and a large blue square.", TWO)
        assert result["precision"] == 4 / 5
        assert result["grammatical"] == 2 / 3 and result["linguistic"] == 2 / 3

    def test_form_wants_periods_and_a_consistent_case(self):
        assert score_caption("A red circle", TWO)["form"] == 0.0
        assert score_caption("a red circle. a blue square.", TWO)["form"] == 1.0  # consistent lower case
        assert score_caption("A red circle. a blue square.", TWO)["form"] == 0.5
        assert score_caption("A red circle.. A blue square.", TWO)["form"] == 0.5

    def test_empty_caption_scores_zero(self):
        assert scores("") == (0.0, 0.0, 0.0)
        assert scores("   ") == (0.0, 0.0, 0.0)

    def test_relations_are_implied_by_two_true_positions(self):
        result = score_caption("A small red circle is on the left. A large blue square is at the top.", TWO)
        assert result["recall"] == 8 / 9  # everything but the count
        wrong = score_caption("A small red circle is at the top. A large blue square is on the left.", TWO)
        assert wrong["covered"] == 4  # objects and sizes; no position, so no implied relation

    def test_recall_weights(self):
        caption = "A small red circle is on the left. A large blue square is at the top."
        recall = WorldRecall(weights={"count": 0.0, "relation": 0.5})
        assert recall(None, [caption], scene=[TWO.to_dict()]) == [1.0]
        with pytest.raises(ValueError, match="colour"):
            WorldRecall(weights={"colour": 1.0})


class TestTrlInterface:
    def test_conversational_completions_scene_dicts_and_sub_scores(self):
        logged = {}
        completions = [[{"role": "assistant", "content": PERFECT}], [{"role": "assistant", "content": ""}]]
        kwargs = {"scene": [TWO.to_dict()] * 2, "log_extra": lambda key, values: logged.__setitem__(key, values)}
        rewards = [WorldPrecision(), WorldRecall(), WorldLinguistic()]
        assert [reward.__name__ for reward in rewards] == ["world_precision", "world_recall", "world_linguistic"]
        assert [reward(None, completions, **kwargs) for reward in rewards] == [[1.0, 0.0]] * 3
        assert logged["world_precision/claims"] == [9, 0] and logged["world_precision/unparseable"] == [0, 0]
        assert logged["world_recall/covered"] == [9.0, 0.0] and logged["world_recall/facts"] == [9.0, 9.0]
        assert set(logged) >= {"world_linguistic/grammatical", "world_linguistic/repetition", "world_linguistic/form"}

    def test_linguistic_as_a_judge_rating(self):
        from balcaprl.rewards import get_reward_funcs
        from balcaprl.rewards.world import rate_on_scale

        # low + round-half-up((high - low) * L), by hand
        assert [rate_on_scale(v, (1, 5)) for v in (0.0, 0.1, 0.125, 0.5, 0.874, 0.875, 1.0)] == [1, 1, 2, 3, 4, 5, 5]
        captions = [PERFECT, "the the red red circle.", "a red circle and a red circle and a red circle.", ""]
        exact = WorldLinguistic()(None, captions)
        (rated,) = get_reward_funcs([{"name": "world_linguistic", "rating_scale": [1, 5]}])
        assert rated(None, captions) == [rate_on_scale(value, (1, 5)) for value in exact] == [5.0, 3.0, 3.0, 1.0]
        assert rated.__name__ == "world_linguistic" and "rating_scale=(1, 5)" in repr(rated)
        for bad in ([5, 1], [1], [1.5, 5]):
            with pytest.raises(ValueError, match="rating_scale"):
                WorldLinguistic(rating_scale=bad)

    def test_missing_scene_column_names_it(self):
        with pytest.raises(ValueError, match="'scene'.*columns passed are \\['references'\\]"):
            WorldPrecision()(None, ["a red circle."], references=[["x"]])

    def test_scene_column_from_a_dataset(self, train_scenes):
        dataset = to_dataset(train_scenes[:4])
        assert dataset.column_names == ["prompt", "image", "references", "scene"]
        row = dataset[0]
        assert row["image"].size == (112, 112) and row["prompt"] == [{"role": "user", "content": PROMPT}]
        assert Scene.from_dict(row["scene"]).objects == train_scenes[0].objects
        captions = [describe(Scene.from_dict(graph), "full") for graph in dataset["scene"]]
        assert WorldPrecision()(dataset["prompt"], captions, scene=dataset["scene"]) == [1.0] * 4


class TestExport:
    def test_rows_are_trl_conversational(self, train_scenes):
        rows = to_rows(train_scenes[:3], image_size=56)
        assert set(rows[0]) == {"prompt", "image", "references", "scene"}
        assert rows[0]["prompt"] == [{"role": "user", "content": "Describe this image in detail."}]
        assert rows[0]["image"].size == (56, 56) and rows[0]["references"] == list(train_scenes[0].references)
        json.dumps(rows[0]["scene"])

    def test_jsonl_round_trip(self, tmp_path, train_scenes):
        scenes = train_scenes[:5]
        path = write_jsonl(scenes, tmp_path)
        assert path == tmp_path / "data.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[0]["image"] == "images/000000.png"
        with Image.open(tmp_path / lines[0]["image"]) as image:
            assert image.size == (112, 112)
        rows = read_jsonl(tmp_path)
        for row, scene in zip(rows, scenes, strict=True):
            assert row["references"] == list(scene.references)
            assert Scene.from_dict(row["scene"]).objects == scene.objects
            assert row["image"].tobytes() == scene.render().tobytes()  # PNG is lossless

    def test_bad_jsonl_row_names_file_and_line(self, tmp_path):
        (tmp_path / "data.jsonl").write_text('{"image": "missing.png", "references": [], "scene": {}}\n')
        with pytest.raises(ValueError, match="data.jsonl:1"):
            read_jsonl(tmp_path)
