"""Regional prompting: each object of a scene drawn in its own region from a prompt of its own.

Why: a base model binds colours and looks poorly across two objects, so in `a <new1> star and a <new2>
ring` each concept bleeds into the other and neither comes out whole (docs/findings.md, "Regional
prompts"). As in AUTOMATIC1111's Regional Prompter (columns or rows with a common prompt), the first share
of the steps reads the whole prompt, which lays out the scene; after that, the cross-attention of each
region of pixels reads only its own prompt. Only cross-attention changes; self-attention still ties the
regions (masking it by column too was no better: docs/findings.md).

A concept acts only where its tokens are named, as the Regional Prompter's LoRA in regions: a prompt
block that names none of them is read with the base model's cross-attention weights, so that the world
object beside a concept is drawn as the base model draws it, and with a merged concept a block naming only
one of its parts is read with that part's own weights, as it was trained.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from customdiff import toyworld
from customdiff.concept import plus_delta
from customdiff.errors import CustomDiffError

if TYPE_CHECKING:
    from customdiff.concept import AppliedConcept, Concept

BREAK = " BREAK "  # between the whole prompt and each region's
WHOLE_PROMPT_SHARE = 0.5  # of the sampling steps, before the regions take over (findings: 0.4–0.6 best)


@dataclass(frozen=True)
class Layout:
    """How the image divides among a prompt's regions: in columns left to right, or in rows top to bottom,
    each taking its share of the width or height (the Regional Prompter's divide ratio)."""

    shares: tuple[float, ...]
    rows: bool = False

    def region_of_pixels(self, pixels: int, width_over_height: float, device) -> torch.Tensor:
        """The region of each of an attention layer's ``pixels`` (row-major), a long tensor."""
        height = max(1, round((pixels / width_over_height) ** 0.5))
        width = pixels // height
        index = torch.arange(pixels, device=device)
        position, extent = (index // width, height) if self.rows else (index % width, width)
        shares = torch.tensor(self.shares, dtype=torch.float64, device=device)
        edges = shares.cumsum(0)[:-1] * extent  # exact for whole-number shares: no pixel lands by rounding
        return torch.searchsorted(edges, position.double() * shares.sum(), right=True)


def columns(count: int) -> Layout:
    """``count`` columns of equal width."""
    return Layout((1.0,) * count)


def parse_layout(text: str | None) -> Layout | None:
    """``--region-ratios``: shares written ``1,2`` (columns, left to right) or ``1;2`` (rows, top down);
    None where none are given (equal columns)."""
    if not text:
        return None
    rows = ";" in text
    try:
        shares = tuple(float(share) for share in text.split(";" if rows else ","))
    except ValueError:
        shares = ()
    if len(shares) < 2 or (rows and "," in text) or not all(0 < share < float("inf") for share in shares):
        raise CustomDiffError(
            f'--region-ratios "{text}": write a positive share per region, "1,2" for columns (left to right) '
            'or "1;2" for rows (top to bottom)'
        )
    return Layout(shares, rows)


@dataclass(frozen=True)
class RegionalPrompt:
    """A prompt split into the whole scene's prompt and one prompt per region, in ``layout``'s order."""

    whole: str
    regions: tuple[str, ...]
    layout: Layout

    def __post_init__(self) -> None:
        if len(self.layout.shares) != len(self.regions):
            raise CustomDiffError(
                f'--region-ratios gives {len(self.layout.shares)} regions, but "{self.whole}" has '
                f"{len(self.regions)}; give one share per region"
            )


def split_prompt(prompt: str, regions: bool, layout: Layout | None = None) -> RegionalPrompt | None:
    """The regions a prompt asks for, when ``regions`` is on: written as ``WHOLE BREAK LEFT BREAK RIGHT
    [BREAK …]``, or a two-object toy-world caption naming a concept, whose objects sit left and right in the
    order named; None for a plain prompt or with ``regions`` off (BREAK is then a word like any other).
    ``layout``: how the regions divide the image (default: equal columns)."""
    if not regions:
        return None
    parts = [part.strip() for part in prompt.split(BREAK)]
    if len(parts) == 2 or not all(parts):
        raise CustomDiffError(
            f'prompt "{prompt}" splits into {len(parts)} parts at BREAK; write "WHOLE BREAK LEFT BREAK RIGHT"'
        )
    if len(parts) > 2:
        return RegionalPrompt(parts[0], tuple(parts[1:]), layout or columns(len(parts) - 1))
    caption = toyworld.caption_or_none(prompt)
    if caption is None or len(caption.things) < 2:
        return None
    if not any(toyworld.MODIFIER_TOKEN.match(thing.color) for thing in caption.things):
        return None  # the base model draws its own two-object scenes better whole (findings)
    objects = tuple(str(toyworld.Caption(caption.background, (thing,))) for thing in caption.things)
    return RegionalPrompt(prompt, objects, layout or columns(len(objects)))


def switch_timestep(train_timesteps: int) -> int:
    """The training timestep below which a view reads its regions as sampling does: sampling switches after
    ``WHOLE_PROMPT_SHARE`` of its steps, which its schedule spaces evenly over the training timesteps."""
    return round((1 - WHOLE_PROMPT_SHARE) * train_timesteps)


@contextmanager
def _weights(module: torch.nn.Module, replacements: dict[str, torch.Tensor]):
    """``module`` with some of its parameters' values replaced (by name, as ``get_parameter`` takes it)."""
    parameters = {name: module.get_parameter(name) for name in replacements}
    current = {name: parameter.data for name, parameter in parameters.items()}
    for name, parameter in parameters.items():
        parameter.data = replacements[name]
    try:
        yield
    finally:
        for name, parameter in parameters.items():
            parameter.data = current[name]


class RegionAttention:
    """Cross-attention whose context is the whole prompt's features followed by each region's.

    Until ``by_region`` is set every pixel reads the whole prompt's block; after, the pixels of region i
    (of ``layout``) read block i + 1 alone. Wraps the layer's own processor, which does the attention
    itself. ``choice`` (prompts, blocks) says with which of ``weight_sets`` (the layer's parameters by
    name) each prompt's block is read, -1 for the layer's own; both guidance branches of a prompt read it
    alike.
    """

    def __init__(
        self,
        inner,
        layout: Layout,
        width_over_height: float,
        weight_sets: tuple[dict[str, torch.Tensor], ...] = (),
        choice: torch.Tensor | None = None,
    ):
        self.inner = inner
        self.layout = layout
        self.width_over_height = width_over_height
        self.weight_sets = weight_sets
        self.choice = choice
        self.by_region = False

    def _read(self, attn, hidden_states, block: torch.Tensor, index: int, attention_mask, **kwargs):
        """The attention output of every pixel reading block ``index``, each prompt with its weights."""
        if self.choice is None or (self.choice[:, index] < 0).all():
            return self.inner(attn, hidden_states, block, attention_mask, **kwargs)
        choice = self.choice[:, index].repeat(len(hidden_states) // len(self.choice))  # guidance branches
        output = None
        for chosen in choice.unique().tolist():
            if chosen < 0:
                read = self.inner(attn, hidden_states, block, attention_mask, **kwargs)
            else:
                with _weights(attn, self.weight_sets[chosen]):
                    read = self.inner(attn, hidden_states, block, attention_mask, **kwargs)
            mine = (choice == chosen).to(read.device).view(-1, 1, 1)
            output = read if output is None else torch.where(mine, read, output)
        return output

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        blocks = encoder_hidden_states.chunk(len(self.layout.shares) + 1, dim=1)
        if not self.by_region:
            return self._read(attn, hidden_states, blocks[0], 0, attention_mask, **kwargs)
        region = self.layout.region_of_pixels(
            hidden_states.shape[1], self.width_over_height, hidden_states.device
        )
        return by_region(
            hidden_states,
            region,
            lambda index, pixels: self._read(
                attn, pixels, blocks[1 + index], 1 + index, attention_mask, **kwargs
            ),
        )


def by_region(hidden_states: torch.Tensor, region: torch.Tensor, read) -> torch.Tensor:
    """Each pixel's attention output from its own region alone: ``read(index, pixels)`` attends ``pixels``
    (batch, n, channels), those of region ``index``, to that region's block. Only a region's own queries
    are computed, and the result is assembled out of place, so gradients flow through it."""
    output = None
    for index in region.unique().tolist():
        mine = (region == index).nonzero().squeeze(1)
        read_here = read(index, hidden_states[:, mine])
        if output is None:
            output = read_here.new_zeros(*hidden_states.shape[:2], read_here.shape[-1])
        output = output.index_copy(1, mine, read_here)
    return output


def names_token(tokenizer, block: str, tokens) -> bool:
    """Whether the prompt ``block`` names any of ``tokens`` (as the tokenizer splits it, not as text)."""
    ids = set(tokenizer(block).input_ids)
    return any(tokenizer.convert_tokens_to_ids(token) in ids for token in tokens)


def _weight_choice(tokenizer, block: str, concept: Concept) -> int:
    """Which weights read a prompt block (``weight_sets``' order): -1 those applied, 0 the base model's
    for a block naming none of the concept's tokens, 1 + i part i's for one naming only part i's."""
    if not names_token(tokenizer, block, concept.tokens):
        return 0
    named = [names_token(tokenizer, block, part.tokens) for part in concept.parts]
    return 1 + named.index(True) if sum(named) == 1 else -1


def _weight_set(unet, applied: AppliedConcept, choice: int, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` that the concept replaced, as ``choice`` reads them (0: as in the base
    model, 1 + i: with part i's deltas at the applied scale), named relative to ``prefix``."""
    deltas = applied.concept.parts[choice - 1].deltas if choice else {}
    weights = {}
    for name, original in applied.originals.items():
        if name.startswith(prefix):
            weight = original.to(unet.get_parameter(name.removeprefix("unet.")))
            if name in deltas:
                weight = plus_delta(weight, deltas[name] * applied.scale)
            weights[name.removeprefix(prefix)] = weight
    return weights


def _weight_sets(unet, applied: AppliedConcept, layer: str) -> tuple[dict[str, torch.Tensor], ...]:
    """The weights of cross-attention ``layer`` (``….attn2``) that the concept replaced: as they were in
    the base model, then with each of its parts' deltas."""
    return tuple(
        _weight_set(unet, applied, choice, f"unet.{layer}.")
        for choice in range(len(applied.concept.parts) + 1)
    )


def part_named(tokenizer, prompt: str, concept: AppliedConcept | None) -> int:
    """For a prompt drawn whole: 1 + i when it names only part i's tokens of a merged ``concept``, so that
    it is drawn as that concept's own run draws it (``drawn_with``); else -1, the applied weights."""
    if concept is None or not concept.concept.parts:
        return -1
    choice = _weight_choice(tokenizer, prompt, concept.concept)
    return choice if choice > 0 else -1


@contextmanager
def drawn_with(unet, applied: AppliedConcept | None, choice: int):
    """``unet`` with the weights ``choice`` picks (``part_named``) in place of the applied ones."""
    if choice < 0:
        yield
        return
    with _weights(unet, _weight_set(unet, applied, choice)):
        yield


def sample_regional(
    pipe,
    regional: list[RegionalPrompt],
    negatives: list[str],
    generators,
    concept: AppliedConcept | None = None,
    **call,
):
    """Run ``pipe`` on prompts that share a layout, their cross-attention split by region.

    ``concept``: the concept applied to ``pipe``; prompt blocks that name none of its tokens are read with
    the cross-attention weights it replaced, and for a merged concept those that name only one part's
    tokens with that part's own deltas (``concept.Part``). ``call`` holds the pipeline's other arguments
    (steps, guidance, size, output type).
    """
    layout = regional[0].layout
    steps = call["num_inference_steps"]
    switch = round(WHOLE_PROMPT_SHARE * steps)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width_over_height = call.get("width", size) / call.get("height", size)
    device = pipe.unet.device
    blocks = [[prompt.whole, *prompt.regions] for prompt in regional]
    encoded = [  # the negative prompts once, with the whole prompts: every block shares them
        pipe.encode_prompt(
            prompt=[block[i] for block in blocks],
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=i == 0,
            negative_prompt=negatives,
        )
        for i in range(len(layout.shares) + 1)
    ]
    embeds = {
        "prompt_embeds": torch.cat([e[0] for e in encoded], dim=1),
        "negative_prompt_embeds": torch.cat([encoded[0][1]] * len(encoded), dim=1),
    }
    if len(encoded[0]) == 4:  # SDXL: the pooled features come from the whole prompt
        embeds["pooled_prompt_embeds"] = encoded[0][2]
        embeds["negative_pooled_prompt_embeds"] = encoded[0][3]
    choice = None
    if concept is not None:
        choice = torch.tensor(
            [[_weight_choice(pipe.tokenizer, b, concept.concept) for b in row] for row in blocks]
        )
    gated = choice is not None and bool((choice >= 0).any())  # else every block reads the applied weights
    originals = pipe.unet.attn_processors
    wrapped = {
        name: RegionAttention(
            processor,
            layout,
            width_over_height,
            _weight_sets(pipe.unet, concept, name.removesuffix(".processor")) if gated else (),
            choice,
        )
        if ".attn2." in name
        else processor
        for name, processor in originals.items()
    }
    split = [processor for processor in wrapped.values() if isinstance(processor, RegionAttention)]

    def switch_at(pipeline, step, timestep, callback_kwargs):
        for processor in split:
            processor.by_region = step + 1 >= switch
        return callback_kwargs

    switch_at(pipe, -1, None, {})
    pipe.unet.set_attn_processor(wrapped)
    try:
        return pipe(**embeds, generator=generators, callback_on_step_end=switch_at, **call)
    finally:
        pipe.unet.set_attn_processor(originals)
