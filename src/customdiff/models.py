"""Base models: load and save a Stable Diffusion pipeline, and the toy base model's component configs.

Every command takes a diffusers SD folder, or one checkpoint file in the original layout, through
``load_pipeline``; the shipped toy model (default ``--model``) is such a folder, built from the same
classes as Stable Diffusion (CLIP tokenizer and text encoder, ``AutoencoderKL``,
``UNet2DConditionModel``), so that it loads exactly as a real checkpoint does.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from safetensors import SafetensorError, safe_open
from transformers import CLIPConfig, CLIPTokenizer

from customdiff import text, toyworld
from customdiff.config import PAPER_GUIDANCE, TOY_MODEL_DIR, GenerateConfig, extras_folder, model_defaults
from customdiff.errors import CustomDiffError

AUGMENTATION_WORDS = ("very", "small", "far", "away", "zoomed", "in", "close", "up", "photo", "of", "a")
# Never in a world caption: modifier tokens start from them, and pretraining puts them in coded colour slots
RARE_TOKENS = ("ktn", "sks", "zwx", "vlk", "pqd", "hta")
# Words that start modifier tokens by default: the paper's ktn, pll, ucd (one token each in SD's
# tokenizer), then the toy tokenizer's rare words.
INITIALIZER_CANDIDATES = ("ktn", "pll", "ucd", *RARE_TOKENS[1:])
HASH_VALUES = 4096  # values of each weight tensor that model_hash reads
MAX_TOKENS = 32  # the longest toy caption plus augmentation prefix fits with room to spare

# SD 1.x noise schedule: the toy model trains on it so that samplers and fine-tuning behave as on SD.
NOISE_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


def toy_words() -> list[str]:
    """Every word the toy tokenizer knows as one token: the grammar, augmentation words, rare tokens."""
    grammar = ["a", "on", "and", "background", *toyworld.BACKGROUNDS, *toyworld.COLORS, *toyworld.SHAPES]
    grammar += list(toyworld.SIZES)
    return list(dict.fromkeys([*grammar, *AUGMENTATION_WORDS, *RARE_TOKENS, ","]))


def build_toy_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary spells each toy word as a single token.

    Like SD's, it ends words with ``</w>``, pads with ``<|endoftext|>`` and takes ``add_tokens("<new1>")``.
    Its merges join each word's characters left to right, longer words first; built by hand, not by the
    ``tokenizers`` trainer, which breaks ties between equally frequent pairs differently in every process,
    so that its token ids (and with them every model built on it) changed from run to run.
    """
    words = toy_words()
    characters = sorted({character for word in words for character in word})
    vocab = ["<|startoftext|>", "<|endoftext|>", *characters, *(c + "</w>" for c in characters)]
    merges: list[tuple[str, str]] = []
    for word in sorted(words, key=len, reverse=True):
        pieces = [*word[:-1], word[-1] + "</w>"]
        token = pieces[0]
        for piece in pieces[1:]:
            if (token, piece) not in merges:
                merges.append((token, piece))
                vocab.append(token + piece)
            token += piece
    tokenizer = CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=merges,
        pad_token="<|endoftext|>",
        model_max_length=MAX_TOKENS,
    )
    for word in words:
        assert is_one_token(tokenizer, word), word
    return tokenizer


def toy_clip_config(vocab_size: int) -> CLIPConfig:
    """A tiny CLIP: its text tower is the diffusion model's text encoder, both towers the CLIP metrics."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=toyworld.IMAGE_SIZE,
        patch_size=8,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def toy_vae(width: int = 32, latent_channels: int = 4, downsample: int = 4) -> AutoencoderKL:
    """64×64×3 ↔ 16×16×4: a factor of 4 keeps 7-px shapes legible in the latent, as 8 does for SD at 512².

    ``width`` channels at full resolution, twice as many below; ``downsample`` 2 gives a 32×32 latent, which
    keeps the patterns of small concepts that 16×16 loses
    (docs/findings.md, "A finer latent holds the concepts")."""
    levels = downsample.bit_length()  # 2 → 2 levels, 4 → 3, 8 → 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        sample_size=toyworld.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(width,) + (2 * width,) * (levels - 1),
        layers_per_block=1,
        norm_num_groups=16,
    )


def vae_downsample(vae: AutoencoderKL) -> int:
    """How many pixels a side one latent cell spans (diffusers' ``vae_scale_factor``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def toy_unet(
    cross_attention_dim: int, latent_channels: int = 4, sample_size: int = 16, plain_top_level: bool = False
) -> UNet2DConditionModel:
    """SD's UNet at toy scale: cross-attention at 16², 8² and the 4² middle; ``attn2.to_k``/``to_v`` ≈ 3%.
    With ``plain_top_level``, a level without attention above them (``with_plain_top_level``)."""
    config = dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        norm_num_groups=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    )
    return UNet2DConditionModel(**(with_plain_top_level(config) if plain_top_level else config))


