"""A concept in the files other tools load: diffusers, and AUTOMATIC1111 / ComfyUI.

``diffusers``: ``pytorch_custom_diffusion_weights.safetensors`` for ``unet.load_attn_procs`` (the
``CustomDiffusionAttnProcessor`` layout, holding the whole fine-tuned projections) and one
``<new1>.safetensors`` (or ``TRIGGER.safetensors``) per token for ``pipe.load_textual_inversion``.

``webui``: ``lora/NAME.safetensors`` in the kohya key naming both AUTOMATIC1111 and ComfyUI read
(``lora_unet_{module}`` with ``lora_down``/``lora_up``/``alpha`` for a compressed delta, or the exact delta
as ``diff`` / ``diff_b``), which diffusers' ``load_lora_weights`` also reads in the low-rank form, and
``embeddings/TRIGGER.safetensors`` per token as ``emb_params``. A trigger word stands in for ``<new1>``,
which is a poor prompt word there and no valid file name on Windows. An SDXL concept's embedding files hold
``clip_l`` and ``clip_g``, a row for each text encoder, in both formats.

``customdiff import`` reads a concept back from the files diffusers' ``train_custom_diffusion.py`` writes
(the ``diffusers`` layout) or from the paper's ``delta.bin`` or ``delta.ckpt``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from customdiff import files, models, text
from customdiff.concept import Concept, apply_concept, load_concept, reads_text, save_concept, save_tensors
from customdiff.config import ExportConfig, ImportConfig, class_word_after, save_config
from customdiff.data import CAPTION_TEMPLATE
from customdiff.errors import CustomDiffError

# diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
DIFFUSERS_ATTN_FILE = "pytorch_custom_diffusion_weights.safetensors"
# diffusers' CustomDiffusionAttnProcessor names for each trained attn2 projection
DIFFUSERS_NAMES = {
    "to_k.weight": "to_k_custom_diffusion.weight",
    "to_v.weight": "to_v_custom_diffusion.weight",
    "to_q.weight": "to_q_custom_diffusion.weight",
    "to_out.0.weight": "to_out_custom_diffusion.0.weight",
    "to_out.0.bias": "to_out_custom_diffusion.0.bias",
}
EXPORTABLE_MODES = ("crossattn_kv", "crossattn", "token")  # a full concept is a whole UNet
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # an SDXL embedding file: one row per text encoder


def check_exportable(concept: Concept) -> None:
    if concept.mode not in EXPORTABLE_MODES:
        raise CustomDiffError(
            f"export takes crossattn_kv, crossattn or token concepts, not --mode {concept.mode}; "
            "apply a full concept with customdiff.apply_concept(pipe, path)"
        )


def triggers(concept: Concept, given: tuple[str, ...] = ()) -> tuple[str, ...]:
    """One prompt word per token: the given ones, or the token without its brackets (``new1``)."""
    if given and len(given) != len(concept.tokens):
        raise CustomDiffError(
            f"--trigger: the concept has {len(concept.tokens)} tokens ({' '.join(concept.tokens)}); "
            f"pass one trigger word for each"
        )
    return given or tuple(token.strip("<>") for token in concept.tokens)


def embedding_tensors(concept: Concept, index: int, key: str) -> dict[str, torch.Tensor]:
    """The tensors of token ``index``'s embedding file: ``{key: (1, d)}`` for one text encoder; for SDXL
    ``clip_l`` and ``clip_g``, (1, width) each, the file AUTOMATIC1111 and ComfyUI read and diffusers' SDXL
    examples load one encoder at a time."""
    rows = [part[index : index + 1] for part in concept.token_rows()]
    return dict(zip(SDXL_EMBEDDING_KEYS, rows, strict=True)) if len(rows) == 2 else {key: rows[0]}


# ---------------------------------------------------------------------------------------------- diffusers


def diffusers_attn_state(unet, mode: str) -> dict[str, torch.Tensor]:
    """The fine-tuned ``unet``'s attention weights in ``CustomDiffusionAttnProcessor``'s key layout.

    Keys are ``{layer}.processor.to_k_custom_diffusion.weight`` etc., with the whole fine-tuned weights
    (diffusers' processor replaces the layer's projections, it does not add to them). Every other
    attention layer gets an empty tensor: diffusers' loader makes an empty processor for those, so that
    its processor count matches the UNet's (its own safetensors save drops them and then fails to load).
    """
    trained = ("to_k.weight", "to_v.weight") if mode == "crossattn_kv" else tuple(DIFFUSERS_NAMES)
    state = {}
    for processor_name in unet.attn_processors:
        if not processor_name.endswith("attn2.processor"):
            state[processor_name] = torch.zeros(0)
            continue
        layer = unet.get_submodule(processor_name.removesuffix(".processor"))
        for name in trained:
            state[f"{processor_name}.{DIFFUSERS_NAMES[name]}"] = layer.get_parameter(name).detach().float()
    return state


def write_diffusers(out: Path, concept: Concept, unet=None, words: tuple[str, ...] = ()) -> list[Path]:
    """Write the diffusers files into ``out``: token embeddings, and given the fine-tuned ``unet`` its
    attention file (``crossattn_kv``, ``crossattn``). Returns the paths."""
    out = files.prepare_output_dir(out)
    written = []
    names = triggers(concept, words) if words else concept.tokens  # <new1>.safetensors, as diffusers' example
    for index, word in enumerate(names):
        save_tensors(out / f"{word}.safetensors", embedding_tensors(concept, index, word), {"format": "pt"})
        written.append(out / f"{word}.safetensors")
    if unet is not None and concept.mode in ("crossattn_kv", "crossattn"):
        save_tensors(out / DIFFUSERS_ATTN_FILE, diffusers_attn_state(unet, concept.mode), {"format": "pt"})
        written.append(out / DIFFUSERS_ATTN_FILE)
    return written


# ---------------------------------------------------------------------------------------------- webui


def kohya_name(parameter: str) -> str:
    """``unet.down_blocks.0….attn2.to_k.weight`` → ``lora_unet_down_blocks_0_…_attn2_to_k``."""
    module = parameter.removeprefix("unet.").rsplit(".", 1)[0]
    return "lora_unet_" + module.replace(".", "_")


def webui_lora_state(concept: Concept) -> dict[str, torch.Tensor]:
    """The concept's UNet deltas as a kohya LoRA state dict.

    A compressed delta (up (out, r), down (r, in)) is ``lora_up`` / ``lora_down`` with ``alpha`` = r, so
    that the tools' scale alpha / r is 1; any other is the exact delta as ``diff`` (weights) or ``diff_b``
    (biases).
    """
    state = {}
    for name, delta in concept.deltas.items():
        key = kohya_name(name)
        if name in concept.factors:
            up, down = concept.factors[name]
            state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"] = up, down
            state[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
        else:
            state[f"{key}.diff" if name.endswith(".weight") else f"{key}.diff_b"] = delta
    return state


def write_webui(out: Path, concept: Concept, words: tuple[str, ...] = ()) -> list[Path]:
    """Write ``out/lora/NAME.safetensors`` (when the concept changes the UNet) and
    ``out/embeddings/TRIGGER.safetensors`` per token, as AUTOMATIC1111 and ComfyUI load them."""
    check_exportable(concept)
    words = triggers(concept, words)
    written = []
    for index, word in enumerate(words):
        path = files.prepare_output_dir(Path(out) / "embeddings") / f"{word}.safetensors"
        save_tensors(path, embedding_tensors(concept, index, "emb_params"), {"name": word})  # (vectors, dim)
        written.append(path)
    if concept.deltas:
        path = files.prepare_output_dir(Path(out) / "lora") / f"{'_'.join(words)}.safetensors"
        metadata = {
            "ss_network_module": "networks.lora",
            "customdiff_base_model_hash": concept.base_hash,
            "customdiff_triggers": " ".join(words),
        }
        save_tensors(path, webui_lora_state(concept), metadata)
        written.append(path)
    return written


def run_export(config: ExportConfig) -> list[Path]:
    """The ``customdiff export`` command; returns the written paths."""
    concept = load_concept(config.concept)
    check_exportable(concept)
    if config.format == "webui":
        written = write_webui(config.out, concept, config.trigger)
    else:
        unet = None
        if concept.mode in ("crossattn_kv", "crossattn"):  # the attention file holds base + delta
            pipe = models.load_pipeline(config.model, model_config=config.model_config)
            apply_concept(pipe, concept)
            unet = pipe.unet
        written = write_diffusers(config.out, concept, unet, config.trigger)
    save_config(config, config.out)
    return written


# ---------------------------------------------------------------------------------------------- import

DIFFUSERS_ATTN_FILES = (DIFFUSERS_ATTN_FILE, "pytorch_custom_diffusion_weights.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# a toy concept trained 6000 steps moved its K/V by 57-60% of their size; another base's weights differ from
# these by about √2 of it (unrelated weights of the same size)
FOREIGN_CHANGE = 1.0
IMPORTABLE = (
    "pass the folder diffusers' train_custom_diffusion.py wrote, or the delta.bin or delta.ckpt of the "
    "paper's scripts"
)
LDM_UNET = "model.diffusion_model."  # the UNet's keys in a CompVis (LDM) state dict


def read_weights(path: Path) -> dict:
    """A weights file as a dict: safetensors whatever its name (diffusers' example writes safetensors
    into ``<new1>.bin``), else a pickle read with ``weights_only``, which runs no code."""
    try:
        return load_file(path)
    except SafetensorError:
        pass
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CustomDiffError(
            f"cannot read {path} as safetensors or as a weights-only pickle ({error}); pass the file as "
            "diffusers' example or the paper's scripts wrote it"
        ) from error
    if not isinstance(state, dict):
        raise CustomDiffError(
            f"{path} holds a {type(state).__name__}, not named tensors; pass a weights file"
        )
    return state


def _in_number_order(path: Path) -> list:
    """A sort key that puts ``<new2>`` before ``<new10>``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def _diffusers_folder(folder: Path) -> tuple[dict, dict, dict]:
    """UNet weights, low-rank deltas (none) and token rows of a folder diffusers' example wrote."""
    weights, rows = {}, {}
    attn = next((folder / name for name in DIFFUSERS_ATTN_FILES if (folder / name).is_file()), None)
    if attn is not None:
        ours = {theirs: name for name, theirs in DIFFUSERS_NAMES.items()}
        for key, value in read_weights(attn).items():
            layer, _, name = key.partition(".processor.")
            if not value.numel():
                continue  # the empty processor of a layer that did not train
            if name not in ours:
                raise CustomDiffError(
                    f"{attn} holds {key}, no Custom Diffusion weight; pass the file diffusers' example wrote"
                )
            weights[f"unet.{layer}.{ours[name]}"] = value
    weight_files = [path for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES and path != attn]
    for path in sorted(weight_files, key=_in_number_order):  # {"<new1>": row}, or SDXL's clip_l, clip_g
        state = read_weights(path)
        if set(state) == {path.stem}:
            rows[path.stem] = [state[path.stem]]
        elif set(state) == set(SDXL_EMBEDDING_KEYS):
            rows[path.stem] = [state[key] for key in SDXL_EMBEDDING_KEYS]
    return weights, {}, rows


