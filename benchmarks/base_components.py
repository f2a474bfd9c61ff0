"""The toy base model's parts, measured on renders training never saw.

- VAE: reconstruction PSNR, and how often the toy judge reads a reconstruction exactly as it reads the
  original (PITFALLS: PSNR alone hides blurred small shapes and stars); on the built-in concepts, whose
  colours lie outside the palette, PSNR and how often the judge still finds the concept.
- VAE ceilings: the judge's shares on round trips of scenes rendered from the paper-table prompts of
  two built-in concepts (new contexts, with a world object, both at once): what a UNet that drew the
  rendered world exactly would score through this autoencoder, the cap of every concept floor.
- CLIP: caption→image top-1 retrieval among 100 held-out pairs (and image→caption).

    python benchmarks/base_components.py [--model PATH] [--n 500]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

from customdiff import evaluate, models, pretrain, toyjudge, toyworld


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The training and scoring options of the benchmarks that train concepts and judge their samples."""
    parser.add_argument(
        "--steps", type=int, help="training steps of every run (default: the model's, else 400)"
    )
    parser.add_argument("--lr", type=float, help="learning rate per image (default: by mode)")
    parser.add_argument("--num-reg", type=int, default=200, help="regularization images per concept")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--sampling-steps", type=int, default=50, help="sampling steps of the evaluation")
    parser.add_argument("--seed", type=int, default=0)


def run_settings(args: argparse.Namespace, cache_dir: Path) -> dict:
    """``FinetuneConfig`` fields from ``add_run_options``' options, regularization images cached in
    ``cache_dir``."""
    return dict(steps=args.steps, lr=args.lr, num_reg=args.num_reg, seed=args.seed, cache_dir=cache_dir)


def same_reading(a: toyjudge.Reading, b: toyjudge.Reading) -> bool:
    """Whether two readings agree on background and every object's colour, shape, size and position."""
    keys = [(o.color, o.shape, o.size, o.position) for o in a.objects]
    return a.background == b.background and keys == [
        (o.color, o.shape, o.size, o.position) for o in b.objects
    ]


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> tuple[np.ndarray, float]:
    """The VAE's reconstructions (N, 64, 64, 3) uint8 of ``images`` and their mean PSNR (dB)."""
    pixels = pretrain.to_tensor(images)
    decoded = torch.cat([vae.decode(vae.encode(batch).latent_dist.mean).sample for batch in pixels.split(64)])
    reconstructions = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    mse = ((reconstructions.astype(float) - images.astype(float)) ** 2).mean(axis=(1, 2, 3))
    return reconstructions, float(np.mean(10 * np.log10(255**2 / np.maximum(mse, 1e-6))))


def judged_round_trips(
    vae, prompts: list[str], concepts: dict[str, toyworld.Concept], targets, n: int, seed: int
) -> dict[str, float]:
    """The judge's shares (``evaluate.judge_concept_prompts``, each concept known by its ``targets`` images
    as ``evaluate`` knows it) on VAE round trips of ``n`` scenes a prompt naming ``concepts`` by token,
    rendered as the spec lays them out: what a UNet drawing the rendered world exactly would score, the
    ceiling of a concept's floors."""
    signatures = {token: toyjudge.concept_signature(images) for token, images in targets.items()}
    rng = np.random.default_rng(seed)
    repeated = [prompt for prompt in prompts for _ in range(n)]
    scenes = np.stack([toyworld.render(toyworld.parse_caption(p), rng, concepts) for p in repeated])
    reconstructions, _ = reconstruct(vae, scenes)
    return evaluate.judge_concept_prompts(list(reconstructions), repeated, signatures)


def vae_report(vae, captions: list[toyworld.Caption], rng: np.random.Generator) -> dict[str, float]:
    images = np.stack([toyworld.render(caption, rng) for caption in captions])
    reconstructions, psnr = reconstruct(vae, images)
    agree = [
        same_reading(toyjudge.read_image(a), toyjudge.read_image(b))
        for a, b in zip(images, reconstructions, strict=True)
    ]
    return {"psnr_db": psnr, "judge_agrees_pct": 100 * float(np.mean(agree))}


