"""One frozen dataclass per command: its fields are the command's flags, with defaults and help.

``cli.py`` derives the argparse flags from these fields (`add_arguments`) and builds a config back from
the parsed flags and an optional ``--config FILE.toml`` (`config_from_args`); flags win over the file.
Checks that span fields live in ``__post_init__`` and raise CustomDiffError. Every run writes its
resolved config beside its outputs (`save_config`).

To add a command: write its dataclass here (positional fields first), then a handler and one
``_add_command`` line in ``cli.py``.
"""

import argparse
import dataclasses
import json
import math
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from customdiff import files, toyworld
from customdiff.errors import CustomDiffError

CONFIG_FILE_NAME = "run_config.json"
TOY_MODEL_DIR = Path(__file__).parent / "toy_model"
MODEL_DEFAULTS_FILE = "customdiff_defaults.toml"  # beside a model: its own defaults, a table per command
PAPER_GUIDANCE = 6.0  # the paper's scale, for a model that recommends none
Mode = Literal["crossattn_kv", "crossattn", "full", "token"]
Sampler = Literal["ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m", "uni_pc", "pndm"]  # ComfyUI's names
# Learning rate per image by mode: the paper's for the weights; Textual Inversion's (diffusers' example)
# for the token alone, which at the weights' rate would barely move
DEFAULT_LR: dict[str, float] = {"crossattn_kv": 1e-5, "token": 5e-4}
MODEL_CONFIG_HELP = (
    "with --model FILE: a diffusers folder (or hub id) of the same architecture for its configs and "
    "tokenizer (default: the hub repo diffusers recognises in the file)"
)
REGIONS_HELP = (
    "regional prompts: draw each object of a two-object toy-world caption that names a concept in its own "
    "column (left named first), from its own one-object caption after half the steps, so that concepts do "
    "not bleed into each other, a concept's weights acting only where its token is named; any model: a "
    "prompt written WHOLE BREAK LEFT BREAK RIGHT [BREAK …], in equal columns or generate's --region-ratios "
    "(default: the model's, else off)"
)
REGION_RATIOS_HELP = (
    'with --regions: each region\'s share of the image, "1,2" for columns (left to right) or "1;2" for rows '
    "(top to bottom), as the Regional Prompter's divide ratio (default: equal columns)"
)
CONCEPT_SCALE_HELP = (
    "strength of the concepts' UNet deltas, as a LoRA's weight in AUTOMATIC1111 or ComfyUI (1: as trained; "
    "the token rows stay as trained)"
)
SAMPLER_HELP = (
    "sampling method, by ComfyUI's name (A1111's DDIM, Euler, Euler a, DPM++ 2M, UniPC; pndm: SD 1.x's own), "
    "on the model's own noise schedule (default: the model's scheduler; the toy model's is euler_ancestral)"
)
TRIGGER_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # a prompt word and a file name anywhere


def option(default: Any, help: str, short: str | None = None, metavar: str | None = None) -> Any:
    """A ``--flag`` field with its default, help text, and optional short form (e.g. "-o") and metavar."""
    return field(default=default, metadata={"help": help, "short": short, "metavar": metavar})


def positional(help: str, optional: bool = False) -> Any:
    """A positional field (write these before the flags); an optional one defaults to None."""
    if optional:
        return field(default=None, metadata={"help": help, "positional": True})
    return field(metadata={"help": help, "positional": True})


# ---------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class ToyRenderConfig:
    """Render random captioned toy-world scenes into an image folder (PNGs + metadata.jsonl)."""

    out: Path = positional("folder to write the images and metadata.jsonl into")
    n: int = option(100, "number of images")
    seed: int = option(0, "random seed: the same seed gives the same images")
    objects: Literal["1", "2", "mixed"] = option("mixed", "objects per scene: 1, 2, or mixed (half each)")

    def __post_init__(self) -> None:
        if self.n < 1:
            raise CustomDiffError(f"--n {self.n}: pass at least 1 image")

    @property
    def n_objects(self) -> int | None:
        """Objects per scene as ``toyworld.sample_scenes`` takes it (None: mixed)."""
        return None if self.objects == "mixed" else int(self.objects)


@dataclass(frozen=True)
class ToyConceptConfig:
    """Render a built-in concept's training images (4-8 views) into an image folder."""

    name: str = positional("built-in concept (see `customdiff toyworld concepts`)")
    out: Path = positional("folder to write the images and metadata.jsonl into")
    n: int = option(6, "number of images, 4 to 8 as the spec's concepts have")
    token: str = option("<new1>", "modifier token the captions use for the concept")
    seed: int = option(0, "random seed: the same seed gives the same images")

    def __post_init__(self) -> None:
        toyworld.get_concept(self.name)
        if not 4 <= self.n <= 8:
            raise CustomDiffError(f"--n {self.n}: a concept has 4 to 8 images; pass --n between 4 and 8")
        check_token(self.token, "--token")


@dataclass(frozen=True)
class ToyConceptsConfig:
    """List the built-in concepts: name, shape and what they look like."""


@dataclass(frozen=True)
class JudgeConfig:
    """Read toy-world images back into words and, with --prompt, score them against a prompt."""

    images: tuple[Path, ...] = positional("64×64 toy-world images to read")
    prompt: str | None = option(None, "toy-world caption to score each image against")
    concept: tuple[str, ...] = option(
        (),
        "for each token in --prompt: a built-in concept or a folder of its images",
        metavar="TOKEN=NAME_OR_DIR",
    )

    def __post_init__(self) -> None:
        concepts = self.concepts
        if self.prompt is not None:
            for thing in toyworld.parse_caption(self.prompt).things:
                if thing.is_concept and thing.color not in concepts:
                    raise CustomDiffError(
                        f"--prompt names {thing.color}; pass --concept {thing.color}=NAME_OR_DIR"
                    )

    @property
    def concepts(self) -> dict[str, str]:
        """Modifier token → built-in concept name or folder, from the ``--concept`` entries."""
        concepts: dict[str, str] = {}
        for entry in self.concept:
            token, equals, value = entry.partition("=")
            if not equals or not value:
                raise CustomDiffError(f'--concept "{entry}": write TOKEN=NAME_OR_DIR, e.g. <new1>=starfish')
            check_token(token, f'--concept "{entry}"')
            if token in concepts:
                raise CustomDiffError(f"--concept: {token} is given twice; give each token once")
            concepts[token] = value
        return concepts


