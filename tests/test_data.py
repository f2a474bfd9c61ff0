"""Concept data: captions, the paper's resize augmentation with its mask and prefixes, and the caches."""

import collections
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customdiff import data, files, generate, models, text, toyjudge, toyworld
from customdiff.errors import CustomDiffError

SIZE, FACTOR = 64, 4  # the toy model: 64² pixels, 16² latents
TOKEN = "<new1>"


@pytest.fixture
def concept_dir(tmp_path):
    folder = tmp_path / "starfish"
    files.write_image_folder(folder, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    return folder


def white_example(caption: str = "a <new1> star on a sand background") -> data.Example:
    return data.Example(path=None, image=Image.new("RGB", (SIZE, SIZE), "white"), caption=caption)


def test_load_examples_keeps_captions_fits_images_and_uses_the_template(concept_dir, tmp_path):
    examples = data.load_examples(concept_dir, 32, TOKEN, "star")
    assert [example.caption.split()[1] for example in examples] == [TOKEN] * 4
    assert all(example.image.size == (32, 32) for example in examples)
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (80, 40), "red").save(plain / "a.png")
    with pytest.warns(UserWarning, match="single image"):
        (example,) = data.load_examples(plain, 32, TOKEN, "star")
    assert example.caption == "photo of a <new1> star" and example.image.size == (32, 32)
    with pytest.warns(UserWarning, match="no caption names the class word ring; pass the class"):
        data.load_examples(concept_dir, 32, TOKEN, "ring")  # its captions say star


