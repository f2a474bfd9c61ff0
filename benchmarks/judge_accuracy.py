"""How often the toy judge reads scenes right: clean renders, blurred ones and noisier ones.

Blur (Gaussian, radius 1) and heavier noise (±20 per channel instead of the spec's ±6) stand in for the
soft edges and grain of images sampled from a small diffusion model. Prints markdown tables: attribute
accuracies per condition, then how often concept renders are told from plain objects of the same shape
and from other concepts.

    python benchmarks/judge_accuracy.py --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
from PIL import Image, ImageFilter

from customdiff import toyjudge, toyworld
from customdiff.toyworld import BACKGROUNDS, COLORS, CONCEPTS, Caption, Thing

CONDITIONS = ("clean", "blur 1", "noise ±20")
COLUMNS = ("background", "count", "color", "shape", "size", "position", "all right")


@contextlib.contextmanager
def render_noise(condition: str):
    """Render with ±20 noise for the noisy condition (the renderer reads toyworld.NOISE per call)."""
    spec_noise = toyworld.NOISE
    toyworld.NOISE = 20 if condition == "noise ±20" else spec_noise
    try:
        yield
    finally:
        toyworld.NOISE = spec_noise


def degrade(image: np.ndarray, condition: str) -> np.ndarray:
    if condition == "blur 1":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)))
    return image


def scene_accuracy(n: int, seed: int, condition: str) -> dict[str, float]:
    """Share of n random scenes (half one-object) read right, per attribute; size on one-object ones."""
    rng = np.random.default_rng(seed)
    results: dict[str, list[bool]] = {column: [] for column in COLUMNS}
    seconds = 0.0
    with render_noise(condition):
        for _ in range(n):
            caption = toyworld.sample_caption(rng)
            layout = toyworld.sample_layout(caption, rng)
            image = degrade(toyworld.render(caption, rng, layout=layout), condition)
            start = time.perf_counter()
            checks = toyjudge.truth_checks(toyjudge.read_image(image), caption, layout)
            seconds += time.perf_counter() - start
            checks["all right"] = all(checks.values())
            for name, right in checks.items():
                results[name].append(right)
    accuracy = {name: float(np.mean(values)) for name, values in results.items()}
    accuracy["ms / image"] = 1000 * seconds / n
    return accuracy


def concept_rates(n: int, seed: int, condition: str) -> dict[str, float]:
    """Detection: concept renders read as their concept (and its shape right); false alarms: plain
    objects of the same shape (every palette colour, both sizes) and other concepts' renders read as it.
    Signatures come from the clean renders of ``toyjudge.builtin_signature``."""
    rng = np.random.default_rng(seed)
    signatures = {name: toyjudge.builtin_signature(name) for name in CONCEPTS}
    rates: dict[str, list[bool]] = {
        "concept detected": [],
        "its shape read": [],
        "plain object taken for it": [],
        "other concept taken for it": [],
    }

    def checks(image, shape: str, background: str, name: str) -> dict[str, bool]:
        prompt = f"a <new1> {shape} on a {background} background"
        return toyjudge.score(degrade(image, condition), prompt, {"<new1>": signatures[name]}).checks

    with render_noise(condition):
        for name, concept in CONCEPTS.items():
            for image, caption in toyworld.concept_scenes(concept, n=n, seed=seed + 1):
                background = toyworld.parse_caption(caption).background
                own = checks(image, concept.shape, background, name)
                rates["concept detected"].append(own["object1.concept"])
                rates["its shape read"].append(own["object1.shape"])
                for other in CONCEPTS:
                    if other != name:
                        alarm = checks(image, concept.shape, background, other)["object1.concept"]
                        rates["other concept taken for it"].append(alarm)
            for index in range(n):
                color = list(COLORS)[index % len(COLORS)]
                background = str(rng.choice([b for b, rgb in BACKGROUNDS.items() if rgb != COLORS[color]]))
                thing = Thing(concept.shape, color, ("small", "large")[index % 2])
                image = toyworld.render(Caption(background, (thing,)), rng)
                rates["plain object taken for it"].append(
                    checks(image, concept.shape, background, name)["object1.concept"]
                )
    return {rate: float(np.mean(values)) for rate, values in rates.items()}


def markdown(rows: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| condition | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for condition, values in rows.items():
        cells = [f"{values[c]:.1f}" if c.startswith("ms") else f"{100 * values[c]:.1f}%" for c in columns]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="random scenes per condition")
    parser.add_argument("--concept-n", type=int, default=40, help="renders per concept (and plain shapes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    args = parser.parse_args()
    scenes = {condition: scene_accuracy(args.n, args.seed, condition) for condition in CONDITIONS}
    concepts = {condition: concept_rates(args.concept_n, args.seed, condition) for condition in CONDITIONS}
    print(
        f"Judge accuracy on {args.n} random scenes per condition (seed {args.seed}; size: one-object ones)\n"
    )
    print(markdown(scenes))
    print(f"\nConcepts: {args.concept_n} renders of each of {len(CONCEPTS)} built-in concepts, ", end="")
    print("plain same-shape objects in every palette colour, and every other concept's signature\n")
    print(markdown(concepts))


if __name__ == "__main__":
    main()