@dataclass(frozen=True)
class DemoConfig:
    """Show the toy world: grids of random scenes and of every built-in concept, with their captions."""

    out: Path = option(Path("demo_out"), "folder to write the demo into", short="-o")
    seed: int = option(0, "random seed: the same seed gives the same images")


@dataclass(frozen=True)
class PretrainConfig:
    """Train the toy base model from scratch: tokenizer, VAE, CLIP, then the UNet (resumable)."""

    out: Path = option(
        Path("runs/pretrain"), "run folder: checkpoints, previews, log and the model in OUT/model", short="-o"
    )
    seed: int = option(0, "random seed of weights and data")
    stage: Literal["all", "vae", "clip", "unet"] = option(
        "all", "stage to run; vae and clip may run in two processes at once, unet needs both done"
    )
    vae_steps: int = option(3000, "autoencoder training steps")
    vae_batch_size: int = option(32, "autoencoder batch size")
    vae_lr: float = option(1e-3, "autoencoder peak learning rate")
    vae_wild_share: float = option(
        0.5,
        "share of autoencoder images showing patterned objects in random colours outside the palette "
        "(concepts are such objects, so the autoencoder must draw any colour, as SD's does)",
    )
    vae_object_weight: float = option(
        4.0,
        "weight of object pixels in the autoencoder's reconstruction loss against 1 for the background: a "
        "small patterned concept must not lose to the flat fill around it",
    )
    vae_width: int = option(
        32,
        "autoencoder channels at full resolution (twice as many below); with --init-from and --stage vae, "
        "a width other than the start's trains a new autoencoder that keeps the start's latents of world "
        "scenes (--vae-anchor)",
    )
    vae_latent_channels: int = option(
        4,
        "latent channels of a new autoencoder (SD's 4; SD 3's 16 hold more detail at the same 16×16); with "
        "--init-from, a number other than the start's trains a new one, whose latents the UNet learns anew",
    )
    vae_downsample: Literal[2, 4, 8] = option(
        4,
        "pixels a side of one latent cell of a new autoencoder: 4 (16×16 latents, the shipped model's) or 2 "
        "(32×32: small concepts keep their patterns, at four times the UNet's work); with --init-from, "
        "another factor than the start's trains a new one, whose latents the UNet learns anew",
    )
    unet_plain_top_level: bool = option(
        False,
        "for latents twice as fine as the start UNet's: add a top level without attention (as SDXL's) and "
        "keep the start UNet whole beneath it, at 1.3× its step cost instead of 4.6× for running every level "
        "at the finer size",
    )
    vae_anchor: float = option(
        1.0,
        "with --init-from and --stage vae: weight of keeping the start's latents of world scenes, so that "
        "its UNet still fits the fine-tuned autoencoder",
    )
    vae_decoder_only: bool = option(
        False,
        "with --init-from and --stage vae: train the decoder alone, so that every latent stays the start's "
        "and its UNet fits exactly",
    )
    clip_steps: int = option(1500, "CLIP contrastive training steps")
    clip_batch_size: int = option(256, "CLIP batch size (each image also meets a hard-negative caption)")
    clip_lr: float = option(1e-3, "CLIP peak learning rate")
    unet_steps: int = option(20000, "UNet training steps")
    batch_size: int = option(64, "UNet batch size")
    lr: float = option(5e-4, "UNet peak learning rate (warmup, then cosine decay)")
    pool_size: int = option(60000, "renders encoded once into the UNet's latent training pool")
    two_object_share: float = option(0.5, "share of two-object scenes in training data")
    caption_dropout: float = option(0.1, "share of empty captions, for classifier-free guidance")
    size_dropout: float = option(
        0.25,
        'share of one-object captions without their size word: "a red star on a gray background" is one '
        "object of either size, as class and concept prompts say it",
    )
    unet_wild_share: float = option(
        0.2,
        "share of the UNet's pool showing objects in random colours outside the palette, captioned without "
        'a colour ("a small star on a gray background"): class prompts draw a varied class, as in SD, and '
        "the UNet can draw the colours a concept's token steers it to",
    )
    unet_wild_partners: float = option(
        0.0,
        'share of two-object wild scenes whose other object is a world one, named by its colour ("a star '
        'and a blue circle on a white background"): the class prompt of a concept composed with a world '
        "object, which the UNet has otherwise never been shown",
    )
    unet_wild_codes: float = option(
        0.0,
        "share of wild scenes whose caption holds a rare word in the colour slot, its text features there "
        "replaced by an appearance code (a linear map of its colours and pattern); the rest stay "
        "colourless. The UNet so learns a continuous space of looks for a concept's K/V to steer, as "
        "Stable Diffusion's vocabulary gives it",
    )
    held_out: tuple[str, ...] = option(
        (
            "red star grass",
            "blue ring sand",
            "yellow cross black",
            "green triangle sky",
            "purple square white",
            "orange circle gray",
        ),
        'colour-shape-background combinations never trained on, e.g. "red star grass"',
    )
    unseen_every: int = option(5, "captions whose CRC32 is divisible by this are never trained on")
    checkpoint_every: int = option(250, "steps between checkpoints (resume after a kill)")
    export_every: int = option(1000, "UNet steps between exports of OUT/model and a preview grid")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("bf16", "autocast precision of training")
    threads: int | None = option(None, "CPU threads (default: torch's choice)")
    init_from: Path | None = option(
        None,
        "continue from a pretrained toy model: keep its tokenizer and CLIP, start the UNet from its, and "
        "keep its VAE (with --stage vae: fine-tune it)",
    )

    def __post_init__(self) -> None:
        for combination in self.held_out:
            color, shape, background = (combination.split() + ["", "", ""])[:3]
            if (
                color not in toyworld.COLORS
                or shape not in toyworld.SHAPES
                or background not in toyworld.BACKGROUNDS
            ):
                raise CustomDiffError(
                    f'--held-out "{combination}": write "COLOUR SHAPE BACKGROUND", e.g. "red star grass"'
                )
        shares = ("vae_wild_share", "unet_wild_share", "unet_wild_partners", "unet_wild_codes")
        for name in (*shares, "size_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise CustomDiffError(f"--{name.replace('_', '-')} is a share: give a number from 0 to 1")
        if self.vae_width < 1 or self.vae_width % 16:
            raise CustomDiffError("--vae-width: give a positive multiple of 16 (its norm has 16 groups)")
        if self.vae_downsample not in (2, 4, 8):
            raise CustomDiffError("--vae-downsample: give 2, 4 or 8 (pixels a side of one latent cell)")
        if self.vae_latent_channels < 1:
            raise CustomDiffError("--vae-latent-channels: give a positive number (SD's autoencoder has 4)")
        if self.vae_decoder_only and (self.init_from is None or self.stage != "vae"):
            raise CustomDiffError(
                "--vae-decoder-only fine-tunes a model's decoder: add --init-from MODEL --stage vae"
            )


@dataclass(frozen=True)
class GenerateConfig:
    """Generate images from prompts with a base model (default: the shipped toy model)."""

    command: ClassVar[str] = "generate"
    model_settable: ClassVar[tuple[str, ...]] = ("guidance", "regions")

    prompt: tuple[str, ...] | None = positional(
        "the prompts, each in quotes (or give --prompts FILE)", optional=True
    )
    out: Path = option(Path("samples"), "folder for the PNGs, grid.png and metadata.jsonl", short="-o")
    prompts: Path | None = option(None, "text file with one prompt a line, all generated in one run")
    n: int = option(4, "images per prompt")
    steps: int = option(50, "sampling steps")
    guidance: float | None = option(None, "classifier-free guidance scale (default: the model's, else 6)")
    sampler: Sampler | None = option(None, SAMPLER_HELP)
    seed: int = option(0, "seed of image 0; image i uses seed + i")
    model: Path | None = option(
        None, "diffusers Stable Diffusion folder or checkpoint file (default: the toy model)"
    )
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)
    concept: tuple[Path, ...] = option(
        (),
        "concept.safetensors (or its folder) to apply to the model first; several are merged in memory as "
        "customdiff merge merges them (its defaults), a prompt or column naming one of them drawn with its "
        "own weights",
    )
    rename_tokens: bool = option(
        False, "with several --concept: give a token an earlier one already uses the first free <newN>"
    )
    concept_scale: float = option(1.0, CONCEPT_SCALE_HELP)
    negative_prompt: str = option("", "what guidance steers away from, for every prompt (default: nothing)")
    regions: bool | None = option(None, REGIONS_HELP)
    region_ratios: str | None = option(None, REGION_RATIOS_HELP)
    batch_size: int = option(16, "images denoised at once")

    def __post_init__(self) -> None:
        fill_from_model(self, {"guidance": PAPER_GUIDANCE, "regions": False})
        check_region_ratios(self)
        if isinstance(self.prompt, str):  # GenerateConfig("a red star") from code
            object.__setattr__(self, "prompt", (self.prompt,))
        if bool(self.prompt) == (self.prompts is not None):
            raise CustomDiffError("give PROMPTs or --prompts FILE (one of them)")
        if self.n < 1 or self.steps < 1:
            raise CustomDiffError("--n and --steps take positive numbers")
        check_concept_scale(self)
        if self.concept_scale != 1 and not self.concept:
            raise CustomDiffError("--concept-scale scales a concept: pass it with --concept")


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to learn: its image folder, class word, modifier token and the token's initializer;
    as diffusers names them, also the caption of its uncaptioned images and its own class images."""

    images: Path
    class_word: str
    token: str
    initializer: str | None  # None: models.default_initializer picks one for the token
    caption: str | None = None  # for images without one of their own (diffusers' instance prompt)
    class_images: Path | None = None  # its regularization images (diffusers' "class_data_dir")
    class_prompt: str | None = None  # their caption, or a file of one a line (diffusers' "class_prompt")


@dataclass(frozen=True)
class FinetuneConfig:
    """Teach the base model concepts from a few images each (Custom Diffusion; several train jointly)."""

    command: ClassVar[str] = "train"
    model_settable: ClassVar[tuple[str, ...]] = (
        "steps", "lr", "token_lr", "augment", "composed_views", "regional_views", "snr_gamma"
    )  # fmt: skip

    images: Path | None = option(
        None, "folder of the concept's images (captions from metadata.jsonl or .txt)", metavar="DIR"
    )
    class_word: str | None = option(
        None, "the concept's class, e.g. cat or star; bare captions use it (default: --instance-prompt's)"
    )
    instance_prompt: str | None = option(
        None,
        "with --images: caption of the images without one of their own, naming --token before the class "
        'word, e.g. "photo of a <new1> cat" (diffusers\' --instance_prompt; default: photo of a TOKEN CLASS)',
    )
    concept: tuple[str, ...] = option(
        (),
        "concepts to train jointly, DIR:CLASS each, e.g. --concept mug:mug --concept cat:cat "
        "(tokens <new1>, <new2>, …; instead of --images/--class-word)",
        metavar="DIR:CLASS",
    )
    concepts_list: Path | None = option(
        None,
        'JSON list of concepts to train jointly: {"images": DIR, "class_word": WORD} each, optionally '
        '"token" and "initializer"; or the diffusers example\'s list ("instance_prompt", "class_prompt", '
        '"instance_data_dir", "class_data_dir")',
    )
    out: Path = option(Path("runs/concept"), "folder for concept.safetensors, checkpoints, previews", "-o")
    model: Path | None = option(
        None, "base model: a diffusers Stable Diffusion folder or checkpoint file (default: the toy model)"
    )
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)
    token: str = option("<new1>", "modifier token that names the concept in captions and prompts")
    init_from: tuple[Path, ...] = option(
        (),
        "start the trained tensors from a concept of the same tokens and base model instead of the base "
        "(its deltas and token rows; the optimizer starts afresh): train a concept further, or concepts "
        "trained apart jointly from their merge; several are merged first as customdiff merge merges them "
        '(its defaults) (README, "Several concepts")',
        metavar="CONCEPT",
    )
    keep_ranks: bool = option(
        False,
        "with --init-from a compressed concept: keep each delta at the rank of its factors, so that training "
        "refines the cut and the concept stays as small (customdiff compress --refine-steps runs this)",
    )
    joint_start: Literal["merge", "base"] = option(
        "merge",
        "with several concepts: merge, train each alone first (--steps, in OUT/apart/<token>), then all "
        "jointly from their merge for half of --steps; base: jointly from the base weights, as the paper "
        '(which keeps fewer of the concepts: README, "Joint training from a merge")',
    )
    initializer: str | None = option(
        None,
        "rare word (one token) whose embedding starts the modifier token's (default: one per token, "
        "<new1> ktn, <new2> pll or sks, …, so that concepts trained apart start apart and merge well)",
    )
    mode: Mode = option(
        "crossattn_kv",
        "what trains besides the token: cross-attention K/V (the paper), all of it, the UNet, nothing",
    )
    reg: Literal["generate", "retrieve", "none"] = option(
        "generate",
        "regularization images: sampled from the base model, retrieved from --reg-dir by CLIP, or none",
    )
    reg_dir: Path | None = option(None, "captioned image folder to retrieve regularization images from")
    class_images: Path | None = option(
        None,
        "with --images: your own regularization images, used as they are (fewer than --num-reg: --reg adds "
        "the rest): a folder, or an images.txt list of paths (diffusers' --class_data_dir)",
    )
    class_prompt: str | None = option(
        None, "caption of --class-images that have none of their own (default: the class word)"
    )
    num_reg: int = option(200, "number of regularization images")
    prior_loss_weight: float = option(
        1.0,
        "weight of the regularization images' loss against the target views' (0: partners of the "
        "two-object views only)",
    )
    snr_gamma: float | None = option(
        None,
        "Min-SNR loss weighting (Hang et al. 2023; diffusers' --snr_gamma, 5 there): each timestep's loss "
        "weighted by min(SNR, gamma) / SNR (/ (SNR + 1) for v-prediction), so that low-noise steps weigh "
        "less (0: off, as the paper; default: the model's, else 0)",
    )
    refit_weight: float | None = option(
        None,
        "crossattn_kv: after training, refit the K/V deltas in closed form, as a merge of the concept alone, "
        "so that ~1000 ordinary captions keep their outputs; the weight of those captions against the "
        "concept's (0: no refit; default: the model's, else 0)",
    )
    steps: int | None = option(None, "training steps (default: the model's, else 400)")
    lr: float | None = option(
        None,
        "learning rate per image with --scale-lr (default: the model's for the mode, else the paper's 1e-5; "
        "for token, the Textual Inversion baseline's 5e-4, as a row this small needs)",
    )
    token_lr: float | None = option(
        None,
        "learning rate per image of the modifier tokens' embedding rows (default: the model's for the mode, "
        "else --lr, as the paper trains them)",
    )
    scale_lr: bool = option(
        True, "multiply --lr and --token-lr by the batch size × processes, as the paper does"
    )
    batch_size: int = option(
        4,
        "images per step and concept (a joint run of N concepts takes N× as many): half target, half "
        "regularization when --reg is on",
    )
    augment: bool | None = option(
        None,
        "the paper's resize augmentation with loss mask and size prefixes (default: the model's, else on)",
    )
    composed_views: float | None = option(
        None,
        "share of target views made two-object scenes, the target's object beside a regularization "
        "image's, the caption naming both (cut-mix; toy-grammar captions), so that the concept composes "
        "with other objects (default: the model's, else 0; 0 with --reg none)",
    )
    regional_views: bool | None = option(
        None,
        "train views whose captions regional prompts split (a two-object toy caption naming a token, or "
        "WHOLE BREAK LEFT BREAK RIGHT) as generate --regions draws them: in the steps after its switch each "
        "region of pixels reads its own caption, one naming no token with the base cross-attention weights "
        "(default: the model's, else off)",
    )
    flip: bool = option(True, "mirror half the images")
    seed: int = option(0, "random seed: the same seed gives the same concept")
    checkpoint_every: int = option(100, "steps between checkpoints (training resumes from the last)")
    save_every: int = option(
        0,
        "steps between concepts saved as training goes, each usable as it stands (OUT/step-N), to pick the "
        "best step afterwards (0: none)",
    )
    preview_every: int = option(0, "steps between preview grids in OUT/previews (0: none)")
    preview_prompts: tuple[str, ...] = option(
        (),
        "prompts of the preview grids, two samples each (default: three training captions and a class "
        "prompt)",
        metavar="PROMPT",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = option(
        "no",
        "autocast precision: bf16 for a model of Stable Diffusion's size on a GPU or a CPU with AMX "
        "(1.5× faster here); the toy model is faster in no",
    )
    gradient_checkpointing: bool = option(
        False, "recompute UNet activations in the backward pass to save memory"
    )
    num_processes: int = option(
        1,
        "processes to train in, each with its own batch, gradients averaged: one per GPU, or CPU processes "
        "without one (customdiff starts them; under accelerate launch or torchrun the launch's count holds)",
    )
    cache_dir: Path | None = option(
        None, "where generated regularization images are kept (default: ~/.cache/customdiff)"
    )

    def __post_init__(self) -> None:
        default_lr = DEFAULT_LR.get(self.mode, DEFAULT_LR["crossattn_kv"])
        if self.reg == "none" and self.composed_views is None:  # the model's share needs partners
            object.__setattr__(self, "composed_views", 0.0)
        fallbacks = {
            "steps": 400, "lr": default_lr, "token_lr": None, "augment": True, "composed_views": 0.0,
            "refit_weight": 0.0, "regional_views": False, "snr_gamma": 0.0,
        }  # fmt: skip
        fill_from_model(self, fallbacks)
        if self.token_lr is None:  # the paper trains the rows at the weights' learning rate
            object.__setattr__(self, "token_lr", self.lr)
        if self.instance_prompt is not None:
            after_token = class_word_after(self.instance_prompt, self.token)
            if self.images is None:
                raise CustomDiffError(
                    "--instance-prompt captions the images of --images: pass --images DIR too"
                )
            if after_token is None:
                raise CustomDiffError(
                    f'--instance-prompt "{self.instance_prompt}" names no class word after --token '
                    f'{self.token}; write it as "photo of a {self.token} cat"'
                )
            object.__setattr__(self, "class_word", self.class_word or after_token)
        given = [self.images is not None or self.class_word is not None, bool(self.concept)]
        given.append(self.concepts_list is not None)
        if sum(given) != 1 or (given[0] and (self.images is None or self.class_word is None)):
            raise CustomDiffError(
                "give the concept as --images DIR --class-word WORD (e.g. star), or several as "
                "--concept DIR:CLASS … or --concepts-list FILE.json"
            )
        specs = self.concept_specs()
        for spec in specs:
            check_token(spec.token, "--token")
        tokens = [spec.token for spec in specs]
        if len(set(tokens)) != len(tokens):
            raise CustomDiffError(f"two concepts use the token {tokens[0]}; give each its own token")
        for name in ("steps", "num_reg", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise CustomDiffError(f"--{name.replace('_', '-')} {getattr(self, name)}: pass at least 1")
        for name in ("lr", "token_lr"):
            if getattr(self, name) <= 0:
                raise CustomDiffError(
                    f"--{name.replace('_', '-')} {getattr(self, name)}: pass a positive learning rate"
                )
        if self.keep_ranks and len(self.init_from) != 1:
            raise CustomDiffError("--keep-ranks keeps the ranks of one compressed concept: --init-from it")
        if self.keep_ranks and self.refit_weight:
            raise CustomDiffError(
                "--keep-ranks keeps low-rank deltas, a refit does not: pass --refit-weight 0"
            )
        if self.refit_weight < 0:
            raise CustomDiffError(f"--refit-weight {self.refit_weight}: pass a weight of 0 (off) or above")
        if self.refit_weight and self.mode != "crossattn_kv":
            raise CustomDiffError(
                "--refit-weight refits K/V deltas alone; pass --mode crossattn_kv or --refit-weight 0"
            )
        if self.prior_loss_weight < 0:
            raise CustomDiffError(
                f"--prior-loss-weight {self.prior_loss_weight}: pass a weight of 0 or above"
            )
        if not 0 <= self.snr_gamma < math.inf:
            raise CustomDiffError(f"--snr-gamma {self.snr_gamma}: pass a positive number, e.g. 5, or 0 (off)")
        if self.prior_loss_weight != 1 and self.reg == "none":
            raise CustomDiffError("--prior-loss-weight weighs regularization images: drop it or --reg none")
        if not 0 <= self.composed_views <= 1:
            raise CustomDiffError(f"--composed-views {self.composed_views}: pass a share from 0 to 1")
        if self.composed_views and self.reg == "none":
            raise CustomDiffError(
                "--composed-views pairs targets with regularization images: drop --reg none"
            )
        if self.num_processes < 1:
            raise CustomDiffError(f"--num-processes {self.num_processes}: pass 1 or more")
        if self.save_every < 0:
            raise CustomDiffError(f"--save-every {self.save_every}: pass a number of steps, or 0 for none")
        if self.preview_prompts and not self.preview_every:
            raise CustomDiffError("--preview-prompts are drawn every --preview-every N steps: pass N")
        if self.class_prompt and not self.class_images:
            raise CustomDiffError("--class-prompt captions --class-images: pass --class-images DIR too")
        if self.class_images and (self.images is None or self.reg == "none"):
            raise CustomDiffError(
                "--class-images regularize the concept of --images (a concepts list names each concept's "
                '"class_data_dir"); pass --images DIR and drop --reg none'
            )
        if self.reg == "retrieve" and self.reg_dir is None:
            raise CustomDiffError("--reg retrieve needs --reg-dir, a captioned image folder to retrieve from")
        if self.reg != "none" and self.batch_size % 2:
            raise CustomDiffError(
                f"--batch-size {self.batch_size}: with regularization half the batch is target images and "
                "half regularization images; pass an even number"
            )

    @property
    def trains_apart_first(self) -> bool:
        """Several concepts, each trained alone first, then jointly from their merge (``--joint-start``)."""
        return self.joint_start == "merge" and not self.init_from and len(self.concept_specs()) > 1

    def concept_specs(self) -> list[ConceptSpec]:
        """The concepts to learn, in token order."""
        if self.images is not None:
            return [
                ConceptSpec(
                    Path(self.images),
                    self.class_word,
                    self.token,
                    self.initializer,
                    self.instance_prompt,
                    class_images=self.class_images,
                    class_prompt=self.class_prompt or self.class_word,
                )
            ]
        if self.concept:
            specs = []
            for number, item in enumerate(self.concept, 1):
                folder, _, class_word = item.rpartition(":")  # rpartition: C:\ paths keep their colon
                if not folder or not class_word:
                    raise CustomDiffError(f'--concept "{item}": write DIR:CLASS, e.g. images/mug:mug')
                specs.append(ConceptSpec(Path(folder), class_word, f"<new{number}>", self.initializer))
            return specs
        return read_concepts_list(self.concepts_list, self.initializer)


def class_word_after(prompt: str, token: str) -> str | None:
    """The word after ``token`` in an instance prompt ("photo of a <new1> cat" → "cat"); None without one."""
    words = prompt.split()
    return words[words.index(token) + 1] if token in words[:-1] else None


def read_concepts_list(path: Path, initializer: str | None) -> list[ConceptSpec]:
    """The concepts of a ``--concepts-list`` JSON file: a list of objects in our keys or in those of the
    diffusers example (``instance_prompt`` names the token before the class word, e.g. ``photo of a <new1>
    cat``; ``class_data_dir`` holds the class images captioned ``class_prompt``)."""
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as error:
        raise CustomDiffError(f"cannot read --concepts-list {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise CustomDiffError(f"--concepts-list {path} is not valid JSON: {error}") from error
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise CustomDiffError(
            f'--concepts-list {path}: write a JSON list of {{"images": DIR, "class_word": WORD}} objects'
        )
    specs = []
    for number, entry in enumerate(entries, 1):
        images = entry.get("images", entry.get("instance_data_dir"))
        caption = entry.get("instance_prompt")
        words = caption.split() if isinstance(caption, str) else []
        named = [word for word in words if toyworld.MODIFIER_TOKEN.match(word)]
        token = entry.get("token") or (named[0] if named else f"<new{number}>")
        after_token = class_word_after(" ".join(words), token)
        class_prompt = entry.get("class_prompt")
        one_word = isinstance(class_prompt, str) and re.fullmatch(r"[\w-]+", class_prompt)  # not a file
        class_word = entry.get("class_word") or after_token or (class_prompt if one_word else None)
        if images is None or not class_word:
            raise CustomDiffError(
                f'--concepts-list {path}: entry {number} needs "images" (a folder) and "class_word", or '
                'diffusers\' "instance_data_dir" and an "instance_prompt" naming its token before the class'
            )
        class_images = entry.get("class_data_dir")
        specs.append(
            ConceptSpec(
                Path(images),
                class_word,
                token,
                entry.get("initializer", initializer),
                caption,
                Path(class_images) if class_images else None,
                class_prompt or class_word,
            )
        )
    return specs


@dataclass(frozen=True)
class EvalConfig:
    """Score a concept as the paper does: text and image alignment, forgetting (KID), the toy judge."""

    command: ClassVar[str] = "generate"  # it samples as generate does: one guidance for both
    model_settable: ClassVar[tuple[str, ...]] = ("guidance", "regions")

    concept: Path = positional("concept.safetensors (or its folder) to evaluate")
    out: Path | None = option(
        None, "folder for eval.json, eval.md and the samples (default: CONCEPT's folder/eval)", short="-o"
    )
    model: Path | None = option(None, "the base model the concept was trained on (default: the toy model)")
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)
    images: tuple[Path, ...] = option(
        (), "the concept's images, a folder per token (default: the folders it was trained on)"
    )
    prompts: Path | None = option(
        None, "prompts naming the concept, one a line (default: the toy world's prompt kinds)"
    )
    clip: Path | None = option(None, "transformers CLIP folder for the metrics (default: MODEL/clip)")
    n: int = option(4, "samples per prompt")
    steps: int = option(50, "sampling steps")
    guidance: float | None = option(None, "classifier-free guidance scale (default: the model's, else 6)")
    sampler: Sampler | None = option(None, SAMPLER_HELP)
    seed: int = option(0, "seed of sample 0 of each prompt")
    regions: bool | None = option(None, REGIONS_HELP)
    region_ratios: str | None = option(None, REGION_RATIOS_HELP)
    concept_scale: float = option(1.0, CONCEPT_SCALE_HELP)

    def __post_init__(self) -> None:
        default_out(self, concept_folder(self.concept) / "eval")
        fill_from_model(self, {"guidance": PAPER_GUIDANCE, "regions": False})
        check_region_ratios(self)
        check_concept_scale(self)
        if self.n < 2 or self.steps < 1:
            raise CustomDiffError("--n takes 2 or more (KID compares sets), --steps a positive number")


@dataclass(frozen=True)
class CompressConfig:
    """Keep a concept's weight deltas in low rank (SVD) for a smaller file (the paper's compression)."""

    concept: Path = positional("concept.safetensors (or its folder) to compress")
    out: Path | None = option(
        None,
        "folder for the compressed concept.safetensors (default: beside CONCEPT's folder, named after it and "
        "the cut, e.g. runs/starfish-energy0.6)",
        short="-o",
    )
    rank: int | None = option(None, "keep this many singular values of each delta")
    energy: float | None = option(
        None, "keep the fewest singular values whose sum reaches this share of all (the paper: 0.6)"
    )
    plain: bool = option(
        False,
        "keep each delta's truncated SVD, as the paper does, instead of the factors of that rank that change "
        "the outputs of the concept's and ordinary captions least (those need the base model, --model)",
    )
    model: Path | None = option(None, "the base model the concept was trained on (default: the toy model)")
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)
    refine_steps: int = option(
        0,
        "then train the cut this many steps on the concept's own images and settings (read from its file), "
        "each delta kept at its rank, into OUT (the cut alone in OUT/cut): a 60%% cut of a toy starfish "
        'refined 1000 steps drew it as often as the full delta (README, "Compression"; 0: none)',
    )

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise CustomDiffError("give --rank R or --energy E (one of them)")
        if self.refine_steps < 0:
            raise CustomDiffError(f"--refine-steps {self.refine_steps}: pass a number of steps, or 0 (none)")
        cut = f"rank{self.rank}" if self.rank is not None else f"energy{self.energy:g}"
        folder = concept_folder(self.concept)
        default_out(self, folder.with_name(f"{folder.name}-{cut}"))


@dataclass(frozen=True)
class MergeConfig:
    """Merge separately trained concepts into one, in closed form (the paper's §3.2)."""

    concepts: tuple[Path, ...] = positional("concept files (or their folders) to merge, of one base model")
    out: Path | None = option(
        None,
        "folder for the merged concept.safetensors (default: beside the first concept's folder, named after "
        "the concepts' folders, e.g. runs/starfish+donut)",
        short="-o",
    )
    model: Path | None = option(None, "the base model the concepts were trained on (default: the toy model)")
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)
    reg_captions: Path | None = option(
        None,
        "ordinary captions whose outputs the merge keeps, one a line (default: toy-world captions for "
        "the toy model, else the list shipped with customdiff)",
    )
    num_reg_captions: int = option(1000, "how many regularization captions to use")
    method: Literal["weighted", "constrained"] = option(
        "weighted",
        "weighted: fit each concept's outputs at every position of its captions, padding included, in least "
        "squares against the regularization captions; constrained: the paper's Eq. 4, exact from the "
        "modifier token to the end of text",
    )
    reg_weight: float = option(0.25, "weighted: the regularization captions' weight against the concepts'")
    context_share: float = option(
        0.5,
        "weighted: the share of each concept's fit given to the regularization captions that name its class "
        "word, with its token put in (0: its own captions alone)",
    )
    seed: int = option(0, "random seed of the sampled toy-world captions")
    rename_tokens: bool = option(
        False,
        "give a token that an earlier concept already uses (each trained as <new1>) the first free <newN>, "
        "instead of refusing the merge",
    )

    def __post_init__(self) -> None:
        folders = [concept_folder(path) for path in self.concepts]
        if folders:
            default_out(self, folders[0].with_name("+".join(folder.name for folder in folders)))
        if self.num_reg_captions < 1:
            raise CustomDiffError(f"--num-reg-captions {self.num_reg_captions}: pass at least 1")
        if self.reg_weight <= 0:
            raise CustomDiffError(f"--reg-weight {self.reg_weight}: pass a weight above 0, e.g. 0.25")
        if not 0 <= self.context_share < 1:
            raise CustomDiffError(f"--context-share {self.context_share}: pass a share from 0 to below 1")


