import json

import numpy as np
import pytest
from PIL import Image

from customdiff import files, toyworld
from customdiff.errors import CustomDiffError


def test_image_folder_round_trip(tmp_path):
    scenes = list(toyworld.sample_scenes(5, seed=3))
    assert files.write_image_folder(tmp_path / "out", scenes) == 5

    records = files.read_image_folder(tmp_path / "out")
    assert [path.name for path, _, _ in records] == [f"{index:05d}.png" for index in range(5)]
    for (_, image, caption), (array, text) in zip(records, scenes, strict=True):
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), array)
        assert caption == text
    lines = (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"file_name": "00000.png", "text": scenes[0][1]}


def test_rewrite_leaves_no_stale_images_or_captions(tmp_path):
    files.write_image_folder(tmp_path, toyworld.sample_scenes(6, seed=0))
    files.write_image_folder(tmp_path, toyworld.sample_scenes(2, seed=1))
    records = files.read_image_folder(tmp_path)
    assert [caption for _, _, caption in records] == [text for _, text in toyworld.sample_scenes(2, seed=1)]
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_interrupted_write_leaves_no_metadata(tmp_path):
    def scenes_then_interrupt():
        yield from toyworld.sample_scenes(3)
        raise KeyboardInterrupt

    files.write_image_folder(tmp_path, toyworld.sample_scenes(3))
    with pytest.raises(KeyboardInterrupt):
        files.write_image_folder(tmp_path, scenes_then_interrupt())
    assert not (tmp_path / "metadata.jsonl").exists()


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "notes.txt"
    files.atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError), files.atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["notes.txt"]


def test_captions_from_text_files(tmp_path):
    files.save_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    files.save_png(tmp_path / "b.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.txt").write_text("a red circle\n")
    records = files.read_image_folder(tmp_path)
    assert [caption for _, _, caption in records] == ["a red circle", None]


def test_corrupt_file_is_skipped_with_a_warning(scene_folder):
    (scene_folder / "broken.png").write_bytes(b"not a png")
    (scene_folder / "notes.md").write_text("hello")
    with pytest.warns(UserWarning, match="broken.png.*notes.md"):
        records = files.read_image_folder(scene_folder)
    assert len(records) == 8


def test_folder_without_images_is_an_error(tmp_path):
    with pytest.raises(CustomDiffError, match="no readable image"):
        files.read_image_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CustomDiffError, match="broken.png"):
        files.read_image_folder(tmp_path)
    with pytest.raises(CustomDiffError, match="does not exist"):
        files.read_image_folder(tmp_path / "missing")


@pytest.mark.parametrize("key", files.CAPTION_KEYS)
def test_metadata_captions_are_read_under_the_common_column_names(tmp_path, key):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    entries = [{"file_name": "a.png", key: "a red square"}, {"file_name": "b.png", "label": 3}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(entry) for entry in entries))
    (tmp_path / "b.txt").write_text("a blue square\n")  # b has no caption column: its .txt is read
    captions = [caption for _, _, caption in files.read_image_folder(tmp_path)]
    assert captions == ["a red square", "a blue square"]


def test_bad_metadata_line_is_named(scene_folder):
    with open(scene_folder / "metadata.jsonl", "a") as handle:
        handle.write('{"text": "no file name"}\n')
    with pytest.raises(CustomDiffError, match="line 9"):
        files.read_image_folder(scene_folder)


def test_unwritable_output_folder(tmp_path):
    regular_file = tmp_path / "file"
    regular_file.write_text("")
    for out in (regular_file, regular_file / "out"):
        with pytest.raises(CustomDiffError) as caught:
            files.prepare_output_dir(out)
        message = str(caught.value)
        assert message.startswith(f"cannot write to {out}: ") and message.endswith("-o/OUT")
        assert "\n" not in message


def test_rgba_and_grayscale_become_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, :, 3] = 255  # top row opaque red, the rest fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((4, 4), 77, np.uint8), "L").save(tmp_path / "b.png")
    Image.fromarray(np.full((4, 4), 77, np.uint8), "L").convert("P").save(tmp_path / "c.gif")

    (_, transparent, _), (_, gray, _), (_, palette, _) = files.read_image_folder(tmp_path)
    assert {image.mode for image in (transparent, gray, palette)} == {"RGB"}
    assert tuple(np.asarray(transparent)[0, 0]) == (200, 0, 0)
    assert tuple(np.asarray(transparent)[3, 3]) == (255, 255, 255)  # transparency laid over white
    assert (np.asarray(gray) == 77).all() and (np.asarray(palette) == 77).all()


def test_image_grid_size():
    images = [np.zeros((10, 12, 3), np.uint8)] * 5
    assert files.image_grid(images, columns=2).size == (2 * 12 + 2, 3 * 10 + 2 * 2)
    labelled = files.image_grid(images, columns=5, labels=["a b"] * 5)
    assert labelled.width == 5 * 12 + 4 * 2 and labelled.height > 3 * 10


def test_a_label_word_wider_than_its_tile_widens_the_cells():
    tiles = [np.zeros((64, 64, 3), np.uint8)] * 2
    grid = np.asarray(files.image_grid(tiles, columns=2, labels=["a star on a sand background"] * 2))
    first_cell = grid.shape[1] // 2  # two equal cells and their gap
    assert grid.shape[1] > 2 * 64 + 2
    label_rows = grid[66:]
    assert (label_rows[:, first_cell - 3 : first_cell] > 128).all()  # the first label ends before the second
