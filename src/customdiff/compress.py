"""Low-rank compression of a concept's weight deltas (Kumari et al. 2023, §4.3 "Compression").

Each 2-D delta ΔW (a K/V projection's change) is replaced by a rank-r product kept as two factors,
up (out, r) and down (r, in). The rank is given, or chosen as the paper's code does: the fewest singular
values of ΔW whose share of the *sum* of singular values reaches ``energy`` (0.6 in the paper), not a
share of the rank.

The paper keeps ΔW's truncated SVD, U_r S_r V_rᵀ, the rank-r product nearest ΔW itself. But a K/V
projection only ever reads text features, and what matters is how its outputs on them change. Given the
weighting A of those features (``fit_weighting``: the concept's captions, its contexts and, weighing as
much, ordinary captions) with A = LLᵀ, the rank-r product that changes those outputs least is the truncated
SVD of ΔW L, mapped back by L⁻¹: at the paper's ranks, on three built-in concepts at the toy defaults, it
kept the concept in new contexts within a point of the full delta over two sets of seeds, where the plain
cut lost 6.8 points on one (docs/findings.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from customdiff.concept import Concept, check_base, reads_text
from customdiff.config import CompressConfig, FinetuneConfig, config_from_settings
from customdiff.errors import CustomDiffError

# a cut missing this share of the K/V outputs' change loses much of the concept: five refit concepts cut to
# 60% energy missed 32–57% and, pooled, lost half their new-context samples; toy-default ones missed 10–12%
LARGE_MISS = 0.3
# the ordinary captions' outputs weigh as much as the concept's own rows: on three toy-default concepts this
# kept more in new contexts and of their class prompts than the merge's 0.25 (docs/findings.md)
REG_WEIGHT = 1.0


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose sum is at least ``energy`` of the sum of all of them."""
    shares = torch.cumsum(singular_values, 0) / singular_values.sum().clamp(min=1e-30)
    needed = int(torch.searchsorted(shares, torch.tensor(energy, dtype=shares.dtype)).item()) + 1
    return min(needed, len(singular_values))  # rounding may leave the last share a hair below 1


def fit_weighting(pipe, concept: Concept) -> torch.Tensor:
    """The weighting A the default cut fits to, on the concept's base ``pipe``: ``merge.output_weighting``
    with the ordinary captions a merge keeps, weighing ``REG_WEIGHT`` of the concept's own rows."""
    from customdiff import merge

    captions = merge.regularization_captions(pipe.tokenizer, merge.NUM_REG_CAPTIONS)
    return merge.output_weighting(pipe, concept, captions, REG_WEIGHT)


def load_fit_weighting(
    concept: Concept, model: Path | None = None, model_config: Path | None = None
) -> torch.Tensor:
    """``fit_weighting`` on the concept's base model, loaded from ``model`` (default: the toy model).

    Raises:
        CustomDiffError: the model is not the concept's base.
    """
    from customdiff import models

    pipe = models.load_pipeline(model, model_config=model_config)
    check_base(pipe, concept, "--plain, which needs no model")
    return fit_weighting(pipe, concept)


def low_rank(
    delta: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    weighting_factor: torch.Tensor | None = None,
):
    """Rank-r factors of a (out, in) delta, in float32: its truncated SVD, or with ``weighting_factor`` L
    (in, in; lower triangular, LLᵀ = A) the rank-r product nearest it in ‖(·) L‖_F.

    Returns:
        up (out, r) and down (r, in), with r the given rank (capped at the matrix's) or the energy's, counted
        on the delta's own singular values either way.
    """
    delta = delta.double()
    L = None if weighting_factor is None else weighting_factor.double()
    U, S, Vh = torch.linalg.svd(delta if L is None else delta @ L, full_matrices=False)
    own = S if L is None else torch.linalg.svdvals(delta)  # the energy rule reads the delta's own values
    r = min(rank, len(S)) if rank is not None else rank_for_energy(own, energy)
    if L is not None:
        Vh = torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T  # V_rᵀ L⁻¹, no inverse formed
    return (U[:, :r] * S[:r]).float().contiguous(), Vh[:r].float().contiguous()


