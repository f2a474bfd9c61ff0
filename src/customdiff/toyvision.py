"""Reading pixels into object regions and fitted shapes, for the toy judge (``toyjudge.py``).

The background is the majority background colour; each pixel is labelled with the palette colour whose
blend with the background fits it best; objects are connected regions far from the background, cut at
half contrast, and a region is split in two where two objects touch; a shape is the template of the
spec's geometry that overlaps an object best. It relies only on the geometry of ``shared/toyworld.md``,
so it reads images from any renderer of the spec, and it tolerates the blur, halos, colour shifts and
noise of images sampled from a small diffusion model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from customdiff.errors import CustomDiffError
from customdiff.toyworld import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, STAR_INNER_RATIO, shape_mask

LEFT_MAX_X, RIGHT_MIN_X = 25.0, 39.0  # between the spec's x ≈ 18, 32, 46 (±3)
FOREGROUND_DISTANCE = 24.0  # RGB distance from the background; green on grass, the closest pair, is ~55
NOISY = 6.0  # mean |deviation| per channel of the background above which the image is smoothed first
MIN_OBJECT_PIXELS = 16  # the smallest shape of the spec (a star of radius 7) covers ~65 pixels
OFF_PALETTE = 60.0  # a pixel farther than this from every palette colour is off-palette
DOMINANT_SHARE = 0.7  # share of an object's pixels one palette colour needs to name the object
OFF_PALETTE_LABEL, EDGE_LABEL = len(COLORS), len(COLORS) + 1  # pixel labels besides palette indices
GOOD_FIT = 0.9  # a region that one template fits this well is never split into two objects
MIN_RADIUS = 6.0  # the spec's radii are 7–20; a blurred small star must not read as a tiny circle

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (8, 3)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_COLORS = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (6, 3)

# Each shape's extent from its centre in units of r (half width, above, below) and its area / r².
_SIN36, _SIN54, _COS18 = np.sin(np.pi / 5), np.sin(0.3 * np.pi), np.cos(0.1 * np.pi)
_EXTENT = {
    "circle": (1.0, 1.0, 1.0, np.pi),
    "square": (1.0, 1.0, 1.0, 4.0),
    "triangle": (np.sqrt(3) / 2, 1.0, 0.5, 3 * np.sqrt(3) / 4),
    "star": (_COS18, 1.0, _SIN54, 5 * STAR_INNER_RATIO * _SIN36),
    "ring": (1.0, 1.0, 1.0, np.pi * 5 / 9),
    "cross": (1.0, 1.0, 1.0, 20 / 9),
}
_MOVES = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float32)


@dataclass
class Fit:
    """The best template for one object: its shape, centre, radius and IoU."""

    shape: str
    x: float
    y: float
    radius: float
    iou: float


@dataclass
class Segmentation:
    """An image cut into objects: its background, the pixels read, their labels and the objects found."""

    background: str
    pixels: np.ndarray  # (64, 64, 3) float32 RGB, smoothed when the image is noisy
    labels: np.ndarray  # (64, 64) int: palette index, OFF_PALETTE_LABEL or EDGE_LABEL
    objects: list[tuple[np.ndarray, Fit]]  # each object's (64, 64) bool mask and its template


# ---------------------------------------------------------------------------------------------- pixels


def segment(rgb: np.ndarray) -> Segmentation:
    """Cut an image into background and objects, each object a mask with its best-fitting template.

    Args:
        rgb: (64, 64, 3) float32 RGB, as ``as_rgb`` returns it.
    Returns:
        the Segmentation, objects in the order their regions were found.
    """
    background, reference, noise = _read_background(rgb)
    # Averaging 3×3 cuts the noise 3-fold; straight edges stay put, as objects are cut at half contrast.
    pixels = _box_blur(rgb) if noise > NOISY else rgb
    offset = pixels - reference
    distance = np.sqrt((offset**2).sum(axis=-1))  # (64, 64)
    labels = np.full(distance.shape, EDGE_LABEL)
    foreground = distance > FOREGROUND_DISTANCE
    labels[foreground] = _pixel_labels(offset[foreground], reference)
    objects = [fitted for region in _regions(labels, offset, distance) for fitted in _fit_objects(region)]
    return Segmentation(background, pixels, labels, objects)


def as_rgb(image: np.ndarray | Image.Image | str | Path) -> np.ndarray:
    """(64, 64, 3) float32 RGB from an array, PIL image or path; anything else is the user's to fix."""
    if isinstance(image, str | Path):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise CustomDiffError(f"image has dtype {array.dtype}; images must be uint8 RGB (0–255)")
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise CustomDiffError(f"image has shape {array.shape}; images must be RGB, (64, 64, 3)")
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        size = f"{array.shape[1]}×{array.shape[0]}"
        raise CustomDiffError(f"image is {size}; images must be {IMAGE_SIZE}×{IMAGE_SIZE}")
    return array[..., :3].astype(np.float32)


