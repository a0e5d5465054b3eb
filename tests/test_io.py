"""Atomic writes and image-folder errors."""

import pytest
from PIL import Image

from recare.errors import RecareError
from recare.io import atomic_path, list_images, load_image_rgb, read_json, write_json_atomic


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            1 / 0  # noqa: B018 (the failure inside the block)
    assert list(tmp_path.iterdir()) == []


def test_atomic_json_round_trip(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    assert (tmp_path / "a.json").stat().st_mode & 0o044 == 0o044  # readable by others, unlike mkstemp's 0600
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(RecareError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ["b.png", "a.JPG", "c.jpeg", "notes.txt", "d.gif"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.jpeg"]


def test_list_images_errors(tmp_path):
    with pytest.raises(RecareError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(RecareError, match="no .jpg"):
        list_images(tmp_path)
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(RecareError, match="not a folder"):
        list_images(tmp_path / "f.png")


def test_corrupt_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(RecareError, match="broken.png"):
        load_image_rgb(tmp_path / "broken.png")
    Image.new("L", (4, 4)).save(tmp_path / "gray.png")
    assert load_image_rgb(tmp_path / "gray.png").mode == "RGB"