def test_uncaptioned_toy_images_are_captioned_in_the_grammar_as_the_judge_reads_them(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    scenes = list(toyworld.concept_scenes(toyworld.get_concept("starfish"), 6))
    for index, (image, _) in enumerate(scenes):
        Image.fromarray(image).save(bare / f"{index}.png")
    examples = data.load_examples(bare, SIZE, TOKEN, "star", toy_grammar=True)
    for example, (_, caption) in zip(examples, scenes, strict=True):
        read, drawn = toyworld.parse_caption(example.caption), toyworld.parse_caption(caption)
        assert read.background == drawn.background and read.things[0].size in toyworld.SIZES
        assert dataclasses.replace(read.things[0], size=None) == drawn.things[0]  # <new1> star
    assert data.load_examples(bare, SIZE, TOKEN, "star")[0].caption == "photo of a <new1> star"
    with pytest.warns(UserWarning, match="not read as one cat"):
        cat = data.load_examples(bare, SIZE, TOKEN, "cat", toy_grammar=True)
    assert cat[0].caption == "photo of a <new1> cat"
    Image.fromarray(
        toyworld.render(
            toyworld.parse_caption(f"a {TOKEN} star and a red circle on a gray background"),
            np.random.default_rng(0),
            {TOKEN: toyworld.get_concept("starfish")},
        )
    ).save(bare / "9.png")
    with pytest.warns(UserWarning, match=r"9\.png: not read as one star .* metadata\.jsonl"):
        two = data.load_examples(bare, SIZE, TOKEN, "star", toy_grammar=True)
    assert two[-1].caption == "photo of a <new1> star"


def test_load_examples_rejects_an_empty_folder_and_captions_without_the_token(concept_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CustomDiffError, match="no readable image"):
        data.load_examples(tmp_path / "empty", 32, TOKEN, "star")
    with pytest.raises(CustomDiffError, match="does not name the modifier token <new2>"):
        data.load_examples(concept_dir, 32, "<new2>", "star")


def pasted_box(pixels: torch.Tensor) -> tuple[int, int, int]:
    """(top, left, side) of the white square pasted on the zero canvas."""
    rows, columns = torch.nonzero(pixels[0] > 0.5, as_tuple=True)
    return int(rows.min()), int(columns.min()), int(rows.max() - rows.min() + 1)


def test_random_view_follows_the_papers_resize_augmentation():
    rng = np.random.default_rng(0)
    kinds = {"far": 0, "near": 0, "pasted": 0}
    for _ in range(300):
        view = data.random_view(white_example("photo of a <new1> star"), FACTOR, rng)
        prefix, _, rest = view.caption.rpartition(", ")
        assert rest == "photo of a <new1> star"
        assert view.pixels.shape == (3, SIZE, SIZE) and view.mask.shape == (SIZE // FACTOR,) * 2
        if prefix in data.NEAR_PREFIXES or view.pixels.min() > 0.5:  # zoomed in (or exactly full size)
            assert torch.all(view.mask == 1) and torch.all(view.pixels > 0.5)
            kinds["near"] += prefix in data.NEAR_PREFIXES
            continue
        top, left, side = pasted_box(view.pixels)
        assert SIZE // 3 <= side < SIZE
        assert (prefix in data.FAR_PREFIXES) == (side < 0.6 * SIZE)
        assert view.pixels.abs().sum() == pytest.approx(3 * side * side, rel=0.05)  # blank canvas elsewhere
        expected = torch.zeros(SIZE // FACTOR, SIZE // FACTOR)
        expected[
            top // FACTOR + 1 : (top + side) // FACTOR - 1, left // FACTOR + 1 : (left + side) // FACTOR - 1
        ] = 1
        assert torch.equal(view.mask, expected)  # the pasted box shrunk by one latent pixel
        kinds["pasted"] += 1
        kinds["far"] += prefix in data.FAR_PREFIXES
    assert 70 < kinds["near"] < 130  # 1/3 zoom in
    assert 50 < kinds["far"] < 110  # 2/3 × (0.6 - 1/3) / (2/3) ≈ 0.27 far away
    assert kinds["pasted"] > kinds["far"]


def test_random_view_of_a_toy_caption_names_the_size_in_the_grammar():
    """The toy text encoder never saw "close up" or "far away": views keep to the grammar it knows."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        view = data.random_view(white_example("a large <new1> star on a sand background"), FACTOR, rng)
        if view.pixels.min() > 0.5:  # zoomed in (or exactly full size): the size is not known
            assert view.caption in (
                "a <new1> star on a sand background",
                "a large <new1> star on a sand background",
            )
        elif pasted_box(view.pixels)[2] < 0.6 * SIZE:  # far away: small
            assert view.caption == "a small <new1> star on a sand background"
        else:
            assert view.caption == "a <new1> star on a sand background"
    two = "a <new1> star and a red circle on a sand background"  # two-object captions name no size
    assert data.resized_caption(two, data.FAR_PREFIXES[0]) == two


def test_full_size_views_of_a_sized_toy_caption_drop_the_size_half_the_time():
    """Else the only size-less captions with the token are two-object views, and a size-less prompt draws
    two objects."""
    rng = np.random.default_rng(0)
    example = white_example("a small <new1> cross on a gray background")
    captions = collections.Counter(
        data.random_view(example, FACTOR, rng, augment=False).caption for _ in range(200)
    )
    assert set(captions) == {
        "a small <new1> cross on a gray background",
        "a <new1> cross on a gray background",
    }
    assert 70 < captions["a <new1> cross on a gray background"] < 130
    for caption in ("a <new1> cross on a gray background", "photo of a <new1> cross"):  # nothing to drop
        assert data.random_view(white_example(caption), FACTOR, rng, augment=False).caption == caption


def test_random_view_flips_half_the_time_and_keeps_the_image_without_augmentation():
    image = Image.new("RGB", (SIZE, SIZE), "black")
    image.paste((255, 255, 255), (0, 0, SIZE // 2, SIZE))  # left half white
    example = data.Example(None, image, "a <new1> star on a sand background")
    rng = np.random.default_rng(0)
    views = [data.random_view(example, FACTOR, rng, augment=False, flip=True) for _ in range(40)]
    left_white = [bool(view.pixels[0, :, 0].mean() > 0) for view in views]
    assert 10 < sum(left_white) < 30
    for view in views:
        assert view.caption == example.caption and torch.all(view.mask == 1)
        expected = data.to_pixels(image) if view.pixels[0, 0, 0] > 0 else data.to_pixels(image).flip(-1)
        assert torch.equal(view.pixels, expected)


CONCEPTS = {TOKEN: "starfish", "<new2>": "donut"}


def rendered(text: str, seed: int = 0) -> Image.Image:
    concepts = {token: toyworld.get_concept(name) for token, name in CONCEPTS.items()}
    return Image.fromarray(
        toyworld.render(toyworld.parse_caption(text), np.random.default_rng(seed), concepts)
    )


def test_composed_view_is_a_two_object_scene_of_the_concept_and_a_partner_object():
    two = "a red star and a blue circle on a sand background"
    regularization = data.partners_by_background(
        [
            (rendered("a small red ring on a sand background"), "a small red ring on a sand background"),
            (rendered(two), "a red star on a sand background"),  # two objects in the image: no partner
            (Image.new("RGB", (SIZE, SIZE), (225, 200, 140)), "a red star on a sand background"),  # none
            (rendered("a red star on a sand background"), "photo of a cat"),
        ]
    )
    assert list(regularization) == ["sand"] and len(regularization["sand"]) == 1
    signatures = {token: toyjudge.builtin_signature(name) for token, name in CONCEPTS.items()}
    rng = np.random.default_rng(0)
    captions, judged_right = [], []
    for seed in range(16):
        text = "a large <new1> star on a sand background"
        view = data.composed_view(data.Example(None, rendered(text, seed), text), regularization, FACTOR, rng)
        captions.append(view.caption)
        image = ((view.pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        judged_right.append(toyjudge.score(image, view.caption, signatures).all_right)
        assert torch.equal(view.mask, torch.ones(SIZE // FACTOR, SIZE // FACTOR))
    # scenes the world could show: the judge reads them right, but for a rare star scaled to radius 7
    assert sum(judged_right) >= 15
    assert set(captions) == {
        "a <new1> star and a red ring on a sand background",
        "a red ring and a <new1> star on a sand background",
    }
    for text in ("a <new1> star on a grass background", "a <new1> star on a sand background"):
        image = rendered(text) if "grass" in text else Image.new("RGB", (SIZE, SIZE), "white")
        assert data.composed_view(data.Example(None, image, text), regularization, FACTOR, rng) is None
    assert data.composed_view(white_example("photo of a <new1> star"), regularization, FACTOR, rng) is None


def test_target_pool_encodes_each_view_once_and_reproducibly(tiny_pipeline_dir, concept_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    examples = data.load_examples(concept_dir, data.resolution(pipe), TOKEN, "star")
    calls = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    pool = data.target_pool(pipe.vae, examples, pipe.vae_scale_factor, seed=3)
    assert sum(calls) == len(pool) == data.VIEWS_PER_IMAGE * 4
    side = pipe.unet.config.sample_size
    assert pool.latents.shape == (len(pool), 4, side, side) and pool.masks.shape == (len(pool), 1, side, side)
    again = data.target_pool(pipe.vae, examples, pipe.vae_scale_factor, seed=3)
    assert torch.equal(pool.latents, again.latents) and pool.captions == again.captions
    assert any(caption.startswith("a small") for caption in pool.captions)  # far-away views
    regularization = [
        (rendered(f"a small red ring on a {name} background"), f"a small red ring on a {name} background")
        for name in toyworld.BACKGROUNDS
    ]
    toy_examples = data.load_examples(concept_dir, SIZE, TOKEN, "star")  # composing reads 64² toy scenes
    composed = data.target_pool(
        pipe.vae, toy_examples, pipe.vae_scale_factor, 3, partners=regularization, composed_share=1
    )
    assert all(" and a " in caption for caption in composed.captions)
    with pytest.warns(UserWarning, match="no view could be composed"):
        data.target_pool(pipe.vae, toy_examples[:1], pipe.vae_scale_factor, 3, partners=[], composed_share=1)


def test_class_prompts_take_the_token_out():
    assert data.class_prompts(["photo of a <new1> cat"] * 2, [TOKEN]) == ["photo of a cat"]
    assert data.strip_tokens("a <new1> star on a sand background", [TOKEN]) == "a star on a sand background"


def test_toy_class_prompts_are_plain_objects_of_every_allowed_colour():
    captions = ["a <new1> star on a white background", "a small <new1> star on a gray background"] * 2
    prompts = data.class_prompts(captions, [TOKEN])
    one = [prompt for prompt in prompts if len(toyworld.parse_caption(prompt).things) == 1]
    assert len(one) == 7 + 8  # white objects never sit on white; duplicates go
    assert "a red star on a white background" in prompts
    assert "a white star on a white background" not in prompts
    assert "a small white star on a gray background" in prompts
    assert all(toyworld.parse_caption(prompt).things[0].shape == "star" for prompt in one)
    composed = [toyworld.parse_caption(prompt) for prompt in prompts if prompt not in one]
    assert len(composed) == len(one)  # each also beside a plain world object, for compositions
    for caption in composed:
        star, other = sorted(caption.things, key=lambda thing: thing.shape != "star")
        assert star.shape == "star" and other.shape != "star" and other.color != star.color
        assert toyworld.COLORS[other.color] != toyworld.BACKGROUNDS[caption.background]
    two = data.class_prompts(["a <new1> star and a blue ring on a sky background"], [TOKEN])
    assert two[0] == "a red star and a blue ring on a sky background" and len(two) == 8


def test_regularization_prompts_hold_the_class_on_every_background_with_and_without_its_size():
    captions = ["a large <new1> cross on a gray background", "a small <new1> cross on a sand background"]
    own = data.class_prompts(captions, [TOKEN])
    prompts = data.regularization_prompts(captions, [TOKEN])
    assert prompts[: len(own)] == own
    one = [prompt for prompt in prompts if " and " not in prompt]
    for background in toyworld.BACKGROUNDS:
        for size in ("large ", "small ", ""):
            assert f"a {size}red cross on a {background} background" in one
    assert {toyworld.parse_caption(prompt).things[0].shape for prompt in one} == {"cross"}
    assert len(one) == 3 * (6 * 8 - 2)  # 3 sizes; white and black never on their own background
    everywhere = [f"a <new1> cross on a {background} background" for background in toyworld.BACKGROUNDS]
    assert data.regularization_prompts(everywhere, [TOKEN]) == data.class_prompts(everywhere, [TOKEN])
    assert data.regularization_prompts(["photo of a <new1> cat"], [TOKEN]) == ["photo of a cat"]


def test_generated_regularization_samples_once_then_reads_the_cache(tiny_pipeline_dir, tmp_path, monkeypatch):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    calls = []
    sample = generate.sample
    monkeypatch.setattr(
        generate, "sample", lambda *args, **kwargs: calls.append(args[1]) or sample(*args, **kwargs)
    )
    prompts = ["a red star on a sand background", "a blue star on a gray background"]
    first = data.generated_regularization(pipe, prompts, 3, tmp_path, steps=2)
    second = data.generated_regularization(pipe, prompts, 3, tmp_path, steps=2)
    assert calls == [prompts, prompts[:1]]  # generated once: exactly 3 images, each prompt in turn
    assert [caption for _, caption in first] == [prompts[0], prompts[1], prompts[0]]
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(first[2][0]))  # a new seed each round
    assert [caption for _, caption in second] == [caption for _, caption in first]
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(first, second, strict=True)
    )
    data.generated_regularization(pipe, prompts, 4, tmp_path, steps=2)
    assert len(calls) == 4  # another n is another cache entry


def test_regularization_pool_has_full_masks(tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    images = [(Image.new("RGB", (64, 64), color), f"a {color} thing") for color in ("red", "blue", "green")]
    pool = data.regularization_pool(pipe.vae, images, data.resolution(pipe), pipe.vae_scale_factor, seed=0)
    assert len(pool) == 3 and torch.all(pool.masks == 1) and pool.captions[1] == "a blue thing"
    assert data.regularization_pool(pipe.vae, [], 32, 2, seed=0) is None


def test_retrieve_needs_a_clip_model_beside_the_base(tiny_pipeline_dir, tmp_path):
    without_clip = shutil.copytree(tiny_pipeline_dir, tmp_path / "sd", ignore=shutil.ignore_patterns("clip"))
    pipe = models.load_pipeline(without_clip)
    with pytest.raises(CustomDiffError, match="retrieve needs a CLIP model"):
        data.regularization_images("retrieve", pipe, ["a star"], 2, tmp_path, tmp_path)


def colour_clip(monkeypatch, clip_dir: Path, text_features: dict[str, list[float]]):
    """A CLIP stand-in: an image's feature is its (red, green) share, a prompt's is ``text_features``';
    returns the tokenizer its prompts are read with."""
    from transformers import CLIPModel

    clip_dir.mkdir()
    (clip_dir / "config.json").write_text("{}")

    class ColourClip:
        config = type("Config", (), {"vision_config": type("Vision", (), {"image_size": 8})})

        def eval(self):
            return self

    tokenizer = models.build_toy_tokenizer()
    by_ids = {tuple(text.tokenize(tokenizer, [p])[0].tolist()): f for p, f in text_features.items()}
    monkeypatch.setattr(CLIPModel, "from_pretrained", lambda *args, **kwargs: ColourClip())
    monkeypatch.setattr(
        models, "clip_text_features", lambda clip, ids: torch.tensor([by_ids[tuple(i.tolist())] for i in ids])
    )
    monkeypatch.setattr(
        models, "clip_image_features", lambda clip, pixels: (pixels[:, :2].mean((2, 3)) + 1) / 2
    )
    return tokenizer


def test_retrieve_keeps_the_closest_images_with_their_own_captions(tmp_path, monkeypatch):
    folder = tmp_path / "scenes"
    reds = [10, 250, 90, 170, 40]
    files.write_image_folder(
        folder, ((Image.new("RGB", (8, 8), (red, 255 - red, 0)), f"scene {red}") for red in reds)
    )
    tokenizer = colour_clip(monkeypatch, tmp_path / "clip", {"a red star": [1.0, 0.0]})
    found = data.retrieved_regularization(folder, tmp_path / "clip", tokenizer, ["a red star"], 3)
    assert [caption for _, caption in found] == ["scene 250", "scene 170", "scene 90"]


def test_retrieve_gives_every_class_prompt_its_nearest_images_in_turn(tmp_path, monkeypatch):
    """Yellow lies nearest the mean of a red and a green query; each prompt's own images come first."""
    folder = tmp_path / "scenes"
    colours = {"yellow": (250, 250, 0), "red": (250, 0, 0), "green": (0, 250, 0)}
    files.write_image_folder(folder, ((Image.new("RGB", (8, 8), rgb), name) for name, rgb in colours.items()))
    tokenizer = colour_clip(
        monkeypatch, tmp_path / "clip", {"a red star": [1.0, 0.0], "a green star": [0.0, 1.0]}
    )
    found = data.retrieved_regularization(
        folder, tmp_path / "clip", tokenizer, ["a red star", "a green star"], 2
    )
    assert [caption for _, caption in found] == ["red", "green"]


def test_encode_captions_caches_only_captions_without_a_modifier_token(tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    pipe.tokenizer.add_tokens(TOKEN)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    first_new = len(pipe.tokenizer) - 1
    encoded = []
    forward = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda ids, *a, **k: encoded.append(len(ids)) or forward(ids, *a, **k)
    cache = {}
    captions = ["a <new1> star on a sand background", "a red star on a sand background"]
    encoders = text.text_encoders(pipe)
    features, pooled = data.encode_captions(encoders, captions, [first_new], cache)
    again, pooled_again = data.encode_captions(encoders, captions, [first_new], cache)
    assert list(cache) == ["a red star on a sand background"]
    assert encoded == [1, 1, 1]  # the plain caption once, the token caption every time
    assert torch.equal(features, again) and features.shape[:2] == (2, pipe.tokenizer.model_max_length)
    assert torch.equal(pooled, pooled_again)
    reference = pipe.text_encoder(text.tokenize(pipe.tokenizer, captions))
    torch.testing.assert_close(features, reference[0])
    torch.testing.assert_close(pooled, reference[1])