def _read_background(rgb: np.ndarray) -> tuple[str, np.ndarray, float]:
    """The background most pixels lie nearest (objects never cover most of an image), its actual
    colour (the median of those pixels, so colour shifts do not matter) and their noise level."""
    pixels = rgb.reshape(-1, 3)
    nearest = np.argmin(((pixels[:, None] - _BACKGROUND_COLORS) ** 2).sum(axis=-1), axis=1)
    winner = int(np.bincount(nearest, minlength=len(_BACKGROUND_NAMES)).argmax())
    reference = np.median(pixels[nearest == winner], axis=0)
    deviation = np.abs(pixels - reference)
    plain = deviation.max(axis=1) < 40  # background pixels, even under heavy noise
    return _BACKGROUND_NAMES[winner], reference, float(deviation[plain].mean())


def _box_blur(rgb: np.ndarray) -> np.ndarray:
    """3×3 mean of every pixel (edges repeated)."""
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[i : i + IMAGE_SIZE, j : j + IMAGE_SIZE] for i in range(3) for j in range(3)) / 9


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in the mask."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _pixel_labels(offset: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each pixel's palette colour index, OFF_PALETTE_LABEL, or EDGE_LABEL for a mix mostly of background.

    A pixel p is read as a blend p = background + alpha·(colour − background): the palette colour whose
    blend fits best (least distance, scaled back to full strength) names it, so that blurred edges and
    thin strokes keep their colour while a concept's off-palette blends stay off-palette.

    Args:
        offset: (N, 3) pixels minus the background colour.
    Returns:
        (N,) int labels.
    """
    directions = _PALETTE - reference  # (8, 3)
    lengths = (directions**2).sum(axis=1)
    alpha = offset @ directions.T / np.maximum(lengths, 1)  # (N, 8): how far along each segment
    blend = np.clip(alpha, 0, 1.5)[..., None] * directions  # (N, 8, 3); beyond 1: oversharpened
    misfit = np.sqrt(((offset[:, None] - blend) ** 2).sum(axis=-1)) / np.clip(alpha, 0.5, 1)
    misfit[:, lengths < 30**2] = np.inf  # a palette colour that is the background
    nearest = misfit.argmin(axis=1)
    along = alpha[np.arange(len(offset)), nearest]
    labels = np.where(along < 0.5, EDGE_LABEL, nearest)
    return np.where(misfit.min(axis=-1) > OFF_PALETTE, OFF_PALETTE_LABEL, labels)


def _regions(labels: np.ndarray, offset: np.ndarray, distance: np.ndarray) -> list[np.ndarray]:
    """Foreground regions, each cut at half its contrast so that blur neither grows nor shrinks it.

    A plain object keeps the pixels that are at least half its colour. A pattern (whose dark colours
    may look like blends, e.g. navy on black) sheds, from the outside in, the pixels that are less than
    half blends of the background with the colour just inside them.
    """
    regions, blends = [], None
    for component in _components(distance > FOREGROUND_DISTANCE):
        if colour_name(labels[component]) != "pattern":
            region = component & (labels != EDGE_LABEL)
        else:
            blends = _background_blends(offset, distance) if blends is None else blends
            region = component.copy()
            for _ in range(2):  # only from outside: two pattern colours may blend to the background's
                region &= ~(region & ~erode(region) & blends)
        # Thin pieces beside a thick one are halos (the overshoot of sharpened edges), not objects.
        pieces = _components(region)
        thick = [piece for piece in pieces if erode(piece).sum() >= 4]
        pieces = thick or pieces
        if pieces:
            regions.append(np.logical_or.reduce(pieces))
    return regions


def _background_blends(offset: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Pixels that are less than half blends of the background with the most distinct pixel within two
    pixels of them: p ≈ alpha·q (offsets from the background), alpha < 1/2."""
    size = distance.shape[0]
    padded = np.pad(distance, 2)
    windows = np.stack([padded[i : i + size, j : j + size] for i in range(5) for j in range(5)])  # (25, H, W)
    best = windows.argmax(axis=0)
    rows = np.clip(np.arange(size)[:, None] + best // 5 - 2, 0, size - 1)
    columns = np.clip(np.arange(size)[None, :] + best % 5 - 2, 0, size - 1)
    inner = offset[rows, columns]  # (H, W, 3)
    alpha = (offset * inner).sum(axis=-1) / np.maximum((inner**2).sum(axis=-1), 1)
    residual = np.sqrt(((offset - alpha[..., None] * inner) ** 2).sum(axis=-1))
    return (alpha < 0.5) & (residual < 0.5 * distance)


def colour_name(labels: np.ndarray) -> str:
    """The palette colour of most of an object's pixel labels (blends with the background left out),
    else "pattern"."""
    votes = labels[labels != EDGE_LABEL]
    counts = np.bincount(votes, minlength=len(_PALETTE))[: len(_PALETTE)]
    dominant = int(counts.argmax())
    return _PALETTE_NAMES[dominant] if counts[dominant] >= DOMINANT_SHARE * max(len(votes), 1) else "pattern"


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of at least MIN_OBJECT_PIXELS, by union-find over each row's runs."""
    parent: list[int] = []

    def root(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    runs, previous = [], []
    for row in range(mask.shape[0]):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[row].astype(np.int8), [0]))))
        current = []
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            run = len(parent)
            parent.append(run)
            for above_start, above_end, above in previous:
                if above_start <= end and start <= above_end:  # overlapping or diagonal neighbours
                    a, b = root(run), root(above)
                    parent[max(a, b)] = min(a, b)
            current.append((start, end, run))
            runs.append((row, start, end, run))
        previous = current
    labels = np.full(mask.shape, -1)
    for row, start, end, run in runs:
        labels[row, start:end] = root(run)
    found, counts = np.unique(labels[labels >= 0], return_counts=True)
    return [labels == label for label, count in zip(found, counts, strict=True) if count >= MIN_OBJECT_PIXELS]