@dataclass(frozen=True)
class InfoConfig:
    """Say what concept files hold: how to prompt them, what they change, how they were made."""

    concepts: tuple[Path, ...] = positional("concept files (or their folders)")
    model: Path | None = option(None, "the base model to check them against (default: the toy model)")
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)


@dataclass(frozen=True)
class ExportConfig:
    """Write a concept as the files diffusers, or AUTOMATIC1111 and ComfyUI, load."""

    concept: Path = positional("concept.safetensors (or its folder) to export")
    format: Literal["webui", "diffusers"] = option(
        "webui", "webui: kohya LoRA + embeddings (A1111, ComfyUI); diffusers: attention procs + embeddings"
    )
    out: Path | None = option(
        None, "folder to write the files into (default: CONCEPT's folder/webui or /diffusers)", short="-o"
    )
    trigger: tuple[str, ...] = option(
        (), "prompt word for each token, also the files' names, e.g. mymug (default: new1 for <new1>)"
    )
    model: Path | None = option(
        None, "the concept's base model, for the diffusers attention file (default: the toy model)"
    )
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)

    def __post_init__(self) -> None:
        default_out(self, concept_folder(self.concept) / self.format)
        for word in self.trigger:
            if not TRIGGER_WORD.match(word):
                raise CustomDiffError(
                    f'--trigger "{word}": write one word of letters, digits, - or _ starting with a letter '
                    "(it names files too), e.g. mymug"
                )


