"""Image generation with per-image generators, resume and manifest (recare.generate), tiny SD on CPU."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from recare.errors import RecareError
from recare.generate import images as generate
from recare.generate.images import GenerationConfig, generate_images, read_manifest
from recare.generate.prompts import PromptJob, jobs_for_prompt, jobs_for_prompts

FAST = GenerationConfig(num_inference_steps=2, batch_size=4, height=16, width=16)  # 8x8 latents: fast


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


class PipelineSpy:
    """Wraps components.pipeline() to record every pipeline call's prompts and guidance."""

    def __init__(self, components, monkeypatch):
        self.calls = []
        make = components.pipeline

        def pipeline(scheduler=None):
            pipe = make(scheduler=scheduler)

            def call(**kwargs):
                self.calls.append((list(kwargs["prompt"]), kwargs["guidance_scale"], len(kwargs["generator"])))
                return pipe(**kwargs)
            return call
        monkeypatch.setattr(components, "pipeline", pipeline)

    @property
    def prompts(self):
        return [p for call in self.calls for p in call[0]]


def test_images_do_not_depend_on_batch_size(tiny_sd, tmp_path):
    jobs = jobs_for_prompts(["a photo of a person", "a red car"], 2)[:3]  # seeds 42, 43, then 42 for prompt 1
    one = generate_images(tiny_sd, jobs, tmp_path / "b1", GenerationConfig(num_inference_steps=2, batch_size=1))
    three = generate_images(tiny_sd, jobs, tmp_path / "b3", GenerationConfig(num_inference_steps=2, batch_size=3))
    assert [p.name for p in one] == ["00000_000.png", "00000_001.png", "00001_000.png"]
    for a, b in zip(one, three):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2  # uint8 levels; batched kernels differ in rounding only
    # the seed matters: two seeds of one prompt give different images
    assert np.abs(pixels(one[0]) - pixels(one[1])).max() > 10
    assert Image.open(one[0]).size == (32, 32)


def test_running_out_of_device_memory_halves_the_batch(tiny_sd, tmp_path, monkeypatch, caplog):
    """A pipeline call of more than 2 images raises OutOfMemoryError (as a full card does): the batch is split,
    the smaller size is kept for later batches, and the images are those of an unconstrained run."""
    jobs = jobs_for_prompt("a photo of a person", 6)
    config = GenerationConfig(num_inference_steps=2, batch_size=4)
    free = generate_images(tiny_sd, jobs, tmp_path / "free", config)
    sizes = []
    make = tiny_sd.pipeline

    def pipeline(scheduler=None):
        pipe = make(scheduler=scheduler)

        def call(**kwargs):
            sizes.append(len(kwargs["prompt"]))
            if len(kwargs["prompt"]) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return pipe(**kwargs)
        return call
    monkeypatch.setattr(tiny_sd, "pipeline", pipeline)
    with caplog.at_level(logging.WARNING, logger="recare.generate.images"):
        tight = generate_images(tiny_sd, jobs, tmp_path / "tight", config)
    assert sizes == [4, 2, 2, 2]  # batch 1: 4 fails, then 2 + 2; batch 2 (2 jobs) starts at the lowered size
    assert "out of device memory at 4 images per call; continuing with 2" in caplog.text
    assert [p.name for p in tight] == [p.name for p in free]
    for a, b in zip(free, tight):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2
    monkeypatch.setattr(tiny_sd, "pipeline", lambda scheduler=None: lambda **kw: (_ for _ in ()).throw(
        torch.OutOfMemoryError("simulated")))
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit: the error, not a loop
        generate_images(tiny_sd, jobs_for_prompt("a dog", 1), tmp_path / "none", GenerationConfig(
            num_inference_steps=2, batch_size=1))


def test_resume_skips_existing_images_and_merges_manifest(tiny_sd, tmp_path, monkeypatch):
    spy = PipelineSpy(tiny_sd, monkeypatch)
    jobs = jobs_for_prompt("a photo of a person", 4)
    first = generate_images(tiny_sd, jobs[:2], tmp_path, FAST)
    before = {p.name: p.stat().st_mtime_ns for p in first}
    paths = generate_images(tiny_sd, jobs, tmp_path, FAST)
    assert spy.calls == [(["a photo of a person"] * 2, 7.5, 2)] * 2  # second run made only images 2 and 3
    assert {p.name: p.stat().st_mtime_ns for p in paths[:2]} == before
    manifest = read_manifest(tmp_path)
    assert [(e["file"], e["seed"]) for e in manifest["images"]] == [
        ("00000.png", 42), ("00001.png", 43), ("00002.png", 44), ("00003.png", 45)]
    generate_images(tiny_sd, jobs, tmp_path, FAST)  # everything there: no pipeline call
    assert len(spy.calls) == 2


