"""The concept file: what fine-tuning changed, as deltas on a named base model (Kumari et al. 2023, §3.1).

``concept.safetensors`` holds, for each UNet tensor the mode trained, its change from the base (for the
paper's ``crossattn_kv`` mode the cross-attention ``W_k``/``W_v`` deltas, ~3% of the UNet, which §3.2 merges
and §4 compresses), the modifier tokens' embedding rows, and as string metadata the base model's hash,
the mode, tokens, class words, initializers, training captions and the run's config. The files other
tools load are written from it by ``export.py``.

``apply_concept`` adds a concept to any diffusers Stable Diffusion pipeline in place (tokens, rows,
deltas); ``remove_concept`` takes it off again exactly (the replaced weights restored, the tokens gone).
Apply one concept file at a time: after it, the pipeline is no longer the base that another concept's
hash names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from customdiff import files, models, text
from customdiff.errors import CustomDiffError

CONCEPT_FILE = "concept.safetensors"
FORMAT = "customdiff-concept-1"
TOKEN_EMBEDDINGS = "token_embeddings"
UP, DOWN = ".up", ".down"  # suffixes of a low-rank delta's factors in the file


def check_base(pipe, concept: Concept, alternative: str = "") -> None:
    """Raise a CustomDiffError naming the fix unless ``pipe`` is the base model ``concept`` was trained on
    (``alternative``: another fix to offer)."""
    actual = models.model_hash(pipe)
    if actual != concept.base_hash:
        raise CustomDiffError(
            f"{CONCEPT_FILE} was trained on base {concept.base_hash}, not on this model ({actual}); "
            f"pass --model the base model it was trained on{f', or {alternative}' if alternative else ''}"
        )


def reads_text(name: str) -> bool:
    """Whether a UNet tensor (``unet.…``) is a cross-attention key or value projection, which reads the
    text features alone: what ``crossattn_kv`` trains and ``compress`` fits to those features' outputs."""
    return re.search(r"\.attn2\.to_[kv]\.", name) is not None


PARTS = "parts."  # prefix of a merged concept's parts' deltas in the file: "parts.<i>.unet.<parameter>"


@dataclass(frozen=True)
class Part:
    """One of the concepts a merged concept was made from: its tokens and its own deltas (restricted to the
    merged ones; ``factors`` as ``Concept``'s). A prompt, or a regional prompt's column, that names only
    these tokens is drawn with these deltas instead of the merged ones (``regions.py``)."""

    tokens: tuple[str, ...]
    deltas: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Concept:
    """A fine-tuned concept relative to its base model.

    token_embeddings: (tokens, Σ embedding_widths), one row per modifier token: its rows in each text
    encoder side by side (SD: one encoder; SDXL: 768 + 1280, see ``text.py``). deltas: "unet.<parameter>"
    → fine-tuned minus base value, for each UNet tensor the mode trained. factors: for deltas kept in low rank
    (``compress.py``), name → (up (out, r), down (r, in)) with ``deltas[name] == up @ down``; the file
    then stores the factors alone. captions: the distinct training captions, which ``merge.py`` holds the
    merged weights to. parts: for a merged concept, the concepts it was merged from.
    """

    base_hash: str
    mode: str
    tokens: tuple[str, ...]
    class_words: tuple[str, ...]
    initializers: tuple[str, ...]
    token_embeddings: torch.Tensor
    deltas: dict[str, torch.Tensor]
    captions: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    embedding_widths: tuple[int, ...] = ()  # empty: one text encoder, as wide as the rows
    parts: tuple[Part, ...] = ()

    def token_rows(self) -> tuple[torch.Tensor, ...]:
        """The token embeddings split per text encoder: (tokens, width) each."""
        widths = self.embedding_widths or (self.token_embeddings.shape[1],)
        return self.token_embeddings.split(list(widths), dim=1)