@dataclass(frozen=True)
class ImportConfig:
    """Read a concept trained by diffusers' Custom Diffusion example or the paper's scripts, or exported
    for AUTOMATIC1111 / ComfyUI."""

    source: Path = positional(
        "the folder diffusers' train_custom_diffusion.py wrote (pytorch_custom_diffusion_weights and a "
        "<token>.bin or .safetensors each), the delta.bin or delta.ckpt of the paper's scripts, or a folder "
        "of lora/ (one kohya LoRA of the UNet's cross-attention) and embeddings/ (TRIGGER.safetensors or "
        ".pt each, the token <TRIGGER>), as export --format webui writes"
    )
    instance_prompt: tuple[str, ...] = option(
        (),
        'the prompt each token was trained on, naming it before its class word, e.g. "photo of a <new1> cat" '
        "(diffusers' --instance_prompt), in token order",
    )
    class_word: tuple[str, ...] = option(
        (),
        "each token's class word, in token order, instead of --instance-prompt (captions: photo of a "
        "TOKEN CLASS)",
    )
    out: Path | None = option(
        None, "folder for the concept.safetensors (default: SOURCE's folder/customdiff)", short="-o"
    )
    model: Path | None = option(None, "the base model it was trained from (default: the toy model)")
    model_config: Path | None = option(None, MODEL_CONFIG_HELP)

    def __post_init__(self) -> None:
        if bool(self.instance_prompt) == bool(self.class_word):
            raise CustomDiffError(
                'give --instance-prompt "photo of a <new1> cat" or --class-word cat (one of them, one a '
                "token)"
            )
        default_out(self, concept_folder(self.source) / "customdiff")


