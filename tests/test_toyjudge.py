"""The toy judge reads renders back into their captions, tells concepts apart, and scores prompts."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from customdiff import toyjudge, toyworld
from customdiff.errors import CustomDiffError
from customdiff.toyworld import BACKGROUNDS, COLORS, CONCEPTS, SHAPES, Caption, Placement, Thing


def scenes(n: int, seed: int):
    """n random (caption, layout, image) triples, half of them one-object, with the truth kept."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        caption = toyworld.sample_caption(rng)
        layout = toyworld.sample_layout(caption, rng)
        yield caption, layout, toyworld.render(caption, rng, layout=layout)


def accuracy(triples, degrade=lambda image: image) -> dict[str, float]:
    results: dict[str, list[bool]] = {}
    for caption, layout, image in triples:
        checks = toyjudge.truth_checks(toyjudge.read_image(degrade(image)), caption, layout)
        for name, right in checks.items():
            results.setdefault(name, []).append(right)
    return {name: float(np.mean(values)) for name, values in results.items()}


def test_reads_random_renders():
    measured = accuracy(scenes(600, seed=0))  # size on one-object scenes, whose captions name it
    floors = {"background": 0.99, "count": 0.99, "color": 0.99, "shape": 0.97, "size": 0.97, "position": 0.99}
    assert not [name for name, floor in floors.items() if measured[name] < floor], measured


def blur(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)))


def test_reads_blurred_renders():
    """Blur stands in for the soft edges of sampled images: objects are cut at half contrast."""
    measured = accuracy(scenes(150, seed=1), blur)
    assert min(measured.values()) >= 0.95, measured


def antialiased(shape: str, color: str, background: str, place: Placement) -> np.ndarray:
    """A render by another rasteriser: 4×4 supersampled, so edges are blends and centres are off-grid."""
    fine = (np.arange(4 * toyworld.IMAGE_SIZE) + 0.5) / 4
    xs, ys = np.meshgrid(fine, fine)
    inside = toyworld.shape_mask(shape, xs - place.x, ys - place.y, place.radius)
    cover = inside.reshape(toyworld.IMAGE_SIZE, 4, toyworld.IMAGE_SIZE, 4).mean(axis=(1, 3))[..., None]
    image = cover * np.array(COLORS[color]) + (1 - cover) * np.array(BACKGROUNDS[background])
    return np.round(image).astype(np.uint8)


@pytest.mark.parametrize("shape", SHAPES)
def test_reads_another_renderer(shape):
    for color, background, place, size in [
        ("red", "gray", Placement(18.4, 30.7, 7.6), "small"),
        ("green", "grass", Placement(32.6, 33.2, 10.4), "small"),
        ("blue", "sand", Placement(45.3, 36.5, 15.3), "large"),
        ("white", "black", Placement(46.8, 31.1, 19.7), "large"),
    ]:
        reading = toyjudge.read_image(antialiased(shape, color, background, place))
        (seen,) = reading.objects
        assert (reading.background, seen.color, seen.shape, seen.size) == (background, color, shape, size)
        assert abs(seen.x - place.x) < 1 and abs(seen.y - place.y) < 1 and abs(seen.radius - place.radius) < 1


def test_concepts_told_from_plain_objects_and_from_each_other():
    rng = np.random.default_rng(2)
    signatures = {name: toyjudge.builtin_signature(name) for name in CONCEPTS}
    for name, concept in CONCEPTS.items():
        for image, caption in toyworld.concept_scenes(concept, n=4, seed=1):  # not the signature's scenes
            reading = toyjudge.read_image(image)
            own = toyjudge.score(reading, caption, {"<new1>": signatures[name]})
            assert own.all_right, (name, caption, own.checks)
            for other in CONCEPTS.keys() - {name}:
                checks = toyjudge.score(reading, caption, {"<new1>": signatures[other]}).checks
                assert not checks["object1.concept"], (name, other, caption)
        for index, color in enumerate(COLORS):
            background = next(
                b for b in rng.permutation(list(BACKGROUNDS)) if BACKGROUNDS[b] != COLORS[color]
            )
            plain = Caption(str(background), (Thing(concept.shape, color, ("small", "large")[index % 2]),))
            prompt = f"a <new1> {concept.shape} on a {background} background"
            checks = toyjudge.score(toyworld.render(plain, rng), prompt, {"<new1>": signatures[name]}).checks
            assert not checks["object1.concept"] and checks["object1.shape"], (name, color)


