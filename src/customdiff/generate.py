"""Sampling: prompts in, PNGs + a grid + metadata.jsonl out, the model loaded once for all prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from customdiff import files, models


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
) -> list[np.ndarray]:
    """``n`` images per prompt, (H, W, 3) uint8, prompt-major, at ``guidance`` (default: the model's
    ``models.recommended_guidance``), guided away from each prompt's negative prompt (default: empty).

    Image ``i`` of a prompt always comes from seed ``seed + i``, so it does not depend on ``n``, on the
    batch size or on the other prompts of the run.
    """
    negative_prompts = negative_prompts or [""] * len(prompts)
    for prompt in prompts + negative_prompts:
        models.check_prompt(pipe.tokenizer, prompt)
    guidance = models.recommended_guidance(pipe) if guidance is None else guidance
    jobs = [
        (prompt, negative, seed + index)
        for prompt, negative in zip(prompts, negative_prompts, strict=True)
        for index in range(n)
    ]
    device = pipe.unet.device
    images = []
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress or len(batches) < 2):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(job_seed) for _, _, job_seed in batch]
        output = pipe(
            [prompt for prompt, _, _ in batch],
            negative_prompt=[negative for _, negative, _ in batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        )
        images += [(image * 255).round().astype(np.uint8) for image in output.images]
    return images


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
