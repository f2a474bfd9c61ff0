"""Closed-form merging of separately fine-tuned concepts (Kumari et al. 2023, §3.2, Eq. 4).

Every cross-attention key/value projection W (out, d) reads only text features, so two concepts can
share one W if it maps each concept's caption features C (s, d) to what that concept's own fine-tuned
weights make of them, V = C W_nᵀ, while changing the outputs of ordinary captions, C_reg (r, d), as
little as possible:

    W = argmin ‖C_reg Wᵀ − C_reg W₀ᵀ‖²_F   subject to   C Wᵀ = V.

With M = C_regᵀ C_reg, the Lagrangian gives Wᵀ = W₀ᵀ + M⁻¹Cᵀ X where (C M⁻¹Cᵀ) X = V − C W₀ᵀ; M gets a
small ridge, so that directions no ordinary caption reaches are not free to change. M is factored once
by Cholesky and the small (s, s) dual system is solved by least squares in float64, which copes with
near-duplicate caption rows; no matrix is inverted. Both factorizations are shared by every
layer, since all layers read the same text features.

The constraint rows of a caption are its positions from the concept's modifier token to the end of text:
under the text encoder's causal mask the positions before the token are the same as in an ordinary
caption, where the objective keeps the base weights (two concepts pinning those rows would contradict
each other).

That is the paper's merge (``method="constrained"``). The UNet also reads the padding after the end of
text, which under the causal mask carries the whole caption: on the toy model 70% of a concept's output
change lies there, which the constraints leave to the objective, so the merged K/V reproduced a concept's
outputs on new prompts no better than adding the deltas did. The default (``method="weighted"``) fits
every position the UNet reads, in least squares against the regularization captions:

    W = argmin Σ_n ‖F_n (W − W_n)ᵀ‖²_F + λ ‖C_reg (W − W₀)ᵀ‖²_F,   so   ΔWᵀ = Σ_n A⁻¹ G_n ΔW_nᵀ,

with F_n every position of concept n's padded captions, G_n = F_nᵀ F_n and A = Σ_n G_n + λ M (one
Cholesky factorization for all layers); λ makes the regularization captions weigh ``reg_weight`` of the
concepts' captions in total energy. Pinning the padding as hard constraints instead leaves more rows
than feature dimensions, and the ordinary captions' outputs then change with 5.6× the energy the concepts'
own deltas give them.

A concept's few training captions do not span the prompts it is used in: fitted on them alone, the merged
K/V missed a toy concept's own outputs on new-context prompts by 0.42 of its change, where they missed its
training captions by 0.19 — about as much with no second concept to share the weights with (0.39). So F_n
also holds the concept in the regularization captions' contexts (``context_captions``: each ordinary
caption naming its class word, with its token in), weighted to ``context_share`` of its rows' energy.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from customdiff import data, files, generate, models, text, toyworld
from customdiff.concept import Concept, Part, concept_file, load_concept, save_concept
from customdiff.config import MergeConfig, save_config
from customdiff.errors import CustomDiffError

MERGEABLE_MODES = ("crossattn_kv", "token")
RIDGE = 1e-2  # of the mean diagonal of C_regᵀC_reg
REG_WEIGHT = MergeConfig.reg_weight
CONTEXT_SHARE = MergeConfig.context_share
NUM_REG_CAPTIONS = MergeConfig.num_reg_captions


@dataclass(frozen=True)
class MergeReport:
    """How well a merge holds: residuals of the concepts' outputs on their captions (constrained: largest
    |C Wᵀ − V| over the largest |V|; weighted: ‖F_n (W − W_n)ᵀ‖_F over ‖F_n ΔW_nᵀ‖_F, the worst layer and
    concept) and the objective Σ‖C_reg ΔWᵀ‖²_F, for the merge and for naive addition of the deltas."""

    residual: float
    naive_residual: float
    objective: float
    naive_objective: float


def check_mergeable(concepts: list[Concept], names: list[str]) -> None:
    """Raise CustomDiffError unless the concepts share a base model, have distinct tokens and K/V modes."""
    for concept, name in zip(concepts, names, strict=True):
        if concept.mode not in MERGEABLE_MODES:
            raise CustomDiffError(
                f"{name} was trained with --mode {concept.mode}; merge takes crossattn_kv or token concepts"
            )
        if concept.base_hash != concepts[0].base_hash:
            raise CustomDiffError(
                f"{name} was trained on base {concept.base_hash}, {names[0]} on {concepts[0].base_hash}; "
                "merge concepts of one base model"
            )
    seen: dict[str, str] = {}
    for concept, name in zip(concepts, names, strict=True):
        for token in concept.tokens:
            if token in seen:
                raise CustomDiffError(
                    f"{name} and {seen[token]} both use the token {token}; pass --rename-tokens to give the "
                    "later one a free <newN>, or retrain one with another --token"
                )
            seen[token] = name


def rename_tokens(concept: Concept, renames: dict[str, str]) -> Concept:
    """The same concept prompted by other tokens: a token's embedding row and the K/V deltas do not depend on
    its name, so only the token list and the captions change."""
    captions = []
    for caption in concept.captions:
        for old, new in renames.items():  # tokens are "<…>", so one never matches inside another
            caption = caption.replace(old, new)
        captions.append(caption)
    tokens = tuple(renames.get(token, token) for token in concept.tokens)
    parts = tuple(
        dataclasses.replace(part, tokens=tuple(renames.get(token, token) for token in part.tokens))
        for part in concept.parts
    )
    return dataclasses.replace(concept, tokens=tokens, captions=tuple(captions), parts=parts)


def free_clashing_tokens(concepts: list[Concept]) -> tuple[list[Concept], list[dict[str, str]]]:
    """Each token an earlier concept already uses renamed to the first ``<newN>`` no concept uses: the
    concepts and, per concept, its renames."""
    used = {token for concept in concepts for token in concept.tokens}
    free = (f"<new{n}>" for n in itertools.count(1) if f"<new{n}>" not in used)
    seen: set[str] = set()
    renamed, renames = [], []
    for concept in concepts:
        own = {token: next(free) for token in concept.tokens if token in seen}
        seen.update(own.get(token, token) for token in concept.tokens)
        renamed.append(rename_tokens(concept, own) if own else concept)
        renames.append(own)
    return renamed, renames


def regularization_captions(tokenizer, n: int, seed: int = 0) -> list[str]:
    """~1000 ordinary captions whose outputs the merge keeps: toy-world captions for the toy tokenizer,
    else the caption list shipped with customdiff."""
    if not models.spells_any_word(tokenizer):
        rng = np.random.default_rng(seed)
        return [str(toyworld.sample_caption(rng)) for _ in range(n)]
    shipped = resources.files("customdiff").joinpath("reg_captions.txt").read_text().splitlines()
    return shipped[:n]


def context_captions(captions: list[str], token: str, class_word: str) -> list[str]:
    """The ``captions`` that name ``class_word``, with ``token`` naming it: in a toy-grammar caption in its
    colour's place, as the world names a concept (``a small red star on …`` → ``a small <new1> star on …``),
    in any other in front of it (``a photo of a dog at the beach`` → ``a photo of a <new1> dog …``)."""
    named = []
    word = re.compile(rf"\b{re.escape(class_word)}\b")
    for caption in captions:
        parsed = toyworld.caption_or_none(caption)
        if parsed is None:
            if word.search(caption):
                named.append(word.sub(f"{token} {class_word}", caption, count=1))
            continue
        things = list(parsed.things)
        for index, thing in enumerate(things):
            if thing.shape == class_word and not thing.is_concept:
                things[index] = dataclasses.replace(thing, color=token)
                named.append(str(dataclasses.replace(parsed, things=tuple(things))))
                break
    return list(dict.fromkeys(named))


@torch.no_grad()
def text_features(pipe, captions: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, tokens) of the first tokenizer and the features the UNet reads (N, tokens, d) in float64
    (SDXL: both encoders' side by side, whose tokenizers put each word at the same position)."""
    encoders = text.text_encoders(pipe)
    ids = [text.tokenize(encoder.tokenizer, captions) for encoder in encoders]
    chunks = zip(*(encoder_ids.split(batch_size) for encoder_ids in ids), strict=True)
    features = [text.encode(encoders, list(chunk))[0].double().cpu() for chunk in chunks]
    return ids[0], torch.cat(features)


