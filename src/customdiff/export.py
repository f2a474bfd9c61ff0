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

``importing.py`` reads these back, and the paper's own files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from customdiff import files, models
from customdiff.concept import Concept, apply_concept, load_concept, save_tensors
from customdiff.config import ExportConfig, save_config
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