def diffusers_attention_name(ldm_key: str, layers: int) -> str:
    """An attention weight's LDM (CompVis) UNet key in diffusers' naming, for SD 1.x/2.x's layout of
    ``layers`` resnets a down level (one more an up level), e.g. ``model.diffusion_model.input_blocks.1.1.
    transformer_blocks.0.attn2.to_k.weight`` → ``down_blocks.0.attentions.0.transformer_blocks.0.…``."""
    key = ldm_key.removeprefix(LDM_UNET)
    if m := re.fullmatch(r"input_blocks\.(\d+)\.1\.(.+)", key):
        block = int(m[1]) - 1  # input block 0 is conv_in
        return f"down_blocks.{block // (layers + 1)}.attentions.{block % (layers + 1)}.{m[2]}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", key):
        block = int(m[1])
        return f"up_blocks.{block // (layers + 1)}.attentions.{block % (layers + 1)}.{m[2]}"
    if m := re.fullmatch(r"middle_block\.1\.(.+)", key):
        return f"mid_block.attentions.0.{m[1]}"
    raise CustomDiffError(f"{ldm_key} is no UNet attention weight of SD 1.x/2.x's layout; {IMPORTABLE}")


def _from_ldm(state: dict, layers: int) -> dict:
    """The CompVis scripts' ``delta.ckpt`` state dict (LDM keys, the tokens' rows as ``embed``) as their
    diffusers scripts' ``delta.bin`` holds it, the tokens named ``<new1>``, ``<new2>``, … as they do."""
    if not isinstance(layers, int):
        raise CustomDiffError(
            "a delta.ckpt of the paper's CompVis scripts is SD 1.x's: pass --model an SD 1.x model"
        )
    embed = state.get("embed", torch.zeros(0, 0))
    unet = {diffusers_attention_name(key, layers): value for key, value in state.items() if key != "embed"}
    return {"unet": unet, "modifier_token": {f"<new{i + 1}>": row for i, row in enumerate(embed)}}