def model_defaults(config_class: type, model: Path | str | None) -> dict[str, Any]:
    """The defaults a model folder (None: the toy model) sets in the ``[config_class.command]`` table of its
    ``MODEL_DEFAULTS_FILE``, checked like a ``--config`` file; {} when it has none. A key may hold a table
    by mode (``[train.lr]``, ``crossattn_kv = 1e-4``).

    The paper's settings suit Stable Diffusion; a model such as the toy one can name its own (README,
    "Model defaults"). Only the fields ``config_class.model_settable`` names can be set so.
    """
    path = (Path(model) if model else TOY_MODEL_DIR) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    command, settable = config_class.command, config_class.model_settable
    table = _read_toml(path, str(path)).get(command, {})
    if not isinstance(table, dict) or not set(table) <= set(settable):
        raise CustomDiffError(f"{path}: [{command}] may set only {', '.join(settable)}, each a flag value")
    values = {}
    for key, value in table.items():
        if isinstance(value, dict):  # one value per mode
            if unknown := sorted(set(value) - set(get_args(Mode))):
                modes = ", ".join(get_args(Mode))
                raise CustomDiffError(f"{path}: [{command}.{key}] names no mode {unknown}; modes: {modes}")
            values[key] = {
                mode: _check_values(config_class, {key: item}, path)[key] for mode, item in value.items()
            }
        else:
            values[key] = _check_values(config_class, {key: value}, path)[key]
    return values


