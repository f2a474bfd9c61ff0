"""Low-rank compression of a concept's weight deltas (Kumari et al. 2023, §4.3 "Compression").

Each 2-D delta ΔW (a K/V projection's change) is replaced by its truncated SVD, ΔW ≈ U_r S_r V_rᵀ, kept
as two factors up = U_r S_r (out, r) and down = V_rᵀ (r, in). The rank is given, or chosen as the
paper's code does: the fewest singular values whose share of the *sum* of singular values reaches
``energy`` (0.6 in the paper), not a share of the rank.
"""

from __future__ import annotations

import dataclasses

import torch

from customdiff.concept import Concept
from customdiff.errors import CustomDiffError


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose sum is at least ``energy`` of the sum of all of them."""
    shares = torch.cumsum(singular_values, 0) / singular_values.sum().clamp(min=1e-30)
    needed = int(torch.searchsorted(shares, torch.tensor(energy, dtype=shares.dtype)).item()) + 1
    return min(needed, len(singular_values))  # rounding may leave the last share a hair below 1


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """Truncated SVD factors of a (out, in) delta, in float32.

    Returns:
        up (out, r) and down (r, in), with r the given rank (capped at the matrix's) or the energy's.
    """
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(S)) if rank is not None else rank_for_energy(S, energy)
    return (U[:, :r] * S[:r]).float().contiguous(), Vh[:r].float().contiguous()


def _low_rank_deltas(deltas: dict, rank: int | None, energy: float | None) -> tuple[dict, dict]:
    """Deltas with every 2-D one replaced by its low-rank product, and those factors."""
    factors = {name: low_rank(delta, rank, energy) for name, delta in deltas.items() if delta.ndim == 2}
    return {**deltas, **{name: up @ down for name, (up, down) in factors.items()}}, factors


def compress_concept(concept: Concept, rank: int | None = None, energy: float | None = None) -> Concept:
    """The concept with every 2-D delta in low rank, a merged concept's parts' too (other deltas and the
    token rows unchanged).

    Raises:
        CustomDiffError: neither or both of ``rank`` and ``energy`` are given, or either is out of range.
    """
    if (rank is None) == (energy is None):
        raise CustomDiffError("give --rank R or --energy E (one of them)")
    if rank is not None and rank < 1:
        raise CustomDiffError(f"--rank {rank}: pass a rank of at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise CustomDiffError(f"--energy {energy}: pass a share in (0, 1], e.g. 0.6 as the paper")
    deltas, factors = _low_rank_deltas(concept.deltas, rank, energy)
    parts = []
    for part in concept.parts:
        part_deltas, part_factors = _low_rank_deltas(part.deltas, rank, energy)
        parts.append(dataclasses.replace(part, deltas=part_deltas, factors=part_factors))
    return dataclasses.replace(concept, deltas=deltas, factors=factors, parts=tuple(parts))