def _paper_delta(path: Path, layers: int) -> tuple[dict, dict, dict]:
    """UNet weights, low-rank deltas and token rows of the paper's ``delta.bin`` (its diffusers scripts:
    ``{"unet": {name: weight or {"u", "v"}}, "modifier_token": {token: row or [row, row_2]}}``) or
    ``delta.ckpt`` (its CompVis scripts, SD 1.x: ``{"state_dict": {LDM key: …, "embed": rows}}``)."""
    state = read_weights(path)
    if isinstance(state.get("state_dict"), dict):
        state = _from_ldm(state["state_dict"], layers)
    if "text_encoder" in state:
        raise CustomDiffError(
            f"{path} holds a fine-tuned text encoder, which a customdiff concept does not; "
            "import a run trained with --freeze_model crossattn_kv or crossattn"
        )
    if not isinstance(state.get("unet"), dict):
        raise CustomDiffError(
            f"{path} is not a Custom Diffusion delta (no 'unet' or 'state_dict'); {IMPORTABLE}"
        )
    weights, factors = {}, {}
    for name, value in state["unet"].items():
        if isinstance(value, dict) and {"u", "v"} <= value.keys():  # compressed: the delta is u @ v
            factors[f"unet.{name}"] = (value["u"], value["v"])
        else:
            weights[f"unet.{name}"] = value
    rows = {
        token: list(row) if isinstance(row, list | tuple) else [row]
        for token, row in state.get("modifier_token", {}).items()
    }
    held = [*weights.values(), *sum(factors.values(), ()), *sum(rows.values(), [])]
    if not all(isinstance(tensor, torch.Tensor) for tensor in held):
        raise CustomDiffError(f"{path} holds values that are not tensors where weights belong; {IMPORTABLE}")
    return weights, factors, rows


