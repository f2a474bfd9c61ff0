"""The toy world of ``shared/toyworld.md``: vocabulary, caption grammar, renderer, built-in concepts.

It plays the part of the photos a Stable Diffusion user works with: 64×64 captioned scenes that a small
base model can learn on a CPU, and patterned objects (concepts) that the vocabulary cannot describe, the
toy counterpart of the paper's "a user's own mug" (Kumari et al. 2023, §4 datasets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from customdiff.errors import CustomDiffError

IMAGE_SIZE = 64
NOISE = 6  # every pixel may carry uniform noise of at most ±NOISE per channel

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "sky": (135, 200, 250),
    "grass": (90, 160, 70),
    "sand": (225, 200, 140),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
SIZES: dict[str, tuple[int, int]] = {"small": (7, 11), "large": (14, 20)}

ONE_OBJECT_X = (18, 32, 46)
TWO_OBJECT_X = (18, 46)  # left, right
X_JITTER = 3
Y_CENTER, Y_JITTER = 32, 6
TWO_OBJECT_RADIUS = (7, 14)
STAR_INNER_RATIO = 0.45
MODIFIER_TOKEN = re.compile(r"^<[A-Za-z0-9_\-]+>$")


@dataclass(frozen=True)
class Thing:
    """One object as a caption names it.

    ``color`` is a palette colour or a modifier token such as ``<new1>`` (a concept);
    ``size`` is "small", "large" or None (not named: two-object captions never name it).
    """

    shape: str
    color: str
    size: str | None = None

    @property
    def is_concept(self) -> bool:
        return self.color.startswith("<")

    def __str__(self) -> str:
        return " ".join(word for word in (self.size, self.color, self.shape) if word)


@dataclass(frozen=True)
class Caption:
    """A parsed caption: a background and one or two things (left one first)."""

    background: str
    things: tuple[Thing, ...]

    def __str__(self) -> str:
        return " and ".join(f"a {thing}" for thing in self.things) + f" on a {self.background} background"


@dataclass(frozen=True)
class Placement:
    """Where and how big one thing is drawn, in pixels (x to the right, y down)."""

    x: float
    y: float
    radius: float


# ---------------------------------------------------------------------------------------------- grammar


def _expect(word: str | None, allowed, what: str, text: str) -> str:
    if word in allowed:
        return word
    shown = "end of caption" if word is None else f'"{word}"'
    raise CustomDiffError(
        f'{shown} in caption "{text}" is not a {what}; expected one of: {", ".join(allowed)}'
    )


def parse_caption(text: str) -> Caption:
    """Parse a caption of the toy grammar (either form); concepts appear as ``<newK>`` colour words.

    Raises:
        CustomDiffError: naming the first word outside the grammar and the words allowed there.
    """
    words = text.split()
    position = 0

    def take() -> str | None:
        nonlocal position
        word = words[position] if position < len(words) else None
        position += 1
        return word

    def take_thing() -> Thing:
        word = take()
        size = None
        if word in SIZES:
            size, word = word, take()
        if word is None or not MODIFIER_TOKEN.match(word):
            _expect(
                word, (*COLORS, *(() if size else SIZES), "<newK>"), "colour, size or modifier token", text
            )
        return Thing(shape=_expect(take(), SHAPES, "shape", text), color=word, size=size)

    _expect(take(), ("a",), "article", text)
    things = [take_thing()]
    word = _expect(take(), ("on", "and"), "connective", text)
    if word == "and":
        _expect(take(), ("a",), "article", text)
        things.append(take_thing())
        _expect(take(), ("on",), "connective", text)
    _expect(take(), ("a",), "article", text)
    background = _expect(take(), BACKGROUNDS, "background", text)
    _expect(take(), ("background",), "word", text)
    if position < len(words):
        raise CustomDiffError(f'"{words[position]}" in caption "{text}" follows the end of the grammar')
    if len(things) == 2:
        for thing in things:
            if thing.size:
                raise CustomDiffError(
                    f'"{thing.size}" in caption "{text}": two-object captions name no size; drop it'
                )
    for thing in things:
        if not thing.is_concept and COLORS[thing.color] == BACKGROUNDS[background]:
            raise CustomDiffError(
                f'caption "{text}": a {thing.color} object never sits on a {background} background'
            )
    return Caption(background=background, things=tuple(things))


def caption_or_none(text: str) -> Caption | None:
    """The parsed caption, or None for text outside the grammar (a real model's caption)."""
    try:
        return parse_caption(text)
    except CustomDiffError:
        return None


def plain_captions(text: str) -> list[str]:
    """A concept caption's class prompts in the grammar: each ``<newK>`` thing as a plain coloured one.

    The grammar gives every object a colour, so "a star on a sky background" does not exist; the class
    of "a <new1> star on a sky background" is a plain star in each palette colour the background allows.

    Returns:
        one caption per allowed colour, or [] when ``text`` is not a caption of the grammar.
    """
    caption = caption_or_none(text)
    if caption is None:
        return []
    captions = []
    for color, rgb in COLORS.items():
        if rgb == BACKGROUNDS[caption.background]:
            continue
        things = tuple(
            Thing(thing.shape, color, thing.size) if thing.is_concept else thing for thing in caption.things
        )
        captions.append(str(Caption(caption.background, things)))
    return list(dict.fromkeys(captions))


def on_every_background(text: str) -> list[str]:
    """A one-object caption of the grammar on each background, with its size word and without one (the
    contexts a class should be held in); [] for any other text."""
    caption = caption_or_none(text)
    if caption is None or len(caption.things) != 1:
        return []
    (thing,) = caption.things
    return [
        str(Caption(background, (Thing(thing.shape, thing.color, size),)))
        for background in BACKGROUNDS
        for size in dict.fromkeys((thing.size, None))
    ]


def with_world_object(text: str, index: int) -> str | None:
    """A one-object caption of the grammar with a plain world object beside it (``index`` picks the object's
    shape, colour and side), or None for any other text: a concept's class prompts composed, so that
    regularization also holds compositions (README, "Model defaults")."""
    caption = caption_or_none(text)
    if caption is None or len(caption.things) != 1:
        return None
    (thing,) = caption.things
    shapes = [shape for shape in SHAPES if shape != thing.shape]
    colors = [c for c, rgb in COLORS.items() if rgb != BACKGROUNDS[caption.background] and c != thing.color]
    other = Thing(shapes[index % len(shapes)], colors[index % len(colors)], None)
    pair = (Thing(thing.shape, thing.color, None), other)
    return str(Caption(caption.background, pair if index % 2 else pair[::-1]))


def sample_caption(rng: np.random.Generator, n_objects: int | None = None) -> Caption:
    """A random caption of the grammar: 1 or 2 objects (each half the time when ``n_objects`` is None)."""
    n_objects = n_objects or int(rng.integers(1, 3))
    background = str(rng.choice(list(BACKGROUNDS)))
    colors = [name for name, rgb in COLORS.items() if rgb != BACKGROUNDS[background]]
    things = tuple(
        Thing(
            shape=str(rng.choice(SHAPES)),
            color=str(rng.choice(colors)),
            size=str(rng.choice(list(SIZES))) if n_objects == 1 else None,
        )
        for _ in range(n_objects)
    )
    return Caption(background=background, things=things)


def sample_layout(caption: Caption, rng: np.random.Generator) -> list[Placement]:
    """Positions and radii for a caption's things, as the spec lays them out."""

    def jitter(center: float, spread: int) -> float:
        return center + float(rng.integers(-spread, spread + 1))

    if len(caption.things) == 1:
        size = caption.things[0].size or str(rng.choice(list(SIZES)))
        low, high = SIZES[size]
        x = jitter(float(rng.choice(ONE_OBJECT_X)), X_JITTER)
        return [Placement(x=x, y=jitter(Y_CENTER, Y_JITTER), radius=float(rng.integers(low, high + 1)))]
    low, high = TWO_OBJECT_RADIUS
    return [
        Placement(
            x=jitter(x, X_JITTER), y=jitter(Y_CENTER, Y_JITTER), radius=float(rng.integers(low, high + 1))
        )
        for x in TWO_OBJECT_X
    ]


# ---------------------------------------------------------------------------------------------- shapes


def _inside_polygon(dx: np.ndarray, dy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every point (dx, dy) against ``vertices`` (V, 2)."""
    inside = np.zeros(np.broadcast(dx, dy).shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > dy) != (y2 > dy)
        inside ^= crosses & (dx < (x2 - x1) * (dy - y1) / (y2 - y1) + x1)
    return inside


def _star_vertices(radius: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # apex up, alternating outer and inner points
    radii = np.where(np.arange(10) % 2 == 0, radius, STAR_INNER_RATIO * radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _triangle_vertices(radius: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3  # equilateral, apex up, circumradius = radius
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Which points, at offsets (dx, dy) from a shape's centre, the shape covers (spec's geometry).

    Args:
        dx, dy: broadcastable offsets in pixels (y down).
        radius: the spec's radius r of the shape.
    Returns:
        bool array of the broadcast shape.
    """
    squared = dx**2 + dy**2
    if shape == "circle":
        return squared <= radius**2
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":
        return _inside_polygon(dx, dy, _triangle_vertices(radius))
    if shape == "star":
        return _inside_polygon(dx, dy, _star_vertices(radius))
    if shape == "ring":
        return (squared <= radius**2) & (squared > (2 * radius / 3) ** 2)
    if shape == "cross":
        arm, half_bar = np.abs(dx) <= radius, np.abs(dy) <= radius / 3
        return (arm & half_bar) | ((np.abs(dy) <= radius) & (np.abs(dx) <= radius / 3))
    raise ValueError(f"unknown shape {shape!r}")


def pixel_grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (size, size)."""
    centres = np.arange(size) + 0.5
    return np.meshgrid(centres, centres)


# ---------------------------------------------------------------------------------------------- concepts


PATTERNS = ("core", "segments", "checker", "quadrants", "bands")  # how a concept's colours are laid out


@dataclass(frozen=True)
class Concept:
    """A built-in concept: one particular patterned instance of a world shape.

    ``pattern`` names how its ``colors`` (outside the palette) are laid over the shape, in coordinates
    scaled by the radius so that the pattern reads at every size.
    """

    name: str
    shape: str
    colors: tuple[tuple[int, int, int], ...]
    pattern: str
    description: str

    def paint(self, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
        """Index into ``colors`` for every point at offsets (dx, dy)."""
        u, v = dx / radius, dy / radius
        if self.pattern == "core":  # a contrasting centre
            return (u**2 + v**2 > 0.4**2).astype(int)
        if self.pattern == "segments":  # alternating angular segments
            return (np.floor((np.arctan2(v, u) + np.pi) / (np.pi / 4)).astype(int)) % 2
        if self.pattern == "checker":  # a 3×3 checkerboard
            return (np.floor((u + 1) * 1.5).astype(int) + np.floor((v + 1) * 1.5).astype(int)) % 2
        if self.pattern == "quadrants":
            return ((u >= 0).astype(int) + (v >= 0).astype(int)) % 2
        if self.pattern == "bands":  # horizontal bands; the base edge (v = 1/2) stays in the last band
            return np.minimum(np.floor((v + 1) * 2).astype(int), 2) % 2
        raise ValueError(f"unknown pattern {self.pattern!r}")


CONCEPTS: dict[str, Concept] = {
    concept.name: concept
    for concept in (
        Concept("starfish", "star", ((0, 128, 128), (255, 105, 180)), "core", "pink star with a teal core"),
        Concept(
            "donut", "ring", ((139, 69, 19), (150, 255, 200)), "segments", "brown and mint segmented ring"
        ),
        Concept(
            "tile", "square", ((20, 20, 110), (180, 255, 100)), "checker", "navy and lime checkered square"
        ),
        Concept("beachball", "circle", ((120, 0, 40), (0, 220, 220)), "quadrants", "maroon and cyan ball"),
        Concept(
            "kite", "triangle", ((110, 110, 0), (255, 0, 255)), "bands", "olive and magenta striped kite"
        ),
    )
}


def get_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise CustomDiffError(f'unknown concept "{name}"; built-in concepts: {", ".join(CONCEPTS)}')
    return CONCEPTS[name]


# ---------------------------------------------------------------------------------------------- rendering


def render(
    caption: Caption,
    rng: np.random.Generator,
    concepts: dict[str, Concept] | None = None,
    layout: list[Placement] | None = None,
) -> np.ndarray:
    """Draw a caption as a 64×64 RGB scene with the spec's noise.

    Args:
        concepts: the concept each modifier token in the caption stands for.
        layout: placements to use instead of a random one.
    Returns:
        (64, 64, 3) uint8 image.
    """
    layout = layout or sample_layout(caption, rng)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
    image[:] = BACKGROUNDS[caption.background]
    xs, ys = pixel_grid()
    for thing, place in zip(caption.things, layout, strict=True):
        dx, dy = xs - place.x, ys - place.y
        mask = shape_mask(thing.shape, dx, dy, place.radius)
        if thing.is_concept:
            concept = (concepts or {}).get(thing.color)
            if concept is None:
                raise CustomDiffError(f'caption "{caption}": no concept given for {thing.color}')
            palette = np.array(concept.colors, dtype=np.int16)
            image[mask] = palette[concept.paint(dx, dy, place.radius)[mask]]
        else:
            image[mask] = COLORS[thing.color]
    image += rng.integers(-NOISE, NOISE + 1, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def sample_scenes(n: int, seed: int = 0, n_objects: int | None = None):
    """Yield ``n`` random (image, caption text) pairs, reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        caption = sample_caption(rng, n_objects)
        yield render(caption, rng), str(caption)


def concept_scenes(concept: Concept, n: int = 6, token: str = "<new1>", seed: int = 0):
    """Yield ``n`` varied (image, caption) pairs of a concept: sizes, positions and backgrounds vary.

    Captions read ``a <new1> {shape} on a {background} background``.
    """
    rng = np.random.default_rng(seed)
    backgrounds = list(rng.permutation(list(BACKGROUNDS)))
    xs = list(ONE_OBJECT_X)
    for index in range(n):
        caption = Caption(str(backgrounds[index % len(backgrounds)]), (Thing(concept.shape, token),))
        low, high = SIZES[("small", "large")[index % 2]]
        place = Placement(
            x=xs[index % len(xs)] + float(rng.integers(-X_JITTER, X_JITTER + 1)),
            y=Y_CENTER + float(rng.integers(-Y_JITTER, Y_JITTER + 1)),
            radius=float(rng.integers(low, high + 1)),
        )
        yield render(caption, rng, {token: concept}, [place]), str(caption)