def extras_folder(model: Path | str | None, model_config: Path | str | None = None) -> Path | None:
    """The folder that holds a model's extras (``clip/``, ``MODEL_DEFAULTS_FILE``): the model's own folder
    (None: the toy model), or for a checkpoint file its ``--model-config`` folder; None when a file has none
    (its configs come from the hub)."""
    if model is None:
        return TOY_MODEL_DIR
    if Path(model).is_file():
        return Path(model_config) if model_config is not None and Path(model_config).is_dir() else None
    return Path(model)


def fill_from_model(config: Any, fallbacks: dict[str, Any]) -> None:
    """Set each field of ``fallbacks`` left None to the model's default (from its table for the config's
    mode, if it has one per mode), else to the fallback."""
    unset = [name for name in fallbacks if getattr(config, name) is None]
    folder = extras_folder(config.model, config.model_config)
    recommended = model_defaults(type(config), folder) if unset and folder else {}
    for name in unset:
        value = recommended.get(name, fallbacks[name])
        if isinstance(value, dict):
            value = value.get(config.mode, fallbacks[name])
        object.__setattr__(config, name, value)


def check_concept_scale(config: Any) -> None:
    """A scale of inf or nan would fill the weights with it and draw black images."""
    if not math.isfinite(config.concept_scale):
        raise CustomDiffError(f"--concept-scale {config.concept_scale}: pass a number, e.g. 0.8")


