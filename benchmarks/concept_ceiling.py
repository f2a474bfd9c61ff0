"""How far the base model lets a concept be drawn at all, stage by stage: the ceiling under the floors.

Trains one built-in concept to memorisation (its 6 images and their own captions, no regularization, no
augmentation), once per mode, and reads with the toy judge the share of images that show the concept:

- ``vae``: the training images through the autoencoder alone (encode, decode): the most any UNet can give;
- ``sdedit s``: the fine-tuned model denoising the training images noised to strength ``s`` (SDEdit,
  Meng et al. 2022) at the model's guidance: how faithfully the UNet holds the concept from low (0.2) to
  high (0.8) noise;
- ``scratch g``: samples from pure noise of the same captions at guidance ``g``;
- ``text room``: the share (%) of the captions' text features, from the modifier token through the end of
  text, outside the span holding 99.9% of the energy of ~1000 ordinary captions' features (the merge's
  C_reg). Only that part lets a K/V change draw the concept without also moving ordinary captions, which
  regularization resists.

A concept lost between ``vae`` and ``sdedit 0.2`` is one the trained parameters cannot express; one lost
only between ``sdedit 0.8`` and ``scratch`` is decided in the first, noisiest sampling steps.

    python benchmarks/concept_ceiling.py [--concept donut] [--runs crossattn_kv=1e-4 full=2.5e-5]
        [--steps 1500] [--n 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from base_components import reconstruct  # benchmarks/, first on the path when run as a script
from customdiff import concept, evaluate, files, finetune, generate, merge, models, toyjudge, toyworld
from customdiff.config import FinetuneConfig

STRENGTHS = (0.2, 0.5, 0.8)
GUIDANCES = (2.0, 3.0, 6.0)
SAMPLING_STEPS = 30
SPAN_ENERGY = 0.999  # of the ordinary captions' features, for the text room


def concept_share(images: list[np.ndarray], captions: list[str], signature: np.ndarray) -> float:
    """Percent of images in which the judge finds the concept as the caption's first object."""
    found = [toyjudge.score(image, caption, {"<new1>": signature}).checks["object1.concept"]
             for image, caption in zip(images, captions, strict=True)]  # fmt: skip
    return 100 * float(np.mean(found))


def sdedit(
    img2img, images: list, captions: list[str], strength: float, guidance: float, n: int, seed: int
) -> list[np.ndarray]:
    """``n`` SDEdit results per image (prompt-major), sampled from the images noised to ``strength``."""
    results = []
    for image, caption in zip(images, captions, strict=True):
        output = img2img(
            [caption] * n, image=[image] * n, strength=strength, num_inference_steps=SAMPLING_STEPS,
            guidance_scale=guidance, output_type="np",
            generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        )  # fmt: skip
        results += [(x * 255).round().astype(np.uint8) for x in output.images]
    return results


def ordinary_span(pipe) -> torch.Tensor:
    """(d, k) orthonormal basis of the span holding ``SPAN_ENERGY`` of ordinary captions' text features."""
    gram = merge.regularization_gram(pipe, merge.regularization_captions(pipe.tokenizer, 1000))
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    energy = eigenvalues.flip(0).cumsum(0) / eigenvalues.sum()
    return vectors.flip(1)[:, : int((energy < SPAN_ENERGY).sum()) + 1]


def text_room(pipe, captions: list[str], span: torch.Tensor) -> float:
    """Percent of the captions' features (modifier token to end of text) outside ``span``."""
    ids, features = merge.text_features(pipe, captions)
    first_new_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    rows = merge.constraint_rows(ids, features, first_new_id, pipe.tokenizer.eos_token_id)
    return 100 * float((rows - rows @ span @ span.T).norm() / rows.norm())


def ceiling_row(pipe, images: list, captions: list[str], signature: np.ndarray, args) -> dict[str, float]:
    """The concept's share at every SDEdit strength and guidance, with the pipeline as it stands."""
    repeated = [caption for caption in captions for _ in range(args.n)]
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)  # shares the pipeline's modules
    img2img.set_progress_bar_config(disable=True)
    row, guidance = {}, models.recommended_guidance(pipe)
    for strength in STRENGTHS:
        edited = sdedit(img2img, images, captions, strength, guidance, args.n, args.seed)
        row[f"sdedit {strength}"] = concept_share(edited, repeated, signature)
    for scale in GUIDANCES:
        sampled = generate.sample(pipe, captions, args.n, SAMPLING_STEPS, scale, args.seed, progress=False)
        row[f"scratch {scale:g}"] = concept_share(sampled, repeated, signature)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="donut", help="built-in concept to memorise")
    parser.add_argument("--runs", nargs="+", default=["crossattn_kv=1e-4", "full=2.5e-5"],
                        help="MODE=LR pairs, the learning rate per image (scaled by the batch)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each run")
    parser.add_argument("--n", type=int, default=3, help="samples per image or caption")
    parser.add_argument("--model", default=None, help="base model folder (default: the shipped toy model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    built_in = toyworld.get_concept(args.concept)
    signature = toyjudge.builtin_signature(built_in.name)
    pipe = models.load_pipeline(args.model)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / built_in.name
        files.write_image_folder(folder, toyworld.concept_scenes(built_in, 6, seed=args.seed))
        records = files.read_image_folder(folder)
        images, captions = [image for _, image, _ in records], [caption for _, _, caption in records]
        reconstructions, _ = reconstruct(pipe.vae, np.stack([np.asarray(image) for image in images]))
        vae_share = concept_share(list(reconstructions), captions, signature)
        span = ordinary_span(pipe)
        for run in args.runs:
            mode, lr = run.split("=")
            config = FinetuneConfig(
                folder, built_in.shape, out=Path(work) / mode, model=args.model, mode=mode, lr=float(lr),
                reg="none", augment=False, steps=args.steps, seed=args.seed,
            )  # fmt: skip
            trained = concept.apply_concept(pipe, finetune.train(config, models.load_pipeline(args.model)))
            row = {"vae": vae_share, **ceiling_row(pipe, images, captions, signature, args)}
            row["text room"] = text_room(pipe, captions, span)
            concept.remove_concept(pipe, trained)
            rows[f"{mode} lr {lr}"] = row
            print(run, row, flush=True)
    print(f"\n{built_in.name}: its 6 images memorised for {args.steps} steps; % of images showing it\n")
    print(evaluate.markdown_table(rows))


if __name__ == "__main__":
    main()
