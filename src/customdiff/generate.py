"""Sampling: prompts in, PNGs + a grid + metadata.jsonl out, the model loaded once for all prompts."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from customdiff import files, models
from customdiff import regions as regional

if TYPE_CHECKING:
    from customdiff.concept import AppliedConcept


class Job(NamedTuple):
    """One image to sample: its place in the output, its prompt (and regions), negative prompt and seed,
    and for a prompt drawn whole, the weights it is drawn with (``regions.part_named``)."""

    position: int
    prompt: str
    regions: regional.RegionalPrompt | None
    negative: str
    seed: int
    weights: int

    def group(self) -> tuple:
        """What a batch of jobs must share: their regions' layout (none for a plain prompt) and weights."""
        layout = (self.regions.layout.rows, self.regions.layout.shares) if self.regions else ()
        return (layout, self.weights)


@torch.no_grad()
def sample(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    n: int = 4,
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    negative_prompts: list[str] | None = None,
    regions: bool | None = None,
    concept: AppliedConcept | None = None,
    layout: regional.Layout | None = None,
) -> list[np.ndarray]:
    """``n`` images per prompt, (H, W, 3) uint8, prompt-major, at ``guidance`` (default: the model's
    ``models.recommended_guidance``), guided away from each prompt's negative prompt (default: empty).

    With ``regions`` (default: ``models.recommended_regions``), prompts written ``WHOLE BREAK LEFT BREAK
    RIGHT`` and two-object toy-world captions naming a concept are drawn by region (``regions.py``), in
    ``layout`` (default: equal columns); there ``concept``, the one ``apply_concept`` put on ``pipe``, acts
    only on the blocks naming its tokens. A prompt drawn whole that names only one part's tokens of a merged
    ``concept`` is drawn with that part's own deltas, as its own run draws it. Image
    ``i`` of a prompt always comes from seed ``seed + i``, so it does not depend on ``n``, on the batch
    size or on the other prompts of the run.
    """
    negative_prompts = negative_prompts or [""] * len(prompts)
    regions = models.recommended_regions(pipe) if regions is None else regions
    split = [regional.split_prompt(prompt, regions, layout) for prompt in prompts]
    for prompt, parts in zip(prompts, split, strict=True):
        for part in [parts.whole, *parts.regions] if parts else [prompt]:
            models.check_prompt(pipe.tokenizer, part)
    for negative in negative_prompts:
        models.check_prompt(pipe.tokenizer, negative)
    guidance = models.recommended_guidance(pipe) if guidance is None else guidance
    jobs = [
        Job(position * n + index, prompt, parts, negative, seed + index, weights)
        for position, (prompt, parts, negative) in enumerate(
            zip(prompts, split, negative_prompts, strict=True)
        )
        for weights in [-1 if parts else regional.part_named(pipe.tokenizer, prompt, concept)]
        for index in range(n)
    ]
    jobs.sort(key=Job.group)  # prompts split alike and drawn with the same weights are denoised together
    call = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
    device = pipe.unet.device
    batches = [
        group[start : start + batch_size]
        for group in (list(same) for _, same in itertools.groupby(jobs, key=Job.group))
        for start in range(0, len(group), batch_size)
    ]
    images: dict[int, np.ndarray] = {}
    for batch in tqdm(batches, desc="generate", disable=not progress or len(batches) < 2):
        generators = [torch.Generator(device).manual_seed(job.seed) for job in batch]
        negatives = [job.negative for job in batch]
        if batch[0].regions is None:
            with regional.drawn_with(pipe.unet, concept, batch[0].weights):
                output = pipe(
                    [job.prompt for job in batch], negative_prompt=negatives, generator=generators, **call
                )
        else:
            output = regional.sample_regional(
                pipe, [job.regions for job in batch], negatives, generators, concept, **call
            )
        for job, image in zip(batch, output.images, strict=True):
            images[job.position] = (image * 255).round().astype(np.uint8)
    return [images[position] for position in range(len(jobs))]


def write_samples(out: Path, prompts: list[str], images: list[np.ndarray], n: int) -> None:
    """The images as an image folder (PNGs + metadata.jsonl) and ``grid.png``, one row per prompt."""
    captions = [prompt for prompt in prompts for _ in range(n)]
    files.write_image_folder(out, zip(images, captions, strict=True))
    files.save_png(out / "grid.png", files.image_grid(images, columns=n))


def read_prompts(path: Path, flag: str = "--prompts") -> list[str]:
    """One prompt a line; blank lines and ``#`` comments are skipped (``flag`` names the file in errors)."""
    from customdiff.errors import CustomDiffError

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise CustomDiffError(
            f"cannot read {flag} file {path}: {error.strerror}; pass {flag} a text file"
        ) from error
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CustomDiffError(f"{path} holds no prompt; write one prompt a line")
    return prompts