def concept_folder(concept: Path) -> Path:
    """The folder a concept path names: its own, or a file's (absolute where that is the working folder)."""
    concept = Path(concept)
    folder = concept.parent if concept.is_file() or concept.suffix == ".safetensors" else concept
    return folder if folder.name else folder.resolve()


def default_out(config: Any, out: Path) -> None:
    """Set ``config.out`` to ``out`` where none was given: a folder of its own for each concept, so that
    outputs of different concepts never land in one folder and replace each other."""
    if config.out is None:
        object.__setattr__(config, "out", out)


def check_region_ratios(config: Any) -> None:
    """Ratios divide regional prompts: without them on they would be ignored, so say so."""
    if config.region_ratios and not config.regions:
        raise CustomDiffError("--region-ratios divides regional prompts: pass --regions too, or drop it")


def check_token(token: str, where: str) -> None:
    if not toyworld.MODIFIER_TOKEN.match(token):
        raise CustomDiffError(f'{where}: "{token}" is not a modifier token; write it like <new1>')


# ---------------------------------------------------------------------------------------------- argparse


def _split_optional(annotation: Any) -> Any:
    """``X | None`` → X; anything else unchanged (flags start at their default, so None needs no type)."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [arg for arg in get_args(annotation) if arg is not type(None)]
    return annotation


def _argparse_kwargs(annotation: Any) -> dict[str, Any]:
    """How argparse should read a field of this type."""
    annotation = _split_optional(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    if get_origin(annotation) in (tuple, list):
        return {"nargs": "+", "type": get_args(annotation)[0]}
    return {"type": annotation}


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one argument per field of ``config_class``, plus ``--config FILE.toml``.

    Flags default to argparse.SUPPRESS so that only flags given on the command line reach the
    namespace, and so win over the config file.
    """
    hints = get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        kwargs = _argparse_kwargs(hints[item.name])
        help_text = item.metadata["help"]
        if item.metadata.get("positional"):
            if item.default is None:  # an optional one: none, or any number of a tuple's items
                kwargs.update(nargs="*" if "nargs" in kwargs else "?", default=None)
            parser.add_argument(item.name, help=help_text, metavar=item.name.upper(), **kwargs)
            continue
        if kwargs.get("nargs"):
            kwargs["action"] = "extend"  # --concept a --concept b and --concept a b both work
        if item.default not in (None, ()):
            shown = " ".join(map(str, item.default)) if isinstance(item.default, tuple) else item.default
            help_text += f" (default: {shown})"
        names = [item.metadata.get("short"), f"--{item.name.replace('_', '-')}"]
        kwargs.update(
            dest=item.name, default=argparse.SUPPRESS, help=help_text, metavar=item.metadata.get("metavar")
        )
        parser.add_argument(*filter(None, names), **kwargs)
    parser.add_argument(
        "--config",
        dest="config_file",
        type=Path,
        default=None,
        metavar="FILE.toml",
        help="read flags from a TOML file (keys are the flag names); flags given here win",
    )


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """Build ``config_class`` from its defaults, then the ``--config`` file, then the flags given."""
    values = read_config_file(config_class, args.config_file) if args.config_file else {}
    for item in dataclasses.fields(config_class):
        if hasattr(args, item.name):
            value = getattr(args, item.name)
            values[item.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**values)