def vae_concept_report(vae, n: int, seed: int) -> dict[str, float]:
    """The built-in concepts (which no training image shows): PSNR, and how often the judge still finds
    the concept (its shape and its pattern) in the reconstruction."""
    found, psnrs = [], []
    for concept in toyworld.CONCEPTS.values():
        scenes = list(toyworld.concept_scenes(concept, n, seed=seed))
        images = np.stack([image for image, _ in scenes])
        reconstructions, psnr = reconstruct(vae, images)
        signature = toyjudge.concept_signature(list(images))
        for reconstruction, (_, caption) in zip(reconstructions, scenes, strict=True):
            checks = toyjudge.score(reconstruction, caption, {"<new1>": signature}).checks
            found.append(checks["object1.concept"] and checks["object1.shape"])
        psnrs.append(psnr)
    return {"psnr_db": float(np.mean(psnrs)), "judge_finds_concept_pct": 100 * float(np.mean(found))}


KINDS = ("new_context", "composed", "two_concepts")  # evaluate.prompt_kind's


def vae_ceiling_report(vae, names: tuple[str, str], n: int, seed: int) -> dict[str, float]:
    """``judged_round_trips`` of every kind of the paper's prompts for two built-in concepts, ``n`` scenes
    a prompt; each concept known by its six training images."""
    tokens = ("<new1>", "<new2>")
    concepts = {token: toyworld.get_concept(name) for token, name in zip(tokens, names, strict=True)}
    targets = {
        token: [image for image, _ in toyworld.concept_scenes(built_in, 6, token=token, seed=seed)]
        for token, built_in in concepts.items()
    }
    prompts = evaluate.toy_prompts(tokens, tuple(built_in.shape for built_in in concepts.values())).concept
    rows = [(name, kind, token) for token, name in zip(tokens, names, strict=True) for kind in KINDS[:2]]
    report = {}
    for name, kind, token in [*rows, ("both", KINDS[2], tokens[0])]:
        chosen = [p for p in prompts if evaluate.prompt_kind(p, tokens) == kind and token in p.split()]
        shares = judged_round_trips(vae, chosen, concepts, targets, n, seed)
        report[f"{name} {kind} all right %"] = shares[f"judge_{kind}_all_right"]
    return report


@torch.no_grad()
def clip_report(
    clip: CLIPModel, tokenizer, captions: list[toyworld.Caption], rng: np.random.Generator
) -> dict[str, float]:
    pixels = pretrain.to_tensor(np.stack([toyworld.render(caption, rng) for caption in captions]))
    ids = tokenizer([str(c) for c in captions], padding=True, return_tensors="pt").input_ids
    image_features = torch.nn.functional.normalize(models.clip_image_features(clip, pixels), dim=-1)
    text_features = torch.nn.functional.normalize(models.clip_text_features(clip, ids), dim=-1)
    similarity = text_features @ image_features.T
    target = torch.arange(len(captions))
    return {
        "caption_to_image_top1_pct": 100 * float((similarity.argmax(1) == target).float().mean()),
        "image_to_caption_top1_pct": 100 * float((similarity.argmax(0) == target).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=models.TOY_MODEL_DIR, help="pretrained toy model folder"
    )
    parser.add_argument("--n", type=int, default=500, help="renders for the VAE")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    split = json.loads((args.model / pretrain.SPLIT_FILE).read_text())
    config = pretrain.PretrainConfig(held_out=tuple(split["held_out"]), unseen_every=split["unseen_every"])
    rng = np.random.default_rng(args.seed)
    unseen = []
    while len(unseen) < args.n:
        caption = toyworld.sample_caption(rng)
        if pretrain.is_held_out(caption, config):
            unseen.append(caption)
    pipe = models.load_pipeline(args.model)
    clip = CLIPModel.from_pretrained(args.model / "clip", dtype=torch.float32).eval()
    report = {
        "vae": vae_report(pipe.vae, unseen, rng),
        "vae on the built-in concepts": vae_concept_report(pipe.vae, 12, args.seed),
        "vae ceiling, starfish + donut (32 scenes a prompt)": vae_ceiling_report(
            pipe.vae, ("starfish", "donut"), 32, args.seed
        ),
        "clip (100 pairs)": clip_report(clip, pipe.tokenizer, unseen[:100], rng),
    }
    for part, figures in report.items():
        print(f"{part}: " + ", ".join(f"{key} {value:.1f}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
