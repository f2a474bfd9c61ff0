"""Compression: the paper's energy rule, full rank gives the delta back, factors round-trip via the file."""

import dataclasses

import pytest
import torch

from customdiff import compress, concept, files, finetune, models, toyworld
from customdiff.config import FinetuneConfig
from customdiff.errors import CustomDiffError


def a_concept(rank: int = 3) -> concept.Concept:
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(16, rank, generator=generator) @ torch.randn(rank, 8, generator=generator)
    return concept.Concept(
        base_hash="abc",
        mode="crossattn_kv",
        tokens=("<new1>",),
        class_words=("star",),
        initializers=("ktn",),
        token_embeddings=torch.randn(1, 8, generator=generator),
        deltas={
            "unet.a.attn2.to_k.weight": low,
            "unet.a.attn2.to_v.weight": torch.randn(16, 8, generator=generator),
        },
    )


def test_rank_for_energy_counts_the_share_of_the_sum_of_singular_values():
    singular_values = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [compress.rank_for_energy(singular_values, e) for e in (0.4, 0.6, 0.7, 0.95, 1.0)] == [
        1,
        2,
        2,
        4,
        4,
    ]


def test_full_rank_reproduces_the_delta_and_a_low_rank_delta_is_kept_exactly():
    original = a_concept()
    full = compress.compress_concept(original, rank=8)
    three = compress.compress_concept(original, rank=3)
    for name, delta in original.deltas.items():
        torch.testing.assert_close(full.deltas[name], delta, rtol=1e-5, atol=1e-5)
    name = "unet.a.attn2.to_k.weight"
    torch.testing.assert_close(three.deltas[name], original.deltas[name], rtol=1e-5, atol=1e-5)
    assert three.factors[name][0].shape == (16, 3) and three.factors[name][1].shape == (3, 8)


def test_a_compressed_concept_round_trips_and_shrinks(tmp_path):
    original = a_concept()
    part = concept.Part(("<new1>",), {name: delta.clone() for name, delta in original.deltas.items()})
    original = concept.Concept(**{**original.__dict__, "parts": (part,)})
    full_path = concept.save_concept(tmp_path / "full", original)
    small = compress.compress_concept(original, energy=0.6)
    small_path = concept.save_concept(tmp_path / "small", small)
    loaded = concept.load_concept(small_path)
    assert small_path.stat().st_size < full_path.stat().st_size
    for name, (up, down) in small.factors.items():
        assert torch.equal(loaded.factors[name][0], up) and torch.equal(loaded.factors[name][1], down)
        torch.testing.assert_close(loaded.deltas[name], up @ down)
        part_up, part_down = loaded.parts[0].factors[name]  # a merged concept's parts compress alike
        assert torch.equal(part_up, up) and torch.equal(part_down, down)
    assert torch.equal(loaded.token_embeddings, original.token_embeddings)
    stored = sum(up.numel() + down.numel() for up, down in small.factors.values())
    assert f"its 1 parts ({stored:,} values stored)" in concept.describe(loaded, loaded.base_hash, "x")[-1]


def test_compress_cli_and_its_bad_input(run_cli, tmp_path):
    concept.save_concept(tmp_path / "full", a_concept())
    code, out, err = run_cli("compress", tmp_path / "full", "--rank", 1, "--plain", "-o", tmp_path / "small")
    assert code == 0, err
    assert concept.load_concept(tmp_path / "small").factors["unet.a.attn2.to_v.weight"][0].shape == (16, 1)
    code, out, _ = run_cli("compress", tmp_path / "full" / "concept.safetensors", "--energy", 0.6, "--plain")
    beside = tmp_path / "full-energy0.6"  # beside the concept's folder, named by the cut
    assert code == 0 and f"wrote {beside / 'concept.safetensors'}" in out
    assert concept.load_concept(beside).factors
    code, _, err = run_cli("compress", tmp_path / "full", "-o", tmp_path / "x")
    assert code == 2 and "--rank R or --energy E" in err
    code, _, err = run_cli("compress", tmp_path / "full", "--rank", 1, "-o", tmp_path / "x")  # base "abc"
    assert code == 2 and "trained on base abc" in err and "--plain" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    token_only = dataclasses.replace(a_concept(), mode="token", deltas={})  # nothing to fit: no model read
    concept.save_concept(tmp_path / "token", token_only)
    code, out, err = run_cli("compress", tmp_path / "token", "--energy", 0.6)
    assert code == 0, err
    assert torch.equal(
        concept.load_concept(tmp_path / "token-energy0.6").token_embeddings, token_only.token_embeddings
    )


