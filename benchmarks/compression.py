"""Concept file size against rank (Kumari et al. 2023, §4.3, Fig. 9): SVD-compressed K/V deltas, scored.

Trains one built-in concept, keeps every delta in low rank by energy share and by fixed rank (fitted to
its outputs as ``customdiff compress`` does; at 60% energy also the paper's plain SVD, and the fitted cut
refined ``--refine-steps`` at its ranks, as ``compress --refine-steps`` does), and prints for
each the file size and the paper's metrics with the toy judge's concept-present share, against the full
delta, as the paper's 75 → 15 → 5 → 1 MB figure.

    python benchmarks/compression.py [--concept starfish] [--steps N] [--n 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from base_components import add_run_options, run_settings  # benchmarks/, first on the path as a script
from customdiff import compress, concept, evaluate, files, finetune, models, toyworld
from customdiff.config import CompressConfig, FinetuneConfig

SETTINGS = (("full", {}), ("energy 0.9", {"energy": 0.9}), ("energy 0.6", {"energy": 0.6}))
SETTINGS += (("energy 0.6, plain SVD", {"energy": 0.6, "plain": True}),)  # the paper's cut, same ranks
SETTINGS += (("energy 0.6, refined", {"refine": "energy 0.6"}),)  # that cut, compress --refine-steps
SETTINGS += tuple((f"rank {r}", {"rank": r}) for r in (8, 4, 2, 1))
COLUMNS = ("file_mb", "text_alignment", "image_alignment", "judge_new_context_concept_present")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="starfish", help="built-in concept to train")
    parser.add_argument("--refine-steps", type=int, default=1000, help="steps of the refined row")
    add_run_options(parser)
    args = parser.parse_args()

    pipe = models.load_pipeline()
    clip = evaluate.ClipFeatures(models.TOY_MODEL_DIR / "clip", pipe.tokenizer)
    built_in = toyworld.get_concept(args.concept)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        images = work / built_in.name
        files.write_image_folder(images, toyworld.concept_scenes(built_in, 6, seed=args.seed))
        config = FinetuneConfig(
            images, built_in.shape, out=work / "full", **run_settings(args, work / "cache")
        )
        full_path = finetune.train(config, models.load_pipeline())
        full = concept.load_concept(full_path)
        targets = {"<new1>": [image for _, image, _ in files.read_image_folder(images)]}
        prompts = evaluate.toy_prompts(("<new1>",), (built_in.shape,))
        weighting = compress.fit_weighting(pipe, full)
        saved = {}
        for name, setting in SETTINGS:
            if "refine" in setting:  # the cut of that row trained as customdiff compress --refine-steps does
                refine = CompressConfig(
                    full_path, work / "refined", energy=0.6, refine_steps=args.refine_steps
                )
                cut_folder = saved[setting["refine"]].parent
                path = finetune.train(
                    compress.refine_config(refine, full, cut_folder), models.load_pipeline()
                )
                kept = concept.load_concept(path)
            else:
                cut = {key: value for key, value in setting.items() if key != "plain"}
                fitted_to = None if setting.get("plain") else weighting
                kept = compress.compress_concept(full, **cut, weighting=fitted_to) if cut else full
                path = concept.save_concept(work / name.replace(" ", "-"), kept)
            saved[name] = path
            metrics = evaluate.evaluate(
                pipe, kept, targets, clip, prompts, args.n, args.sampling_steps, seed=args.seed
            )
            rows[name] = {"file_mb": path.stat().st_size / 2**20, **metrics}
            print(f"{name}: " + ", ".join(f"{k} {rows[name][k]:.3f}" for k in COLUMNS), flush=True)
    print(f"\n{built_in.name}, {args.steps or 'default'} steps, {args.n} samples a prompt\n")
    print(evaluate.markdown_table({name: {k: row[k] for k in COLUMNS} for name, row in rows.items()}))


if __name__ == "__main__":
    main()