def constraint_rows(
    ids: torch.Tensor, features: torch.Tensor, first_new_id: int, eos_id: int
) -> torch.Tensor:
    """(s, d): each caption's features from its first modifier token through its end-of-text token."""
    rows = []
    for caption_ids, caption_features in zip(ids, features, strict=True):
        positions = torch.arange(len(caption_ids))
        new = positions[caption_ids >= first_new_id]
        if len(new) == 0:
            continue
        ends = positions[(caption_ids == eos_id) & (positions > new[0])]
        stop = int(ends[0]) + 1 if len(ends) else len(caption_ids)
        rows.append(caption_features[int(new[0]) : stop])
    return torch.cat(rows)


def regularization_gram(pipe, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """M = C_regᵀ C_reg (d, d) over every token position of ``captions``, summed in float64 batch by batch.

    Each batch's product is taken in float32, the precision of the features themselves; M only weighs
    the objective, while the constraints are met by the float64 dual solve whatever its rounding.
    """
    gram = 0
    for start in range(0, len(captions), batch_size):
        _, features = text_features(pipe, captions[start : start + batch_size])
        rows = features.flatten(0, 1).float()  # (captions × tokens, d)
        gram = gram + (rows.T @ rows).double()
    return gram


def dual_solve(S: torch.Tensor, R: torch.Tensor, cutoff: float = 1e-8) -> torch.Tensor:
    """X (s, n) with S X = R for the symmetric positive semi-definite dual matrix S (s, s), in float64.

    Solved in S's eigenbasis; eigenvalues below ``cutoff`` of the largest are dropped, and the
    constraints along them met in least squares. Repeated caption words give exactly dependent rows
    (eigenvalue ~0), and two tokens still near a shared initializer give rows that differ by a hair while
    their targets differ a lot: solving those exactly would move the weights without bound. No matrix is
    inverted.
    """
    eigenvalues, Q = torch.linalg.eigh((S + S.T) / 2)
    kept = eigenvalues > cutoff * eigenvalues.max()
    Q, eigenvalues = Q[:, kept], eigenvalues[kept]
    return Q @ ((Q.T @ R) / eigenvalues[:, None])


def change_on_captions(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """‖C_reg ΔWᵀ‖²_F = tr(ΔW M ΔWᵀ): how much a weight change moves the regularization captions' outputs
    (in float32: a report, and SD-sized layers take seconds in float64)."""
    delta = delta.float()
    return float((delta @ gram.float() * delta).sum())


def merge_deltas(
    base: dict[str, torch.Tensor],
    gram: torch.Tensor,
    rows: list[torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """Eq. 4 for every K/V matrix, given the text features: the merged deltas and the report.

    With M = C_regᵀ C_reg, the Lagrangian gives W − W0 = (M⁻¹Cᵀ X)ᵀ with S X = V − C W0ᵀ, S = C M⁻¹Cᵀ.
    For concept n's rows V_n − C_n W0ᵀ = C_n ΔW_nᵀ, so only small (s, out) products touch the weights.
    All layers share C, M and S: one Cholesky factorization and one dual solve serve them all.

    Args:
        base: name → base weight W0 (out, d). gram: M (d, d), float64.
        rows: per concept, its constraint features C_n (s_n, d), float64.
        deltas: per concept, name → its fine-tuned change ΔW_n of that weight (absent: unchanged).
    """
    # A ridge (1% of M's mean diagonal) prices directions the captions leave unseen, such as the modifier
    # tokens' own: left nearly free (1e-6), the toy demo's merge put a weight change 100× the concepts'
    # own there, and reproduced them worse on prompts outside the constraints.
    ridged = gram + torch.eye(len(gram), dtype=gram.dtype) * RIDGE * gram.diagonal().mean()
    C = torch.cat(rows)
    D = torch.cholesky_solve(C.T, torch.linalg.cholesky(ridged))  # M⁻¹Cᵀ (d, s)
    S = C @ D  # (s, s)

    R, largest_target, naive_residual, naive_objective = [], 0.0, 0.0, 0.0
    for name, W0 in base.items():
        own = [concept[name].double() if name in concept else None for concept in deltas]
        blocks = [  # V_n − C_n W0ᵀ = C_n ΔW_nᵀ (s_n, out)
            C_n @ Δ.T if Δ is not None else C_n.new_zeros(len(C_n), len(W0))
            for C_n, Δ in zip(rows, own, strict=True)
        ]
        R.append(torch.cat(blocks))
        naive = sum(Δ for Δ in own if Δ is not None)
        largest_target = max(largest_target, float((C @ W0.double().T + R[-1]).abs().max()))
        naive_residual = max(naive_residual, float((C @ naive.T - R[-1]).abs().max()))
        naive_objective += change_on_captions(naive, gram)
    R = torch.cat(R, dim=1)  # (s, Σ out)
    X = dual_solve(S, R)
    largest_target = max(largest_target, 1e-30)
    widths = [len(W0) for W0 in base.values()]
    merged = [(D @ X_layer).T for X_layer in X.split(widths, dim=1)]
    # Σ tr(ΔW M ΔWᵀ) over the layers in the dual: ΔWᵀ = D X, so tr(Xᵀ (Dᵀ M D) X), an (s, s) kernel
    # instead of a (d, d) product per layer (SDXL's 140 matrices: seconds instead of half a minute)
    kernel = D.T @ (gram @ D)
    report = MergeReport(
        residual=float((S @ X - R).abs().max()) / largest_target,
        naive_residual=naive_residual / largest_target,
        objective=float((X * (kernel @ X)).sum()),
        naive_objective=naive_objective,
    )
    merged = [delta.float() for delta in merged]
    return dict(zip(base, merged, strict=True)), report


def weighting(total: torch.Tensor, gram: torch.Tensor, reg_weight: float = REG_WEIGHT) -> torch.Tensor:
    """A = Σ_n G_n + λ M (d, d), float64: how much each text-feature direction's outputs count, with the
    regularization captions' ``gram`` M weighing ``reg_weight`` of the concepts' ``total`` Σ_n G_n."""
    system = total + gram * (reg_weight * total.trace() / gram.trace())
    # directions no caption reaches (a short --reg-captions list) get no change; jitter keeps A invertible
    return system + torch.eye(len(system), dtype=system.dtype) * 1e-6 * system.diagonal().mean()


def output_weighting(
    pipe, concept: Concept, reg_captions: list[str], reg_weight: float = REG_WEIGHT
) -> torch.Tensor:
    """The weighted merge's A for ``concept`` alone (its captions, its contexts, the ordinary captions at
    ``reg_weight``), so that ‖ΔW L‖_F with LLᵀ = A measures how much a K/V change moves the outputs the
    concept is used for: what ``compress`` keeps. ``pipe`` is the base pipeline, left as it was."""
    gram = regularization_gram(pipe, reg_captions)
    text.load_tokens(pipe, list(concept.tokens), concept.token_embeddings)
    try:
        (rows,) = fitted_rows(pipe, [concept], reg_captions, "weighted", CONTEXT_SHARE)
    finally:
        text.unload_tokens(pipe, list(concept.tokens))
    return weighting(rows.T @ rows, gram, reg_weight)


def weighted_deltas(
    base: dict[str, torch.Tensor],
    gram: torch.Tensor,
    features: list[torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    reg_weight: float = REG_WEIGHT,
) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """The weighted merge for every K/V matrix (see the module's docstring): the merged deltas and report.

    Args:
        base: name → base weight W0 (out, d), or any tensor of its shape. gram: M = C_regᵀ C_reg (d, d),
            float64.
        features: per concept, every position of its captions F_n (s_n, d), float64 (only F_nᵀF_n matters).
        deltas: per concept, name → its fine-tuned change ΔW_n of that weight (absent: unchanged, so its
            captions keep the base outputs).
    """
    # rows with F_n's Gram matrix, at most d of them (a thin QR), so each layer's products are r_n wide, not d
    rows = [torch.linalg.qr(F, mode="r").R if len(F) > F.shape[1] else F for F in features]
    factor = torch.linalg.cholesky(weighting(sum(R.T @ R for R in rows), gram, reg_weight))
    solved = [torch.cholesky_solve(R.T, factor).T for R in rows]  # R_n A⁻¹ (r_n, d)
    # ΔW = Σ_n (ΔW_n R_nᵀ)(R_n A⁻¹): its outputs on concept m's rows and its objective come from small kernels
    cross = [[(R @ Z.T).float() for Z in solved] for R in rows]  # R_m A⁻¹ R_nᵀ
    kernels = [[(Z_a @ gram @ Z_b.T).float() for Z_b in solved] for Z_a in solved]  # R_a A⁻¹ M A⁻¹ R_bᵀ
    rows, solved = [R.float() for R in rows], [Z.float() for Z in solved]
    merged, residual, naive_residual, objective, naive_objective = {}, 0.0, 0.0, 0.0, 0.0
    for name, W0 in base.items():
        own = [concept[name].float() if name in concept else torch.zeros(W0.shape) for concept in deltas]
        outputs = [Δ @ R.T for Δ, R in zip(own, rows, strict=True)]  # each concept's own change on its rows
        merged[name] = sum(Y @ Z for Y, Z in zip(outputs, solved, strict=True))
        naive = sum(own)
        for m, (Δ, R, Y) in enumerate(zip(own, rows, outputs, strict=True)):
            on_rows = sum(Y_n @ cross[m][n].T for n, Y_n in enumerate(outputs))
            reference = max(float(Y.norm()), 1e-30)
            residual = max(residual, float((on_rows - Y).norm()) / reference)
            naive_residual = max(naive_residual, float(((naive - Δ) @ R.T).norm()) / reference)
        objective += sum(
            float((Y_a @ kernels[a][b] * Y_b).sum())
            for a, Y_a in enumerate(outputs)
            for b, Y_b in enumerate(outputs)
        )
        naive_objective += change_on_captions(naive, gram)
    return merged, MergeReport(residual, naive_residual, objective, naive_objective)


def with_contexts(own: torch.Tensor, contexts: torch.Tensor | None, share: float) -> torch.Tensor:
    """A concept's rows for the weighted fit: its captions' ``own`` rows and, scaled to ``share`` of the
    energy of both, its rows in the regularization captions' ``contexts``."""
    if contexts is None:
        return own
    scale = (share / (1 - share) * own.square().sum() / contexts.square().sum()).sqrt()
    return torch.cat([own, contexts * scale])


def fitted_rows(
    pipe, concepts: list[Concept], reg_captions: list[str], method: str, context_share: float
) -> list[torch.Tensor]:
    """Per concept, the text features (s_n, d) at which the merged K/V must give its own outputs, in
    float64: ``constrained`` its captions from the modifier token to the end of text; ``weighted`` every
    position of its captions and, at ``context_share`` of their energy, of the regularization captions that
    name its class (``context_captions``). The concepts' tokens must be in ``pipe``.
    """
    first_new_id = pipe.tokenizer.convert_tokens_to_ids(concepts[0].tokens[0])
    rows = []
    for concept in concepts:
        captions = list(concept.captions) or [
            data.CAPTION_TEMPLATE.format(token=token, class_word=word)
            for token, word in zip(concept.tokens, concept.class_words, strict=True)
        ]
        ids, features = text_features(pipe, captions)
        if method == "constrained":
            rows.append(constraint_rows(ids, features, first_new_id, pipe.tokenizer.eos_token_id))
            continue
        contexts = [
            caption
            for token, word in zip(concept.tokens, concept.class_words, strict=True)
            for caption in context_captions(reg_captions, token, word)
        ]
        encode = contexts and context_share  # none to encode when they weigh nothing
        in_contexts = text_features(pipe, contexts)[1].flatten(0, 1) if encode else None
        rows.append(with_contexts(features.flatten(0, 1), in_contexts, context_share))
    return rows


def merge_concepts(
    pipe,
    concepts: list[Concept],
    reg_captions: list[str],
    method: str = "weighted",
    reg_weight: float = REG_WEIGHT,
    context_share: float = CONTEXT_SHARE,
) -> tuple[Concept, MergeReport]:
    """Merge concepts of ``pipe``'s base model into one concept (``method`` per K/V matrix: the module's
    docstring).

    ``pipe`` is the base pipeline, left as it was; ``token`` concepts contribute their tokens alone.

    Returns:
        the merged concept (mode ``crossattn_kv``, every token) and the merge's report.
    """
    if len(concepts) == 1:
        return concepts[0], MergeReport(0.0, 0.0, 0.0, 0.0)
    gram = regularization_gram(pipe, reg_captions)
    tokens = [token for concept in concepts for token in concept.tokens]
    embeddings = torch.cat([concept.token_embeddings for concept in concepts])
    text.load_tokens(pipe, tokens, embeddings)
    try:
        rows = fitted_rows(pipe, concepts, reg_captions, method, context_share)
    finally:
        text.unload_tokens(pipe, tokens)
    names = sorted({name for concept in concepts for name in concept.deltas})
    base = {name: pipe.unet.get_parameter(name.removeprefix("unet.")).detach().cpu() for name in names}
    own = [concept.deltas for concept in concepts]
    if method == "constrained":
        deltas, report = merge_deltas(base, gram, rows, own)
    else:
        deltas, report = weighted_deltas(base, gram, rows, own, reg_weight)
    merged = Concept(
        base_hash=concepts[0].base_hash,
        mode="crossattn_kv",
        tokens=tuple(tokens),
        class_words=tuple(word for concept in concepts for word in concept.class_words),
        initializers=tuple(word for concept in concepts for word in concept.initializers),
        token_embeddings=embeddings,
        deltas=deltas,
        captions=tuple(caption for concept in concepts for caption in concept.captions),
        config={"merged_from": [concept.config for concept in concepts]},
        embedding_widths=concepts[0].embedding_widths,
        parts=tuple(part for concept in concepts for part in parts_of(concept, set(deltas))),
    )
    return merged, report


def parts_of(concept: Concept, names: set[str]) -> tuple[Part, ...]:
    """What a concept brings to a merge as parts: its own parts if it is merged already, else itself, its
    deltas restricted to ``names`` (the merged ones)."""
    if concept.parts:
        return concept.parts
    deltas = {name: delta for name, delta in concept.deltas.items() if name in names}
    factors = {name: pair for name, pair in concept.factors.items() if name in names}
    return (Part(concept.tokens, deltas, factors),)


def refit_deltas(
    pipe, concept: Concept, reg_captions: list[str], reg_weight: float, context_share: float = CONTEXT_SHARE
) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """A K/V concept's deltas fitted again as the weighted merge fits each concept, with itself alone:
    its outputs on its captions and in the contexts of ordinary captions kept, the ordinary captions' own
    outputs returned towards the base in closed form (``customdiff train --refit-weight``).

    Regularization images hold ordinary captions back by gradient descent, which moves slowly along the
    few text-feature directions a new token has to itself; the least-squares fit puts the change there at
    once. ``pipe`` holds the concept's tokens (its weights do not matter: only the deltas are fitted).
    """
    gram = regularization_gram(pipe, reg_captions)
    rows = fitted_rows(pipe, [concept], reg_captions, "weighted", context_share)
    return weighted_deltas(concept.deltas, gram, rows, [concept.deltas], reg_weight)


def load_mergeable(config: MergeConfig) -> tuple[list[Concept], list[str]]:
    """``config.concepts`` loaded, their clashing tokens renamed if ``config.rename_tokens`` asks, and checked
    for a merge (``check_mergeable``): the concepts, and a line for each token renamed."""
    names = [str(concept_file(path)) for path in config.concepts]
    concepts = [load_concept(path) for path in config.concepts]
    renamed = []
    if config.rename_tokens:
        concepts, renames = free_clashing_tokens(concepts)
        renamed = [
            f"{name}: {old} is {new} in the merged concept"
            for name, own in zip(names, renames, strict=True)
            for old, new in own.items()
        ]
    check_mergeable(concepts, names)
    return concepts, renamed


def merge_loaded(pipe, concepts: list[Concept], config: MergeConfig) -> tuple[Concept, MergeReport]:
    """``merge_concepts`` with ``config``'s regularization captions, method and weights."""
    if config.reg_captions is not None:
        captions = generate.read_prompts(config.reg_captions, "--reg-captions")[: config.num_reg_captions]
    else:
        captions = regularization_captions(pipe.tokenizer, config.num_reg_captions, config.seed)
    return merge_concepts(pipe, concepts, captions, config.method, config.reg_weight, config.context_share)


def merge_files(pipe, config: MergeConfig) -> tuple[Concept, MergeReport, list[str]]:
    """``load_mergeable``, then ``merge_loaded``: the merged concept, the report and a line for each token
    renamed (a concept merged in memory, without ``customdiff merge``'s output folder)."""
    concepts, renamed = load_mergeable(config)
    merged, report = merge_loaded(pipe, concepts, config)
    return merged, report, renamed


def run_merge(config: MergeConfig) -> tuple[Path, Concept, MergeReport, list[str]]:
    """The ``customdiff merge`` command: load and check the concepts, merge, write OUT/concept.safetensors.

    Returns the path, the merged concept, the report and a line for each token ``--rename-tokens`` renamed.
    """
    concepts, renamed = load_mergeable(config)
    files.prepare_output_dir(config.out)
    pipe = models.load_pipeline(config.model, model_config=config.model_config)
    merged, report = merge_loaded(pipe, concepts, config)
    path = save_concept(config.out, merged)
    save_config(config, config.out)
    return path, merged, report, renamed
