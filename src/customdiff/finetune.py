"""Custom Diffusion fine-tuning (Kumari et al. 2023, §3.1): train only what the mode names.

The paper's method (mode ``crossattn_kv``) updates the cross-attention key and value projections
``W_k``, ``W_v`` that read the text features (§3.1, Fig. 2) together with the embedding of a new modifier
token ``V*`` (``<new1>``), initialised from a rare word; everything else stays frozen. A prior-preservation
loss on regularization images of the class keeps the model from forgetting it. Other modes are the
paper's ablations and baselines: all cross-attention (``crossattn``), the whole UNet (``full``,
DreamBooth-like) and the token alone (``token``, Textual-Inversion-like).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from tqdm.auto import tqdm

from customdiff import compress, concept, data, export, files, generate, merge, models, regions, text
from customdiff.config import FinetuneConfig, MergeConfig, Mode, save_config
from customdiff.errors import CustomDiffError

NEW_ROWS = "new_token_rows"  # the trainable parameter holding the modifier tokens' embedding rows
CHECKPOINT_FILE = "checkpoint.pt"
LOG_EVERY = 10
# what a resumed run may change: how long, how often it saves, where it writes, and where a checkpoint
# file's configs come from (the weights stay those of --model)
RESUME_MAY_CHANGE = (
    "steps", "checkpoint_every", "save_every", "preview_every", "preview_prompts", "out", "model_config",
    "num_processes",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- parameters


def _is_token_row(name: str) -> bool:
    return name.startswith("text_encoder") and name.endswith(NEW_ROWS)


MODE_PREDICATES: dict[str, Callable[[str], bool]] = {
    "crossattn_kv": lambda name: _is_token_row(name) or concept.reads_text(name),
    "crossattn": lambda name: _is_token_row(name) or (name.startswith("unet.") and ".attn2." in name),
    "full": lambda name: _is_token_row(name) or name.startswith("unet."),
    "token": _is_token_row,
}


def trainable_parameters(unet, encoders: list[text.TextEncoder], mode: Mode) -> dict[str, torch.nn.Parameter]:
    """The parameters ``mode`` trains, by name ("unet.…", "text_encoder.…", SDXL "text_encoder_2.…"), in a
    fixed order.

    The modifier tokens' rows count only once split off by ``new_token_rows``, so that the other rows of
    the embedding can never change.
    """
    named = [(f"unet.{name}", p) for name, p in unet.named_parameters()]
    named += [(f"{e.name}.{name}", p) for e in encoders for name, p in e.model.named_parameters()]
    return {name: parameter for name, parameter in named if MODE_PREDICATES[mode](name)}


def add_modifier_tokens(tokenizer, text_encoder, tokens: list[str], initializers: list[str]) -> list[int]:
    """Add modifier tokens to the vocabulary, each embedding row a copy of its initializer word's (§3.1).

    Returns:
        the new tokens' ids, in order (the last rows of the resized embedding).
    Raises:
        CustomDiffError: a token is already in the vocabulary, or an initializer is not exactly one token.
    """
    for token in tokens:
        if models.is_known_token(tokenizer, token) or tokens.count(token) > 1:
            raise CustomDiffError(
                f"the token {token} is already in the tokenizer's vocabulary; pass another --token"
            )
    initializer_ids = []
    for word in initializers:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise CustomDiffError(
                f'--initializer "{word}" is {len(ids)} tokens for this tokenizer; pass a one-token word'
            )
        initializer_ids.append(ids[0])
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    assert token_ids == list(range(len(weight) - len(tokens), len(weight))), (
        "new tokens must be the last rows"
    )
    with torch.no_grad():
        weight[token_ids] = weight[initializer_ids].clone()
    return token_ids


class NewTokenEmbedding(torch.nn.Module):
    """A token embedding whose last ``count`` rows are a separate parameter, so that only they train."""

    def __init__(self, embedding: torch.nn.Embedding, count: int):
        super().__init__()
        self.base = embedding
        self.first = embedding.num_embeddings - count
        self.register_parameter(NEW_ROWS, torch.nn.Parameter(embedding.weight[self.first :].detach().clone()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        base = self.base(torch.where(new, 0, ids))
        rows = F.embedding(torch.where(new, ids - self.first, 0), getattr(self, NEW_ROWS))
        return torch.where(new[..., None], rows.to(base.dtype), base)


@contextmanager
def new_token_rows(text_encoder, count: int) -> Iterator[NewTokenEmbedding]:
    """Split the last ``count`` embedding rows off as their own parameter; write them back on exit.

    A whole-matrix parameter with the other rows' gradients zeroed would still move them under AdamW's
    weight decay, and its optimizer state would be vocabulary-sized.
    """
    embedding = text_encoder.get_input_embeddings()
    split = NewTokenEmbedding(embedding, count)
    text_encoder.set_input_embeddings(split)
    try:
        yield split
    finally:
        with torch.no_grad():
            embedding.weight[split.first :] = getattr(split, NEW_ROWS).to(embedding.weight.dtype)
        text_encoder.set_input_embeddings(embedding)


# ---------------------------------------------------------------------------------------------- attention


def _detach_start(states: torch.Tensor) -> torch.Tensor:
    """(B, tokens, dim) with the start-of-text position cut from the graph."""
    return torch.cat([states[:, :1].detach(), states[:, 1:]], dim=1)


@dataclass(frozen=True)
class RegionalBatch:
    """How a training batch's views read their regions (``--regional-views``): the text features hold the
    whole captions' block, then one block per region."""

    counts: torch.Tensor  # (B,) regions of each view's caption, 0 for a caption read whole
    base: torch.Tensor  # (B, blocks after the whole one) bool: the region names no token, reads the base
    by_region: torch.Tensor | None = None  # (B,) bool: the view's timestep lies after sampling's switch