def import_concept(pipe, source: Path, config: ImportConfig) -> Concept:
    """The concept ``source`` holds (``ImportConfig.source``), as deltas against ``pipe``'s UNet.

    Raises:
        CustomDiffError: ``source`` is not one of those layouts, holds no token, names too few class words,
            or does not fit ``pipe`` (another architecture, or tokens already in its vocabulary).
    """
    source = Path(source)
    if source.is_dir():
        weights, factors, rows = _diffusers_folder(source)
    elif source.is_file():
        weights, factors, rows = _paper_delta(source, pipe.unet.config.layers_per_block)
    else:
        raise CustomDiffError(f"{source} does not exist; {IMPORTABLE}")
    if not rows:
        raise CustomDiffError(
            f"{source} holds no token embedding (<new1>.bin or modifier_token); {IMPORTABLE}"
        )
    tokens = tuple(rows)
    vocabulary = pipe.tokenizer.get_vocab()
    taken = [token for token in tokens if token in vocabulary or models.is_one_token(pipe.tokenizer, token)]
    if taken:
        raise CustomDiffError(
            f"{source}'s token {taken[0]} is a word of the model's vocabulary already; pass --model the "
            "model it was trained from"
        )
    if config.instance_prompt:
        captions = tuple(config.instance_prompt)
        class_words = tuple(
            class_word_after(prompt, token) for prompt, token in zip(captions, tokens, strict=False)
        )
    else:
        class_words = config.class_word
        captions = tuple(
            CAPTION_TEMPLATE.format(token=t, class_word=w) for t, w in zip(tokens, class_words, strict=False)
        )
    if len(config.instance_prompt or config.class_word) != len(tokens) or None in class_words:
        raise CustomDiffError(
            f"{source} holds the tokens {' '.join(tokens)}: pass an --instance-prompt naming each before its "
            'class word, in this order ("photo of a <new1> cat"), or a --class-word for each'
        )
    parameters = {f"unet.{name}": value for name, value in pipe.unet.named_parameters()}
    own = {name: weight.float() for name, weight in weights.items()}
    own |= {name: up.float() @ down.float() for name, (up, down) in factors.items()}
    for name, value in own.items():
        if name not in parameters or parameters[name].shape != value.shape:
            found = tuple(parameters[name].shape) if name in parameters else "none"
            raise CustomDiffError(
                f"{source} holds {name} of shape {tuple(value.shape)}, the model's is {found}: pass --model "
                "the model it was trained from"
            )
    deltas = {  # whole weights less the base; factors are deltas already
        name: value if name in factors else value - parameters[name].detach().float().cpu()
        for name, value in own.items()
    }
    widths = text.embedding_widths(text.text_encoders(pipe))
    token_rows = [[row.reshape(-1).float() for row in rows[token]] for token in tokens]
    if any([row.numel() for row in token_row] != list(widths) for token_row in token_rows):
        raise CustomDiffError(
            f"{source}'s token rows are not as wide as the model's text embeddings ({widths}): pass --model "
            "the model it was trained from"
        )
    if all(reads_text(name) for name in deltas):
        mode = "crossattn_kv" if deltas else "token"
    elif all(".attn2." in name for name in deltas):
        mode = "crossattn"
    else:
        raise CustomDiffError(f"{source} trains UNet weights outside cross-attention; {IMPORTABLE}")
    return Concept(
        base_hash=models.model_hash(pipe),
        mode=mode,
        tokens=tokens,
        class_words=class_words,
        initializers=("",) * len(tokens),  # not kept by either layout
        token_embeddings=torch.stack([torch.cat(token_row) for token_row in token_rows]),
        deltas=deltas,
        captions=captions,
        config={"imported_from": str(source)},
        factors={name: (up.float(), down.float()) for name, (up, down) in factors.items()},
        embedding_widths=widths,
    )


def foreign_change(pipe, concept: Concept) -> float:
    """The concept's UNet deltas' size against the weights they change (a share, 0 without deltas)."""
    parameters = dict(pipe.unet.named_parameters())
    change = sum(float(delta.norm() ** 2) for delta in concept.deltas.values())
    size = sum(float(parameters[name.removeprefix("unet.")].detach().norm() ** 2) for name in concept.deltas)
    return (change / size) ** 0.5 if size else 0.0


def run_import(config: ImportConfig) -> tuple[Path, Concept]:
    """The ``customdiff import`` command: the written concept file and the concept. Warns where its deltas
    are larger than fine-tuning makes them: ``config.model`` is then likely not its base."""
    pipe = models.load_pipeline(config.model, model_config=config.model_config)
    imported = import_concept(pipe, config.source, config)
    change = foreign_change(pipe, imported)
    if change > FOREIGN_CHANGE:
        warnings.warn(
            f"{config.source}'s deltas are {change:.0%} of the weights they change, larger than fine-tuning "
            "makes them: pass --model the model it was trained from",
            stacklevel=2,
        )
    path = save_concept(config.out, imported)
    save_config(config, config.out)
    return path, imported