def save_concept(out_dir: Path, concept: Concept) -> Path:
    """Write ``concept.safetensors`` into ``out_dir`` atomically; returns its path.

    The files other tools load (diffusers, AUTOMATIC1111, ComfyUI) are written by ``export.py``.
    """
    out_dir = files.prepare_output_dir(out_dir)
    tensors = {TOKEN_EMBEDDINGS: concept.token_embeddings, **_delta_tensors(concept.deltas, concept.factors)}
    for index, part in enumerate(concept.parts):
        tensors.update(_delta_tensors(part.deltas, part.factors, f"{PARTS}{index}."))
    metadata = {
        "format": FORMAT,
        "base_model_hash": concept.base_hash,
        "mode": concept.mode,
        "tokens": json.dumps(concept.tokens),
        "class_words": json.dumps(concept.class_words),
        "initializers": json.dumps(concept.initializers),
        "embedding_widths": json.dumps(concept.embedding_widths),
        "captions": json.dumps(concept.captions),
        "config": json.dumps(concept.config),
        "part_tokens": json.dumps([part.tokens for part in concept.parts]),
    }
    save_tensors(out_dir / CONCEPT_FILE, tensors, metadata)
    return out_dir / CONCEPT_FILE


def _delta_tensors(deltas: dict, factors: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The file's tensors for some deltas: each under its name, or its two factors if it has them."""
    tensors = {}
    for name, delta in deltas.items():
        if name in factors:
            tensors[f"{prefix}{name}{UP}"], tensors[f"{prefix}{name}{DOWN}"] = factors[name]
        else:
            tensors[prefix + name] = delta
    return tensors


def _read_deltas(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Deltas and factors from the file's tensors of one set of deltas (``_delta_tensors``'s inverse)."""
    factors = {
        name.removesuffix(UP): (tensors.pop(name), tensors.pop(name.removesuffix(UP) + DOWN))
        for name in [name for name in tensors if name.endswith(UP)]
    }
    return {**tensors, **{name: up.float() @ down.float() for name, (up, down) in factors.items()}}, factors


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written atomically, tensors moved to the CPU and made contiguous."""
    with files.atomic_path(path) as temporary:
        save_file(
            {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
            temporary,
            metadata,
        )


def concept_file(path: Path) -> Path:
    """The concept file a path names: the path itself, or the ``concept.safetensors`` in a folder."""
    path = Path(path)
    return path / CONCEPT_FILE if path.is_dir() else path


def load_concept(path: Path) -> Concept:
    """Read a concept file (or the ``concept.safetensors`` in a folder).

    Raises:
        CustomDiffError: the file is missing, unreadable, or not a customdiff concept.
    """
    path = concept_file(path)
    if not path.is_file():
        raise CustomDiffError(
            f"concept file {path} does not exist; pass the concept.safetensors a finetune wrote"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CustomDiffError(
            f"cannot read {path} as safetensors ({error}); pass a concept.safetensors"
        ) from error
    if metadata.get("format") != FORMAT:
        raise CustomDiffError(
            f"{path} is not a customdiff concept file; pass the concept.safetensors a finetune wrote"
        )
    token_embeddings = tensors.pop(TOKEN_EMBEDDINGS)
    parts = []
    for index, tokens in enumerate(json.loads(metadata.get("part_tokens", "[]"))):
        prefix = f"{PARTS}{index}."
        own = {
            name.removeprefix(prefix): tensors.pop(name) for name in list(tensors) if name.startswith(prefix)
        }
        parts.append(Part(tuple(tokens), *_read_deltas(own)))
    deltas, factors = _read_deltas(tensors)
    return Concept(
        base_hash=metadata["base_model_hash"],
        mode=metadata["mode"],
        tokens=tuple(json.loads(metadata["tokens"])),
        class_words=tuple(json.loads(metadata["class_words"])),
        initializers=tuple(json.loads(metadata["initializers"])),
        token_embeddings=token_embeddings,
        deltas=deltas,
        captions=tuple(json.loads(metadata.get("captions", "[]"))),
        config=json.loads(metadata["config"]),
        factors=factors,
        embedding_widths=tuple(json.loads(metadata.get("embedding_widths", "[]"))),
        parts=tuple(parts),
    )


def describe(concept: Concept, model_hash: str, model_name: str) -> list[str]:
    """Lines for ``customdiff info``: whether ``model_name`` (hash ``model_hash``) is the concept's base,
    how to prompt it, what its deltas are and what made it (a file name says none of this)."""
    if model_hash == concept.base_hash:
        base = f"base {concept.base_hash}, {model_name}'s"
    else:
        base = f"base {concept.base_hash}, not {model_name}'s ({model_hash}): pass --model its base model"
    lines = [f"{concept.mode} concept of {base}"]
    for token, word, start in zip(concept.tokens, concept.class_words, concept.initializers, strict=True):
        caption = next((caption for caption in concept.captions if token in caption), None)
        example = f', e.g. "{caption}"' if caption else ""
        started = f" (its row started from {start})" if start else ""  # an imported row's start is unknown
        lines.append(f"prompt {token} {word}{started}{example}")
    values = sum(delta.numel() for delta in concept.deltas.values())
    if not concept.deltas:
        lines.append("no UNet deltas: the token rows alone")
    elif concept.factors:
        ranks = sorted(up.shape[1] for up, _ in concept.factors.values())
        stored = _values_stored(concept.deltas, concept.factors)
        lines.append(
            f"{len(concept.deltas)} UNet deltas of {values:,} values, {len(concept.factors)} kept as SVD "
            f"factors of rank {ranks[0]}–{ranks[-1]} ({stored:,} values stored)"
        )
    else:
        lines.append(f"{len(concept.deltas)} UNet deltas of {values:,} values")
    if "merged_from" in concept.config:
        lines.append(f"merged from {len(concept.config['merged_from'])} concepts")
    elif "imported_from" in concept.config:
        lines.append(f"imported from {concept.config['imported_from']}")
    elif "steps" in concept.config:
        config = concept.config
        sources = [config.get("images"), config.get("concepts_list"), *config.get("concept", [])]
        shown = ", ".join(str(source) for source in sources if source)
        lines.append(f"trained {config['steps']} steps on {shown}, {len(concept.captions)} captions")
    if concept.parts:
        stored = sum(_values_stored(part.deltas, part.factors) for part in concept.parts)
        parts = f"{len(concept.parts)} parts ({stored:,} values stored)"
        lines.append(f"keeps the deltas of its {parts}, for prompts naming one of them")
    return lines


def _values_stored(deltas: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, ...]]) -> int:
    """How many numbers the file holds for ``deltas``: a factored one's factors, any other whole."""
    return sum(
        sum(factor.numel() for factor in factors[name]) if name in factors else delta.numel()
        for name, delta in deltas.items()
    )


@dataclass(frozen=True)
class AppliedConcept:
    """A concept as ``apply_concept`` put it on a pipeline, with the UNet weights it replaced and the scale
    of its deltas."""

    concept: Concept
    originals: dict[str, torch.Tensor]
    scale: float = 1.0


def apply_concept(pipe, concept: Concept | Path | str, scale: float = 1.0) -> AppliedConcept:
    """Add a concept to a diffusers Stable Diffusion pipeline, in place.

    The modifier tokens go into the tokenizers and their rows into the text encoders (through diffusers'
    ``load_textual_inversion``, as its own file would), and each delta, times ``scale``, is added to its
    UNet weight. The replaced weights are kept (for ``crossattn_kv`` ~3% of the UNet) so that
    ``remove_concept`` is exact.

    Args:
        concept: a Concept, a concept file, or a folder holding ``concept.safetensors``.
        scale: the deltas' strength, as a LoRA's weight in AUTOMATIC1111 or ComfyUI (1: as trained); the
            token rows stay as trained.
    Raises:
        CustomDiffError: the pipeline is not the base the concept was trained on, or already has one of
            its tokens.
    """
    concept = concept if isinstance(concept, Concept) else load_concept(concept)
    taken = [token for token in concept.tokens if token in pipe.tokenizer.get_vocab()]
    if taken:
        raise CustomDiffError(f"the pipeline already has the token {taken[0]}; apply each concept once")
    check_base(pipe, concept)
    text.load_tokens(pipe, list(concept.tokens), concept.token_embeddings)
    originals = {}
    with torch.no_grad():
        for name, delta in concept.deltas.items():
            parameter = pipe.unet.get_parameter(name.removeprefix("unet."))
            originals[name] = parameter.detach().clone()
            parameter.copy_(plus_delta(parameter, delta * scale))
    return AppliedConcept(concept, originals, scale)


def plus_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A base weight with a concept's delta added, summed in float32 and kept in the weight's dtype."""
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def remove_concept(pipe, applied: AppliedConcept) -> None:
    """Take a concept off a pipeline exactly: the UNet weights it replaced come back, its tokens go.

    The tokens and their rows are removed with diffusers' ``unload_textual_inversion``.
    """
    with torch.no_grad():
        for name, original in applied.originals.items():
            pipe.unet.get_parameter(name.removeprefix("unet.")).copy_(original)
    text.unload_tokens(pipe, list(applied.concept.tokens))
