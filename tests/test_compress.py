"""Compression: the paper's energy rule, full rank gives the delta back, factors round-trip via the file."""

import pytest
import torch

from customdiff import compress, concept
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
    code, out, err = run_cli("compress", tmp_path / "full", "--rank", 1, "-o", tmp_path / "small")
    assert code == 0, err
    assert concept.load_concept(tmp_path / "small").factors["unet.a.attn2.to_v.weight"][0].shape == (16, 1)
    code, _, err = run_cli("compress", tmp_path / "full", "-o", tmp_path / "x")
    assert code == 2 and "--rank R or --energy E" in err
    with pytest.raises(CustomDiffError, match="--energy"):
        compress.compress_concept(a_concept(), energy=1.5)
