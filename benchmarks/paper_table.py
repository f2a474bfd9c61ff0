"""The paper's comparison (Kumari et al. 2023, Table 1 / Fig. 6) on the toy world: four modes, same seeds.

For each built-in concept and each mode (``crossattn_kv`` the paper's method, ``crossattn``, ``full``
DreamBooth-like, ``token`` Textual-Inversion-like) it trains with the same steps and seed, then samples
and scores with ``customdiff.evaluate`` (text alignment, image alignment, KID, the judge). Prints one
row per mode, averaged over the concepts, and the floors of the issue beside it, with the VAE's ceiling of
the judge's columns: the shares its round trips of rendered scenes of the same prompts score.

    python benchmarks/paper_table.py [--concepts starfish donut] [--steps N] [--n 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

# base_components: benchmarks/, first on the path when run as a script
from base_components import add_run_options, judged_round_trips, run_settings
from customdiff import concept, evaluate, files, finetune, models, toyworld
from customdiff.config import FinetuneConfig

MODES = ("crossattn_kv", "crossattn", "full", "token")
COLUMNS = {
    "text_alignment": "text-align",
    "image_alignment": "image-align",
    "kid_x1000": "KID×10³",
    "judge_new_context_concept_present": "new ctx: concept %",
    "judge_new_context_context_right": "new ctx: background %",
    "judge_composed_all_right": "composed: both %",
    "class_drop": "class prompts: drop (points)",
    "trainable_params": "trained params",
    "file_mb": "file MB",
    "train_s": "train s",
}
CEILING_SCENES = 32  # rendered scenes a prompt for the VAE's ceiling


def run_one(pipe, clip, images: Path, shape: str, mode: str, args, work: Path) -> dict[str, float]:
    """Train one concept in one mode on a fresh copy of the base, then evaluate it on ``pipe``."""
    out = work / f"{images.name}-{mode}"
    config = FinetuneConfig(images, shape, out=out, mode=mode, **run_settings(args, work / "cache"))
    started = time.perf_counter()
    path = finetune.train(config, models.load_pipeline())
    train_s = time.perf_counter() - started
    loaded = concept.load_concept(path)
    targets = [image for _, image, _ in files.read_image_folder(images)]
    prompts = evaluate.toy_prompts(("<new1>",), (shape,))
    metrics = evaluate.evaluate(
        pipe, loaded, {"<new1>": targets}, clip, prompts, args.n, args.sampling_steps, seed=args.seed
    )
    metrics["class_drop"] = metrics["judge_class_right_base"] - metrics["judge_class_right_finetuned"]
    metrics["trainable_params"] = loaded.token_embeddings.numel() + sum(
        d.numel() for d in loaded.deltas.values()
    )
    metrics["file_mb"] = path.stat().st_size / 2**20
    metrics["train_s"] = train_s
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(toyworld.CONCEPTS), help="built-in concepts")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    add_run_options(parser)
    args = parser.parse_args()

    pipe = models.load_pipeline()
    clip = evaluate.ClipFeatures(models.TOY_MODEL_DIR / "clip", pipe.tokenizer)
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
    ceilings = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.concepts:
            built_in = toyworld.get_concept(name)
            images = work / name
            files.write_image_folder(images, toyworld.concept_scenes(built_in, 6, seed=args.seed))
            targets = [image for _, image, _ in files.read_image_folder(images)]
            ceilings.append(
                judged_round_trips(
                    pipe.vae,
                    list(evaluate.toy_prompts(("<new1>",), (built_in.shape,)).concept),
                    {"<new1>": built_in},
                    {"<new1>": targets},
                    CEILING_SCENES,
                    args.seed,
                )
            )
            for mode in args.modes:
                metrics = run_one(pipe, clip, images, built_in.shape, mode, args, work)
                rows[mode].append(metrics)
                print(f"{name} {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    averaged = {
        mode: {key: float(np.mean([m[key] for m in runs])) for key in COLUMNS} for mode, runs in rows.items()
    }
    print(
        f"\n{len(args.concepts)} concepts, {args.steps or 'default'} steps, lr {args.lr or 'by mode'}, "
        f"{args.n} samples a prompt, seed {args.seed}\n"
    )
    print("| mode | " + " | ".join(COLUMNS.values()) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for mode, metrics in averaged.items():
        print(f"| {mode} | " + " | ".join(f"{metrics[key]:.3g}" for key in COLUMNS) + " |")
    ceiling = {key: float(np.mean([c[key] for c in ceilings])) for key in COLUMNS if key in ceilings[0]}
    print(
        "| VAE ceiling | "
        + " | ".join(f"{ceiling[key]:.3g}" if key in ceiling else "" for key in COLUMNS)
        + " |"
    )
    print("\nfloors (crossattn_kv): new ctx concept ≥ 85%, background ≥ 90%, composed both ≥ 70%, drop ≤ 3")


if __name__ == "__main__":
    main()
