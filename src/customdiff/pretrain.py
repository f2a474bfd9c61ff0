"""Trains the toy base model from scratch: tokenizer, VAE, CLIP, then the latent-diffusion UNet.

The toy model plays Stable Diffusion's part (Rombach et al. 2022): a KL autoencoder, a CLIP text encoder
trained contrastively (Radford et al. 2021) and frozen, and a UNet trained on the noise-prediction loss
with caption dropout for classifier-free guidance. Each stage checkpoints and resumes; the finished
pipeline is a diffusers ``StableDiffusionPipeline`` folder with the CLIP model beside it in ``clip/``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from customdiff import files, models, toyworld
from customdiff.config import MODEL_DEFAULTS_FILE, PretrainConfig, save_config
from customdiff.errors import CustomDiffError
from customdiff.files import image_grid, save_png

PREVIEW_PROMPTS = (
    "a small red star on a grass background",
    "a large blue circle on a white background",
    "a small yellow cross on a black background",
    "a large green triangle on a sky background",
    "a red circle and a blue square on a gray background",
    "a purple ring and a orange star on a sand background",
    "a white cross and a black triangle on a gray background",
    "a small orange ring on a sky background",
)
LOG_EVERY = 50
CODE_FEATURES = 6 + len(toyworld.PATTERNS)  # two RGB colours and a pattern: see appearance_features
CODE_SEED = 1234
# Words that hold a coded object's colour slot: the rare tokens that start modifier tokens, so that a new
# token begins where the UNet learnt "an object whose look the slot's features name".
CODE_WORDS = models.RARE_TOKENS
SPLIT_FILE = "customdiff_split.json"  # beside a pretrained model: which captions training never saw


# ---------------------------------------------------------------------------------------------- data


def is_held_out(caption: toyworld.Caption, config: PretrainConfig) -> bool:
    """Whether training never sees this caption: it names a held-out "colour shape background"
    combination, or it is one of the unseen captions picked by a stable hash (the benchmark's prompts)."""
    held = any(is_held_out_combination(thing, caption.background, config) for thing in caption.things)
    return held or zlib.crc32(str(caption).encode()) % config.unseen_every == 0


def is_held_out_combination(thing: toyworld.Thing, background: str, config: PretrainConfig) -> bool:
    """Whether a thing on this background is one of the held-out "colour shape background" combinations."""
    return f"{thing.color} {thing.shape} {background}" in config.held_out


def training_captions(rng: np.random.Generator, n: int, config: PretrainConfig) -> list[toyworld.Caption]:
    """``n`` random captions of the grammar outside the held-out combinations."""
    captions = []
    while len(captions) < n:
        n_objects = 2 if rng.random() < config.two_object_share else 1
        caption = toyworld.sample_caption(rng, n_objects)
        if not is_held_out(caption, config):
            captions.append(caption)
    return captions


def render_batch(rng: np.random.Generator, n: int, config: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """A batch of fresh renders in [-1, 1], (n, 3, 64, 64), with their captions; a ``size_dropout`` share
    of one-object captions leave out the size word, as the spec's class and concept prompts do."""
    captions = training_captions(rng, n, config)
    images = np.stack([toyworld.render(caption, rng) for caption in captions])
    return to_tensor(images), [str(drop_size(caption, rng, config)) for caption in captions]


def drop_size(
    caption: toyworld.Caption, rng: np.random.Generator, config: PretrainConfig
) -> toyworld.Caption:
    """A ``size_dropout`` share of one-object captions lose their size word; the rest stay as they are."""
    if config.size_dropout and len(caption.things) == 1 and rng.random() < config.size_dropout:
        return unsized(caption)
    return caption


def unsized(caption: toyworld.Caption) -> toyworld.Caption:
    """The caption without size words ("a red star on a gray background")."""
    things = tuple(dataclasses.replace(thing, size=None) for thing in caption.things)
    return toyworld.Caption(caption.background, things)


def with_colour(caption: toyworld.Caption, color: str) -> toyworld.Caption:
    """The caption with every colourless object's colour slot holding ``color``."""
    return toyworld.Caption(
        caption.background,
        tuple(dataclasses.replace(t, color=color) if not t.color else t for t in caption.things),
    )


def render_wild_batch(
    rng: np.random.Generator, n: int, config: PretrainConfig
) -> tuple[torch.Tensor, list[toyworld.Caption], np.ndarray]:
    """(n, 3, 64, 64) in [-1, 1]: one or two objects, each a random pattern (or a solid fill) in random
    colours outside the palette, on the world's backgrounds: what concepts look like, never a built-in. In
    a ``unet_wild_partners`` share of two-object scenes one of the two is a world object instead.

    Their captions name shapes, sizes and background but no colour ("a small star on a gray background";
    a world object keeps its colour: "a star and a blue circle on a white background"): the class prompts
    of concepts, which thus draw the variety of a class, as "a photo of a cat" does in Stable Diffusion.
    With them, (n, 2, CODE_FEATURES) appearance features of each wild object in caption order (zeros
    where there is none), from which the UNet's pool makes appearance codes.
    """
    images, captions = [], []
    features = np.zeros((n, 2, CODE_FEATURES), dtype=np.float32)
    for index in range(n):
        named = toyworld.sample_caption(rng, int(rng.integers(1, 3)))
        kept = -1  # the world object's index, if any: never one of a held-out combination
        # no draw when the share is 0, so that the pools of earlier runs come out as they did
        if config.unet_wild_partners and len(named.things) == 2 and rng.random() < config.unet_wild_partners:
            kept = int(rng.integers(2))
            if is_held_out_combination(named.things[kept], named.background, config):
                kept = -1
        things, concepts = [], {}
        for place, thing in enumerate(named.things):
            if place == kept:
                things.append(thing)
                continue
            colors = tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
            pattern = str(rng.choice(toyworld.PATTERNS))
            solid = rng.random() < 0.25
            if solid:
                colors = colors[:1] * 2
            features[index, len(concepts)] = appearance_features(colors, None if solid else pattern)
            token = f"<w{len(concepts)}>"
            concepts[token] = toyworld.Concept("wild", thing.shape, colors, pattern, "")
            things.append(dataclasses.replace(thing, color=token))
        images.append(toyworld.render(toyworld.Caption(named.background, tuple(things)), rng, concepts))
        colourless = [dataclasses.replace(t, color="") if t.is_concept else t for t in things]
        captions.append(drop_size(toyworld.Caption(named.background, tuple(colourless)), rng, config))
    return to_tensor(np.stack(images)), captions, features


def appearance_features(colors: tuple[tuple[int, int, int], ...], pattern: str | None) -> np.ndarray:
    """(CODE_FEATURES,): an object's two colours in [-1, 1] and its pattern, one-hot (none for a solid)."""
    one_hot = [float(pattern == name) for name in toyworld.PATTERNS]
    return np.array([c / 127.5 - 1 for color in colors for c in color] + one_hot, dtype=np.float32)


def appearance_codes(features: torch.Tensor, text_encoder, tokenizer) -> torch.Tensor:
    """Text features (..., D) that say how a wild object looks, to stand at its colour slot.

    A fixed random linear map of the object's features, centred on the features colour words get in
    that slot and as spread as theirs. Captioned "a small ktn star on a gray background" with the slot's
    output swapped for its code, wild objects teach the UNet to draw any colours and pattern a point of
    that space names, as Stable Diffusion's countless words teach it. That continuous space is what a
    concept's K/V steer (the paper's premise); a UNet that knew only eight colour words could not draw a
    concept's. After the encoder, the map from a look to its features is linear, which codes fed in as
    token embeddings were not (docs/findings.md says how far either has got).
    """
    captions = [f"a large {color} star on a gray background" for color in toyworld.COLORS]
    ids = tokenizer(captions, padding="max_length", return_tensors="pt").input_ids.to(text_encoder.device)
    slot = int((ids[0] != ids[1]).nonzero()[0])
    with torch.no_grad():
        colour_features = text_encoder(ids).last_hidden_state[:, slot].float()
    centre = colour_features.mean(dim=0)
    spread = (colour_features - centre).pow(2).sum(dim=1).mean().sqrt()
    generator = torch.Generator().manual_seed(CODE_SEED)
    # Random colours in [-1, 1] and a one-hot pattern give |features|² ≈ 3, so codes lie ≈ spread away
    projection = (
        torch.randn(CODE_FEATURES, len(centre), generator=generator) * spread / math.sqrt(3 * len(centre))
    )
    return centre.cpu() + features.float() @ projection


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def hard_negative(caption: toyworld.Caption, rng: np.random.Generator) -> toyworld.Caption:
    """A caption one binding away: colours swapped between two objects, or one attribute changed."""
    things = list(caption.things)
    if len(things) == 2 and things[0].color != things[1].color and rng.random() < 0.5:
        first, second = things
        things = [toyworld.Thing(first.shape, second.color), toyworld.Thing(second.shape, first.color)]
        return toyworld.Caption(caption.background, tuple(things))
    index = int(rng.integers(len(things)))
    thing = things[index]
    field = rng.choice(["shape", "color", "size"] if thing.size else ["shape", "color"])
    if field == "shape":
        thing = toyworld.Thing(
            str(rng.choice([s for s in toyworld.SHAPES if s != thing.shape])), thing.color, thing.size
        )
    elif field == "size":
        thing = toyworld.Thing(thing.shape, thing.color, "large" if thing.size == "small" else "small")
    else:
        background_rgb = toyworld.BACKGROUNDS[caption.background]
        colors = [c for c, rgb in toyworld.COLORS.items() if c != thing.color and rgb != background_rgb]
        thing = toyworld.Thing(thing.shape, str(rng.choice(colors)), thing.size)
    things[index] = thing
    return toyworld.Caption(caption.background, tuple(things))


# ---------------------------------------------------------------------------------------------- loop


def train_stage(
    name: str,
    run_dir: Path,
    model: torch.nn.Module,
    steps: int,
    lr: float,
    loss_fn: Callable[[torch.nn.Module, np.random.Generator], torch.Tensor],
    config: PretrainConfig,
    ema: EMAModel | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> None:
    """One resumable training loop: AdamW with warmup and cosine decay, checkpoints, a progress bar."""
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def schedule(step: int) -> float:
        warmup = min(500, steps // 10)
        return (
            step / max(1, warmup)
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )

    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    checkpoint_dir = run_dir / "checkpoints" / name
    step = 0
    if (checkpoint_dir / "step.json").is_file():
        accelerator.load_state(str(checkpoint_dir))
        step = json.loads((checkpoint_dir / "step.json").read_text())["step"]
    rng = np.random.default_rng([config.seed, step])  # a resumed run draws fresh, reproducible data
    model.train()
    bar = tqdm(total=steps, initial=step, desc=name, dynamic_ncols=True)
    started, running_loss = time.time(), 0.0
    while step < steps:
        with accelerator.autocast():
            loss = loss_fn(model, rng)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        step += 1
        running_loss += loss.item()
        bar.update(1)
        if step % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{running_loss / LOG_EVERY:.4f}")
            with open(run_dir / "log.jsonl", "a") as log:
                log.write(
                    json.dumps(
                        {
                            "stage": name,
                            "step": step,
                            "loss": running_loss / LOG_EVERY,
                            "seconds": round(time.time() - started, 1),
                        }
                    )
                    + "\n"
                )
            running_loss = 0.0
        if step % config.checkpoint_every == 0 or step == steps:
            save_checkpoint(accelerator, checkpoint_dir, step)
            if on_checkpoint is not None:
                on_checkpoint(step)
    bar.close()


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int) -> None:
    """Write the state to a fresh folder, then swap it in: a kill mid-save leaves the last one whole."""
    with files.atomic_folder(checkpoint_dir) as partial:
        accelerator.save_state(str(partial))
        (partial / "step.json").write_text(json.dumps({"step": step}))


# ---------------------------------------------------------------------------------------------- stages


def train_vae(run_dir: Path, config: PretrainConfig) -> torch.nn.Module:
    """The autoencoder on fresh renders, world scenes and wild ones (``vae_wild_share``): L1 + MSE
    reconstruction and a small KL term (SD's recipe, no GAN).

    Started from a warm start's autoencoder (``stages/vae-init``), it also keeps that one's latents of
    world scenes (weight ``vae_anchor``; with ``vae_decoder_only`` all latents, exactly) and its scaling
    factor, so that the warm start's UNet still fits. A ``vae_width`` other than the start's begins a
    wider (or narrower) autoencoder afresh, anchored the same way; ``vae_latent_channels`` or
    ``vae_downsample`` other than the start's begin one afresh whose latents nothing can anchor: the UNet
    learns them anew.
    """
    final = run_dir / "stages" / "vae"
    if final.is_dir():
        return AutoencoderKL.from_pretrained(final)
    torch.manual_seed(config.seed)
    start = run_dir / "stages" / "vae-init"
    vae = AutoencoderKL.from_pretrained(start) if start.is_dir() else None
    new_latents = vae is None or (vae.config.latent_channels, models.vae_downsample(vae)) != (
        config.vae_latent_channels,
        config.vae_downsample,
    )
    fresh = new_latents or vae.config.block_out_channels[0] != config.vae_width
    if fresh and vae is not None and config.vae_decoder_only:
        raise CustomDiffError(
            f"--vae-decoder-only keeps the start's encoder, of width {vae.config.block_out_channels[0]} and "
            f"{vae.config.latent_channels} latent channels, {models.vae_downsample(vae)} pixels a cell: drop "
            "--vae-width/--vae-latent-channels/--vae-downsample or --vae-decoder-only"
        )
    # anchored to the start's latents of world scenes, unless a frozen encoder (decoder-only) keeps them all
    anchored = not new_latents and not config.vae_decoder_only
    anchor = copy.deepcopy(vae).eval().requires_grad_(False) if anchored else None
    if fresh:
        vae = models.toy_vae(config.vae_width, config.vae_latent_channels, config.vae_downsample)
        if anchor is not None:
            vae.register_to_config(scaling_factor=anchor.config.scaling_factor)
    elif config.vae_decoder_only:  # a frozen encoder keeps every latent as it was
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    n_wild = round(config.vae_batch_size * config.vae_wild_share)

    def loss_fn(model, rng):
        world = render_batch(rng, config.vae_batch_size - n_wild, config)[0]
        images = torch.cat([world, render_wild_batch(rng, n_wild, config)[0]]).to(model.device)
        posterior = model.encode(images).latent_dist
        reconstruction = model.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / images[0].numel()
        error = (reconstruction - images).abs()
        weight = object_weight(images, config.vae_object_weight)
        loss = (weight * (error + error**2)).sum() / (weight.sum() * 3) + 1e-6 * kl
        if anchor is not None:
            with torch.no_grad():
                kept = anchor.to(model.device).encode(images[: len(world)]).latent_dist.mean
            drift = F.mse_loss(posterior.mean[: len(world)].float(), kept.float()) / kept.float().var()
            loss = loss + config.vae_anchor * drift
        return loss

    train_stage("vae", run_dir, vae, config.vae_steps, config.vae_lr, loss_fn, config)
    vae.eval()
    if new_latents:
        with torch.no_grad():
            images, _ = render_batch(np.random.default_rng(config.seed + 1), 256, config)
            latents = vae.encode(images).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(final)
    return vae


def train_clip(run_dir: Path, config: PretrainConfig, tokenizer: CLIPTokenizer) -> CLIPModel:
    """CLIP on toy captions and renders, each image also against a hard-negative caption (binding)."""
    final = run_dir / "stages" / "clip"
    if final.is_dir():
        return CLIPModel.from_pretrained(final)
    torch.manual_seed(config.seed)
    clip = CLIPModel(models.toy_clip_config(len(tokenizer)))

    def loss_fn(model, rng):
        captions = training_captions(rng, config.clip_batch_size, config)
        images = to_tensor(np.stack([toyworld.render(caption, rng) for caption in captions])).to(model.device)
        texts = [str(c) for c in captions] + [str(hard_negative(c, rng)) for c in captions]
        tokens = tokenizer(texts, padding=True, return_tensors="pt").input_ids.to(
            model.device
        )  # causal: pad freely
        image_features = F.normalize(models.clip_image_features(model, images), dim=-1)
        text_features = F.normalize(models.clip_text_features(model, tokens), dim=-1)
        logits = (
            model.logit_scale.exp() * image_features @ text_features.T
        )  # (B, 2B): negatives as extra texts
        labels = torch.arange(len(captions), device=model.device)
        n = len(captions)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :n].T, labels)) / 2

    train_stage("clip", run_dir, clip, config.clip_steps, config.clip_lr, loss_fn, config)
    clip.save_pretrained(final)
    return clip


