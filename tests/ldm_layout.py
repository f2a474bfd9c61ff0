"""A diffusers SD or SDXL pipeline's weights in the original (CompVis/LDM, Stability's SGM) single-file layout
that A1111 and ComfyUI save, so that tests can load such a file through ``--model FILE`` without downloaded
checkpoints."""

from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_name(name: str, layers: int, up_attentions: list[bool]) -> str:
    """One UNet key in LDM naming (SD 1.x/2.x: ``layers`` resnets a down level, one more an up level)."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2",
             "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for old, new in fixed.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = f"input_blocks.{1 + level * (layers + 1) + j}"
        return f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = f"output_blocks.{level * (layers + 1) + j}"
        return f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        level = int(m[1])
        return f"output_blocks.{level * (layers + 1) + layers}.{2 if up_attentions[level] else 1}.conv.{m[2]}"
    raise KeyError(name)


def _resnet(rest: str) -> str:
    part, _, leaf = rest.rpartition(".")
    return f"{RESNET[part]}.{leaf}"


def _vae_name(name: str, levels: int) -> tuple[str, bool]:
    """One VAE key in LDM naming, and whether it is a mid-block attention weight (1×1 conv in LDM)."""
    name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(
        r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.",
        lambda m: (
            f"decoder.up.{levels - 1 - int(m[1])}." + (f"block.{m[3]}." if m[2] == "resnets" else "upsample.")
        ),
        name,
    )
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    attention = re.match(r"(.*)mid_block\.attentions\.0\.(.*)\.(weight|bias)$", name)
    if attention:
        name = f"{attention[1]}mid.attn_1.{VAE_ATTENTION[attention[2]]}.{attention[3]}"
    return name, bool(attention)


def _open_clip(model) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in OpenCLIP naming (SD 2.x's, SDXL's second): q, k, v in one ``in_proj``."""
    state = {key.removeprefix("text_model."): value for key, value in model.state_dict().items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    parts = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for i in range(model.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [state[f"{layer}self_attn.{x}_proj.{leaf}"] for x in "qkv"]
            out[f"{block}attn.in_proj_{leaf}"] = torch.cat(qkv)
            out.update({f"{block}{new}.{leaf}": state[f"{layer}{old}.{leaf}"] for old, new in parts.items()})
    width = model.config.hidden_size
    out["text_projection"] = state.get("text_projection.weight", torch.eye(width)).T  # SD 2.x's is unused
    return out


def ldm_state_dict(pipe, open_clip: bool = False) -> dict[str, torch.Tensor]:
    """UNet, VAE and text encoders of an SD-style ``pipe`` as one state dict in LDM naming: SD 1.x's CLIP text
    encoder, or with ``open_clip`` SD 2.x's OpenCLIP one; an SDXL pipe in SGM naming (CLIP and OpenCLIP)."""
    unet = pipe.unet
    layers = unet.config.layers_per_block
    up_attentions = [hasattr(block, "attentions") for block in unet.up_blocks]
    out = {
        f"model.diffusion_model.{unet_name(key, layers, up_attentions)}": value
        for key, value in unet.state_dict().items()
    }
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name, attention = _vae_name(key, levels)
        if attention and value.ndim == 2:
            value = value[:, :, None, None]
        out[f"first_stage_model.{name}"] = value
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    first = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    if open_clip and not sdxl:
        out.update({f"cond_stage_model.model.{k}": v for k, v in _open_clip(pipe.text_encoder).items()})
    else:
        for key, value in pipe.text_encoder.state_dict().items():  # transformers 5 names drop "text_model."
            out[f"{first}text_model.{key.removeprefix('text_model.')}"] = value
    if sdxl:
        out.update(
            {f"conditioner.embedders.1.model.{k}": v for k, v in _open_clip(pipe.text_encoder_2).items()}
        )
    return {k: v.contiguous() for k, v in out.items()}
