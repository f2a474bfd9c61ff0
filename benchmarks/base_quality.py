"""How well the base model draws captions it never saw in training, read back by the toy judge.

Prints a markdown table: one-object prompts (background, colour, shape, size, all of them right) and
two-object prompts (both objects' colour and shape right), for captions held out by hash (unseen
captions of seen parts) and, separately, captions naming a held-out colour-shape-background triple
(composition must generalise, not recall); and the class prompts that measure forgetting, which name
no size ("a red star on a gray background").

    python benchmarks/base_quality.py [--model PATH] [--n 4] [--steps 50] [--sampler NAME]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from customdiff import evaluate, generate, models, pretrain, toyjudge, toyworld


def prompt_sets(model_dir: Path, seed: int, total: int) -> dict[str, list[str]]:
    """200 unseen prompts (all unseen one-object captions, two-object for the rest) + held-out triples."""
    split = json.loads((model_dir / pretrain.SPLIT_FILE).read_text())
    rng = np.random.default_rng(seed)
    one = pretrain.unseen_captions(split, rng, total // 2, n_objects=1, held_out_triple=False)
    two = pretrain.unseen_captions(split, rng, total - len(one), n_objects=2, held_out_triple=False)
    return {
        "unseen one-object": one,
        "unseen two-object": two,
        "held-out triple, one-object": pretrain.unseen_captions(split, rng, 12, 1, held_out_triple=True),
        "held-out triple, two-object": pretrain.unseen_captions(split, rng, 50, 2, held_out_triple=True),
        "class prompts, no size": [
            f"a {color} {shape} on a {background} background"
            for shape in toyworld.SHAPES
            for color, background in evaluate.CLASS_SCENES
        ],
    }


def rates(prompts: list[str], images: list[np.ndarray], n: int) -> dict[str, float]:
    """Share of images whose judged attributes match each prompt."""
    counts: dict[str, list[bool]] = {}
    for index, image in enumerate(images):
        checks = toyjudge.score(image, prompts[index // n]).checks
        objects = sorted({key.split(".")[0] for key in checks if key.startswith("object")})
        if len(objects) == 1:
            named = ("background", "object1.color", "object1.shape", "object1.size")
            keys = [key for key in named if key in checks]
            for key in keys:
                counts.setdefault(key.replace("object1.", ""), []).append(checks[key])
            counts.setdefault("all named", []).append(all(checks[key] for key in keys))
        else:
            bound = all(checks[f"{name}.{attribute}"] for name in objects for attribute in ("color", "shape"))
            counts.setdefault("background", []).append(checks["background"])
            counts.setdefault("both colour+shape", []).append(bound)
    return {key: 100 * float(np.mean(values)) for key, values in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=models.TOY_MODEL_DIR, help="diffusers SD folder")
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's, else 6)")
    parser.add_argument("--sampler", choices=sorted(models.SAMPLERS), help="(default: the model's scheduler)")
    parser.add_argument("--prompts", type=int, default=200, help="unseen prompts in all")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt choice and sampling")
    args = parser.parse_args()

    pipe = models.load_pipeline(args.model)
    models.use_sampler(pipe, args.sampler)
    print("| prompts | n | background | colour | shape | size | all named | both colour+shape |")
    print("|---|---|---|---|---|---|---|---|")
    for name, prompts in prompt_sets(args.model, args.seed, args.prompts).items():
        started = time.time()
        images = generate.sample(
            pipe, prompts, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed
        )
        table = rates(prompts, images, args.n)
        cells = [
            table.get(key)
            for key in ("background", "color", "shape", "size", "all named", "both colour+shape")
        ]
        shown = " | ".join("–" if cell is None else f"{cell:.1f}%" for cell in cells)
        print(
            f"| {name} ({len(prompts)} prompts, {time.time() - started:.0f} s) | {len(images)} | {shown} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