@pytest.mark.parametrize(
    "prompt",
    ["a small red circle on a gray background", "a large yellow star on a sky background"],
)
def test_score_flags_exactly_the_wrong_part(prompt):
    image = toyworld.render(toyworld.parse_caption(prompt), np.random.default_rng(3))
    assert toyjudge.score(image, prompt).all_right
    red = "red" in prompt
    wrong = {
        "object1.color": prompt.replace("red" if red else "yellow", "blue"),
        "object1.shape": prompt.replace("circle" if red else "star", "square"),
        "object1.size": prompt.replace("small", "large") if red else prompt.replace("large", "small"),
        "background": prompt.replace("gray" if red else "sky", "white"),
    }
    for check, wrong_prompt in wrong.items():
        result = toyjudge.score(image, wrong_prompt)
        assert [name for name, right in result.checks.items() if not right] == [check], wrong_prompt
        assert result.fraction == (len(result.checks) - 1) / len(result.checks) and not result.all_right


def test_score_two_objects_left_to_right():
    prompt = "a red circle and a blue square on a white background"
    layout = [Placement(18, 30, 14), Placement(46, 34, 8)]
    image = toyworld.render(toyworld.parse_caption(prompt), np.random.default_rng(4), layout=layout)
    assert toyjudge.score(image, prompt).checks == {
        "background": True,
        "count": True,
        "object1.color": True,
        "object1.shape": True,
        "object2.color": True,
        "object2.shape": True,
    }
    swapped = toyjudge.score(image, "a blue square and a red circle on a white background")
    assert swapped.count_right == 2 and swapped.checks["count"]
    one = toyjudge.score(image, "a large red circle on a white background")  # matched to the largest
    assert [name for name, right in one.checks.items() if not right] == ["count"]


def test_score_concept_needs_its_signature():
    prompt = "a <new1> star and a <new2> ring on a gray background"
    image = toyworld.render(
        toyworld.parse_caption(prompt),
        np.random.default_rng(5),
        {"<new1>": CONCEPTS["starfish"], "<new2>": CONCEPTS["donut"]},
    )
    signatures = {
        "<new1>": toyjudge.builtin_signature("starfish"),
        "<new2>": toyjudge.builtin_signature("donut"),
    }
    assert toyjudge.score(image, prompt, signatures).all_right
    with pytest.raises(CustomDiffError, match="<new2>"):
        toyjudge.score(image, prompt, {"<new1>": signatures["<new1>"]})


def test_bad_input_is_a_user_error():
    with pytest.raises(CustomDiffError, match="128×96; images must be 64×64"):
        toyjudge.read_image(np.zeros((96, 128, 3), dtype=np.uint8))
    with pytest.raises(CustomDiffError, match="must be 64×64"):
        toyjudge.read_image(Image.new("RGB", (32, 32)))
    with pytest.raises(CustomDiffError, match="uint8"):
        toyjudge.read_image(np.zeros((64, 64, 3), dtype=np.float32))
    image = toyworld.render(
        toyworld.parse_caption("a small red circle on a gray background"), np.random.default_rng(6)
    )
    with pytest.raises(CustomDiffError, match="purple"):
        toyjudge.score(image, "a small red circle on a purple background")
    with pytest.raises(CustomDiffError, match="no object"):
        toyjudge.concept_signature([np.full((64, 64, 3), 128, dtype=np.uint8)])


def test_reads_paths_pil_rgba_and_grayscale(tmp_path):
    image = toyworld.render(
        toyworld.parse_caption("a large blue ring on a sand background"), np.random.default_rng(7)
    )
    Image.fromarray(image).save(tmp_path / "scene.png")
    expected = toyjudge.describe(toyjudge.read_image(image))
    assert toyjudge.describe(toyjudge.read_image(tmp_path / "scene.png")) == expected
    assert toyjudge.describe(toyjudge.read_image(str(tmp_path / "scene.png"))) == expected
    assert toyjudge.describe(toyjudge.read_image(Image.fromarray(image).convert("RGBA"))) == expected
    gray = toyjudge.read_image(np.asarray(Image.fromarray(image).convert("L")))
    assert [seen.shape for seen in gray.objects] == ["ring"]


def test_describe_is_one_line():
    image = toyworld.render(
        toyworld.parse_caption("a small red circle on a gray background"),
        np.random.default_rng(8),
        layout=[Placement(18, 32, 9)],
    )
    assert (
        toyjudge.describe(toyjudge.read_image(image))
        == "gray background; left: small red circle (r=9.0, fit 1.00)"
    )
    blank = np.full((64, 64, 3), 15, dtype=np.uint8)
    assert toyjudge.describe(toyjudge.read_image(blank)) == "black background; no objects"
