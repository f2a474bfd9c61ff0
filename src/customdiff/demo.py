"""The demo that ``make demo`` runs: the toy world, the toy base model, and two concepts taught to it.

It shows the two kinds of data the method works with: captioned scenes (the base model's world, the
paper's web images) and built-in concepts (the paper's user photos of one particular object); then the
base model's samples, two concepts trained (a short run, refit instead of regularization images) beside
the base on the paper's prompt kinds (new contexts, composition with a world object, the class prompt for
forgetting), and the two merged in closed form on prompts naming both.
"""

from pathlib import Path

from PIL import Image

from customdiff import files, toyworld
from customdiff.config import DemoConfig, save_config

SCENES = 16
SCENE_COLUMNS = 4
ZOOM = 3  # 64 px tiles are too small to read beside a caption
NEXT_STEP = "next: teach your own concept with customdiff train --images DIR --class-word WORD (see -h)"
DEMO_CONCEPTS = ("starfish", "donut")  # taught as <new1> star and <new2> ring
DEMO_STEPS = 1000  # two concepts in a few minutes; with regularization images 1000 drew neither (README)
BASE_PROMPTS = (
    "a small red circle on a gray background",
    "a large blue star on a white background",
    "a small yellow cross on a black background",
    "a large green triangle on a sky background",
    "a red circle and a blue square on a gray background",
    "a purple ring and a orange star on a sand background",
    "a red star on a grass background",  # a held-out combination: composed, never seen
    "a white cross and a black triangle on a gray background",
)


def _zoomed(image) -> Image.Image:
    pil = files.as_pil(image)
    return pil.resize((pil.width * ZOOM, pil.height * ZOOM), Image.Resampling.NEAREST)


def run_demo(config: DemoConfig) -> list[tuple[Path, str]]:
    """Write scene and concept image folders and their grids into ``config.out``.

    Returns:
        (path, what it holds) for each thing written.
    """
    out = files.prepare_output_dir(config.out)
    written = []

    scenes = list(toyworld.sample_scenes(SCENES, seed=config.seed))
    files.write_image_folder(out / "scenes", scenes)
    tiles = [_zoomed(image) for image, _ in scenes]
    files.save_png(out / "scenes.png", files.image_grid(tiles, SCENE_COLUMNS, [text for _, text in scenes]))
    written += [
        (out / "scenes", f"{SCENES} random scenes with their captions (metadata.jsonl)"),
        (out / "scenes.png", "those scenes in a grid, captioned"),
    ]

    tiles, labels = [], []
    for concept in toyworld.CONCEPTS.values():
        views = list(toyworld.concept_scenes(concept, seed=config.seed))
        files.write_image_folder(out / "concepts" / concept.name, views)
        tiles += [_zoomed(image) for image, _ in views]
        labels += [f"{concept.name}: {text}" for _, text in views]
    files.save_png(out / "concepts.png", files.image_grid(tiles, len(views), labels))
    written += [
        (out / "concepts", f"{len(toyworld.CONCEPTS)} built-in concepts, {len(views)} images each"),
        (out / "concepts.png", "one row per concept, as it is taught: a <new1> {shape}"),
    ]
    written += base_model_samples(out, config.seed)
    written += concept_samples(out, config.seed)
    written.append((save_config(config, out), "the settings of this run"))
    return written


def base_model_samples(out: Path, seed: int) -> list[tuple[Path, str]]:
    """Samples of the shipped toy base model, each labelled with the judge's verdict."""
    from customdiff import generate, models

    pipe = models.load_pipeline()
    images = generate.sample(pipe, list(BASE_PROMPTS), n=2, seed=seed, progress=False)
    labels = [
        f"{BASE_PROMPTS[index // 2]} | judge: {_verdict(image, BASE_PROMPTS[index // 2])}"
        for index, image in enumerate(images)
    ]
    files.save_png(out / "base_model.png", files.image_grid([_zoomed(i) for i in images], 4, labels))
    right = sum(label.endswith("right") for label in labels)
    return [(out / "base_model.png", f"the toy base model's samples, {right}/{len(images)} judged all right")]


def _verdict(image, prompt: str, signatures: dict | None = None) -> str:
    """The judge's word on a sample: "right", or "wrong" and the checks that failed."""
    from customdiff import toyjudge

    wrong = [check for check, right in toyjudge.score(image, prompt, signatures).checks.items() if not right]
    return "right" if not wrong else "wrong " + ", ".join(wrong)