def read_config_file(config_class: type, path: Path) -> dict[str, Any]:
    """Read a TOML file of flag values for ``config_class``, checking each key and its type."""
    return _check_values(config_class, _read_toml(path, f"--config {path}"), f"--config {path}")


def _read_toml(path: Path, name: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise CustomDiffError(f"cannot read {name}: {error.strerror or error}") from error
    except tomllib.TOMLDecodeError as error:
        raise CustomDiffError(f"{name} is not valid TOML: {error}") from error


def _check_values(config_class: type, table: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """``table``'s flag values as ``config_class`` fields, each key and type checked (``where`` names the
    file in errors)."""
    hints = get_type_hints(config_class)
    by_name = {item.name: item for item in dataclasses.fields(config_class)}
    flags = [name for name, item in by_name.items() if not item.metadata.get("positional")]
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in flags:
            known = ", ".join(name.replace("_", "-") for name in flags) or "none"
            what = "a positional argument: give it on the command line" if name in by_name else "unknown"
            raise CustomDiffError(f'{where}: key "{key}" is {what}; keys allowed here: {known}')
        values[name] = _value_from_toml(hints[name], value, f'{where}: key "{key}"')
    return values


def _value_from_toml(annotation: Any, value: Any, where: str) -> Any:
    """Check a TOML value against a field's type; convert strings to Path and lists to tuples."""
    annotation = _split_optional(annotation)
    origin = get_origin(annotation)
    if origin in (tuple, list) and isinstance(value, list):
        return tuple(_value_from_toml(get_args(annotation)[0], item, where) for item in value)
    if origin is Literal and value in get_args(annotation):
        return value
    if annotation is Path and isinstance(value, str):
        return Path(value)
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation in (bool, int, str) and type(value) is annotation:
        return value
    if origin is Literal:
        expected = "one of " + ", ".join(map(repr, get_args(annotation)))
    else:
        expected = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    raise CustomDiffError(f"{where} is {value!r}; expected {expected}")


def config_from_settings(config_class: type, settings: dict[str, Any], where: str | Path) -> Any:
    """``config_class`` from the settings a run saved (``save_config``'s, or a concept's metadata), each
    checked as a ``--config`` file's; those saved as None take their defaults again."""
    given = {name: value for name, value in settings.items() if value is not None}
    return config_class(**_check_values(config_class, given, where))


def save_config(config: Any, folder: Path) -> Path:
    """Write the resolved config as JSON beside a run's outputs, atomically; returns the file."""
    path = Path(folder) / CONFIG_FILE_NAME
    files.atomic_write_text(path, json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n")
    return path
