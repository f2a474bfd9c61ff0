"""The text side of a Stable Diffusion pipeline: the features the UNet's cross-attention reads.

SD 1.x/2.x have one tokenizer and text encoder, whose last hidden states the UNet reads. SDXL has two (CLIP
ViT-L and OpenCLIP bigG): its UNet reads both encoders' penultimate hidden states side by side and, through
its "text_time" embedding, the second encoder's pooled output and the image size. A modifier token goes into
every tokenizer with its own embedding row in each encoder; a concept keeps a token's rows side by side
(SDXL: 768 + 1280 wide), in the order of ``text_encoders``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextEncoder:
    """One tokenizer and its encoder; ``name`` is the pipeline attribute, which prefixes its parameters."""

    name: str
    tokenizer: object
    model: torch.nn.Module


def text_encoders(pipe) -> list[TextEncoder]:
    """The pipeline's tokenizer / encoder pairs in the order the UNet reads their features."""
    pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    return [
        TextEncoder(name, getattr(pipe, tokenizer), getattr(pipe, name))
        for name, tokenizer in pairs
        if getattr(pipe, name, None) is not None
    ]


def embedding_widths(encoders: list[TextEncoder]) -> tuple[int, ...]:
    """The width of each encoder's token embedding: how a concept's token rows split between them."""
    return tuple(encoder.model.config.hidden_size for encoder in encoders)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, tokenizer.model_max_length) token ids, padded as Stable Diffusion pads."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode(encoders: list[TextEncoder], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention features (B, tokens, d) and pooled features (B, p) of token ids (one tensor for each
    encoder).

    As diffusers' pipelines encode prompts: one encoder gives its last hidden states; two (SDXL) give their
    penultimate ones side by side, and the pooled output of the one with a projection (the second).
    """
    if len(encoders) == 1:
        output = encoders[0].model(ids[0].to(encoders[0].model.device))
        return output[0], output[1]
    states, pooled = [], None
    for encoder, encoder_ids in zip(encoders, ids, strict=True):
        output = encoder.model(encoder_ids.to(encoder.model.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0] if output[0].ndim == 2 else pooled
    return torch.cat(states, dim=-1), pooled


def added_conditions(unet_config, pooled: torch.Tensor, size: int) -> dict | None:
    """The extra UNet inputs of an SDXL UNet ("text_time"): pooled text and the size of an uncropped
    ``size``² image (original size, crop corner, target size); None for other UNets."""
    if unet_config.addition_embed_type != "text_time":
        return None
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": time_ids.expand(len(pooled), -1)}


def load_tokens(pipe, tokens: list[str], embeddings: torch.Tensor) -> None:
    """Add tokens to every tokenizer with their rows (tokens, Σ widths) split across the encoders, through
    diffusers' ``load_textual_inversion``."""
    encoders = text_encoders(pipe)
    parts = embeddings.split(list(embedding_widths(encoders)), dim=1)
    for encoder, part in zip(encoders, parts, strict=True):
        pipe.load_textual_inversion(
            part.to(encoder.model.device, encoder.model.dtype),
            token=tokens,
            tokenizer=encoder.tokenizer,
            text_encoder=encoder.model,
        )


def unload_tokens(pipe, tokens: list[str]) -> None:
    """Take tokens added by ``load_tokens`` out of every tokenizer and encoder again."""
    for encoder in text_encoders(pipe):
        pipe.unload_textual_inversion(tokens, tokenizer=encoder.tokenizer, text_encoder=encoder.model)
