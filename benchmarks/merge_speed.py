"""Merge speed on Stable Diffusion 1.5-shaped layers: both closed forms (§3.2) against naive addition.

SD 1.5 has 16 cross-attention layers whose K/V matrices read 768-d text features (320, 640 or 1280
outputs); SDXL (``--sdxl``) has 70 reading 2048-d ones (640 or 1280 outputs). Two concepts with four
captions each (constrained: rows from the modifier token to end of text; weighted: all 77 positions) are
merged under ~1000 regularization captions of 77 tokens. The text features are random stand-ins of the
right shapes (encoding the captions is the text encoder's time, the same for any merge).

    python benchmarks/merge_speed.py [--captions 1000] [--width 768] [--sdxl]

Prints the seconds of the regularization Gram matrix and of the solve for all matrices, the naive
sum's time beside them, and the constraint residuals (target: the whole merge ≤ 5 s on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from customdiff import merge

SD15_ATTN2_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
# SDXL: transformer layers per attention block × blocks, by level (down 640, 1280; mid; up 1280, 640)
SDXL_ATTN2_WIDTHS = (640,) * 2 * 2 + (1280,) * 2 * 10 + (1280,) * 10 + (1280,) * 3 * 10 + (640,) * 3 * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--width", type=int, default=768, help="text feature width (SD 2.x: 1024)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL's 70 layers, text width 2048")
    args = parser.parse_args()
    layers, args.width = (SDXL_ATTN2_WIDTHS, 2048) if args.sdxl else (SD15_ATTN2_WIDTHS, args.width)
    generator = torch.Generator().manual_seed(0)
    base = {
        f"unet.layer{i}.attn2.{kv}.weight": torch.randn(out, args.width, generator=generator) * 0.02
        for i, out in enumerate(layers)
        for kv in ("to_k", "to_v")
    }
    deltas = [{name: torch.randn_like(w) * 1e-3 for name, w in base.items()} for _ in range(2)]
    rows = [torch.randn(4 * 6, args.width, generator=generator, dtype=torch.float64) for _ in range(2)]
    every = [
        torch.randn(4 * args.tokens, args.width, generator=generator, dtype=torch.float64) for _ in range(2)
    ]

    started = time.perf_counter()
    gram = torch.zeros(args.width, args.width, dtype=torch.float64)
    for _ in range(0, args.captions, 64):  # batch by batch, as merge.regularization_gram
        features = torch.randn(64 * args.tokens, args.width, generator=generator)
        gram += (features.T @ features).double()
    gram_seconds = time.perf_counter() - started

    started = time.perf_counter()
    _, report = merge.merge_deltas(base, gram, rows, deltas)
    solve_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _, weighted_report = merge.weighted_deltas(base, gram, every, deltas)
    weighted_seconds = time.perf_counter() - started

    started = time.perf_counter()
    {name: w + deltas[0][name] + deltas[1][name] for name, w in base.items()}
    naive_seconds = time.perf_counter() - started

    print(
        f"{len(base)} K/V matrices, text width {args.width}, {args.captions} captions × {args.tokens} tokens"
    )
    print(f"regularization Gram matrix           {gram_seconds:6.2f} s  (random features stand in)")
    print(f"constrained solve, all matrices       {solve_seconds:6.2f} s")
    print(f"constrained merge total               {gram_seconds + solve_seconds:6.2f} s  (target ≤ 5 s)")
    print(f"weighted solve, all matrices          {weighted_seconds:6.2f} s")
    print(f"weighted merge total                  {gram_seconds + weighted_seconds:6.2f} s  (target ≤ 5 s)")
    print(f"naive addition (reference)            {naive_seconds:6.3f} s")
    print(f"largest constraint residual {report.residual:.1e} (naive addition {report.naive_residual:.1e})")
    print(
        f"weighted: output error {weighted_report.residual:.2f} of a concept's own change "
        f"(naive addition {weighted_report.naive_residual:.2f})"
    )


if __name__ == "__main__":
    main()
