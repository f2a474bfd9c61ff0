"""Multi-concept on the toy world (Kumari et al. 2023, §3.2, Table 2): joint training against closed-form
merging of two separately trained concepts, and compression's cost, scored by the judge.

Trains ``<new1>`` (default: the starfish, a star) and ``<new2>`` (the donut, a ring) separately, then both
jointly from the base weights (the paper's joint training, ``--joint-start base``), merges the separate ones
(the default weighted merge and the paper's constrained one), trains both jointly from that merge (what a
joint run does by default, ``train --init-from``, ``--joint-steps``), and
compresses each to 60% of its singular-value energy (fitted to its outputs, as ``customdiff compress``
does; both, so that the compression floor is read on twice the samples), also refined ``--compress-steps``
at its ranks (``compress --refine-steps``). Each is sampled on the paper's
prompt kinds and read by the toy judge. Two-concept prompts are drawn a column a concept, the toy
model's default, and whole (README, "Regional prompts"). A merge draws a prompt naming one of its
concepts with that concept's own deltas (its parts); the "merged weights alone" rows drop the parts, as
other tools apply a merge.

    python benchmarks/multi_concept.py [--concepts starfish donut] [--steps N] [--n 4]

Prints a table and the issue's floors: two-concept prompts with both concepts present — joint ≥ 60%,
merged ≥ 50%; each concept's single-concept score after merging ≥ 90% of its own model's; compression
to 60% energy within 2 points of the full delta. Beside them, the VAE's ceiling for two-concept prompts:
the share of rendered two-concept scenes (the spec's layout) whose VAE round trip still shows both.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

# base_components: benchmarks/, first on the path when run as a script
from base_components import add_run_options, judged_round_trips, run_settings
from customdiff import compress, concept, evaluate, files, finetune, merge, models, toyworld
from customdiff.config import CompressConfig, FinetuneConfig

PRESENT = "judge_new_context_concept_present"
BOTH = "judge_two_concepts_concept_present"
CEILING_SCENES = 32  # rendered scenes a prompt for the VAE's ceiling
JOINT_STEPS = 3000  # half the toy model's 6000: what the README's joint run from a merge measured
COMPRESS_STEPS = 1000  # a refined 60% cut of a starfish drew it as often as the full delta (README)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs=2, default=["starfish", "donut"], help="two built-in concepts")
    add_run_options(parser)
    parser.add_argument(
        "--joint-steps",
        type=int,
        help="steps of the joint run from the merge (default: half of --steps, or 3000)",
    )
    parser.add_argument(
        "--compress-steps",
        type=int,
        help="steps of the refined 60%% cuts (default: a sixth of --steps, or 1000)",
    )
    args = parser.parse_args()
    joint_steps = args.joint_steps or (args.steps // 2 if args.steps else JOINT_STEPS)
    compress_steps = args.compress_steps or (max(1, args.steps // 6) if args.steps else COMPRESS_STEPS)

    pipe = models.load_pipeline()
    clip = evaluate.ClipFeatures(models.TOY_MODEL_DIR / "clip", pipe.tokenizer)
    built_ins = [toyworld.get_concept(name) for name in args.concepts]
    tokens = ("<new1>", "<new2>")
    shapes = tuple(built_in.shape for built_in in built_ins)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folders = [work / built_in.name for built_in in built_ins]
        for folder, built_in, token in zip(folders, built_ins, tokens, strict=True):
            files.write_image_folder(
                folder, toyworld.concept_scenes(built_in, 6, token=token, seed=args.seed)
            )
        settings = run_settings(args, work / "cache")

        def trained(out: str, **config) -> concept.Concept:
            path = finetune.train(
                FinetuneConfig(out=work / out, **{**settings, **config}), models.load_pipeline()
            )
            return concept.load_concept(path)

        separate = [
            trained(f"alone{i}", images=folder, class_word=shape, token=token)
            for i, (folder, shape, token) in enumerate(zip(folders, shapes, tokens, strict=True))
        ]
        small, refined_small = [], []
        for i, one in enumerate(separate):  # fitted as customdiff compress fits, then refined as it refines
            small.append(
                compress.compress_concept(one, energy=0.6, weighting=compress.fit_weighting(pipe, one))
            )
            cut = concept.save_concept(work / f"cut{i}", small[-1]).parent
            request = CompressConfig(
                work / f"alone{i}", work / f"refined{i}", energy=0.6, refine_steps=compress_steps
            )
            path = finetune.train(compress.refine_config(request, one, cut), models.load_pipeline())
            refined_small.append(concept.load_concept(path))
        both_concepts = tuple(f"{folder}:{shape}" for folder, shape in zip(folders, shapes, strict=True))
        joint = trained("joint", concept=both_concepts, joint_start="base")
        captions = merge.regularization_captions(pipe.tokenizer, 1000, args.seed)
        merged, report = merge.merge_concepts(pipe, separate, captions)
        constrained, constrained_report = merge.merge_concepts(pipe, separate, captions, "constrained")
        # a prompt naming one concept reads its part's own deltas; without parts, the merged weights
        # (what export writes and other tools apply)
        merged_only, constrained_only = (dataclasses.replace(m, parts=()) for m in (merged, constrained))
        refined = trained(
            "joint_from_merge",
            concept=both_concepts,
            init_from=(concept.save_concept(work / "merged", merged),),
            steps=joint_steps,
        )
        targets = {
            token: [image for _, image, _ in files.read_image_folder(folder)]
            for token, folder in zip(tokens, folders, strict=True)
        }
        both = evaluate.toy_prompts(tokens, shapes)
        pairs = [p for p in both.concept if evaluate.prompt_kind(p, tokens) == "two_concepts"]
        two = evaluate.Prompts(tuple(pairs), both.classes)

        def scored(model: concept.Concept, prompts: evaluate.Prompts, **regions) -> dict[str, float]:
            return evaluate.evaluate(
                pipe, model, targets, clip, prompts, args.n, args.sampling_steps, seed=args.seed, **regions
            )

        named = dict(zip(tokens, built_ins, strict=True))
        ceiling = judged_round_trips(pipe.vae, pairs, named, targets, CEILING_SCENES, args.seed)[BOTH]
        singles = [evaluate.toy_prompts((t,), (s,)) for t, s in zip(tokens, shapes, strict=True)]

        def each_concept(name: str, model: concept.Concept) -> dict[str, dict[str, float]]:
            """``model``'s rows on each concept's own prompts."""
            return {f"{name}, {t} prompts": scored(model, s) for t, s in zip(tokens, singles, strict=True)}

        rows = {
            f"{tokens[0]} alone": scored(separate[0], singles[0]),
            f"{tokens[1]} alone": scored(separate[1], singles[1]),
            f"{tokens[0]} 60% energy": scored(small[0], singles[0]),
            f"{tokens[1]} 60% energy": scored(small[1], singles[1]),
            f"{tokens[0]} 60% energy, refined": scored(refined_small[0], singles[0]),
            f"{tokens[1]} 60% energy, refined": scored(refined_small[1], singles[1]),
            **each_concept("joint from the base", joint),
            "joint from the base, two-concept prompts": scored(joint, two),
            "joint from the base, two-concept prompts drawn whole": scored(joint, two, regions=False),
            **each_concept("joint from the merge", refined),
            "joint from the merge, two-concept prompts": scored(refined, two),
            **each_concept("merged", merged),
            **each_concept("merged weights alone", merged_only),
            "merged, two-concept prompts": scored(merged, two),
            "merged, two-concept prompts drawn whole": scored(merged, two, regions=False),
            **each_concept("paper's constrained merge alone", constrained_only),
            "paper's constrained merge, two-concept prompts": scored(constrained, two),
        }
    print(
        f"\n{' + '.join(args.concepts)}: {args.steps or 'default'} steps, lr {args.lr or 'by mode'}, "
        f"{args.n} samples a prompt\n"
    )
    print(evaluate.markdown_table(rows))
    print(
        f"merge (weighted, the default): output error {report.residual:.2f} of a concept's own change "
        f"(naive addition {report.naive_residual:.2f}), regularization objective {report.objective:.3g} "
        f"(naive {report.naive_objective:.3g}); constrained: largest constraint residual "
        f"{constrained_report.residual:.1e} (naive {constrained_report.naive_residual:.1e}), objective "
        f"{constrained_report.objective:.3g}"
    )
    own = [rows[f"{t} alone"][PRESENT] for t in tokens]
    cut = [rows[f"{t} 60% energy"][PRESENT] for t in tokens]  # equal sample counts: the mean pools them
    refined_cut = [rows[f"{t} 60% energy, refined"][PRESENT] for t in tokens]

    def kept(row: str) -> str:
        shares = [rows[row.format(t)][PRESENT] / score for t, score in zip(tokens, own, strict=True) if score]
        return f"{100 * min(shares):.0f}%" if len(shares) == len(tokens) else "n/a (a concept alone scores 0)"

    print(
        f"floors: joint (from the merge, the default) both present "
        f"{rows['joint from the merge, two-concept prompts'][BOTH]:.1f}% (≥ 60; from the base, as the paper: "
        f"{rows['joint from the base, two-concept prompts'][BOTH]:.1f}%), merged "
        f"{rows['merged, two-concept prompts'][BOTH]:.1f}% (≥ 50); merged keeps "
        f"{kept('merged, {} prompts')} of a concept's own score (≥ 90%; its merged weights alone "
        f"{kept('merged weights alone, {} prompts')}); 60% energy changes concept-present by "
        f"{(sum(cut) - sum(own)) / len(tokens):+.1f} points over both concepts (within ±2; "
        f"{', '.join(f'{t} {c - o:+.1f}' for t, c, o in zip(tokens, cut, own, strict=True))}), refined "
        f"{compress_steps} steps at its ranks by {(sum(refined_cut) - sum(own)) / len(tokens):+.1f}; "
        f"the VAE alone keeps both concepts in {ceiling:.1f}% of rendered two-concept scenes"
    )


if __name__ == "__main__":
    main()
