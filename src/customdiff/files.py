"""Reading and writing image folders (Hugging Face imagefolder layout: PNGs + metadata.jsonl with
file_name, text) and atomic writes, so that an interrupted run never leaves a half-written file.
"""

import json
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from customdiff.errors import CustomDiffError

METADATA_FILE_NAME = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption", "prompt")  # metadata.jsonl's caption column, as datasets commonly name it
NUMBERED_PNG = re.compile(r"^(\d{5,})\.png$")  # the names write_image_folder gives
_NOT_IMAGES = (".jsonl", ".json", ".txt", ".toml")  # captions and run records kept beside images


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, rename it onto ``path``.

    Any writer can use it (PIL, safetensors, torch.save). The temporary file sits in the same folder, so
    os.replace is atomic; on error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a fresh ``FOLDER.partial`` to fill; when the block ends without error, swap it in for
    ``folder``. A kill mid-write leaves the previous folder whole (at worst beside a stale ``.old``)."""
    folder = Path(folder)
    partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    yield partial
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """A PIL image from a PIL image or an (H, W, 3) / (H, W) uint8 array."""
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def save_png(path: Path, image: np.ndarray | Image.Image) -> None:
    """Write an image as PNG, atomically; light compression, since toy datasets hold thousands."""
    with atomic_path(path) as temporary:
        as_pil(image).save(temporary, format="PNG", compress_level=1)


def prepare_output_dir(path: Path) -> Path:
    """Create the output folder (and its parents) and check that it takes files.

    Raises:
        CustomDiffError: one line naming the folder and why it cannot be written.
    """
    path = Path(path)
    fix = "pass a writable folder with -o/OUT"
    if path.exists() and not path.is_dir():
        raise CustomDiffError(f"cannot write to {path}: it is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise CustomDiffError(f"cannot write to {path}: {error.strerror or error}; {fix}") from error
    return path


def write_image_folder(out: Path, pairs: Iterable[tuple[np.ndarray | Image.Image, str]]) -> int:
    """Stream (image, caption) pairs to ``out/00000.png …`` and write ``metadata.jsonl`` last.

    An old metadata.jsonl is removed first and numbered PNGs left by an earlier, longer run are removed
    at the end, so the folder never pairs new images with old captions. An interrupted run leaves no
    metadata.jsonl.

    Returns:
        the number of images written.
    """
    out = prepare_output_dir(out)
    (out / METADATA_FILE_NAME).unlink(missing_ok=True)
    lines = []
    for index, (image, caption) in enumerate(pairs):
        name = f"{index:05d}.png"
        save_png(out / name, image)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    for stale in out.iterdir():
        match = NUMBERED_PNG.match(stale.name)
        if match and int(match.group(1)) >= len(lines):
            stale.unlink()
    atomic_write_text(out / METADATA_FILE_NAME, "".join(line + "\n" for line in lines))
    return len(lines)


def _read_metadata(folder: Path) -> dict[str, str]:
    """file_name → caption (its first ``CAPTION_KEYS`` column) from a folder's metadata.jsonl (empty when
    there is none)."""
    path = folder / METADATA_FILE_NAME
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[entry["file_name"]] = next((entry[key] for key in CAPTION_KEYS if key in entry), None)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CustomDiffError(
                f'{path}, line {number}: expected a JSON object with "file_name" and "text" ({error})'
            ) from error
    return captions


def open_image(path: Path) -> Image.Image:
    """Open one image file as RGB: upright by its EXIF orientation, transparency laid over white.

    Raises:
        CustomDiffError: naming the file when it is missing or not a readable image.
    """
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise CustomDiffError(f"image {path} does not exist; check the path") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise CustomDiffError(f"cannot read {path} as an image ({error}); pass a PNG or JPEG file") from error


def read_image_folder(folder: Path) -> list[tuple[Path, Image.Image, str | None]]:
    """Read every image in a flat folder with its caption, sorted by file name.

    Captions come from metadata.jsonl (``file_name``, and ``text``, ``caption`` or ``prompt``) or else from
    a ``.txt`` file beside the image (``0001.png`` → ``0001.txt``); None when neither has one. Files that
    are not readable images are skipped with a warning, as long as some image remains.

    Returns:
        (path, RGB image, caption or None) for each image.
    Raises:
        CustomDiffError: the folder is missing or holds no readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CustomDiffError(f"image folder {folder} does not exist; pass a folder of images")
    captions = _read_metadata(folder)
    records, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() in _NOT_IMAGES:
            continue
        try:
            image = open_image(path)
        except CustomDiffError:
            skipped.append(path.name)
            continue
        caption = captions.get(path.name)
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        records.append((path, image, caption))
    if not records:
        found = f"; skipped {', '.join(skipped)}" if skipped else ""
        raise CustomDiffError(f"no readable image in {folder}{found}; pass a folder of PNG or JPEG images")
    if skipped:
        warnings.warn(f"{folder}: skipped files that are not images: {', '.join(skipped)}", stacklevel=2)
    missing = sorted(set(captions) - {path.name for path, _, _ in records})
    if missing:
        warnings.warn(
            f"{folder / METADATA_FILE_NAME} names images not in the folder: {', '.join(missing)}",
            stacklevel=2,
        )
    return records


def image_grid(
    images: list[np.ndarray | Image.Image], columns: int, labels: list[str] | None = None
) -> Image.Image:
    """Tile equal-sized images into a grid, row by row, each with an optional label beneath.

    Labels wrap to the tile's width; every label gets the height of the longest one, and a single word
    wider than a tile widens the cells instead of running under the next tile.
    """
    tiles = [as_pil(image).convert("RGB") for image in images]
    width, height = tiles[0].size
    if any(tile.size != (width, height) for tile in tiles):
        raise ValueError("image_grid needs images of one size")
    font = ImageFont.load_default(size=12)
    wrapped = [_wrap(label, font, width - 4) for label in labels] if labels else [[] for _ in tiles]
    line_height, gap = 15, 2
    lines = max(map(len, wrapped))
    widest = max((font.getlength(line) for label in wrapped for line in label), default=0)
    cell_width = max(width, math.ceil(widest) + 4) + gap  # a word wider than a tile widens every cell
    cell_height = height + (lines * line_height + 4 if lines else 0) + gap
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * cell_width - gap, rows * cell_height - gap), "white")
    draw = ImageDraw.Draw(grid)
    for index, (tile, label) in enumerate(zip(tiles, wrapped, strict=True)):
        left, top = (index % columns) * cell_width, (index // columns) * cell_height
        grid.paste(tile, (left, top))
        for number, line in enumerate(label):
            draw.text((left + 2, top + height + 2 + number * line_height), line, fill="black", font=font)
    return grid


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels (a long word stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
