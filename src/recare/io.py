"""File helpers: atomic writes, image folders, JSON.

Every output is written under a temporary name in the same folder and then renamed, so an
interrupted or failed command never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path, PurePath
from typing import Any, Iterator, Mapping

from PIL import Image, UnidentifiedImageError

from recare.errors import RecareError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_ready(obj: Any) -> Any:
    """`obj` as it reads back from JSON: dataclasses -> dicts, tuples -> lists, Paths -> str, keys -> str.

    Raises TypeError for objects JSON cannot hold.
    """
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_ready(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {_json_key(key): json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(item) for item in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def _json_key(key: Any) -> str:
    """A dict key as json.dumps writes it."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return {None: "null", True: "true", False: "false"}[key]
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float):
        return repr(key) if math.isfinite(key) else {math.inf: "Infinity", -math.inf: "-Infinity"}.get(key, "NaN")
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically; the format follows the file extension."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, raising RecareError that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise RecareError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecareError(f"{what} {path} is not valid JSON: {err}") from err


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The .jpg/.jpeg/.png files of `folder` in sorted file-name order (SPEC 2.2).

    Raises RecareError when the folder is missing, is not a folder, or holds no image files.
    Other files are ignored.
    """
    folder = Path(folder)
    if not folder.exists():
        raise RecareError(f"image folder does not exist: {folder}")
    if not folder.is_dir():
        raise RecareError(f"not a folder: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise RecareError(f"no .jpg/.jpeg/.png images in {folder}")
    return paths


def load_image_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image fully as RGB; a corrupt or unreadable file raises RecareError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RecareError(f"cannot read image {path}: {err}") from err