def _low_rank_deltas(
    deltas: dict, rank: int | None, energy: float | None, weighting_factor: torch.Tensor | None
) -> tuple[dict, dict]:
    """Deltas with every 2-D one replaced by its low-rank product, and those factors (weighted where the
    delta reads text features)."""
    factors = {
        name: low_rank(delta, rank, energy, weighting_factor if reads_text(name) else None)
        for name, delta in deltas.items()
        if delta.ndim == 2
    }
    return {**deltas, **{name: up @ down for name, (up, down) in factors.items()}}, factors


def compress_concept(
    concept: Concept,
    rank: int | None = None,
    energy: float | None = None,
    weighting: torch.Tensor | None = None,
) -> Concept:
    """The concept with every 2-D delta in low rank, a merged concept's parts' too (other deltas and the
    token rows unchanged): fitted to the outputs ``weighting`` A (``fit_weighting``) weighs, or
    without it the plain truncated SVD (the paper's).

    Raises:
        CustomDiffError: neither or both of ``rank`` and ``energy`` are given, or either is out of range.
    """
    if (rank is None) == (energy is None):
        raise CustomDiffError("give --rank R or --energy E (one of them)")
    if rank is not None and rank < 1:
        raise CustomDiffError(f"--rank {rank}: pass a rank of at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise CustomDiffError(f"--energy {energy}: pass a share in (0, 1], e.g. 0.6 as the paper")
    factor = torch.linalg.cholesky(weighting.double()) if weighting is not None else None
    deltas, factors = _low_rank_deltas(concept.deltas, rank, energy, factor)
    parts = []
    for part in concept.parts:
        part_deltas, part_factors = _low_rank_deltas(part.deltas, rank, energy, factor)
        parts.append(dataclasses.replace(part, deltas=part_deltas, factors=part_factors))
    return dataclasses.replace(concept, deltas=deltas, factors=factors, parts=tuple(parts))


def refine_config(config: CompressConfig, concept: Concept, cut: Path) -> FinetuneConfig:
    """The training run ``customdiff compress --refine-steps`` makes of ``cut``, the compressed ``concept``:
    the concept's own run settings (its images, class images, mode and rates, as its file keeps them) for
    ``--refine-steps`` from the cut, each delta kept at its rank, into OUT.

    Raises:
        CustomDiffError: the concept has no delta to cut, keeps no run's settings (a merged one), or its
            images are gone.
    """
    if not any(delta.ndim == 2 for delta in concept.deltas.values()):
        raise CustomDiffError(
            f"{config.concept} has no delta to cut (a {concept.mode} concept), so nothing to refine; "
            "pass --refine-steps 0"
        )
    settings = concept.config
    if not any(settings.get(name) for name in ("images", "concept", "concepts_list")):
        raise CustomDiffError(
            f"{config.concept} keeps no training run's settings (merged or imported), so --refine-steps "
            "has no images to train on; refine a concept customdiff trained, before merging, or pass "
            "--refine-steps 0"
        )
    run = config_from_settings(FinetuneConfig, settings, f"the run settings kept in {config.concept}")
    missing = [spec.images for spec in run.concept_specs() if not Path(spec.images).is_dir()]
    if missing:
        raise CustomDiffError(
            f"{config.concept} was trained on the images in {missing[0]}, which is gone; --refine-steps "
            "trains on them: put them back there, or pass --refine-steps 0"
        )
    return dataclasses.replace(
        run, init_from=(cut,), keep_ranks=True, steps=config.refine_steps, out=config.out,
        model=config.model or run.model, model_config=config.model_config or run.model_config,
        save_every=0, preview_every=0, preview_prompts=(), num_processes=1,
    )  # fmt: skip


def output_error(full: Concept, kept: Concept, weighting: torch.Tensor) -> float:
    """How far ``kept``'s K/V deltas miss ``full``'s outputs on the features ``weighting`` A weighs, as a
    share of ``full``'s own change to them: √(Σ tr(E A Eᵀ) / Σ tr(ΔW A ΔWᵀ)), E = ΔW − kept's delta."""
    A = weighting.float()
    missed = change = 0.0
    for name, delta in full.deltas.items():
        if reads_text(name):
            miss = delta - kept.deltas[name]
            missed += float((miss @ A * miss).sum())
            change += float((delta @ A * delta).sum())
    return (missed / change) ** 0.5 if change else 0.0