# ---------------------------------------------------------------------------------------------- shapes


def _fit_objects(mask: np.ndarray) -> list[tuple[np.ndarray, Fit]]:
    """One object per region, or two when the region is two touching objects (left x ≈ 18, right ≈ 46).

    A region that no template fits well and that spans the middle is cut at its emptiest column near
    x = 32; the cut is kept if each side is a whole object on its own side that fits better.
    """
    single = _fit_shape(mask, (0, IMAGE_SIZE))
    columns = np.flatnonzero(mask.any(axis=0))
    if single.iou >= GOOD_FIT or columns[0] >= LEFT_MAX_X or columns[-1] < RIGHT_MIN_X:
        return [(mask, single)]
    middle = np.arange(IMAGE_SIZE // 2 - 6, IMAGE_SIZE // 2 + 7)  # where two objects may touch
    cut = int(middle[np.argmin(mask.sum(axis=0)[middle] + 0.01 * np.abs(middle - IMAGE_SIZE // 2))])
    left, right = mask.copy(), mask.copy()
    left[:, cut:], right[:, :cut] = False, False
    if left.sum() < MIN_OBJECT_PIXELS or right.sum() < MIN_OBJECT_PIXELS:
        return [(mask, single)]
    fits = _fit_shape(left, (0, cut)), _fit_shape(right, (cut, IMAGE_SIZE))
    areas = left.sum(), right.sum()
    joint = (fits[0].iou * areas[0] + fits[1].iou * areas[1]) / (areas[0] + areas[1])
    apart = fits[0].x <= LEFT_MAX_X and fits[1].x >= RIGHT_MIN_X
    if apart and joint > single.iou and min(fits[0].iou, fits[1].iou) > 0.6:
        return [(left, fits[0]), (right, fits[1])]
    return [(mask, single)]


def _fit_shape(mask: np.ndarray, window: tuple[int, int]) -> Fit:
    """The shape template (spec geometry) of best IoU with ``mask``, searched around bbox estimates.

    Only columns inside ``window`` count: beyond them the object runs off the image or into another.
    """
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    clipped = (left <= window[0], right >= window[1], top <= 0, bottom >= IMAGE_SIZE)
    margin = 4
    crop_rows = slice(max(top - margin, 0), min(bottom + margin, IMAGE_SIZE))
    crop_columns = slice(max(left - margin, window[0]), min(right + margin, window[1]))
    target = mask[crop_rows, crop_columns]
    xs = np.arange(crop_columns.start, crop_columns.stop, dtype=np.float32) + 0.5
    ys = np.arange(crop_rows.start, crop_rows.stop, dtype=np.float32)[:, None] + 0.5
    area = int(mask.sum())
    starts = {}
    for shape in SHAPES:
        start = _bbox_estimate(shape, (left, right, top, bottom), clipped, area)
        starts[shape] = (start, float(_ious(shape, target, xs, ys, start[None])[0]))
    best_start = max(iou for _, iou in starts.values())
    fits = [
        _refine(shape, target, xs, ys, start, iou)
        for shape, (start, iou) in starts.items()
        if iou >= best_start - 0.15
    ]
    return max(fits, key=lambda fit: fit.iou)


def _bbox_estimate(shape: str, box, clipped, area: int) -> np.ndarray:
    """(x, y, r) of ``shape`` from the sides of its bounding box that are not clipped."""
    half, above, below, area_per_r2 = _EXTENT[shape]
    left, right, top, bottom = box
    clip_left, clip_right, clip_top, clip_bottom = clipped
    if not (clip_top or clip_bottom):
        radius = (bottom - top) / (above + below)
    elif not (clip_left or clip_right):
        radius = (right - left) / (2 * half)
    else:
        radius = np.sqrt(area / area_per_r2)
    y = bottom - below * radius if clip_top else top + above * radius
    x = (left + right) / 2
    if clip_left != clip_right:
        x = right - half * radius if clip_left else left + half * radius
    return np.array([x, y, radius], dtype=np.float32)


def _ious(shape: str, target: np.ndarray, xs: np.ndarray, ys: np.ndarray, candidates: np.ndarray):
    """IoU with ``target`` (h, w) of the template at each candidate (x, y, r) of (K, 3); returns (K,)."""
    x, y, radius = (candidates[:, i, None, None] for i in range(3))
    # In units of r, as the polygon shapes take one radius per call.
    templates = shape_mask(shape, (xs - x) / radius, (ys - y) / radius, 1.0)  # (K, h, w)
    inter = (templates & target).sum(axis=(1, 2))
    return inter / (templates.sum(axis=(1, 2)) + target.sum() - inter)


def _refine(shape: str, target, xs, ys, start: np.ndarray, iou: float) -> Fit:
    """Coordinate ascent of the IoU over (x, y, r) in steps of 1, 1/2 and 1/4 pixel."""
    best = start
    if best[2] < MIN_RADIUS:
        best = np.array([best[0], best[1], MIN_RADIUS], dtype=np.float32)
        iou = float(_ious(shape, target, xs, ys, best[None])[0])
    for step in (1.0, 0.5, 0.25):
        for _ in range(8):
            candidates = best + step * _MOVES
            candidates[:, 2] = np.maximum(candidates[:, 2], MIN_RADIUS)
            ious = _ious(shape, target, xs, ys, candidates)
            if ious.max() <= iou:
                break
            best, iou = candidates[int(ious.argmax())], float(ious.max())
    return Fit(shape, float(best[0]), float(best[1]), float(best[2]), iou)