def _judged_grid(path: Path, rows: list[tuple[str, list, list[str]]], signatures: dict) -> str:
    """A grid of (who, images, prompts) columns side by side, two samples a prompt, each judged; returns
    how many of each column's samples the judge read right."""
    tiles, labels, right = [], [], dict.fromkeys((who for who, *_ in rows), 0)
    for index in range(len(rows[0][1])):
        for who, images, prompts in rows:
            tiles.append(_zoomed(images[index]))
            text = prompts[index // 2]
            verdict = _verdict(images[index], text, signatures)
            labels.append(f"{who}: {text} | judge: {verdict}")
            right[who] += verdict == "right"
    files.save_png(path, files.image_grid(tiles, 2 * len(rows), labels))
    return ", ".join(f"{who} {count}/{len(rows[0][1])}" for who, count in right.items()) + " judged right"


def _base_prompts(prompts: list[str], tokens: list[str]) -> list[str]:
    """Each prompt as the base model can be asked it: the tokens out, a plain colour in the grammar."""
    from customdiff import data

    return [data.class_prompts([prompt], tokens)[0] for prompt in prompts]


def concept_samples(out: Path, seed: int) -> list[tuple[Path, str]]:
    """Train the demo concepts separately (``crossattn_kv``, no regularization images, refit), grid each
    beside the base model, then merge them in closed form and grid prompts naming both."""
    from customdiff import merge, models

    written, trained = [], []
    for number, name in enumerate(DEMO_CONCEPTS, 1):
        concept, what = _teach(out, name, f"<new{number}>", seed)
        trained.append(concept)
        written += what
    pipe = models.load_pipeline()
    merged, _ = merge.merge_concepts(pipe, trained, merge.regularization_captions(pipe.tokenizer, 1000))
    return written + _merged_samples(out, pipe, merged, seed)


def _teach(out: Path, name: str, token: str, seed: int) -> tuple:
    """One built-in concept taught as ``token``: the concept and its grid beside the base model."""
    from customdiff import evaluate, finetune, generate, models, toyjudge
    from customdiff.concept import apply_concept, load_concept
    from customdiff.config import FinetuneConfig

    concept = toyworld.get_concept(name)
    images = out / name / "images"  # captioned with this token
    files.write_image_folder(images, toyworld.concept_scenes(concept, token=token, seed=seed))
    prompts = evaluate.toy_prompts((token,), (concept.shape,))
    tuned_prompts = [*prompts.concept[:2], prompts.concept[-1], prompts.classes[0]]
    base_prompts = _base_prompts(tuned_prompts, [token])
    pipe = models.load_pipeline()
    base = generate.sample(pipe, base_prompts, n=2, seed=seed, progress=False)
    config = FinetuneConfig(
        images, concept.shape, out=out / name, token=token, steps=DEMO_STEPS, reg="none", refit_weight=1.0,
        seed=seed,
    )  # fmt: skip
    trained = load_concept(finetune.train(config))
    tuned = generate.sample(
        pipe, tuned_prompts, n=2, seed=seed, progress=False, concept=apply_concept(pipe, trained)
    )
    grid = (("base", base, base_prompts), ("tuned", tuned, tuned_prompts))
    judged = _judged_grid(out / f"{name}.png", grid, {token: toyjudge.builtin_signature(name)})
    return trained, [
        (out / name, f"{name} taught as {token} {concept.shape} ({DEMO_STEPS} steps)"),
        (out / f"{name}.png", f"the paper's prompt kinds, base on the class prompt then tuned; {judged}"),
    ]


def _merged_samples(out: Path, pipe, merged, seed: int) -> list[tuple[Path, str]]:
    """Save the merged concept and grid prompts naming both concepts, base beside merged."""
    from customdiff import evaluate, generate, toyjudge
    from customdiff.concept import apply_concept, save_concept

    save_concept(out / "merged", merged)
    tokens = merged.tokens
    prompts = [
        prompt
        for prompt in evaluate.toy_prompts(tokens, merged.class_words).concept
        if evaluate.prompt_kind(prompt, tokens) == "two_concepts"
    ][:4]
    base_prompts = _base_prompts(prompts, list(tokens))
    base = generate.sample(pipe, base_prompts, n=2, seed=seed, progress=False)
    applied = apply_concept(pipe, merged)
    tuned = generate.sample(pipe, prompts, n=2, seed=seed, progress=False, concept=applied)
    names = zip(tokens, DEMO_CONCEPTS, strict=True)
    signatures = {token: toyjudge.builtin_signature(name) for token, name in names}
    grid = (("base", base, base_prompts), ("merged", tuned, prompts))
    judged = _judged_grid(out / "merged.png", grid, signatures)
    return [
        (out / "merged", f"{' and '.join(DEMO_CONCEPTS)} merged in closed form (customdiff merge)"),
        (out / "merged.png", f"prompts naming both concepts: base beside the merged concepts; {judged}"),
    ]
