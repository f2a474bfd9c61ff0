"""``customdiff import``: a concept trained or kept elsewhere, as a customdiff concept file.

It reads the folder diffusers' ``train_custom_diffusion.py`` writes (``export.py``'s ``diffusers`` layout),
the paper's ``delta.bin`` (its diffusers scripts) or ``delta.ckpt`` (its CompVis scripts, SD 1.x), or a
folder of ``lora/`` and ``embeddings/`` (the ``webui`` layout, kohya naming). Whole fine-tuned weights become
deltas against the base model; low-rank ones stay factored.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from customdiff import models, text
from customdiff.concept import Concept, reads_text, save_concept
from customdiff.config import ImportConfig, check_token, class_word_after, save_config
from customdiff.data import CAPTION_TEMPLATE
from customdiff.errors import CustomDiffError
from customdiff.export import DIFFUSERS_ATTN_FILE, DIFFUSERS_NAMES, SDXL_EMBEDDING_KEYS, kohya_name

DIFFUSERS_ATTN_FILES = (DIFFUSERS_ATTN_FILE, "pytorch_custom_diffusion_weights.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# a toy concept trained 6000 steps moved its K/V by 57-60% of their size; another base's weights differ from
# these by about √2 of it (unrelated weights of the same size)
FOREIGN_CHANGE = 1.0
IMPORTABLE = (
    "pass the folder diffusers' train_custom_diffusion.py wrote, the delta.bin or delta.ckpt of the "
    "paper's scripts, or a folder of lora/ and embeddings/ as customdiff export --format webui writes"
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
    """UNet weights, deltas (none) and token rows of a folder diffusers' example wrote."""
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


KOHYA_PARTS = {"diff", "diff_b", "lora_up.weight", "lora_down.weight", "alpha"}
LDM_KOHYA_MODULE = re.compile(r"lora_unet_((?:input|output)_blocks_\d+|middle_block)_1_(.+)")


def in_diffusers_naming(module: str, layers: int) -> str:
    """A kohya module name of the LDM / SGM naming (``lora_unet_input_blocks_4_1_…``, as kohya's SDXL LoRAs
    name them) in diffusers' naming (``lora_unet_down_blocks_1_attentions_0_…``); any other as it is."""
    m = LDM_KOHYA_MODULE.fullmatch(module)
    if m is None or not isinstance(layers, int):
        return module
    block = m[1].replace("_blocks_", "_blocks.")  # input_blocks.4, middle_block
    name = diffusers_attention_name(f"{block}.1.{m[2]}", layers)  # down_blocks.1.attentions.0.{rest}
    return "lora_unet_" + name.replace(".", "_")