def test_fitted_to_outputs_keeps_the_ranks_and_changes_the_outputs_less(
    tiny_pipeline_dir, make_concept, run_cli, tmp_path
):
    """At the plain cut's ranks, the factors fitted to the weighted outputs miss those outputs by less than
    the truncated SVD does (the truncated SVD is nearest in the plain norm, so it can only lose there);
    ``customdiff compress`` fits them by default, ``--plain`` keeps the paper's cut."""
    pipe = models.load_pipeline(tiny_pipeline_dir)
    captions = ("a <new1> star on a gray background", "a <new1> star on a sky background")
    full = make_concept(pipe, captions=captions)
    weighting = compress.fit_weighting(pipe, full)
    assert "<new1>" not in pipe.tokenizer.get_vocab()  # the pipeline is left as it was
    plain = compress.compress_concept(full, energy=0.6)
    fitted = compress.compress_concept(full, energy=0.6, weighting=weighting)
    assert fitted.factors.keys() == plain.factors.keys() == full.deltas.keys()
    for name, delta in full.deltas.items():
        assert fitted.factors[name][0].shape == plain.factors[name][0].shape  # the same rank
        assert fitted.factors[name][0].shape[1] < min(delta.shape)
        fitted_miss, plain_miss = ((delta - kept.deltas[name]).double() for kept in (fitted, plain))
        assert (fitted_miss @ weighting * fitted_miss).sum() < (plain_miss @ weighting * plain_miss).sum()
        assert plain_miss.square().sum() < fitted_miss.square().sum()
    fitted_error, plain_error = (compress.output_error(full, kept, weighting) for kept in (fitted, plain))
    assert compress.output_error(full, full, weighting) == 0 and 0 < fitted_error < plain_error < 1
    path = concept.save_concept(tmp_path / "full", full)
    code, out, err = run_cli(
        "compress", path, "--energy", 0.6, "--model", tiny_pipeline_dir, "-o", tmp_path / "f"
    )
    assert code == 0, err
    assert f"miss the full delta's change by {fitted_error:.1%} (--plain: {plain_error:.1%})" in out
    assert (fitted_error > compress.LARGE_MISS) == ("try --energy 0.9" in out)
    rank_one = compress.compress_concept(full, rank=1, weighting=weighting)
    assert compress.output_error(full, rank_one, weighting) > compress.LARGE_MISS
    code, out, _ = run_cli("compress", path, "--rank", 1, "--model", tiny_pipeline_dir, "-o", tmp_path / "r1")
    assert code == 0 and "try --energy 0.9" in out  # a cut that loses much says so
    written = concept.load_concept(tmp_path / "f")
    for name, delta in written.deltas.items():
        torch.testing.assert_close(delta, fitted.deltas[name], rtol=1e-4, atol=1e-5)
    code, _, err = run_cli("compress", path, "--energy", 0.6, "--plain", "-o", tmp_path / "p")
    assert code == 0, err
    assert all(
        torch.equal(d, plain.deltas[n]) for n, d in concept.load_concept(tmp_path / "p").deltas.items()
    )
    with pytest.raises(CustomDiffError, match="--energy"):
        compress.compress_concept(a_concept(), energy=1.5)


def test_refine_steps_train_the_cut_at_its_ranks_on_the_concepts_own_images(
    run_cli, tiny_pipeline_dir, tmp_path
):
    images = tmp_path / "images"
    files.write_image_folder(images, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    model = ("--model", tiny_pipeline_dir)
    tiny = ("--reg", "none", "--steps", 2, "--lr", 1e-2, "--batch-size", 2, "--composed-views", 0)
    code, _, err = run_cli(
        "train", "--images", images, "--class-word", "star", *tiny, *model, "-o", tmp_path / "run"
    )
    assert code == 0, err
    small = tmp_path / "small"
    code, out, err = run_cli(
        "compress", tmp_path / "run", "--rank", 2, "--refine-steps", 3, *model, "-o", small
    )
    assert code == 0, err
    assert f"refined the cut 3 steps at its ranks: wrote {small / concept.CONCEPT_FILE}" in out
    cut, refined = concept.load_concept(small / "cut"), concept.load_concept(small)
    assert refined.config["steps"] == 3 and refined.config["keep_ranks"]
    assert refined.config["images"] == str(images) and refined.config["init_from"] == [str(small / "cut")]
    assert refined.factors.keys() == cut.factors.keys() == refined.deltas.keys()
    for name, delta in refined.deltas.items():  # trained from the cut, and still of its rank
        up, down = refined.factors[name]
        assert up.shape[1] == down.shape[0] == 2 and torch.linalg.matrix_rank(delta) == 2
        assert not torch.allclose(delta, cut.deltas[name])
    assert not torch.equal(refined.token_embeddings, cut.token_embeddings)
    whole = tmp_path / "run" / concept.CONCEPT_FILE
    with pytest.raises(CustomDiffError, match="keeps its deltas whole, so --keep-ranks has no ranks to keep"):
        finetune.train(
            FinetuneConfig(images, "star", out=tmp_path / "x", init_from=(whole,), keep_ranks=True),
            models.load_pipeline(tiny_pipeline_dir),
        )
    with pytest.raises(CustomDiffError, match="keeps the ranks of one compressed concept: --init-from it"):
        FinetuneConfig(images, "star", keep_ranks=True)
    merged = dataclasses.replace(refined, config={"merged_from": [refined.config]})
    concept.save_concept(tmp_path / "merged", merged)
    token_only = dataclasses.replace(refined, mode="token", deltas={}, factors={})
    concept.save_concept(tmp_path / "token", token_only)
    moved = dataclasses.replace(refined, config={**refined.config, "images": str(tmp_path / "gone")})
    concept.save_concept(tmp_path / "moved", moved)
    wrong = {"merged": "settings (merged or imported)", "token": "no delta", "moved": "is gone"}
    for name, message in wrong.items():
        code, _, err = run_cli(
            "compress", tmp_path / name, "--rank", 2, "--refine-steps", 1, "-o", tmp_path / "y"
        )
        assert code == 2 and message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "y").exists()
