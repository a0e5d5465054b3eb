"""Shared tiny-model fixtures. Every model here has RANDOM weights: tests check code paths,
shapes, determinism and math, never model quality."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def clip_tokenizer():
    """The real 49,408-entry CLIP BPE tokenizer, built offline."""
    from recare.models.tokenizer import offline_clip_tokenizer

    return offline_clip_tokenizer()


@pytest.fixture
def tiny_sd():
    """A fresh tiny random SD (function scope: tests may modify its weights)."""
    from recare.models.tiny import build_tiny_sd

    return build_tiny_sd(seed=0)


@pytest.fixture
def tiny_sdxl():
    """A fresh tiny random SDXL (two text encoders, text_time conditioning; function scope)."""
    from recare.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


@pytest.fixture(params=["sd", "sdxl"])
def tiny_model(request):
    """A fresh tiny random model of each family: SD 1.x layout, then SDXL layout."""
    from recare.models.tiny import build_tiny_sd, build_tiny_sdxl

    return build_tiny_sd(seed=0) if request.param == "sd" else build_tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL saved as a diffusers StableDiffusionXLPipeline folder (read-only for tests)."""
    from recare.models.tiny import build_tiny_sdxl, save_sd

    return save_sd(build_tiny_sdxl(seed=0), tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random SD saved as a diffusers pipeline folder (read-only for tests)."""
    from recare.models.tiny import build_tiny_sd, save_sd

    return save_sd(build_tiny_sd(seed=0), tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_clip():
    """A tiny random CLIPModel with the real tokenizer (session scope: do not modify)."""
    from recare.models.tiny import build_tiny_clip

    return build_tiny_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_clip, tmp_path_factory):
    """The tiny CLIP saved as a folder that load_image_text_model reads."""
    from recare.models.tiny import save_image_text_model

    return save_image_text_model(tiny_clip, tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: tiny models are several times faster so on the shared 2-core
    machine, and bit-identity checks need the same thread count (float reductions depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_error(capsys):
    """Run the CLI expecting a user error: exit status 2 and one 'recare: error:' line; returns stderr."""
    from recare.cli import main

    def run(argv):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "recare: error:" in err
        return err

    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four random 32x32 target images as PNG files (the tiny SD's image size), sorted."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("target-images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def careset():
    """A hand-made nudity CARE-set (anchors 'A person', ...; retain 'A photo of person', ...)."""
    from recare.careset.artifact import CareSet

    return CareSet.from_words("nudity", ["person", "woman", "man"], concept_type="nudity")