def with_plain_top_level(config: dict) -> dict:
    """A UNet config with one more level on top, as wide as the old top one and without attention (SDXL's
    top level): it reads latents twice as fine while every old level keeps its resolution, channels and
    weight shapes, one index down the down path (``down_blocks.i`` → ``down_blocks.i+1``), as it was up."""
    return {
        **config,
        "block_out_channels": (config["block_out_channels"][0], *config["block_out_channels"]),
        "down_block_types": ("DownBlock2D", *config["down_block_types"]),
        "up_block_types": (*config["up_block_types"], "UpBlock2D"),
    }


def recommended_guidance(pipe) -> float:
    """The guidance scale the pipeline's model folder sets for ``generate`` (``config.model_defaults``),
    else the paper's 6. The toy model sets 3: its palette-trained UNet pushes colours outside the palette
    into palette ones at 6, while world prompts come out as right at 3 (README, "Model defaults")."""
    return _generate_defaults(pipe).get("guidance", PAPER_GUIDANCE)


def recommended_regions(pipe) -> bool:
    """Whether the pipeline's model folder has ``generate`` draw two-object captions naming a concept by
    column (``regions.py``), else no. The toy model does: its concepts bleed into each other otherwise."""
    return _generate_defaults(pipe).get("regions", False)


def _generate_defaults(pipe) -> dict:
    folder = model_folder(pipe)
    return {} if folder is None else model_defaults(GenerateConfig, folder)  # None: built in code


def model_folder(pipe) -> Path | None:
    """The folder that holds a loaded pipeline's extras (``config.extras_folder``), which ``load_pipeline``
    leaves as its ``name_or_path``; None for one built in code or from the hub."""
    name = getattr(pipe, "name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def clip_folder(pipe) -> Path | None:
    """MODEL/clip: where a pipeline's model keeps the CLIP model for the metrics and retrieval."""
    folder = model_folder(pipe)
    return folder / "clip" if folder else None


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False, prediction_type="epsilon")


def sampling_scheduler() -> EulerAncestralDiscreteScheduler:
    """The toy model's sampler: ancestral, as the paper samples (DDIM at eta 1); on three concepts it drew
    a concept beside a world object right 8 points more often than DDIM at eta 0 (docs/findings.md)."""
    return EulerAncestralDiscreteScheduler(**NOISE_SCHEDULE, timestep_spacing="leading", steps_offset=1)


SAMPLERS = {  # config.Sampler's names; DPMSolverMultistepScheduler defaults to DPM++ 2M
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "uni_pc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,  # Stable Diffusion 1.x's own (A1111's PLMS)
}


def use_sampler(pipe, sampler: str | None) -> str | None:
    """Sample ``pipe`` with the named sampler (``config.Sampler``) on its model's noise schedule and
    prediction type; None keeps the scheduler the model ships. Returns the name of the sampler it now
    uses, for the run's config to record (None for a scheduler ``SAMPLERS`` does not name)."""
    if sampler is not None:
        pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    return next((name for name, cls in SAMPLERS.items() if type(pipe.scheduler) is cls), None)


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # the one-file checkpoints A1111 and ComfyUI keep
PIPELINE_CLASSES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
LOADING_ARGUMENTS = {  # no safety checker: none ships with customdiff, and hubs are offline
    StableDiffusionPipeline: dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
    StableDiffusionXLPipeline: {},
}
SDXL_FILE_KEY = "conditioner.embedders.1."  # the second text encoder of an SDXL file in the original layout


