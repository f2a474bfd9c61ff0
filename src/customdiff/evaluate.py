"""Evaluation as in the paper (Kumari et al. 2023, §4 "Evaluation metrics"), plus the toy judge.

- Text alignment (CLIP-T): CLIP similarity of each sample to its prompt with the modifier token taken
  out ("a <new1> star on a black background" → "a star on a black background"), as the paper scores it.
- Image alignment (CLIP-I): CLIP similarity of each sample to each of the concept's training images.
- Forgetting (KID): kernel inception distance (Bińkowski et al. 2018), here on CLIP image features,
  between base-model and fine-tuned samples of class prompts that hold no modifier token.
- Toy world: the judge reads each sample: the concept present (its shape with its pattern), the context
  right (background, and any world object composed with it), and retention: the share of class-prompt
  samples read fully right, fine-tuned against base.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from customdiff import concept as concepts
from customdiff import data, files, generate, models, toyjudge, toyworld
from customdiff import regions as regional
from customdiff.config import EvalConfig, FinetuneConfig, save_config
from customdiff.errors import CustomDiffError

KID_SUBSET = 100  # samples per KID subset, as torchmetrics' default for small sets
KID_SUBSETS = 50
CLASS_SCENES = (("red", "gray"), ("blue", "white"), ("yellow", "black"), ("green", "sand"))


@dataclass(frozen=True)
class Prompts:
    """What a concept is sampled on: prompts naming it, and class prompts without it (forgetting)."""

    concept: tuple[str, ...]
    classes: tuple[str, ...]


def toy_prompts(tokens: tuple[str, ...], class_words: tuple[str, ...]) -> Prompts:
    """The paper's prompt kinds in the toy grammar for each concept: new contexts, composition with a world
    object, and plain class prompts; with several concepts also prompts naming two of them at once."""
    backgrounds = list(toyworld.BACKGROUNDS)
    named, classes = [], []
    for token, class_word in zip(tokens, class_words, strict=True):
        others = [shape for shape in toyworld.SHAPES if shape != class_word]
        named += [f"a {token} {class_word} on a {background} background" for background in backgrounds]
        named += [f"a small {token} {class_word} on a {backgrounds[1]} background"]
        named += [
            f"a {token} {class_word} and a {color} {others[i % len(others)]} on a {backgrounds[i]} background"
            for i, color in enumerate(("blue", "red", "yellow", "green"))
            if toyworld.COLORS[color] != toyworld.BACKGROUNDS[backgrounds[i]]
        ]
        classes += [f"a {color} {class_word} on a {scene} background" for color, scene in CLASS_SCENES]
    pairs = [(a, b) for a in range(len(tokens)) for b in range(a + 1, len(tokens))]
    named += [
        f"a {tokens[a]} {class_words[a]} and a {tokens[b]} {class_words[b]} on a {background} background"
        for a, b in pairs
        for background in backgrounds
    ]
    return Prompts(tuple(named), tuple(dict.fromkeys(classes)))


def prompts_from_file(path: Path, tokens: tuple[str, ...]) -> Prompts:
    """Prompts naming the concept from a file (one a line); class prompts are those with the tokens out."""
    lines = generate.read_prompts(path)
    named = [line for line in lines if any(token in line.split() for token in tokens)]
    if not named:
        raise CustomDiffError(f"{path}: no prompt names {' or '.join(tokens)}; write prompts with the token")
    return Prompts(tuple(named), tuple(data.class_prompts(named, list(tokens))))


# ---------------------------------------------------------------------------------------------- metrics


class ClipFeatures:
    """Normalised CLIP features of images and texts, for the alignment metrics and KID.

    Images go to CLIP as the toy CLIP was trained: RGB in [-1, 1] at its image size, unless the CLIP
    folder has a ``preprocessor_config.json`` (a real CLIP), whose processor is used instead.
    """

    def __init__(self, clip_dir: Path, tokenizer):
        """``tokenizer`` serves when the CLIP folder has none of its own (the toy CLIP shares SD's)."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise CustomDiffError(f"no CLIP model at {clip_dir}; pass --clip a transformers CLIPModel folder")
        self.clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
        has_tokenizer = (clip_dir / "tokenizer_config.json").is_file()
        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir) if has_tokenizer else tokenizer
        processor_file = Path(clip_dir) / "preprocessor_config.json"
        self.processor = CLIPImageProcessor.from_pretrained(clip_dir) if processor_file.is_file() else None

    @torch.no_grad()
    def images(self, images: list[np.ndarray | Image.Image]) -> torch.Tensor:
        """(N, D) unit-length image features."""
        pils = [files.as_pil(image) for image in images]
        if self.processor is not None:
            pixels = self.processor(images=pils, return_tensors="pt").pixel_values
        else:
            size = self.clip.config.vision_config.image_size
            pixels = torch.stack([data.to_pixels(data.fit(image, size)) for image in pils])
        features = torch.cat([models.clip_image_features(self.clip, batch) for batch in pixels.split(64)])
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) unit-length text features."""
        ids = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").input_ids
        return torch.nn.functional.normalize(models.clip_text_features(self.clip, ids), dim=-1)


def kernel_inception_distance(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """KID: the unbiased MMD² of a cubic polynomial kernel k(a, b) = (a·b / d + 1)³, averaged over subsets.

    Args:
        x, y: (N, D) and (M, D) features of the two sample sets.
    """
    x, y = x.double(), y.double()
    size = min(KID_SUBSET, len(x), len(y))
    if size < 2:
        raise CustomDiffError("KID needs at least 2 samples a side; pass a larger --n")
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(KID_SUBSETS if size < max(len(x), len(y)) else 1):
        a = x[torch.randperm(len(x), generator=generator)[:size]]
        b = y[torch.randperm(len(y), generator=generator)[:size]]
        k_aa, k_bb, k_ab = ((p @ q.T / x.shape[1] + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        off_diagonal = size * (size - 1)
        mmd = (k_aa.sum() - k_aa.trace()) / off_diagonal + (k_bb.sum() - k_bb.trace()) / off_diagonal
        estimates.append(float(mmd - 2 * k_ab.mean()))
    return float(np.mean(estimates))


def named_alone(prompts: list[str], tokens: tuple[str, ...]) -> dict[str, list[int]]:
    """Token → the indices of ``prompts`` that name it and no other token, when the prompts name two or
    more tokens so (a joint or merged concept's prompts); else empty. Pooled, a concept drawn well hides
    one drawn badly: a joint run's tile and beachball read 42% together, the beachball's own prompts 16%."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        named = [token for token in tokens if token in prompt.split()]
        if len(named) == 1:
            groups.setdefault(named[0], []).append(index)
    return {token: groups[token] for token in tokens if token in groups} if len(groups) > 1 else {}


def prompt_kind(prompt: str, tokens: tuple[str, ...]) -> str:
    """``new_context`` (a concept alone), ``composed`` (with a world object) or ``two_concepts``."""
    named = sum(token in prompt.split() for token in tokens)
    if named >= 2:
        return "two_concepts"
    return "new_context" if len(toyworld.parse_caption(prompt).things) == 1 else "composed"


def judge_concept_prompts(
    images: list[np.ndarray], prompts: list[str], signatures: dict[str, np.ndarray]
) -> dict[str, float]:
    """Shares (%) of samples with the concepts present, the context right, and both, per prompt kind;
    with several concepts also per concept, as ``TOKEN/judge_…`` (``named_alone``).

    A concept is present when its object has the right shape and its pattern; the context is everything
    else the prompt names (background, a world object's colour and shape).
    """
    kinds: dict[str, dict[str, list[bool]]] = {}
    alone = {i: token for token, indices in named_alone(prompts, tuple(signatures)).items() for i in indices}
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        checks = toyjudge.score(image, prompt, signatures).checks
        concept_keys = [key for key in checks if key.endswith(".concept")]
        concept_objects = {key.split(".")[0] for key in concept_keys}
        concept_ok = all(checks[key] and checks[key.replace(".concept", ".shape")] for key in concept_keys)
        context_keys = [key for key in checks if key != "count" and key.split(".")[0] not in concept_objects]
        context_ok = all(checks[key] for key in context_keys)
        kind = f"judge_{prompt_kind(prompt, tuple(signatures))}"
        for group in [kind, f"{alone[index]}/{kind}"] if index in alone else [kind]:
            shares = kinds.setdefault(group, {"concept_present": [], "context_right": [], "all_right": []})
            shares["concept_present"].append(concept_ok)
            shares["context_right"].append(context_ok)
            shares["all_right"].append(concept_ok and context_ok and checks["count"])
    return {
        f"{kind}_{name}": 100 * float(np.mean(values))
        for kind, shares in kinds.items()
        for name, values in shares.items()
    }


def judge_all_right(images: list[np.ndarray], prompts: list[str]) -> float:
    """Share (%) of samples the judge reads fully right for their prompt."""
    pairs = zip(images, prompts, strict=True)
    right = [toyjudge.score(image, prompt).fraction == 1 for image, prompt in pairs]
    return 100 * float(np.mean(right))


# ---------------------------------------------------------------------------------------------- run


def evaluate(
    pipe,
    concept: concepts.Concept | Path,
    targets: dict[str, list[Image.Image]],
    clip: ClipFeatures,
    prompts: Prompts,
    n: int = 4,
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    samples_dir: Path | None = None,
    regions: bool | None = None,
    layout: regional.Layout | None = None,
    scale: float = 1.0,
) -> dict[str, float]:
    """Sample base and fine-tuned models on ``prompts`` and compute the paper's metrics (+ the judge's).

    Args:
        pipe: the base pipeline; the concept is applied for the fine-tuned samples and removed after.
        targets: token → its concept's training images (image alignment, the judge's signature).
        samples_dir: where to keep the samples as image folders ``finetuned/`` and ``base/`` (optional).
        regions: draw two-object prompts naming a concept by column (default: the model's;
            ``generate.sample``).
        layout: the regions' shares of the image (default: equal columns; ``regions.Layout``).
        scale: the strength of the concept's deltas (``apply_concept``).
    Returns:
        metric name → value; judge metrics only for toy-world prompts and 64×64 samples.
    """
    loaded = concept if isinstance(concept, concepts.Concept) else concepts.load_concept(concept)
    concept_prompts = [p for p in prompts.concept for _ in range(n)]
    class_prompts = [p for p in prompts.classes for _ in range(n)]
    base = generate.sample(pipe, list(prompts.classes), n, steps, guidance, seed)
    applied = concepts.apply_concept(pipe, loaded, scale)
    try:
        tuned_concept = generate.sample(
            pipe, list(prompts.concept), n, steps, guidance, seed, regions=regions, concept=applied,
            layout=layout,
        )  # fmt: skip
        tuned_class = generate.sample(pipe, list(prompts.classes), n, steps, guidance, seed)
    finally:
        concepts.remove_concept(pipe, applied)
    if samples_dir is not None:
        tuned = zip(tuned_concept + tuned_class, concept_prompts + class_prompts, strict=True)
        files.write_image_folder(Path(samples_dir) / "finetuned", tuned)
        files.write_image_folder(Path(samples_dir) / "base", zip(base, class_prompts, strict=True))

    sample_features = clip.images(tuned_concept)
    stripped = [data.strip_tokens(prompt, list(loaded.tokens)) for prompt in concept_prompts]
    target_features = {token: clip.images(images) for token, images in targets.items()}
    image_alignment = np.array([  # to the training images of each concept the prompt names
        float(np.mean([(features @ target_features[t].T).mean() for t in targets if t in prompt.split()]))
        for features, prompt in zip(sample_features, concept_prompts, strict=True)
    ])  # fmt: skip
    text_alignment = (sample_features * clip.texts(stripped)).sum(-1).numpy()
    metrics = {
        "text_alignment": float(text_alignment.mean()),
        "image_alignment": float(image_alignment.mean()),
        "kid_x1000": 1000 * kernel_inception_distance(clip.images(base), clip.images(tuned_class), seed),
    }
    for token, indices in named_alone(concept_prompts, loaded.tokens).items():
        metrics[f"{token}/text_alignment"] = float(text_alignment[indices].mean())
        metrics[f"{token}/image_alignment"] = float(image_alignment[indices].mean())
    toy_sized = tuned_concept[0].shape[:2] == (toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)
    if toy_sized and all(is_toy_caption(p) for p in prompts.concept + prompts.classes):
        signatures = {token: toyjudge.concept_signature(images) for token, images in targets.items()}
        metrics.update(judge_concept_prompts(tuned_concept, concept_prompts, signatures))
        metrics["judge_class_right_base"] = judge_all_right(base, class_prompts)
        metrics["judge_class_right_finetuned"] = judge_all_right(tuned_class, class_prompts)
    return metrics


def training_folders(loaded: concepts.Concept) -> list[Path]:
    """The image folder each token of a concept was trained on, read from its recorded run config(s)."""
    runs = loaded.config.get("merged_from") or [loaded.config]
    fields = {field.name for field in dataclasses.fields(FinetuneConfig)}
    try:
        return [
            spec.images
            for run in runs
            for spec in FinetuneConfig(**{k: v for k, v in run.items() if k in fields}).concept_specs()
        ]
    except (CustomDiffError, TypeError):
        return []


def run_eval(config: EvalConfig) -> dict[str, float]:
    """``customdiff eval``: sample, score, and write eval.json, eval.md and the samples into OUT."""
    layout = regional.parse_layout(config.region_ratios)
    out = files.prepare_output_dir(config.out)
    loaded = concepts.load_concept(config.concept)
    folders = list(config.images) or training_folders(loaded)
    if len(folders) != len(loaded.tokens) or not all(Path(folder).is_dir() for folder in folders):
        raise CustomDiffError(
            f"the images of {' '.join(loaded.tokens)} are not at "
            f"{' '.join(map(str, folders)) or '(unknown)'}; pass --images DIR, one folder per token"
        )
    targets = {
        token: [image for _, image, _ in files.read_image_folder(folder)]
        for token, folder in zip(loaded.tokens, folders, strict=True)
    }
    pipe = models.load_pipeline(config.model, model_config=config.model_config)
    config = dataclasses.replace(config, sampler=models.use_sampler(pipe, config.sampler))  # recorded
    if config.prompts is not None:
        prompts = prompts_from_file(config.prompts, loaded.tokens)
    elif all(word in toyworld.SHAPES for word in loaded.class_words):
        prompts = toy_prompts(loaded.tokens, loaded.class_words)
    else:
        raise CustomDiffError(
            f'the class "{loaded.class_words[0]}" is no toy-world shape; pass --prompts FILE with prompts '
            f"that name {loaded.tokens[0]}"
        )
    clip_dir = config.clip or models.clip_folder(pipe)
    if clip_dir is None:
        raise CustomDiffError(
            f"{config.model} keeps no CLIP model beside it; pass --clip DIR "
            "(or --model-config DIR holding clip/)"
        )
    clip = ClipFeatures(clip_dir, pipe.tokenizer)
    metrics = evaluate(
        pipe,
        loaded,
        targets,
        clip,
        prompts,
        config.n,
        config.steps,
        config.guidance,
        config.seed,
        out / "samples",
        config.regions,
        layout,
        config.concept_scale,
    )
    write_report(out, Path(config.concept).name, metrics)
    save_config(config, out)
    return metrics


def is_toy_caption(prompt: str) -> bool:
    """Whether a prompt is in the toy grammar, so that the judge can score its samples."""
    return toyworld.caption_or_none(prompt) is not None


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows (name → metrics) as a markdown table, one column per metric."""
    columns = list(dict.fromkeys(key for metrics in rows.values() for key in metrics))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.3f}" if c in metrics else "–" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_rows(name: str, metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``evaluate``'s metrics as table rows: ``name`` for all prompts, then ``name TOKEN`` for each concept's
    own prompts (its ``TOKEN/…`` metrics)."""
    rows: dict[str, dict[str, float]] = {name: {}}
    for key, value in metrics.items():
        token, _, metric = key.rpartition("/")
        rows.setdefault(f"{name} {token}" if token else name, {})[metric] = value
    return rows


def write_report(out: Path, name: str, metrics: dict[str, float]) -> None:
    """``eval.json`` and ``eval.md`` in ``out``, written atomically."""
    files.atomic_write_text(Path(out) / "eval.json", json.dumps(metrics, indent=2) + "\n")
    files.atomic_write_text(Path(out) / "eval.md", markdown_table(report_rows(name, metrics)))
