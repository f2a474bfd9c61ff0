"""Regional prompts: how prompts split into columns, the column attention, and sampling with them."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from customdiff import generate, merge, models, regions
from customdiff.concept import apply_concept, save_concept
from customdiff.errors import CustomDiffError


def test_with_regions_on_prompts_split_at_break_and_two_object_toy_captions_naming_a_concept():
    written = "two pets BREAK a <new1> dog BREAK a <new2> cat"
    assert regions.split_prompt(written, True) == regions.RegionalPrompt(
        "two pets", ("a <new1> dog", "a <new2> cat"), regions.columns(2)
    )
    assert regions.split_prompt(written, False) is None  # BREAK is a word like any other
    caption = "a <new1> star and a blue ring on a sand background"
    assert regions.split_prompt(caption, False) is None
    assert regions.split_prompt(caption, True) == regions.RegionalPrompt(
        caption,
        ("a <new1> star on a sand background", "a blue ring on a sand background"),
        regions.columns(2),
    )
    assert regions.split_prompt("a small red star on a gray background", True) is None
    assert regions.split_prompt("a red star and a blue ring on a sand background", True) is None
    assert regions.split_prompt("a photo of a dog and a cat", True) is None
    for bad in ("two pets BREAK a dog", "two pets BREAK  BREAK a cat"):
        with pytest.raises(CustomDiffError, match="WHOLE BREAK LEFT BREAK RIGHT"):
            regions.split_prompt(bad, True)
    assert regions.parse_layout(None) is regions.parse_layout("") is None  # none given: equal columns
    rows = regions.parse_layout("1;2")
    assert regions.split_prompt(written, True, rows).layout == regions.Layout((1.0, 2.0), rows=True)
    with pytest.raises(CustomDiffError, match='gives 3 regions, but "two pets" has 2; give one share per'):
        regions.split_prompt(written, True, regions.parse_layout("1,1,2"))
    for bad in ("1", "1,x", "1,-2", "1,2;3", "1,inf"):
        with pytest.raises(CustomDiffError, match='"1,2" for columns'):
            regions.parse_layout(bad)


def test_a_layout_gives_each_pixel_its_region_by_share():
    equal = regions.columns(3).region_of_pixels(2 * 6, 3.0, "cpu").view(2, 6)
    assert equal.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    wide_left = regions.parse_layout("3,1").region_of_pixels(8 * 8, 1.0, "cpu").view(8, 8)
    assert wide_left[0].tolist() == [0] * 6 + [1] * 2 and torch.equal(wide_left[0], wide_left[7])
    rows = regions.parse_layout("1;1;2").region_of_pixels(4 * 8, 2.0, "cpu").view(4, 8)  # 4 high, 8 wide
    assert [set(row.tolist()) for row in rows] == [{0}, {1}, {2}, {2}]
    for size in (1, 2, 3, 5, 16, 64):  # equal columns as before: pixel x of w is in column x · n // w
        for count in (2, 3):
            got = regions.columns(count).region_of_pixels(size * size, 1.0, "cpu")
            assert torch.equal(got, torch.arange(size * size) % size * count // size)


def test_column_attention_reads_the_whole_prompt_then_each_column_its_own():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    inner = AttnProcessor2_0()
    height, width = 2, 6  # a wide image: three columns of two pixels
    pixels = torch.randn(1, height * width, 8)
    whole, *columns = (torch.randn(1, 5, 6) for _ in range(4))
    split = regions.RegionAttention(inner, regions.columns(3), width_over_height=width / height)
    context = torch.cat([whole, *columns], dim=1)
    assert torch.equal(split(attn, pixels, context), inner(attn, pixels, whole))
    split.by_region = True
    out = split(attn, pixels, context).view(height, width, 8)
    for index, block in enumerate(columns):
        alone = inner(attn, pixels, block).view(height, width, 8)
        span = slice(2 * index, 2 * index + 2)
        torch.testing.assert_close(out[:, span], alone[:, span])
        assert not torch.allclose(out[:, span], inner(attn, pixels, whole).view(height, width, 8)[:, span])


def test_column_attention_reads_each_prompts_blocks_with_the_weights_chosen_for_them():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    inner = AttnProcessor2_0()
    names = ("to_k.weight", "to_v.weight")
    own = {name: attn.get_parameter(name).detach().clone() for name in names}
    sets = tuple({name: torch.randn_like(own[name]) for name in names} for _ in range(2))
    pixels = torch.randn(6, 2 * 4, 8)  # three prompts, each in both guidance branches; two columns of 2×2
    whole, left, right = (torch.randn(6, 5, 6) for _ in range(3))
    choice = torch.tensor([[-1, 0, -1], [-1, -1, 1], [1, 1, 0]])  # -1: the layer's own weights
    split = regions.RegionAttention(
        inner, regions.columns(2), width_over_height=2.0, weight_sets=sets, choice=choice
    )
    context = torch.cat([whole, left, right], dim=1)
    before = split(attn, pixels, context)
    torch.testing.assert_close(before[[0, 1, 3, 4]], inner(attn, pixels, whole)[[0, 1, 3, 4]])
    with regions._weights(attn, sets[1]):
        torch.testing.assert_close(before[[2, 5]], inner(attn, pixels, whole)[[2, 5]])
    split.by_region = True
    out = split(attn, pixels, context).view(6, 2, 4, 8)
    for column, (block, span) in enumerate([(left, slice(0, 2)), (right, slice(2, 4))], 1):
        for prompt in range(3):
            chosen = int(choice[prompt, column])
            with regions._weights(attn, sets[chosen] if chosen >= 0 else own):
                want = inner(attn, pixels, block).view(6, 2, 4, 8)
            rows = [prompt, prompt + 3]
            torch.testing.assert_close(out[rows, :, span], want[rows, :, span])
    assert all(torch.equal(attn.get_parameter(name), own[name]) for name in names)


@pytest.mark.parametrize("model", ["tiny_pipeline_dir", "tiny_sdxl_dir"])
def test_a_concept_acts_only_in_the_blocks_naming_its_token(model, request, make_concept):
    base_pipe = models.load_pipeline(request.getfixturevalue(model))
    pipe = models.load_pipeline(request.getfixturevalue(model))
    applied = apply_concept(pipe, make_concept(pipe, scale=1.0))
    weights = {name: p.detach().clone() for name, p in pipe.unet.named_parameters() if ".attn2." in name}
    plain = "a red star and a blue ring BREAK a red star on a gray background BREAK a blue ring"
    named = "a <new1> star and a blue ring BREAK a <new1> star on a gray background BREAK a blue ring"
    kwargs = {"n": 1, "steps": 3, "progress": False, "regions": True}
    as_base = generate.sample(base_pipe, [plain], **kwargs)[0]
    gated, gated_named = generate.sample(pipe, [plain, named], concept=applied, **kwargs)
    everywhere = generate.sample(pipe, [plain], **kwargs)[0]
    assert np.array_equal(gated, as_base)  # no block names the token: the base model's image
    assert not np.array_equal(everywhere, as_base)
    assert not np.array_equal(gated_named, generate.sample(pipe, [named], **kwargs)[0])
    assert all(torch.equal(p, weights[name]) for name, p in pipe.unet.named_parameters() if name in weights)


def test_a_merged_concepts_part_draws_the_prompts_and_blocks_naming_only_its_tokens(
    tiny_pipeline_dir, make_concept
):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    star, ring = (
        make_concept(pipe, "<new1>", seed=1, scale=1.0),
        make_concept(pipe, "<new2>", seed=2, scale=1.0),
    )
    merged, _ = merge.merge_concepts(pipe, [star, ring], merge.regularization_captions(pipe.tokenizer, 50))
    assert [part.tokens for part in merged.parts] == [("<new1>",), ("<new2>",)]
    prompts = [
        "a <new1> star and a red ring BREAK a <new1> star BREAK a red ring",  # the star's part, then base
        "a <new1> star on a gray background",  # drawn whole, the star's part throughout
        "a <new1> star and a <new2> ring BREAK a <new1> star BREAK a <new2> ring",
        "a photo of a <new1> star and a <new2> ring",  # drawn whole, both named: the merged weights
        "a red star on a gray background",  # none named: the merged weights
    ]
    kwargs = {"n": 1, "steps": 3, "progress": False, "regions": True}
    applied = apply_concept(pipe, merged)
    weights = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    own, own_whole, both, both_whole, neither = generate.sample(pipe, prompts, concept=applied, **kwargs)
    assert all(torch.equal(p, weights[name]) for name, p in pipe.unet.named_parameters())
    unparted = generate.sample(pipe, prompts[2:], **kwargs)  # merged weights throughout
    pipe = models.load_pipeline(tiny_pipeline_dir)
    alone = generate.sample(pipe, prompts[:2], concept=apply_concept(pipe, star), **kwargs)
    assert np.array_equal(own, alone[0]) and np.array_equal(own_whole, alone[1])
    assert not np.array_equal(both, unparted[0])
    assert np.array_equal(both_whole, unparted[1]) and np.array_equal(neither, unparted[2])


def test_a_scaled_merged_concept_draws_its_parts_at_that_scale(tiny_pipeline_dir, make_concept):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    parts = [make_concept(pipe, token, seed, scale=1.0) for seed, token in enumerate(("<new1>", "<new2>"))]
    merged, _ = merge.merge_concepts(pipe, parts, merge.regularization_captions(pipe.tokenizer, 50))

    def halved(deltas: dict) -> dict:
        return {name: 0.5 * delta for name, delta in deltas.items()}

    halved_merge = dataclasses.replace(
        merged,
        deltas=halved(merged.deltas),
        parts=tuple(dataclasses.replace(part, deltas=halved(part.deltas)) for part in merged.parts),
    )
    prompts = [
        "a <new1> star and a red ring BREAK a <new1> star BREAK a red ring",  # a part's weights
        "a <new1> star and a <new2> ring BREAK a <new1> star BREAK a <new2> ring",  # each part's
        "a photo of a <new1> star and a <new2> ring",  # the merged weights
    ]
    kwargs = {"n": 1, "steps": 3, "progress": False, "regions": True}
    drawn = []
    for concept, scale in ((merged, 0.5), (halved_merge, 1.0), (merged, 1.0)):
        pipe = models.load_pipeline(tiny_pipeline_dir)
        drawn.append(generate.sample(pipe, prompts, concept=apply_concept(pipe, concept, scale), **kwargs))
    scaled, as_halved, whole = drawn
    assert all(np.array_equal(a, b) for a, b in zip(scaled, as_halved, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(scaled, whole, strict=True))


@pytest.mark.parametrize("model", ["tiny_pipeline_dir", "tiny_sdxl_dir"])
def test_regional_prompts_sample_in_order_beside_plain_ones(model, request, make_concept):
    pipe = models.load_pipeline(request.getfixturevalue(model))
    apply_concept(pipe, make_concept(pipe))
    plain, scene = "a red star on a gray background", "a <new1> star and a blue ring on a gray background"
    same = f"{plain} BREAK {plain} BREAK {plain}"
    kwargs = {"n": 2, "steps": 3, "progress": False, "batch_size": 3}
    alone = generate.sample(pipe, [plain], **kwargs)
    mixed = generate.sample(pipe, [same, plain, scene], regions=True, **kwargs)
    unsplit = generate.sample(pipe, [scene], **kwargs)
    assert [image.shape for image in mixed] == [alone[0].shape] * 6
    for got, want in zip(mixed[2:4], alone, strict=True):  # order kept; a plain prompt as if alone
        assert np.array_equal(got, want)
    for got, want in zip(mixed[:2], alone, strict=True):  # columns that repeat the prompt change nothing
        assert np.abs(got.astype(int) - want).max() <= 1
    assert all(not np.array_equal(got, want) for got, want in zip(mixed[4:], unsplit, strict=True))
    assert not any(isinstance(p, regions.RegionAttention) for p in pipe.unet.attn_processors.values())


def test_generate_regions_flag_and_a_bad_break_prompt(run_cli, tiny_pipeline_dir, make_concept, tmp_path):
    scene = "a red star and a blue ring on a gray background"
    scene += " BREAK a red star on a gray background BREAK a blue ring on a gray background"
    out = tmp_path / "out"
    args = ("--n", 1, "--steps", 2, "--model", tiny_pipeline_dir)
    code, stdout, _ = run_cli("generate", scene, *args, "--regions", "-o", out)
    assert code == 0, stdout
    assert json.loads((out / "run_config.json").read_text())["regions"] is True
    save_concept(tmp_path / "concept", make_concept(models.load_pipeline(tiny_pipeline_dir), scale=1.0))
    code, stdout, _ = run_cli(
        "generate", scene, *args, "--regions", "--concept", tmp_path / "concept", "-o", tmp_path / "gated"
    )
    assert code == 0, stdout
    read = [np.asarray(Image.open(folder / "00000.png")) for folder in (out, tmp_path / "gated")]
    assert np.array_equal(*read)  # no block names the concept's token
    for ratios in ("1,1", "1;1", "3,1"):
        code, stdout, err = run_cli(
            "generate", scene, *args, "--regions", "--region-ratios", ratios, "-o", tmp_path / ratios
        )
        assert code == 0, err
        read.append(np.asarray(Image.open(tmp_path / ratios / "00000.png")))
    assert np.array_equal(read[2], read[0])  # equal columns, as without the flag
    assert not np.array_equal(read[3], read[0]) and not np.array_equal(read[4], read[0])
    code, _, err = run_cli(
        "generate", scene, *args, "--regions", "--region-ratios", "1,1,1", "-o", tmp_path / "x"
    )
    assert code == 2 and "gives 3 regions" in err and len(err.strip().splitlines()) == 1
    bad = ("generate", "a red star BREAK a blue ring", *args, "--regions", "-o", tmp_path / "bad")
    code, _, err = run_cli(*bad)
    assert code == 2 and "WHOLE BREAK LEFT BREAK RIGHT" in err and len(err.strip().splitlines()) == 1
