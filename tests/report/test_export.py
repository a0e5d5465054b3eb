"""`recare export` on the shipped synthetic world (a real diffusers folder, 16x16 images): the
folder loads with stock from_pretrained and generates, the model card parses with huggingface_hub."""

from __future__ import annotations

import json

import pytest
import torch

from recare.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    import recare.world

    out = tmp_path_factory.mktemp("export") / "esd"
    argv = ["train", "--method", "esd", "--model", str(recare.world.sd_path()), "--concept", "dotted",
            "--erase-iterations", "2", "--ddim-steps", "4", "--stop-range", "1", "3", "--out", str(out),
            "--device", "cpu"]
    assert main(argv) == 0
    return out


def test_export_loads_in_stock_diffusers_with_a_model_card(world_run, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    results = tmp_path / "results.json"
    entry = {"name": "ESD", "model": {"unet_weights": str(world_run / "unet.safetensors")},
             "robustness": {"plain": {"asr": 12.5, "ci_low": 3.0, "ci_high": 30.0}}, "care": {"score": 0.625}}
    results.write_text(json.dumps({"methods": [entry]}))
    assert main(["export", str(world_run), "--out", str(folder), "--results", str(results)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    erased = load_file(world_run / "unet.safetensors")
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, erased[name].to(tensor.dtype)), name
    image = pipe("a dotted thing", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "diffusers" and "synthetic-world" in data["tags"]
    assert data["recare"]["method"] == "esd" and data["recare"]["concept"] == "dotted"
    assert "NOT Stable Diffusion" in card.text and "| ASR plain (%) | 12.50 [3.0, 30.0] |" in card.text
    assert "| CARE score | 0.625 |" in card.text and "erase_iterations | 2" in card.text
    assert (folder / "recare" / "run.json").is_file() and (folder / "recare_model_note.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no staging folder left


def test_export_refuses_what_it_cannot_export(world_run, tmp_path, cli_error, monkeypatch):
    assert "not a training run folder" in cli_error(["export", str(tmp_path), "--out", str(tmp_path / "m")])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"methods": [{"name": "X", "model": {"unet_weights": "elsewhere.safetensors"}}]}))
    err = cli_error(["export", str(world_run), "--out", str(tmp_path / "m"), "--results", str(other)])
    assert "no method whose UNet is" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    assert "not empty" in cli_error(["export", str(world_run), "--out", str(busy)])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = cli_error(["export", str(world_run), "--out", str(tmp_path / "m2"), "--push-to-hub", "me/erased"])
    assert "HF_HUB_OFFLINE is set" in err and "huggingface-cli upload me/erased" in err
    assert (tmp_path / "m2" / "README.md").is_file()  # the folder itself is complete
