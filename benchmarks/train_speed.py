"""Fine-tuning speed: customdiff's training step against a straightforward reference loop, same run.

The reference is the diffusers-example way: every step draws fresh augmented views, VAE-encodes the
target and regularization images again, runs the text encoder on every caption, trains the whole
token-embedding matrix (other rows' gradients zeroed) in fp32. Ours encodes every frozen input once
(latent pools, cached text features of token-free captions) and trains only the new rows. Both train
``crossattn_kv`` with the same batch; each runs in its own process so that its peak memory is its own.

    python benchmarks/train_speed.py [--model PATH | --architecture sd15] [--steps 60] [--batch-size 4]

Prints s/step of both (the loop alone, set-up excluded), the steps/s ratio, and each process's peak RSS
(and, on a GPU, its peak CUDA memory).

``--architecture sd15`` times both on Stable Diffusion 1.5's architecture with random weights (its UNet,
VAE and text encoder shapes, a tokenizer padded to SD's 49,408 entries), 512² at the default
``--latent-size 64``, for the issue's GPU target, e.g. ``--architecture sd15 --batch-size 8 --steps 60
--mixed-precision bf16`` on one GPU (``--mixed-precision`` applies to ours; the reference stays fp32). A
smaller ``--latent-size`` makes a quick run on a CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from customdiff import data, files, finetune, models, text, toyworld
from customdiff.config import FinetuneConfig

WARMUP_STEPS = 10  # excluded from the timing: first steps allocate and warm caches
SD15_VOCAB, SD15_MAX_TOKENS = 49408, 77
GPU_TARGET_STEPS = 250  # the goal: 250 steps of SD 1.5 at 512², batch 8, in 90 s on one H100


def sd15_pipeline(folder: Path, latent_size: int) -> Path:
    """A Stable Diffusion 1.5-shaped pipeline with random weights, saved to ``folder``: what a step costs
    does not depend on the weights, and no real ones can be downloaded here."""
    torch.manual_seed(0)
    tokenizer_dir = folder / "toy-tokenizer"
    models.build_toy_tokenizer().save_pretrained(tokenizer_dir)
    saved = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    vocab.update({f"unused{i}</w>": i for i in range(len(vocab), SD15_VOCAB)})  # SD's embedding size
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(saved))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=SD15_MAX_TOKENS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=SD15_MAX_TOKENS, hidden_act="quick_gelu",
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=8 * latent_size,
    )  # fmt: skip
    unet = UNet2DConditionModel(sample_size=latent_size, cross_attention_dim=768, attention_head_dim=8)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=models.sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder / "sd15")
    return folder / "sd15"


def ours(args, images: Path, work: Path) -> float:
    """s/step of ``finetune.train``, read from its log (the loop alone, after the warm-up steps)."""
    config = FinetuneConfig(
        images, args.class_word, out=work / "ours", model=args.model, steps=args.steps,
        batch_size=args.batch_size, num_reg=args.num_reg, cache_dir=work / "cache",
        mixed_precision=args.mixed_precision,
    )  # fmt: skip
    finetune.train(config)
    records = [json.loads(line) for line in (work / "ours" / "log.jsonl").read_text().splitlines()]
    log = [record for record in records if "step" in record]  # not a refit's record
    first = next(record for record in log if record["step"] >= WARMUP_STEPS)
    return (log[-1]["seconds"] - first["seconds"]) / (log[-1]["step"] - first["step"])


def reference(args, images: Path, work: Path) -> float:
    """s/step of the reference loop: per-step augmentation, VAE and text encoding, fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = models.load_pipeline(args.model).to(device)
    size = data.resolution(pipe)
    examples = data.load_examples(images, size, "<new1>", args.class_word)
    prompts = data.regularization_prompts([example.caption for example in examples], ["<new1>"])
    reg_images = data.generated_regularization(pipe, prompts, args.num_reg, work / "cache")
    (token_id,) = finetune.add_modifier_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"], ["ktn"])
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    embedding = pipe.text_encoder.get_input_embeddings().weight
    kv = [p for name, p in pipe.unet.named_parameters() if ".attn2.to_k." in name or ".attn2.to_v." in name]
    for parameter in [embedding, *kv]:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW([embedding, *kv], lr=1e-5)
    scheduler = models.training_scheduler()
    rng = np.random.default_rng(0)
    half = args.batch_size // 2
    started = 0.0
    for step in range(args.steps):
        if step == WARMUP_STEPS:
            if device == "cuda":  # the warm-up's queued GPU work ends outside the timing
                torch.cuda.synchronize()
            started = time.perf_counter()
        views = [
            data.random_view(examples[i], pipe.vae_scale_factor, rng)
            for i in rng.integers(len(examples), size=half)
        ]
        regs = [reg_images[i] for i in rng.integers(len(reg_images), size=half)]
        pixels = torch.stack(
            [v.pixels for v in views] + [data.to_pixels(data.fit(im, size)) for im, _ in regs]
        )
        masks = torch.stack([v.mask for v in views] + [torch.ones_like(views[0].mask)] * half)[:, None]
        pixels, masks = pixels.to(device), masks.to(device)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        ids = text.tokenize(pipe.tokenizer, [v.caption for v in views] + [caption for _, caption in regs])
        ids = ids.to(device)
        features = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        prediction = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, features).sample
        loss = finetune.masked_mse(prediction, noise, masks)
        loss.backward()
        keep = torch.zeros(len(embedding), 1, device=device)
        keep[token_id] = 1
        embedding.grad *= keep
        torch.nn.utils.clip_grad_norm_([embedding, *kv], 1.0)
        optimizer.step()
        optimizer.zero_grad()
    if device == "cuda":  # the loop's queued GPU work ends inside it
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / (args.steps - WARMUP_STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--model", type=Path, default=None, help="diffusers SD folder (default: toy model)")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each loop")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step, half regularization")
    parser.add_argument("--num-reg", type=int, default=16, help="regularization images")
    parser.add_argument("--concept", default="starfish", help="built-in concept to train")
    base.add_argument(
        "--architecture", choices=["toy", "sd15"], default="toy",
        help="the --model (default: the toy model), or SD 1.5's architecture with random weights",
    )  # fmt: skip
    parser.add_argument("--latent-size", type=int, default=64, help="sd15: latent side (64: 512² images)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="ours")
    parser.add_argument("--which", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    minimum = WARMUP_STEPS + finetune.LOG_EVERY  # timed from the first logged step after the warm-up
    if args.steps < minimum:
        parser.error(f"--steps {args.steps}: pass at least {minimum}, the warm-up and one logged interval")
    concept = toyworld.get_concept(args.concept)
    args.class_word = concept.shape

    if args.which:  # a child process: one loop, then its timing and peak memory as JSON
        images = args.work / "images"
        seconds = (ours if args.which == "ours" else reference)(args, images, args.work)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        print(json.dumps({"s_per_step": seconds, "peak_mb": peak_mb, "gpu_mb": gpu_mb}))
        return

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        files.write_image_folder(work / "images", toyworld.concept_scenes(concept, 6))
        if args.architecture == "sd15":
            args.model = sd15_pipeline(work, args.latent_size)
        results = {}
        for which in ("reference", "ours"):  # the reference fills the shared regularization cache
            command = [sys.executable, __file__, "--which", which, "--work", str(work)]
            command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            command += ["--num-reg", str(args.num_reg), "--concept", args.concept]
            command += ["--mixed-precision", args.mixed_precision]
            command += ["--model", str(args.model)] if args.model else []
            output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[which] = json.loads(output.strip().splitlines()[-1])
    print("| loop | s/step | steps/s | peak RSS (MB) | peak GPU memory (MB) |\n|---|---|---|---|---|")
    for which, result in results.items():
        seconds, peak, gpu = result["s_per_step"], result["peak_mb"], result["gpu_mb"]
        gpu_text = "–" if gpu is None else f"{gpu:.0f}"  # no GPU, no figure
        print(f"| {which} | {seconds:.3f} | {1 / seconds:.2f} | {peak:.0f} | {gpu_text} |")
    ratio = results["reference"]["s_per_step"] / results["ours"]["s_per_step"]
    print(
        f"\n{args.architecture}, batch {args.batch_size}, {args.steps} steps, ours in mixed precision "
        f"{args.mixed_precision}: steps/s ratio, ours / reference: {ratio:.2f}×; {GPU_TARGET_STEPS} steps of "
        f"ours take {GPU_TARGET_STEPS * results['ours']['s_per_step']:.0f} s"
    )


if __name__ == "__main__":
    main()