def test_deleted_or_unlisted_image_is_made_again(tiny_sd, tmp_path, monkeypatch):
    jobs = jobs_for_prompt("a dog", 2)
    generate_images(tiny_sd, jobs, tmp_path, FAST)
    (tmp_path / "00000.png").unlink()
    manifest = read_manifest(tmp_path)  # simulate a crash between writing 00001.png and the manifest
    manifest["images"] = manifest["images"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    spy = PipelineSpy(tiny_sd, monkeypatch)
    generate_images(tiny_sd, jobs, tmp_path, FAST)
    assert spy.prompts == ["a dog", "a dog"]
    assert len(read_manifest(tmp_path)["images"]) == 2


def test_manifest_layout(tiny_sd, tmp_path):
    jobs = [PromptJob("a cat", 7, "cat", guidance=3.0, case_id="12")]
    generate_images(tiny_sd, jobs, tmp_path, FAST, model_info={"unet_weights": "erased.safetensors"})
    manifest = read_manifest(tmp_path)
    assert manifest["format"] == "recare-images/1"
    assert manifest["model"] == {"source": "<tiny-random-sd>", "revision": None, "dtype": "float32",
                                 "unet_weights": "erased.safetensors"}
    assert manifest["settings"] == {
        "num_inference_steps": 2, "guidance_scale": 7.5, "height": 16, "width": 16, "scheduler": "default",
        "scheduler_class": "PNDMScheduler", "image_format": "png", "generator_device": "cpu", "safety_checker": False}
    assert manifest["images"] == [{"file": "cat.png", "prompt": "a cat", "seed": 7, "guidance": 3.0, "case_id": "12"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png", "manifest.json"]  # no temporary leftovers


def test_other_settings_or_model_in_folder_is_an_error(tiny_sd, tmp_path):
    jobs = jobs_for_prompt("a cat", 1)
    generate_images(tiny_sd, jobs, tmp_path, FAST)
    with pytest.raises(RecareError, match="another run.*settings differs"):
        generate_images(tiny_sd, jobs, tmp_path, GenerationConfig(num_inference_steps=3, height=16, width=16))
    with pytest.raises(RecareError, match="another run.*model differs"):
        generate_images(tiny_sd, jobs, tmp_path, FAST, model_info={"unet_weights": "x.safetensors"})
    with pytest.raises(RecareError, match="made from another job"):
        generate_images(tiny_sd, jobs_for_prompt("a dog", 1), tmp_path, FAST)
    # batch size does not change the images, so it may change on resume
    assert generate_images(tiny_sd, jobs, tmp_path, GenerationConfig(num_inference_steps=2, batch_size=1,
                                                                      height=16, width=16))


def test_folder_with_foreign_images_is_an_error(tiny_sd, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "holiday.jpg")
    with pytest.raises(RecareError, match="no manifest.json"):
        generate_images(tiny_sd, jobs_for_prompt("a cat", 1), tmp_path, FAST)


def test_per_job_guidance_is_grouped_and_used(tiny_sd, tmp_path, monkeypatch):
    spy = PipelineSpy(tiny_sd, monkeypatch)
    jobs = [PromptJob("a cat", 1, "a", 3.0), PromptJob("a cat", 2, "b"), PromptJob("a cat", 3, "c", 3.0)]
    paths = generate_images(tiny_sd, jobs, tmp_path / "mixed", FAST)
    assert [(g, n) for _, g, n in spy.calls] == [(3.0, 2), (7.5, 1)]
    alone = generate_images(tiny_sd, [PromptJob("a cat", 3, "c")], tmp_path / "alone",
                            GenerationConfig(num_inference_steps=2, guidance_scale=3.0, height=16, width=16))
    assert np.abs(pixels(paths[2]) - pixels(alone[0])).max() <= 2


def test_ddim_scheduler_and_jpg(tiny_sd, tmp_path):
    config = GenerationConfig(num_inference_steps=2, scheduler="ddim", image_format="jpg", height=24, width=16)
    (path,) = generate_images(tiny_sd, jobs_for_prompt("a cat", 1), tmp_path, config)
    assert path.name == "00000.jpg" and Image.open(path).size == (16, 24)
    assert read_manifest(tmp_path)["settings"]["scheduler_class"] == "DDIMScheduler"


def test_safety_checker_warning_is_logged_once(tiny_sd, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(generate, "_safety_warning_given", False)
    with caplog.at_level(logging.WARNING, logger="recare.generate"):
        generate_images(tiny_sd, jobs_for_prompt("a cat", 1), tmp_path / "a", FAST)
        generate_images(tiny_sd, jobs_for_prompt("a cat", 1), tmp_path / "b", FAST)
    assert sum("safety checker is DISABLED" in r.getMessage() for r in caplog.records) == 1


def test_bad_config_and_jobs_are_errors(tiny_sd, tmp_path):
    with pytest.raises(RecareError, match="scheduler"):
        GenerationConfig(scheduler="euler")
    with pytest.raises(RecareError, match="batch_size"):
        GenerationConfig(batch_size=0)
    with pytest.raises(RecareError, match="image format"):
        GenerationConfig(image_format="gif")
    with pytest.raises(RecareError, match="multiples of 8"):
        generate_images(tiny_sd, jobs_for_prompt("a", 1), tmp_path, GenerationConfig(height=30))
    with pytest.raises(RecareError, match="same file"):
        generate_images(tiny_sd, [PromptJob("a", 1, "x"), PromptJob("b", 2, "x")], tmp_path, FAST)
    assert generate_images(tiny_sd, [], tmp_path / "none", FAST) == []