@dataclass
class RegionalReads:
    """What every cross-attention layer reads in the current step: None, or the batch's regions."""

    batch: RegionalBatch | None = None


class StartDetachedAttnProcessor(AttnProcessor2_0):
    """Cross-attention whose key and value at the start-of-text token get no gradient.

    As in the paper's code: the start token's features are the same for every prompt, so fitting
    ``W_k``/``W_v`` to them would shift every prompt. The forward pass equals ``AttnProcessor2_0``;
    self-attention and unusual layers take its path unchanged.

    With ``reads`` holding a batch, a view past sampling's switch reads as ``regions.RegionAttention``
    draws it: each region of pixels its own block, a region naming no token with the layer's ``base``
    weights (name → value, detached: no gradient reaches them), so that training sees what sampling does.
    """

    def __init__(self, reads: RegionalReads | None = None, base: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.reads = reads
        self.base = base or {}

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        batch = self.reads.batch if self.reads is not None else None
        blocks = encoder_hidden_states.chunk(1 + batch.base.shape[1], dim=1) if batch is not None else None
        whole = blocks[0] if blocks else encoder_hidden_states
        unusual = attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None
        if encoder_hidden_states is None or hidden_states.ndim != 3 or unusual or attn.norm_k is not None:
            return super().__call__(attn, hidden_states, whole, attention_mask, temb)
        out = self._attend(attn, hidden_states, whole, attention_mask)
        if batch is None or not batch.by_region.any():
            return out
        for count in batch.counts[batch.by_region].unique().tolist():
            rows = (batch.by_region & (batch.counts == count)).nonzero().squeeze(1)
            region = regions.columns(count).region_of_pixels(hidden_states.shape[1], 1.0, out.device)

            def read(index: int, pixels: torch.Tensor, rows=rows) -> torch.Tensor:
                context, use_base = blocks[1 + index][rows], batch.base[rows, index].view(-1, 1, 1)
                own = self._attend(attn, pixels, context, None)
                if not use_base.any():
                    return own
                return torch.where(use_base, self._attend(attn, pixels, context, None, self.base), own)

            out = out.index_copy(0, rows, regions.by_region(hidden_states[rows], region, read))
        return out

    @staticmethod
    def _attend(attn, hidden_states, encoder_hidden_states, attention_mask, weights=None):
        """The attention output, with ``weights`` (parameter name → value) in place of the layer's own."""

        def project(name: str, states: torch.Tensor) -> torch.Tensor:
            module = attn.get_submodule(name)
            replaced = {key.removeprefix(f"{name}."): value for key, value in (weights or {}).items()}
            replaced = {key: value for key, value in replaced.items() if "." not in key}
            return torch.func.functional_call(module, replaced, (states,)) if replaced else module(states)

        batch = hidden_states.shape[0]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, encoder_hidden_states.shape[1], batch
            )
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, tokens, head_dim)

        query = heads(project("to_q", hidden_states))
        key = heads(_detach_start(project("to_k", encoder_hidden_states)))
        value = heads(_detach_start(project("to_v", encoder_hidden_states)))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = attn.to_out[1](
            project("to_out.0", out.transpose(1, 2).flatten(2).to(query.dtype))
        )  # (B, pixels, dim)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def start_detached(
    unet, reads: RegionalReads | None = None, base: dict[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Give every cross-attention layer (``attn2``) a ``StartDetachedAttnProcessor`` reading ``reads``,
    with its weights among ``base`` (``unet.``-prefixed names, as ``trainable_parameters``); restore on
    exit."""
    original, base = unet.attn_processors, base or {}

    def processor_for(name: str) -> StartDetachedAttnProcessor:
        prefix = f"unet.{name.removesuffix('processor')}"
        own = {key.removeprefix(prefix): value for key, value in base.items() if key.startswith(prefix)}
        return StartDetachedAttnProcessor(reads, own)

    unet.set_attn_processor(
        {
            name: processor_for(name) if name.endswith("attn2.processor") else processor
            for name, processor in original.items()
        }
    )
    try:
        yield
    finally:
        unet.set_attn_processor(original)


# ---------------------------------------------------------------------------------------------- loss


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked latent pixels of each sample, averaged over the batch.

    As the paper's code: ``(loss * mask).sum() / mask.sum()`` per sample for a target view's 0/1 mask
    (B, 1, h, w). A regularization image's mask holds the prior loss weight everywhere (1 in the paper),
    which the mean over the mask's support keeps as its sample's weight.
    """
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    mask = mask.expand_as(squared)
    return ((squared * mask).sum((1, 2, 3)) / (mask > 0).sum((1, 2, 3)).clamp(min=1)).mean()


def diffusion_loss(
    unet,
    scheduler: DDPMScheduler,
    latents,
    masks,
    states,
    added: dict | None,
    generator: torch.Generator,
    at_timesteps: Callable[[torch.Tensor], None] | None = None,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """The denoising loss at random timesteps (Eq. 1), masked; noise and timesteps from ``generator``.

    ``states``: the text features; ``added``: an SDXL UNet's extra inputs (``text.added_conditions``);
    ``at_timesteps`` is told the drawn timesteps before the UNet runs; ``snr_gamma`` (0: off) weighs each
    sample by Min-SNR-γ, the weight of the noise (or velocity) target that puts the loss on x₀ capped at γ.
    """
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (len(latents),), generator=generator).to(latents.device)
    if at_timesteps is not None:
        at_timesteps(timesteps)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, states, added_cond_kwargs=added).sample
    velocity = scheduler.config.prediction_type == "v_prediction"
    if snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        weights = snr.clamp(max=snr_gamma) / (snr + 1 if velocity else snr)
        masks = masks * weights.to(masks)[:, None, None, None]
    if velocity:
        return masked_mse(prediction, scheduler.get_velocity(latents, noise, timesteps), masks)
    return masked_mse(prediction, noise, masks)


