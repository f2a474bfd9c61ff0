import numpy as np
import pytest

from customdiff import toyworld
from customdiff.errors import CustomDiffError
from customdiff.toyworld import BACKGROUNDS, COLORS, NOISE, Caption, Placement, Thing


def test_captions_round_trip():
    rng = np.random.default_rng(0)
    for n_objects in (1, 2):
        for _ in range(500):
            caption = toyworld.sample_caption(rng, n_objects)
            assert toyworld.parse_caption(str(caption)) == caption
            assert len(caption.things) == n_objects


def test_concept_caption_parses():
    caption = toyworld.parse_caption("a <new1> star and a blue circle on a white background")
    assert caption.things == (Thing("star", "<new1>"), Thing("circle", "blue"))
    assert caption.things[0].is_concept


@pytest.mark.parametrize(
    ("text", "word", "allowed"),
    [
        ("a small red dog on a gray background", '"dog"', "circle, square, triangle, star, ring, cross"),
        ("a small red circle on a moon background", '"moon"', "gray, white, black, sky, grass, sand"),
        ("a tiny red circle on a gray background", '"tiny"', "red, green, blue"),
        ("a small red circle on a gray", "end of caption", "background"),
    ],
)
def test_bad_word_is_named_with_the_allowed_ones(text, word, allowed):
    with pytest.raises(CustomDiffError) as caught:
        toyworld.parse_caption(text)
    message = str(caught.value)
    assert word in message and allowed in message


def test_two_object_caption_with_a_size_is_rejected():
    with pytest.raises(CustomDiffError, match='"small".*two-object captions name no size'):
        toyworld.parse_caption("a small red circle and a blue square on a gray background")


def test_object_in_its_background_colour_is_rejected():
    with pytest.raises(CustomDiffError, match="white object never sits on a white background"):
        toyworld.parse_caption("a small white circle on a white background")


def test_sampled_objects_never_take_the_background_colour():
    rng = np.random.default_rng(1)
    for index in range(2000):
        caption = toyworld.sample_caption(rng, n_objects=1 + index % 2)
        for thing in caption.things:
            assert COLORS[thing.color] != BACKGROUNDS[caption.background]


def test_render_is_background_and_object_within_the_noise():
    caption = toyworld.parse_caption("a large red circle on a sky background")
    place = Placement(x=32, y=30, radius=16)
    image = toyworld.render(caption, np.random.default_rng(0), layout=[place])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8

    xs, ys = toyworld.pixel_grid()
    inside = toyworld.shape_mask("circle", xs - place.x, ys - place.y, place.radius)
    assert (np.abs(image[inside].astype(int) - COLORS["red"]) <= NOISE).all()
    assert (np.abs(image[~inside].astype(int) - BACKGROUNDS["sky"]) <= NOISE).all()
    assert len(np.unique(image[~inside])) > 1  # the noise is there


def test_two_object_render_draws_both_at_their_places():
    caption = toyworld.parse_caption("a blue star and a yellow square on a black background")
    layout = [Placement(18, 32, 12), Placement(46, 32, 12)]
    image = toyworld.render(caption, np.random.default_rng(0), layout=layout)
    assert (np.abs(image[32, 18].astype(int) - COLORS["blue"]) <= NOISE).all()
    assert (np.abs(image[32, 46].astype(int) - COLORS["yellow"]) <= NOISE).all()
    assert (np.abs(image[2, 2].astype(int) - BACKGROUNDS["black"]) <= NOISE).all()


def test_concept_colours_are_outside_the_palette():
    palette = set(COLORS.values()) | set(BACKGROUNDS.values())
    for concept in toyworld.CONCEPTS.values():
        assert concept.shape in toyworld.SHAPES
        assert not set(concept.colors) & palette


def test_concept_render_shows_only_its_colours():
    concept = toyworld.get_concept("tile")
    caption = Caption("gray", (Thing("square", "<new1>"),))
    place = Placement(32, 32, 15)
    image = toyworld.render(caption, np.random.default_rng(0), {"<new1>": concept}, [place])
    xs, ys = toyworld.pixel_grid()
    inside = toyworld.shape_mask("square", xs - place.x, ys - place.y, place.radius)
    distances = np.abs(image[inside][:, None].astype(int) - np.array(concept.colors)).max(axis=-1)
    assert (distances.min(axis=1) <= NOISE).all()
    assert (distances.argmin(axis=1) == 0).any() and (distances.argmin(axis=1) == 1).any()


def test_concept_scenes_vary_and_use_the_token():
    views = list(toyworld.concept_scenes(toyworld.get_concept("starfish"), n=6, token="<new2>"))
    captions = [text for _, text in views]
    assert len(views) == 6
    assert all(text.startswith("a <new2> star on a ") for text in captions)
    assert len(set(captions)) == 6  # six backgrounds


def test_unknown_concept_lists_the_built_in_ones():
    with pytest.raises(CustomDiffError, match='"seastar".*starfish, donut, tile, beachball, kite'):
        toyworld.get_concept("seastar")


def test_seeded_renders_repeat():
    def render(seed):
        return [(image.tobytes(), text) for image, text in toyworld.sample_scenes(5, seed=seed)]

    assert render(4) == render(4)
    assert render(4) != render(5)
    concept = toyworld.get_concept("donut")
    first, again = (list(toyworld.concept_scenes(concept, seed=2)) for _ in range(2))
    assert all((a == b).all() for (a, _), (b, _) in zip(first, again, strict=True))
