"""File helpers: atomic writes, image folders, JSON.

Every output is written under a temporary name in the same folder and then renamed, so an
interrupted or failed command never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path, PurePath
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from recare.errors import RecareError

logger = logging.getLogger(__name__)

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


TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")  # also the older ".tmp.<ext>" names


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary file is hidden and ends in ".tmp" (".NAME.XXXXXXXX.tmp"), so globs of the real
    extension never match it; `remove_stale_temporaries` clears those a killed process left. An
    OSError (full disk, read-only folder, ...) becomes one RecareError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_path, path)
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def write_error(path: str | os.PathLike, err: OSError) -> RecareError:
    """One line naming the output and the operating system's reason ("No space left on device")."""
    reason = err.strerror or str(err)
    return RecareError(f"cannot write {path}: {reason}")


def is_temporary(path: Path) -> bool:
    """True for a file atomic_path left behind (hidden, ".NAME.XXXXXXXX.tmp")."""
    return _TEMP_NAME.match(path.name) is not None


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> int:
    """Delete the temporary files of interrupted atomic writes under `folder`; returns how many.

    name: only those of the file `folder/name` (not recursive). Call it only while holding the
    output's lock (output_lock): another writer's live temporaries look the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    candidates = folder.glob(f".{glob.escape(name)}.*") if name is not None else folder.rglob(".*")
    for candidate in candidates:
        if candidate.is_file() and is_temporary(candidate):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed += 1
    if removed:
        logger.info("removed %d temporary file(s) of interrupted writes under %s", removed, folder)
    return removed


# ----------------------------------------------------------------------------- output locations


def check_output_path(path: str | os.PathLike, kind: str) -> Path:
    """Check before any work that `path` can be written as a `kind` ('file' or 'folder').

    RecareError when a file stands where a folder is wanted (or the reverse), or the nearest
    existing folder is not writable.
    """
    path = Path(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise RecareError(f"output folder {path} is a file; give a folder (new or existing)")
    if kind == "file" and path.is_dir():
        raise RecareError(f"output file {path} is a folder; give a file name")
    existing = path if path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RecareError(f"cannot create {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RecareError(f"cannot write {path}: {existing if not path.exists() else path} is not writable")
    return path


def lock_file(path: str | os.PathLike) -> Path:
    """The lock of an output: a hidden sibling ".NAME.lock" (outside the folder, whose contents stay the run's)."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, rank: int = 0) -> Iterator[None]:
    """Hold an exclusive lock on output `path` (a file or folder) for the block (filelock).

    A second process asking for the same output gets a RecareError at once, not a wait. `rank`:
    the process's rank in a sharded run (each rank takes its own lock, ".NAME.rankR.lock").
    """
    from filelock import FileLock, Timeout

    lock_path = lock_file(path)
    if rank:
        lock_path = lock_path.with_name(f"{lock_path.stem}.rank{rank}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout as err:
        raise RecareError(f"another process is writing {path} (it holds {lock_path}); wait for it to finish "
                          "or choose another output") from err
    except OSError as err:
        raise write_error(lock_path, err) from err
    try:
        yield
    finally:
        lock.release()


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
    """The .jpg/.jpeg/.png files of `folder` in sorted file-name order (method §2.2).

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
    except Image.DecompressionBombError as err:
        raise RecareError(f"cannot read image {path}: larger than PIL's decompression-bomb limit "
                          f"({Image.MAX_IMAGE_PIXELS} pixels): {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise RecareError(f"cannot read image {path}: {err}") from err


def check_images(paths: Sequence[str | os.PathLike], what: str = "image") -> None:
    """Decode every image fully (before long work starts); the first bad one raises RecareError naming it."""
    for path in tqdm(paths, desc=f"checking {what}s", disable=len(paths) < 64, leave=False):
        load_image_rgb(path).close()