def _lora_changes(path: Path, unet) -> dict:
    """The UNet deltas of a kohya LoRA file, in either naming: exact ones (``diff``, ``diff_b``) as tensors,
    low-rank ones as (up × alpha / rank, down)."""
    modules = {kohya_name(f"unet.{name}"): name.rsplit(".", 1)[0] for name, _ in unet.named_parameters()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in read_weights(path).items():
        module, _, part = key.partition(".")
        module = in_diffusers_naming(module, unet.config.layers_per_block)
        if module.startswith("lora_te"):
            raise CustomDiffError(
                f"{path} trains the text encoder ({key}), which a customdiff concept does not; {IMPORTABLE}"
            )
        if module not in modules or part not in KOHYA_PARTS:
            raise CustomDiffError(
                f"{path} holds {key}, no LoRA or diff weight of this model's UNet: pass --model the model it "
                "was trained from, and a LoRA in kohya's lora_up / lora_down or diff naming"
            )
        parts.setdefault(modules[module], {})[part] = value
    changes = {}
    for module, held in parts.items():
        if "diff" in held:
            changes[f"unet.{module}.weight"] = held["diff"]
        if "diff_b" in held:
            changes[f"unet.{module}.bias"] = held["diff_b"]
        if ("lora_up.weight" in held) != ("lora_down.weight" in held):
            raise CustomDiffError(
                f"{path} holds only one of lora_up and lora_down for {module}; pass the whole LoRA file"
            )
        if "lora_up.weight" in held:
            up, down = held["lora_up.weight"].float(), held["lora_down.weight"].float()
            scale = float(held.get("alpha", down.shape[0])) / down.shape[0]  # the tools' alpha / rank
            changes[f"unet.{module}.weight"] = (up * scale, down)
    return changes


def _embedding_rows(path: Path) -> list[torch.Tensor]:
    """An A1111 / ComfyUI embedding's row for each text encoder: ``emb_params``, a ``.pt``'s
    ``string_to_param``, or SDXL's ``clip_l`` and ``clip_g``; each must be one vector, as a token is."""
    state = read_weights(path)
    if set(SDXL_EMBEDDING_KEYS) <= state.keys():
        rows = [state[key] for key in SDXL_EMBEDDING_KEYS]
    elif "emb_params" in state:
        rows = [state["emb_params"]]
    elif isinstance(state.get("string_to_param"), dict) and len(state["string_to_param"]) == 1:
        rows = list(state["string_to_param"].values())
    else:
        raise CustomDiffError(
            f"{path} is no embedding file (no emb_params, string_to_param or clip_l / clip_g); {IMPORTABLE}"
        )
    if any(not isinstance(row, torch.Tensor) or row.reshape(-1, row.shape[-1]).shape[0] != 1 for row in rows):
        raise CustomDiffError(
            f"{path} holds an embedding of several vectors; a concept's token is one: import a one-vector "
            "embedding"
        )
    return rows


def _webui_loras(folder: Path) -> list[Path]:
    return sorted((folder / "lora").glob("*.safetensors")) if (folder / "lora").is_dir() else []


def exported_from(folder: Path) -> str | None:
    """The base model hash customdiff's export wrote into a webui folder's LoRA (None: none, or another
    tool's LoRA)."""
    for lora in _webui_loras(Path(folder)):
        with safe_open(lora, "pt") as opened:
            return (opened.metadata() or {}).get("customdiff_base_model_hash")
    return None


def _webui_folder(folder: Path, pipe) -> tuple[dict, dict, dict]:
    """UNet weights (none), deltas and token rows of a folder holding ``lora/`` (one kohya LoRA) and
    ``embeddings/`` (one file per trigger word, the token ``<trigger>``), as ``write_webui`` writes them."""
    loras = _webui_loras(folder)
    if len(loras) > 1:
        raise CustomDiffError(
            f"{folder / 'lora'} holds {len(loras)} LoRA files; keep there only the one of this concept"
        )
    base = exported_from(folder)
    if base and base != models.model_hash(pipe):
        raise CustomDiffError(
            f"{loras[0]} was exported from base model {base}, not from this one ({models.model_hash(pipe)}): "
            "pass --model the model it was trained from"
        )
    changes = _lora_changes(loras[0], pipe.unet) if loras else {}
    embeddings = folder / "embeddings"
    paths = [path for path in embeddings.glob("*") if path.suffix in (".safetensors", ".pt", ".bin")]
    rows = {}
    for path in sorted(paths, key=_in_number_order):
        check_token(f"<{path.stem}>", f"{path}'s trigger word (its name), as a token")
        rows[f"<{path.stem}>"] = _embedding_rows(path)
    return {}, changes, rows


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
    """UNet weights, deltas (low-rank ones) and token rows of the paper's ``delta.bin`` (its diffusers
    scripts: ``{"unet": {name: weight or {"u", "v"}}, "modifier_token": {token: row or [row, row_2]}}``) or
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
    weights, changes = {}, {}
    for name, value in state["unet"].items():
        if isinstance(value, dict) and {"u", "v"} <= value.keys():  # compressed: the delta is u @ v
            changes[f"unet.{name}"] = (value["u"], value["v"])
        else:
            weights[f"unet.{name}"] = value
    rows = {
        token: list(row) if isinstance(row, list | tuple) else [row]
        for token, row in state.get("modifier_token", {}).items()
    }
    held = [*weights.values(), *sum(changes.values(), ()), *sum(rows.values(), [])]
    if not all(isinstance(tensor, torch.Tensor) for tensor in held):
        raise CustomDiffError(f"{path} holds values that are not tensors where weights belong; {IMPORTABLE}")
    return weights, changes, rows


def import_concept(pipe, source: Path, config: ImportConfig) -> Concept:
    """The concept ``source`` holds (``ImportConfig.source``), as deltas against ``pipe``'s UNet.

    Raises:
        CustomDiffError: ``source`` is not one of those layouts, holds no token, names too few class words,
            or does not fit ``pipe`` (another architecture, or tokens already in its vocabulary).
    """
    source = Path(source)
    if (source / "lora").is_dir() or (source / "embeddings").is_dir():
        weights, changes, rows = _webui_folder(source, pipe)
    elif source.is_dir():
        weights, changes, rows = _diffusers_folder(source)
    elif source.is_file():
        weights, changes, rows = _paper_delta(source, pipe.unet.config.layers_per_block)
    else:
        raise CustomDiffError(f"{source} does not exist; {IMPORTABLE}")
    if not rows:
        raise CustomDiffError(
            f"{source} holds no token embedding (<new1>.bin, modifier_token or embeddings/); {IMPORTABLE}"
        )
    tokens = tuple(rows)
    taken = [token for token in tokens if models.is_known_token(pipe.tokenizer, token)]
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
    factors = {name: (c[0].float(), c[1].float()) for name, c in changes.items() if isinstance(c, tuple)}
    own = {name: weight.float() for name, weight in weights.items()}
    own |= {name: change.float() for name, change in changes.items() if name not in factors}
    own |= {name: up @ down for name, (up, down) in factors.items()}
    if all(reads_text(name) for name in own):
        mode = "crossattn_kv" if own else "token"
    elif all(".attn2." in name for name in own):
        mode = "crossattn"
    else:
        raise CustomDiffError(f"{source} trains UNet weights outside cross-attention; {IMPORTABLE}")
    for name, value in own.items():
        if name not in parameters or parameters[name].shape != value.shape:
            found = tuple(parameters[name].shape) if name in parameters else "none"
            raise CustomDiffError(
                f"{source} holds {name} of shape {tuple(value.shape)}, the model's is {found}: pass --model "
                "the model it was trained from"
            )
    deltas = {  # whole weights less the base; changes are deltas already
        name: value if name in changes else value - parameters[name].detach().float().cpu()
        for name, value in own.items()
    }
    widths = text.embedding_widths(text.text_encoders(pipe))
    token_rows = [[row.reshape(-1).float() for row in rows[token]] for token in tokens]
    if any([row.numel() for row in token_row] != list(widths) for token_row in token_rows):
        raise CustomDiffError(
            f"{source}'s token rows are not as wide as the model's text embeddings ({widths}): pass --model "
            "the model it was trained from"
        )
    return Concept(
        base_hash=models.model_hash(pipe),
        mode=mode,
        tokens=tokens,
        class_words=class_words,
        initializers=("",) * len(tokens),  # kept by no layout
        token_embeddings=torch.stack([torch.cat(token_row) for token_row in token_rows]),
        deltas=deltas,
        captions=captions,
        config={"imported_from": str(source)},
        factors=factors,
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
    are larger than fine-tuning makes them: ``config.model`` is then likely not its base (unless customdiff's
    export named this base: a closed-form refit can move the K/V further)."""
    pipe = models.load_pipeline(config.model, model_config=config.model_config)
    imported = import_concept(pipe, config.source, config)
    change = foreign_change(pipe, imported)
    if change > FOREIGN_CHANGE and exported_from(config.source) != imported.base_hash:
        warnings.warn(
            f"{config.source}'s deltas are {change:.0%} of the weights they change, larger than fine-tuning "
            "makes them: pass --model the model it was trained from",
            stacklevel=2,
        )
    path = save_concept(config.out, imported)
    save_config(config, config.out)
    return path, imported