def sample_batch(
    targets: list[data.LatentPool],
    regs: list[data.LatentPool | None],
    batch_size: int,
    generator: torch.Generator,
    prior_loss_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latents (B, C, h, w), masks (B, 1, h, w), captions: target views, then regularization images, whose
    masks hold ``prior_loss_weight`` (``masked_mse``).

    Every concept gets ``batch_size`` images, with regularization half target views and half images of its
    own class, so a joint run gives each concept the step it would get alone (§3.2, joint training): one
    shared batch, each concept holding a share of it, drew the concepts in new contexts in 33.9% of
    samples against 58.9% (docs/findings.md).
    """
    n_reg = batch_size // 2 if regs[0] is not None else 0
    pools = [pool for pool in targets for _ in range(batch_size - n_reg)]
    pools += [pool for pool in regs for _ in range(n_reg)]
    drawn = [pool.take(torch.randint(len(pool), (1,), generator=generator)) for pool in pools]
    latents, masks = torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])
    masks[len(pools) - n_reg * len(regs) :] *= prior_loss_weight
    return latents, masks, [caption for d in drawn for caption in d[2]]


def regional_states(
    encoders: list[text.TextEncoder],
    captions: list[str],
    states: torch.Tensor,
    first_new_ids: list[int],
    cache: dict,
    tokens: list[str],
) -> tuple[torch.Tensor, RegionalBatch | None]:
    """The batch's text features with a block per region after the whole captions' ``states``, and how
    its views read them; a view whose caption regional prompts do not split fills its region blocks with
    its whole caption's features. (``states``, None) for a batch with no split caption."""
    split = [regions.split_prompt(caption, True) for caption in captions]
    if not any(split):
        return states, None
    most = max(len(prompt.regions) for prompt in split if prompt)
    rows = [i for i, prompt in enumerate(split) if prompt]
    blocks = []
    for index in range(most):
        texts = [split[i].regions[min(index, len(split[i].regions) - 1)] for i in rows]
        block = states.clone()
        block[rows] = data.encode_captions(encoders, texts, first_new_ids, cache)[0]
        blocks.append(block)
    regions_of = [prompt.regions if prompt else () for prompt in split]
    tokenizer = encoders[0].tokenizer
    base = torch.tensor(
        [
            [i < len(own) and not regions.names_token(tokenizer, own[i], tokens) for i in range(most)]
            for own in regions_of
        ]
    )
    counts = torch.tensor([len(own) for own in regions_of])
    return torch.cat([states, *blocks], dim=1), RegionalBatch(
        counts.to(states.device), base.to(states.device)
    )


# ---------------------------------------------------------------------------------------------- run


def _resumable(config: FinetuneConfig) -> dict:
    return {k: str(v) for k, v in dataclasses.asdict(config).items() if k not in RESUME_MAY_CHANGE}


def save_checkpoint(path: Path, step: int, parameters: dict, optimizer, config: FinetuneConfig) -> None:
    """The trainable tensors, optimizer state and step, written atomically (each step seeds its own
    randomness, so there is no RNG state to keep).

    Small by design (not ``accelerator.save_state``, which would save the whole UNet each time).
    """
    state = {
        "step": step,
        "config": _resumable(config),
        "optimizer": optimizer.state_dict(),
        "parameters": {name: p.detach().cpu() for name, p in parameters.items()},
    }
    with files.atomic_path(path) as temporary:
        torch.save(state, temporary)


def read_checkpoint(path: Path, config: FinetuneConfig) -> dict | None:
    """The checkpoint ``save_checkpoint`` wrote, if this run can go on from it (None: start afresh), read
    before any work so that a run that cannot resume fails at once.

    Raises:
        CustomDiffError: it is another run's, it is past ``--steps``, or the folder holds a finished
            concept and no checkpoint (nothing is trained over silently).
    """
    if not path.is_file():
        finished = path.parent / concept.CONCEPT_FILE
        if finished.is_file():  # a run of an older customdiff, or one whose checkpoint was deleted
            raise CustomDiffError(
                f"{path.parent} already holds a trained concept and no {path.name} to resume from; "
                f"pass a new --out, or delete {finished} to train again"
            )
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = [k for k, v in _resumable(config).items() if state["config"].get(k) != v]
    if changed:
        raise CustomDiffError(
            f"{path} is a checkpoint of another run (--{changed[0].replace('_', '-')} differs); "
            "pass a new --out or delete the checkpoint"
        )
    if state["step"] > config.steps:
        raise CustomDiffError(
            f"{path} is a checkpoint at step {state['step']}, past --steps {config.steps}; pass --steps "
            f"{state['step']} or more to go on, or a new --out"
        )
    return state


def restore_checkpoint(state: dict | None, parameters: dict, optimizer) -> int:
    """Put a ``read_checkpoint`` state into the trainable tensors and optimizer; returns its step (0 for
    none)."""
    if state is None:
        return 0
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state["parameters"][name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def preview_prompts(captions: list[list[str]], tokens: list[str]) -> list[str]:
    """What the preview grids show: a few target captions of each concept, then a class prompt."""
    per_concept = max(1, 3 // len(captions))
    prompts = [caption for group in captions for caption in list(dict.fromkeys(group))[:per_concept]]
    return prompts + data.class_prompts(captions[0], tokens)[:1]


def append_log(path: Path, record: dict) -> None:
    """One line of ``log.jsonl``: every LOG_EVERY steps the step, the mean loss of those steps and the loop's
    seconds; after a refit, what it changed."""
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")


def write_preview(step: int, pipe, prompts: list[str], folder: Path, seed: int) -> None:
    """Two samples of each prompt in one grid, a labelled row per prompt, as ``folder/step-NNNNNN.png``."""
    images = generate.sample(pipe, prompts, n=2, steps=25, seed=seed, progress=False)
    grid = files.image_grid(images, columns=2, labels=[prompt for prompt in prompts for _ in range(2)])
    files.save_png(files.prepare_output_dir(folder) / f"step-{step:06d}.png", grid)


def prepare_data(
    config: FinetuneConfig, pipe
) -> tuple[list[list[str]], list[data.LatentPool], list[data.LatentPool | None]]:
    """Per concept: its target captions, and the encoded pools of its target views (two-object views pair
    it with its class's regularization images) and of its regularization images."""
    size = data.resolution(pipe)
    specs = config.concept_specs()
    tokens = [spec.token for spec in specs]
    cache_dir = config.cache_dir or data.default_cache_dir()
    toy_grammar = not models.spells_any_word(pipe.tokenizer)
    examples = [
        data.load_examples(spec.images, size, spec.token, spec.class_word, toy_grammar, spec.caption)
        for spec in specs
    ]
    captions = [[example.caption for example in own] for own in examples]
    targets, regs = [], []
    for spec, own, own_captions in zip(specs, examples, captions, strict=True):
        # the user's own: --class-images, or a concepts list's "class_data_dir"; --reg tops them up
        own_class = spec.class_images is not None and config.reg != "none"
        class_images = (
            data.class_images(spec.class_images, spec.class_prompt, config.num_reg) if own_class else []
        )
        if class_images:
            prompts = list(dict.fromkeys(caption for _, caption in class_images))
        else:
            prompts = data.regularization_prompts(own_captions, tokens)
        for prompt in prompts:  # a caption word the tokenizer cannot spell fails here, before sampling
            models.check_prompt(pipe.tokenizer, prompt)
        missing = config.num_reg - len(class_images)
        if own_class and missing > 0:  # as diffusers does; ours go to the cache, not into the folder
            source = "sampled from the base model" if config.reg == "generate" else "retrieved from --reg-dir"
            found = (
                f"{len(class_images)} class images, fewer than" if class_images else "no class images yet for"
            )
            warnings.warn(
                f"{spec.class_images}: {found} --num-reg {config.num_reg}; adding {missing} {source}",
                stacklevel=2,
            )
        reg_images = class_images + data.regularization_images(
            config.reg, pipe, prompts, max(missing, 0), config.reg_dir, cache_dir
        )
        scale, seed = pipe.vae_scale_factor, config.seed
        targets.append(  # a joint run's concepts never share a view: that cost them (docs/findings.md)
            data.target_pool(
                pipe.vae, own, scale, seed, config.augment, config.flip, reg_images, config.composed_views
            )
        )
        regs.append(data.regularization_pool(pipe.vae, reg_images, size, scale, seed, config.flip))
    return captions, targets, regs


def prepare_unet(accelerator: Accelerator, unet, optimizer) -> tuple[object, object]:
    """Hand the UNet, if it trains, and the optimizer to accelerate (device, DDP); returns both to step with.

    The text encoders stay as they are: only their new token rows train, whose gradients
    ``average_token_gradients`` averages. DDP would sync a whole encoder for those rows, and it hangs when
    processes run the encoder a different number of times a step (regional views encode region blocks only
    for a batch holding a two-object caption).
    """
    if not any(p.requires_grad for p in unet.parameters()):
        return unet, accelerator.prepare(optimizer)
    return accelerator.prepare(unet, optimizer)


def average_token_gradients(accelerator: Accelerator, parameters: dict[str, torch.nn.Parameter]) -> None:
    """Average the token rows' gradients over the processes, as DDP averages the UNet's."""
    for name, parameter in parameters.items():
        if _is_token_row(name):
            gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            parameter.grad = accelerator.reduce(gradient, reduction="mean")


@contextmanager
def gradient_checkpointing(unet, enabled: bool) -> Iterator[None]:
    """Recompute the UNet's activations in the backward pass while the block runs (when ``enabled``)."""
    if enabled:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled:
            unet.disable_gradient_checkpointing()


def refit(pipe, result: concept.Concept, config: FinetuneConfig) -> tuple[concept.Concept, dict[str, float]]:
    """The trained concept with its K/V deltas refit in closed form (``merge.refit_deltas``), and the
    refit's log record. ``pipe`` still holds the new tokens."""
    captions = merge.regularization_captions(pipe.tokenizer, merge.NUM_REG_CAPTIONS, config.seed)
    deltas, report = merge.refit_deltas(pipe, result, captions, config.refit_weight)
    record = {
        "refit_output_error": report.residual,  # relative, on the concept's captions and contexts
        "refit_change_on_captions": report.objective,
        "trained_change_on_captions": report.naive_objective,
    }
    return dataclasses.replace(result, deltas=deltas), record


def set_unet_deltas(parameters: dict, base: dict, deltas: dict[str, torch.Tensor]) -> None:
    """Set the trained UNet tensors to ``base + deltas`` (a refit's, or the ``--init-from`` concept's), so
    that the UNet holds the concept."""
    with torch.no_grad():
        for name, delta in deltas.items():
            parameters[name].copy_(base[name] + delta.to(base[name]))


@contextmanager
def unet_holding(parameters: dict, base: dict, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """``set_unet_deltas`` while the block runs, the trained tensors restored after: a refit snapshot's
    diffusers file reads the UNet mid-run."""
    trained = {name: parameters[name].detach().clone() for name in deltas}
    set_unet_deltas(parameters, base, deltas)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in trained.items():
                parameters[name].copy_(value)


def check_prompts(tokenizer, config: FinetuneConfig) -> None:
    """Fail before the long set-up, not at the first preview or in eval, on a word the tokenizer cannot
    spell: in a preview prompt, or in a class word (eval and merge prompt with it even when every image
    has its own caption)."""
    specs = config.concept_specs()
    for prompt in config.preview_prompts:
        models.check_prompt(tokenizer, prompt, [spec.token for spec in specs])
    for spec in specs:
        try:
            models.check_prompt(tokenizer, spec.class_word)
        except CustomDiffError as error:
            raise CustomDiffError(f"the class word of {spec.images}: {error}") from None


def starting_concept(pipe, config: FinetuneConfig, tokens: list[str]) -> concept.Concept | None:
    """The concept ``--init-from`` names, or the merge of the several it names (None without it), checked
    against this run before any work.

    Raises:
        CustomDiffError: it is of another base model, holds other tokens, or deltas the mode does not train.
    """
    if not config.init_from:
        return None
    named = " ".join(str(path) for path in config.init_from)
    if len(config.init_from) == 1:
        start = concept.load_concept(config.init_from[0])
    else:
        start, _, _ = merge.merge_files(pipe, MergeConfig(config.init_from))
    concept.check_base(pipe, start, "--init-from a concept of this model")
    if start.tokens != tuple(tokens):
        raise CustomDiffError(
            f"--init-from {named} holds {' '.join(start.tokens)}, this run trains {' '.join(tokens)}; "
            "train the same tokens in the same order (--token, or --concept's order)"
        )
    if any(not MODE_PREDICATES[config.mode](name) for name in start.deltas):
        raise CustomDiffError(
            f"--init-from {named} is a {start.mode} concept, with tensors --mode {config.mode} "
            f"does not train; pass --mode {start.mode}"
        )
    if config.keep_ranks and not start.factors:
        raise CustomDiffError(
            f"--init-from {named} keeps its deltas whole, so --keep-ranks has no ranks to keep; "
            "compress it first (customdiff compress --energy 0.6)"
        )
    return start


@torch.no_grad()
def keep_ranks(parameters: dict, base: dict, ranks: dict[str, int]) -> None:
    """Put each delta named in ``ranks`` back to the nearest matrix of its rank (its truncated SVD), as
    after each step of a ``--keep-ranks`` run: training refines a compressed concept and it stays as small."""
    for name, rank in ranks.items():  # in the weights' precision: float64 is slow on most GPUs
        U, S, Vh = torch.linalg.svd(parameters[name] - base[name], full_matrices=False)
        parameters[name].copy_(base[name] + (U[:, :rank] * S[:rank]) @ Vh[:rank])


def apart_configs(config: FinetuneConfig) -> list[FinetuneConfig]:
    """A run for each concept of a joint run that starts from their merge (``--joint-start merge``): the
    concept alone, with its own images, class images and token, in OUT/apart/<token>."""
    return [
        dataclasses.replace(
            config,
            images=spec.images,
            class_word=spec.class_word,
            instance_prompt=spec.caption,
            token=spec.token,
            initializer=spec.initializer,
            class_images=spec.class_images,
            class_prompt=spec.class_prompt if spec.class_images else None,
            concept=(),
            concepts_list=None,
            init_from=(),
            out=Path(config.out) / "apart" / (re.sub(r"[^\w.-]", "", spec.token) or f"concept{number}"),
        )
        for number, spec in enumerate(config.concept_specs(), 1)
    ]


def write_concept(folder: Path, result: concept.Concept, unet) -> None:
    """Write ``concept.safetensors`` and the files diffusers loads (given the fine-tuned ``unet``)."""
    concept.save_concept(folder, result)
    export.write_diffusers(folder, result, unet)


def make_optimizer(parameters: dict, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over the trained tensors alone: the K/V (or UNet) weights at ``--lr``, the token rows at
    ``--token-lr``, each times the images a step across processes with ``--scale-lr`` (as the paper)."""
    scale = config.batch_size * config.num_processes if config.scale_lr else 1
    groups = [
        {"params": [p for name, p in parameters.items() if _is_token_row(name) == token], "lr": lr * scale}
        for token, lr in ((False, config.lr), (True, config.token_lr))
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]])


def train_apart_first(config: FinetuneConfig, pipe) -> tuple[FinetuneConfig, dict | None]:
    """With ``--joint-start merge``, train each concept alone first (``apart_configs``; one that ended is
    not trained again). Returns the config of the run to go on with (the joint one from their merge, for
    half the steps) and its checkpoint, read before any run alone so that one that cannot resume fails at
    once."""
    apart = apart_configs(config) if config.trains_apart_first else []
    if apart:
        config = dataclasses.replace(
            config, init_from=tuple(one.out for one in apart), steps=max(1, config.steps // 2)
        )
    resumed = read_checkpoint(Path(config.out) / CHECKPOINT_FILE, config)
    if apart and pipe is not None:
        pipe.to("cpu")  # the device holds one copy at a time, the one training
    for one in apart:  # a run alone that ended (its checkpoint stays) is read back, not prepared again
        ended = read_checkpoint(one.out / CHECKPOINT_FILE, one)
        if ended is None or ended["step"] < one.steps or not (one.out / concept.CONCEPT_FILE).is_file():
            train(one, copy.deepcopy(pipe) if pipe is not None else None)
    return config, resumed


def trained_concept(
    unfilled: concept.Concept,
    parameters: dict,
    base: dict,
    embeddings: list[NewTokenEmbedding],
    ranks: dict[str, int],
    steps_done: int,
) -> concept.Concept:
    """The concept as the trained tensors stand after ``steps_done`` steps (before any refit): the deltas
    against ``base``, those of ``--keep-ranks`` as their factors, and the token rows of each encoder."""
    deltas = {name: (parameters[name].detach() - value).float().cpu() for name, value in base.items()}
    factors = {name: compress.low_rank(deltas[name], rank) for name, rank in ranks.items()}
    return dataclasses.replace(
        unfilled,
        token_embeddings=torch.cat([getattr(e, NEW_ROWS).detach().float().cpu() for e in embeddings], 1),
        deltas={**deltas, **{name: up @ down for name, (up, down) in factors.items()}},
        factors=factors,
        config={**unfilled.config, "steps": steps_done},
    )


def train(
    config: FinetuneConfig,
    pipe: StableDiffusionPipeline | None = None,
    preview: Callable[[int, StableDiffusionPipeline], None] | None = None,
) -> Path:
    """Fine-tune as ``config.mode`` says and write the concept (§3.1); resumes from OUT's checkpoint.

    Several concepts with ``--joint-start merge`` (the default) train each alone first (``apart_configs``),
    then jointly from their merge for half the steps: from the base weights the shared K/V kept one concept
    and lost the other (README, "Joint training from a merge").

    Args:
        pipe: the base pipeline (default: ``models.load_pipeline(config.model, …)``); it is fine-tuned in
            place and holds the concept afterwards (runs of single concepts first get copies of it).
        preview: called as ``preview(step, pipe)`` every ``config.preview_every`` steps, the pipe holding
            the concept as a run of that many steps ends, refit too (default: a grid of three target
            captions and a class prompt in OUT/previews).
    Returns:
        the path of the written ``concept.safetensors``.
    """
    config, resumed = train_apart_first(config, pipe)
    out = files.prepare_output_dir(config.out)
    pipe = pipe or models.load_pipeline(config.model, model_config=config.model_config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    config = dataclasses.replace(config, num_processes=accelerator.num_processes)  # as run, however launched
    set_seed(config.seed)
    pipe.to(accelerator.device)
    base_hash = models.model_hash(pipe)  # before the new tokens change the text encoder
    specs = config.concept_specs()
    tokens = [spec.token for spec in specs]
    check_prompts(pipe.tokenizer, config)
    start = starting_concept(pipe, config, tokens)
    with accelerator.main_process_first():  # one process fills the regularization cache, the rest read it
        captions, targets, regs = prepare_data(config, pipe)
    prompts = list(config.preview_prompts) or preview_prompts(captions, tokens)
    preview = preview or partial(write_preview, prompts=prompts, folder=out / "previews", seed=config.seed)
    unet, encoders = pipe.unet, text.text_encoders(pipe)
    encoder_models = [encoder.model for encoder in encoders]
    initializers = [
        spec.initializer or models.default_initializer(pipe.tokenizer, spec.token) for spec in specs
    ]
    for encoder in encoders:
        add_modifier_tokens(encoder.tokenizer, encoder.model, tokens, initializers)
    unfilled = concept.Concept(  # the trained tensors are filled in as a run of some steps ends
        base_hash=base_hash,
        mode=config.mode,
        tokens=tuple(tokens),
        class_words=tuple(spec.class_word for spec in specs),
        initializers=tuple(initializers),
        token_embeddings=torch.zeros(0),
        deltas={},
        captions=tuple(dict.fromkeys(caption for group in captions for caption in group)),
        config=json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        embedding_widths=text.embedding_widths(encoders),
    )
    for module in [pipe.vae, unet, *encoder_models]:
        module.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = data.resolution(pipe)
    text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reads, switch = RegionalReads(), regions.switch_timestep(scheduler.config.num_train_timesteps)
    if config.regional_views:  # a caption BREAK splits badly fails now, not mid-run
        for pool in targets:
            for caption in set(pool.captions):
                regions.split_prompt(caption, True)
    with ExitStack() as stack:
        embeddings = [stack.enter_context(new_token_rows(e.model, len(tokens))) for e in encoders]
        stack.enter_context(gradient_checkpointing(unet, config.gradient_checkpointing))
        parameters = trainable_parameters(unet, encoders, config.mode)
        base = {name: p.detach().clone() for name, p in parameters.items() if name.startswith("unet.")}
        stack.enter_context(start_detached(unet, reads, base))
        ranks = {name: up.shape[1] for name, (up, _) in start.factors.items()} if config.keep_ranks else {}
        if start is not None:  # a resumed run's checkpoint overwrites this below
            set_unet_deltas(parameters, base, start.deltas)
            with torch.no_grad():
                for embedding, rows in zip(embeddings, start.token_rows(), strict=True):
                    getattr(embedding, NEW_ROWS).copy_(rows)
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        optimizer = make_optimizer(parameters, config)
        step = restore_checkpoint(resumed, parameters, optimizer)
        unet_step, optimizer = prepare_unet(accelerator, unet, optimizer)
        first_new_ids = [embedding.first for embedding in embeddings]
        bar = tqdm(
            total=config.steps,
            initial=step,
            desc="finetune",
            dynamic_ncols=True,
            disable=None if accelerator.is_main_process else True,
        )
        trained = partial(trained_concept, unfilled, parameters, base, embeddings, ranks)

        @lru_cache(maxsize=1)
        def refit_at(steps_done: int) -> tuple[concept.Concept, dict]:
            """``refit`` of the concept after ``steps_done`` steps, solved once however many ask (a
            snapshot, a preview and the end can fall on one step)."""
            return refit(pipe, trained(steps_done), config)

        @contextmanager
        def as_ended(steps_done: int) -> Iterator[concept.Concept]:
            """The concept as a run of ``steps_done`` steps ends, refit too when asked, the UNet holding it
            meanwhile: what a snapshot saves and a preview draws."""
            if not config.refit_weight:
                yield trained(steps_done)
                return
            result, _ = refit_at(steps_done)
            with unet_holding(parameters, base, result.deltas):
                yield result

        losses, started = [], time.perf_counter()  # seconds in the log count the loop alone
        while step < config.steps:
            # batches, noise and timesteps from (seed, process, step): a resumed run draws what an
            # uninterrupted one would, and each process of a multi-process run draws its own
            generator = torch.Generator().manual_seed(hash((config.seed, accelerator.process_index, step)))
            latents, masks, batch_captions = sample_batch(
                targets, regs, config.batch_size, generator, config.prior_loss_weight
            )
            with accelerator.autocast():
                states, pooled = data.encode_captions(encoders, batch_captions, first_new_ids, text_cache)
                regional = None
                if config.regional_views:
                    states, regional = regional_states(
                        encoders, batch_captions, states, first_new_ids, text_cache, tokens
                    )

                def at_timesteps(timesteps: torch.Tensor, regional=regional) -> None:
                    by_region = (regional.counts > 0) & (timesteps < switch) if regional else None
                    reads.batch = dataclasses.replace(regional, by_region=by_region) if regional else None

                added = text.added_conditions(unet.config, pooled, size)
                loss = diffusion_loss(
                    unet_step, scheduler, latents, masks, states, added, generator, at_timesteps,
                    config.snr_gamma,
                )  # fmt: skip
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                average_token_gradients(accelerator, parameters)
            accelerator.clip_grad_norm_(list(parameters.values()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            keep_ranks(parameters, base, ranks)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-LOG_EVERY:]):.4f}")
            if not accelerator.is_main_process:
                continue
            if step % LOG_EVERY == 0:
                seconds = round(time.perf_counter() - started, 3)
                append_log(
                    out / "log.jsonl",
                    {"step": step, "loss": np.mean(losses[-LOG_EVERY:]), "seconds": seconds},
                )
            if step % config.checkpoint_every == 0 or step == config.steps:  # a finished run goes on too
                save_checkpoint(out / CHECKPOINT_FILE, step, parameters, optimizer, config)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                with as_ended(step) as snapshot:
                    write_concept(out / f"step-{step}", snapshot, unet)
            if config.preview_every and step % config.preview_every == 0:
                with as_ended(step):
                    preview(step, pipe)
        bar.close()
        if config.refit_weight:
            result, record = refit_at(config.steps)
            set_unet_deltas(parameters, base, result.deltas)
            if accelerator.is_main_process:
                append_log(out / "log.jsonl", record)
        else:
            result = trained(config.steps)
    for module in [unet, *encoder_models]:
        module.requires_grad_(False).eval()
    path = out / concept.CONCEPT_FILE
    if accelerator.is_main_process:
        save_config(config, out)
        write_concept(out, result, unet)
    accelerator.wait_for_everyone()
    return path