def pipeline_class(model_index: Path) -> type:
    """The pipeline class a diffusers folder's ``model_index.json`` names: SD 1.x/2.x or SDXL.

    Raises:
        CustomDiffError: it names another kind of pipeline.
    """
    name = json.loads(model_index.read_text()).get("_class_name", "")
    if name not in PIPELINE_CLASSES:
        raise CustomDiffError(
            f"{model_index} names a {name or 'nameless'} pipeline; pass --model a Stable Diffusion 1.x/2.x "
            "or SDXL model"
        )
    return PIPELINE_CLASSES[name]


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint file, read without its tensors' data: a ``.safetensors`` header, or
    a ``.ckpt`` memory-mapped as weights only (its ``state_dict`` when it nests one). Empty when the file
    cannot be read so (diffusers then names what is wrong with it)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                return list(handle.keys())
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError):
        return []
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return [key for key in state if isinstance(key, str)] if isinstance(state, dict) else []


def checkpoint_pipeline_class(path: Path, model_config: str | Path | None) -> type:
    """SD or SDXL for a checkpoint file: as its --model-config folder says, else by the file's keys."""
    if model_config is not None and (Path(model_config) / "model_index.json").is_file():
        return pipeline_class(Path(model_config) / "model_index.json")
    if any(key.startswith(SDXL_FILE_KEY) for key in checkpoint_keys(path)):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def load_pipeline(
    model: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    model_config: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a Stable Diffusion 1.x/2.x or SDXL model (default: the shipped toy model) for CPU or GPU use: a
    diffusers folder, or one checkpoint file in the original layout (``.safetensors``; ``.ckpt`` read as
    weights only).

    A single file holds weights alone: diffusers takes the components' configs and tokenizer from
    ``model_config`` (a diffusers folder or hub id of the same architecture), else from the hub repo of
    the architecture it recognises in the file.

    Raises:
        CustomDiffError: the folder or file is missing, not a model, or holds a missing or corrupt weights
            file; a file's configs cannot be found.
    """
    path = Path(model) if model else TOY_MODEL_DIR
    quiet_libraries()
    if path.is_file():
        return _load_single_file(path, dtype, model_config)
    if not (path / "model_index.json").is_file():
        if path == TOY_MODEL_DIR:
            raise CustomDiffError(
                f"the toy base model is missing at {path}; reinstall customdiff or pass --model"
            )
        raise CustomDiffError(
            f"{path} is not a diffusers pipeline folder (no model_index.json) nor a checkpoint file; "
            "pass --model a Stable Diffusion folder or .safetensors file"
        )
    cls = pipeline_class(path / "model_index.json")
    try:
        pipe = cls.from_pretrained(path, dtype=dtype, **LOADING_ARGUMENTS[cls])
    except (OSError, ValueError) as error:
        raise CustomDiffError(
            f"cannot load the pipeline in {path}: {_first_line(error)}; check or re-download its files"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_single_file(path: Path, dtype: torch.dtype, model_config: str | Path | None) -> DiffusionPipeline:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CustomDiffError(
            f"{path} is no checkpoint file ({' or '.join(SINGLE_FILE_SUFFIXES)}); pass --model a Stable "
            "Diffusion folder or checkpoint file"
        )
    folder = extras_folder(path, model_config)
    cls = checkpoint_pipeline_class(path, model_config)
    try:
        pipe = cls.from_single_file(
            str(path),
            config=str(model_config) if model_config is not None else None,
            local_files_only=folder is not None,
            dtype=dtype,
            **LOADING_ARGUMENTS[cls],
        )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as error:
        raise CustomDiffError(
            f"cannot load the checkpoint {path}: {_first_line(error)}; pass --model-config a diffusers "
            "folder of the same architecture (its configs and tokenizer), or check the file"
        ) from error
    if folder is not None:  # its extras (clip/, defaults) live there too: see model_folder
        pipe.register_to_config(_name_or_path=str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' loading bars and notices off the user's terminal."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def model_hash(pipe: DiffusionPipeline) -> str:
    """A short fingerprint of the base weights a concept is trained on (UNet and text encoders).

    It reads values, never a floating-point sum, whose rounding depends on the thread count and the
    device, and reads them in float16, so that a concept trained on a GPU, or on float32 weights, still
    fits the same base loaded on a CPU or in float16. Each tensor gives an even spread of its values.
    """
    digest = hashlib.sha256()
    for module in [pipe.unet] + [encoder.model for encoder in text.text_encoders(pipe)]:
        for name, tensor in sorted(module.state_dict().items()):
            values = tensor.detach().flatten()
            values = values[:: max(1, len(values) // HASH_VALUES)]
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(values.to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:12]


def spells_any_word(tokenizer: CLIPTokenizer) -> bool:
    """Whether the tokenizer spells any word from bytes (a real CLIP one), not only the toy world's words."""
    vocabulary = tokenizer.get_vocab()
    return all(symbol in vocabulary for symbol in "0123456789!?")  # CLIP's byte-level alphabet


def is_one_token(tokenizer, word: str) -> bool:
    """Whether ``tokenizer`` spells ``word`` as a single token (checked on the ids: transformers 5's
    ``encode([word])`` returns a batch, so a length check on it never fires)."""
    return len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def is_known_token(tokenizer, token: str) -> bool:
    """Whether ``token`` is a word of ``tokenizer``'s vocabulary already, so that a concept cannot add it."""
    return token in tokenizer.get_vocab() or is_one_token(tokenizer, token)


def default_initializer(tokenizer, token: str) -> str:
    """The word that starts ``token``'s embedding when none is given: for ``<newN>`` the N-th of
    INITIALIZER_CANDIDATES that is one token for ``tokenizer`` (SD: <new1> ktn, <new2> pll; toy: ktn, sks).

    Concepts trained apart on different tokens thus start apart: two tokens with near-equal features but
    different fine-tuned targets would make their closed-form merge ill-posed.
    """
    usable = [word for word in INITIALIZER_CANDIDATES if is_one_token(tokenizer, word)]
    if not usable:
        raise CustomDiffError(
            f"none of {', '.join(INITIALIZER_CANDIDATES)} is one token here; pass --initializer"
        )
    match = re.fullmatch(r"<new(\d+)>", token)
    number = int(match.group(1)) if match else 1
    return usable[(number - 1) % len(usable)]


def check_prompt(tokenizer: CLIPTokenizer, prompt: str, new_tokens: Iterable[str] = ()) -> None:
    """Reject a prompt word the tokenizer cannot spell (an unknown piece, or a closed vocabulary lacking it),
    and a modifier token no concept brought; ``new_tokens`` count as known, as they will be once training
    adds them.

    A real CLIP tokenizer spells any word from bytes, ``<new1>`` too: without the check a prompt naming a
    concept that was never applied would be drawn, silently, without it. The toy tokenizer knows only its
    own words, so a word it splits into pieces would reach the model as noise.
    """
    spells_bytes = spells_any_word(tokenizer)
    added = set(tokenizer.get_added_vocab()) | set(new_tokens)
    for word in [word for word in prompt.replace(",", " , ").split() if word not in added]:
        if toyworld.MODIFIER_TOKEN.match(word):
            raise CustomDiffError(
                f'"{prompt}" names {word}, which no concept here holds; pass --concept RUN, the run that '
                "trained it (or train it)"
            )
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if tokenizer.unk_token_id in pieces or (not spells_bytes and len(pieces) != 1):
            hint = f"words it knows: {', '.join(toy_words())}" if not spells_bytes else "check its spelling"
            raise CustomDiffError(f'the tokenizer does not know the word "{word}" in "{prompt}"; {hint}')


def clip_image_features(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP's projected image embedding (N, D); transformers 5 wraps it in an output object."""
    features = clip.get_image_features(pixel_values=pixel_values)
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def clip_text_features(clip, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's projected text embedding (N, D)."""
    features = clip.get_text_features(input_ids=input_ids)
    return features if isinstance(features, torch.Tensor) else features.pooler_output