def object_weight(images: torch.Tensor, weight: float) -> torch.Tensor:
    """(N, 1, H, W): ``weight`` on object pixels (far from the image's median colour, its background), 1
    elsewhere, so that a small patterned object is not outweighed by the flat background around it."""
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    is_object = (images - background).abs().amax(dim=1, keepdim=True) > 4 * toyworld.NOISE / 127.5
    return 1 + (weight - 1) * is_object.float()


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """SD's text encoder is CLIP's text tower: the same transformer, without the projection."""
    text_encoder = CLIPTextModel(clip.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(
        clip.text_model.state_dict()
    )  # flat in v5
    return text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(run_dir: Path, config: PretrainConfig, vae, tokenizer) -> dict[str, torch.Tensor]:
    """Render and encode the UNet's training pool once: frozen work is never repeated per step.

    Returns:
        ``latents`` (N, C, H, W) already scaled, ``input_ids`` (N, MAX_TOKENS), and for a
        ``unet_wild_codes`` share of wild scenes the token positions of their appearance codes,
        ``code_slots`` (N, 2; -1 for none), with the objects' ``features`` (N, 2, CODE_FEATURES).
    """
    path = run_dir / "stages" / "pool.safetensors"
    if path.is_file():
        pool = load_file(path)
        if "code_slots" in pool and _holds_code_words(pool, tokenizer):  # else of an older run: again
            return pool
    rng = np.random.default_rng(config.seed + 2)
    code_words = code_word_ids(tokenizer)
    parts = {"latents": [], "input_ids": [], "code_slots": [], "features": []}
    n_wild = round(256 * config.unet_wild_share)
    for _ in tqdm(range(0, config.pool_size, 256), desc="encode pool"):
        world, world_captions = render_batch(rng, 256 - n_wild, config)
        wild, wild_captions, features = render_wild_batch(rng, n_wild, config)
        coded = rng.random(n_wild) < config.unet_wild_codes
        wild_texts = [
            str(with_colour(caption, str(rng.choice(CODE_WORDS))) if code else caption)
            for caption, code in zip(wild_captions, coded, strict=True)
        ]
        ids = tokenizer(world_captions + wild_texts, padding="max_length", return_tensors="pt").input_ids
        slots = torch.full((len(ids), 2), -1)
        for row in np.flatnonzero(coded) + len(world_captions):
            positions = torch.isin(ids[row], code_words).nonzero().flatten()
            slots[row, : len(positions)] = positions
        parts["latents"].append(
            vae.encode(torch.cat([world, wild])).latent_dist.mean * vae.config.scaling_factor
        )
        parts["input_ids"].append(ids)
        parts["code_slots"].append(slots)
        parts["features"].append(
            torch.cat([torch.zeros(len(world), 2, CODE_FEATURES), torch.from_numpy(features)])
        )
    pool = {name: torch.cat(tensors).contiguous() for name, tensors in parts.items()}
    with files.atomic_path(path) as temporary:
        save_file(pool, temporary)
    return pool


def code_word_ids(tokenizer) -> torch.Tensor:
    """Token ids of CODE_WORDS, one each."""
    return torch.tensor(tokenizer(list(CODE_WORDS), add_special_tokens=False).input_ids).flatten()


def _holds_code_words(pool: dict[str, torch.Tensor], tokenizer) -> bool:
    """Whether the pool's code slots hold today's CODE_WORDS (an older run's held a colour word)."""
    rows, which = (pool["code_slots"] >= 0).nonzero(as_tuple=True)
    words = pool["input_ids"][rows, pool["code_slots"][rows, which]]
    return bool(torch.isin(words, code_word_ids(tokenizer)).all())


def encode_text(
    text_encoder, input_ids: torch.Tensor, codes: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Text features (B, L, D) of token ids; at ``slots`` (B, 2; -1 for none) they become ``codes``
    (B, 2, D), and the shape word after each slot moves with them.

    The UNet reads an object's colour from its noun's features as much as from the colour word's: codes
    at the slot alone were still ignored after 3000 steps, moved with the noun they were read at once.
    """
    features = text_encoder(input_ids).last_hidden_state.clone()
    rows, which = (slots >= 0).nonzero(as_tuple=True)
    at = slots[rows, which]
    shift = codes[rows, which].to(features) - features[rows, at]
    for offset in (0, 1):  # the colour slot and the shape word it qualifies
        features[rows, at + offset] += shift
    return features


def train_unet(run_dir: Path, config: PretrainConfig, vae, clip: CLIPModel, tokenizer) -> None:
    """The UNet on the noise-prediction loss, min-SNR weighted (Hang et al. 2023), with an EMA copy."""
    text_encoder = text_encoder_from_clip(clip)
    pool = encode_pool(run_dir, config, vae, tokenizer)
    latents, input_ids, slots = pool["latents"], pool["input_ids"], pool["code_slots"]
    codes = appearance_codes(pool["features"], text_encoder, tokenizer)
    empty_ids = tokenizer([""], padding="max_length", return_tensors="pt").input_ids
    scheduler = models.training_scheduler()
    torch.manual_seed(config.seed)
    latent_channels, latent_size = (
        vae.config.latent_channels,
        toyworld.IMAGE_SIZE // models.vae_downsample(vae),
    )
    init, plain_top_level = run_dir / "stages" / "unet-init", config.unet_plain_top_level
    unet = (
        warm_unet(init, latent_channels, latent_size, plain_top_level)
        if init.is_dir()
        else models.toy_unet(text_encoder.config.hidden_size, latent_channels, latent_size, plain_top_level)
    )
    ema = EMAModel(
        unet.parameters(), decay=0.9995, use_ema_warmup=True, model_cls=type(unet), model_config=unet.config
    )

    def loss_fn(model, rng):
        index = torch.from_numpy(rng.integers(0, len(latents), config.batch_size))
        x0, ids, batch_slots = latents[index].to(model.device), input_ids[index].clone(), slots[index].clone()
        dropped = torch.from_numpy(rng.random(config.batch_size) < config.caption_dropout)
        ids[dropped], batch_slots[dropped] = empty_ids, -1
        with torch.no_grad():
            text_encoder.to(model.device)
            context = encode_text(
                text_encoder, ids.to(model.device), codes[index].to(model.device), batch_slots
            )
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=model.device)
        prediction = model(scheduler.add_noise(x0, noise, timesteps), timesteps, context).sample.float()
        snr = compute_snr(scheduler, timesteps.cpu()).to(model.device)
        weight = torch.clamp(snr, max=5.0) / snr
        return (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    def on_checkpoint(step: int) -> None:
        if step % config.export_every == 0 or step == config.unet_steps:
            pipe = assemble_pipeline(vae, text_encoder, tokenizer, ema_unet(ema, unet))
            split = {"held_out": list(config.held_out), "unseen_every": config.unseen_every}
            save_pipeline(pipe, clip, run_dir / "model", split, run_dir / "stages" / MODEL_DEFAULTS_FILE)
            preview(pipe, run_dir / "previews" / f"step-{step:06d}.png", config.seed)

    train_stage("unet", run_dir, unet, config.unet_steps, config.lr, loss_fn, config, ema, on_checkpoint)


def warm_unet(
    folder: Path, latent_channels: int, latent_size: int, plain_top_level: bool = False
) -> UNet2DConditionModel:
    """The warm start's UNet, made to read and predict latents of ``latent_channels`` × ``latent_size``²:
    its convolutions and attention fit any latent size, and for other channels every layer between
    ``conv_in`` and ``conv_out`` (which start afresh) is kept. With ``plain_top_level`` the start UNet
    becomes the body beneath a new top level (``models.with_plain_top_level``)."""
    start = UNet2DConditionModel.from_pretrained(folder, dtype=torch.float32)
    config = {
        **start.config,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "sample_size": latent_size,
    }
    weights = start.state_dict()
    if plain_top_level:
        config = models.with_plain_top_level(config)
        weights = {
            re.sub(r"^down_blocks\.(\d+)\.", lambda m: f"down_blocks.{int(m[1]) + 1}.", name): tensor
            for name, tensor in weights.items()
        }
    unet = UNet2DConditionModel.from_config(config)
    shapes = {name: tensor.shape for name, tensor in unet.state_dict().items()}
    kept = {name: tensor for name, tensor in weights.items() if tensor.shape == shapes[name]}
    unet.load_state_dict(kept, strict=False)
    assert set(weights) - set(kept) <= {"conv_in.weight", "conv_out.weight", "conv_out.bias"}
    return unet


def ema_unet(ema: EMAModel, unet):
    """A copy of the UNet holding the EMA weights (the training copy is left untouched)."""
    copy = type(unet).from_config(unet.config)
    copy.load_state_dict(unet.state_dict())
    ema.copy_to(copy.parameters())
    return copy.eval()


def assemble_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=models.sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(
    pipe: StableDiffusionPipeline, clip: CLIPModel, out: Path, split: dict, defaults: Path | None = None
) -> None:
    """Save the pipeline with CLIP in ``clip/``, swapped in whole.

    The pipeline stays float32, so that a plain ``StableDiffusionPipeline.from_pretrained(out)`` runs on a
    CPU (diffusers and transformers would otherwise load its parts in different precisions); CLIP, which
    only customdiff loads (with an explicit dtype), is stored in float16 to keep the package small.
    """
    with files.atomic_folder(out) as partial:
        pipe.to(torch.float32).save_pretrained(partial, safe_serialization=True)
        clip.to(torch.float16).save_pretrained(partial / "clip", safe_serialization=True)
        clip.to(torch.float32)
        (partial / SPLIT_FILE).write_text(json.dumps(split))
        if defaults is not None and defaults.is_file():
            shutil.copyfile(defaults, partial / MODEL_DEFAULTS_FILE)


def unseen_captions(
    split: dict, rng: np.random.Generator, n: int, n_objects: int, held_out_triple: bool
) -> list[str]:
    """``n`` distinct captions that training never saw, from the split saved beside a model.

    ``held_out_triple`` picks captions naming a held-out colour-shape-background combination (does
    composition generalise?); otherwise captions held out by hash alone (unseen, but of seen parts).
    """
    config = PretrainConfig(held_out=tuple(split["held_out"]), unseen_every=split["unseen_every"])
    found: dict[str, None] = {}
    for _ in range(200_000):
        caption = toyworld.sample_caption(rng, n_objects)
        triple = any(is_held_out_combination(t, caption.background, config) for t in caption.things)
        if is_held_out(caption, config) and triple == held_out_triple:
            found[str(caption)] = None
            if len(found) == n:
                break
    return list(found)


@torch.no_grad()
def preview(pipe: StableDiffusionPipeline, path: Path, seed: int) -> None:
    """A grid of the fixed preview prompts, two samples each, saved as one PNG."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        list(PREVIEW_PROMPTS) * 2,
        num_inference_steps=25,
        guidance_scale=6.0,
        generator=generator,
        output_type="np",
    ).images
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(
        path, image_grid([(image * 255).round().astype(np.uint8) for image in images], len(PREVIEW_PROMPTS))
    )


def pretrain(config: PretrainConfig) -> Path:
    """Run (or resume) every stage; returns the folder of the finished pipeline."""
    run_dir = Path(config.out)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    if config.init_from is not None:
        warm_start(run_dir, Path(config.init_from), config.stage)
    tokenizer_dir = run_dir / "stages" / "tokenizer"
    if not tokenizer_dir.is_dir():
        models.build_toy_tokenizer().save_pretrained(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if config.stage in ("all", "vae", "unet"):
        vae = train_vae(run_dir, config).eval().requires_grad_(False)
    if config.stage in ("all", "clip", "unet"):
        clip = train_clip(run_dir, config, tokenizer).eval().requires_grad_(False)
    if config.stage in ("all", "unet"):
        train_unet(run_dir, config, vae, clip, tokenizer)
    return run_dir / "model"


def warm_start(run_dir: Path, model_dir: Path, stage: str) -> None:
    """Take a pretrained toy model's tokenizer, CLIP and VAE as finished stages (for ``--stage vae`` its VAE
    is the start of that stage instead); its UNet seeds the UNet's, and the model it becomes keeps the
    start's own defaults (``MODEL_DEFAULTS_FILE``: without them a continued toy model would train concepts
    with the paper's settings, which fail on it)."""
    stages = run_dir / "stages"
    vae_stage = "vae-init" if stage == "vae" else "vae"  # --stage vae fine-tunes the VAE, else it is kept
    for part, load, target in (
        ("vae", AutoencoderKL.from_pretrained, vae_stage),
        ("clip", CLIPModel.from_pretrained, "clip"),
    ):
        if not (stages / target).is_dir() and not (stages / part).is_dir():
            load(model_dir / part, dtype=torch.float32).save_pretrained(stages / target)
    if not (stages / "tokenizer").is_dir():
        CLIPTokenizer.from_pretrained(model_dir / "tokenizer").save_pretrained(stages / "tokenizer")
    if (model_dir / MODEL_DEFAULTS_FILE).is_file() and not (stages / MODEL_DEFAULTS_FILE).is_file():
        shutil.copyfile(model_dir / MODEL_DEFAULTS_FILE, stages / MODEL_DEFAULTS_FILE)
    if not (stages / "unet-init").is_dir():
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", dtype=torch.float32)
        unet.save_pretrained(stages / "unet-init")
