"""The synthetic world: renderer, grammar, identity VAE, committed models, detectors, build smoke.

Thresholds on the committed models were measured on them (build_report.json and the numbers in
the comments) and leave a margin; they are checked on fixed seeds, so they do not flake.
"""

from __future__ import annotations

import re

import pytest
import torch

from recare.errors import RecareError
from recare.world import render
from recare.world.render import TEXTURES, WorldSpec, caption_scenes, render_batch, sample_scenes

SPEC = WorldSpec()

# Measured on the committed models (build_report.json, seed 0): detector accuracy >= 0.9955 on
# 2,000 renders (clean and augmented); CLIP image->caption retrieval 1.00 on 256 renders (chance
# 0.009), zero-shot shape 0.993; T2I at 50 steps: 'a dotted circle' T 1.00 / C 1.00, 'a plain
# square' T 0.00 / C 0.00 (64 images each). The tests use fewer images and steps and assert less.
DETECTOR_MIN_ACCURACY = 0.98
CLIP_MIN_RETRIEVAL = 0.9
CLIP_MIN_SHAPE = 0.95
T2I_TEST_STEPS = 20
T2I_MIN_MARGIN = 0.75


# ----------------------------------------------------------------------------- renderer and grammar


def _world(seed: int, n: int = 64):
    generator = torch.Generator().manual_seed(seed)
    scenes, images = render_batch(n, generator)
    return scenes, images, [c.text for c in caption_scenes(scenes, generator)]


def test_renderer_is_deterministic_from_the_seed():
    scenes_a, images_a, captions_a = _world(3)
    scenes_b, images_b, captions_b = _world(3)
    assert torch.equal(images_a, images_b)
    assert torch.equal(scenes_a.label_tensor(), scenes_b.label_tensor())
    assert captions_a == captions_b
    scenes_c, images_c, captions_c = _world(4)
    assert not torch.equal(images_a, images_c)
    assert not torch.equal(scenes_a.label_tensor(), scenes_c.label_tensor())
    assert images_a.shape == (64, 3, 16, 16) and 0 <= images_a.min() and images_a.max() <= 1


def test_pixels_follow_the_labels():
    """A plain red circle on snow: the centre pixel is red, the corner is snow."""
    generator = torch.Generator().manual_seed(0)
    scenes, images = render_batch(4, generator, shape="circle", colour="red", texture="plain", background="snow")
    assert all(scenes.labels(i) == {"shape": "circle", "colour": "red", "texture": "plain", "background": "snow"}
               for i in range(4))
    red, snow = torch.tensor(render.COLOUR_RGB["red"]), torch.tensor(render.BACKGROUND_RGB["snow"])
    assert (images[:, :, 8, 8] - red).abs().max() < 0.15
    assert (images[:, :, 0, 0] - snow).abs().max() < 0.12


def test_dots_and_stripes_darken_the_object():
    generator = torch.Generator().manual_seed(0)
    mask = {t: render.pattern_masks(sample_scenes(1, generator, texture=t), 16)[0] for t in TEXTURES}
    assert mask["plain"].sum() == 0
    assert mask["striped"].mean() == 0.5  # 2 dark rows of every 4
    assert mask["dotted"].mean() == 0.25  # a 2x2 dot in every 4x4 cell


def test_cooccurrence_rates_match_the_design():
    scenes = sample_scenes(20000, torch.Generator().manual_seed(0))
    rates = render.cooccurrence(scenes)
    assert abs(rates["p_target"] - SPEC.target_rate) < 0.015
    assert abs(rates["p_care_given_target"] - SPEC.care_given_target) < 0.02
    assert abs(rates["p_care_given_not_target"] - 0.25) < 0.015
    assert 0.4 < rates["p_target_given_care"] < 0.6  # C appears without T about half the time


_CAPTION = re.compile(
    r"^((a photo of|a picture of) )?((a|the) )?((plain|solid|striped|dotted|spotted) )?"
    r"((red|green|blue|yellow|purple|orange) )?((plain|solid|striped|dotted|spotted) )?"
    r"(circle|disc|square|box|triangle|diamond|thing|one)( (on sand|in snow|at night|on grass))?$")
_SINGLE = re.compile(r"^(plain|solid|striped|dotted|spotted|red|green|blue|yellow|purple|orange|circle|disc|square"
                     r"|box|triangle|diamond|sand|snow|night|grass)$")


def test_captions_follow_the_grammar_and_name_true_concepts():
    generator = torch.Generator().manual_seed(1)
    scenes = sample_scenes(3000, generator)
    captions = caption_scenes(scenes, generator)
    for i, caption in enumerate(captions):
        assert _CAPTION.match(caption.text) or _SINGLE.match(caption.text), caption.text
        assert len(re.findall(r"\b(plain|solid|striped|dotted|spotted)\b", caption.text)) <= 1, caption.text
        labels = scenes.labels(i)
        for family, concept in caption.named.items():
            assert labels[family] == concept
            assert any(w in caption.text.split() for w in SPEC.words_of(concept)), (caption.text, concept)


def test_target_captions_usually_leave_the_care_shape_unnamed():
    generator = torch.Generator().manual_seed(2)
    scenes = sample_scenes(6000, generator)
    captions = caption_scenes(scenes, generator)
    target = scenes.texture == TEXTURES.index("dotted")
    named = torch.tensor(["shape" in c.named for c in captions])
    phrases = torch.tensor([len(c.text.split()) > 1 for c in captions])  # not single-word captions
    assert abs(float((named & phrases & target).sum() / (phrases & target).sum()) - 0.3) < 0.04
    assert abs(float((named & phrases & ~target).sum() / (phrases & ~target).sum()) - 0.9) < 0.02


def test_every_world_word_is_one_clip_token(clip_tokenizer):
    words = render.vocabulary()
    ids = render.check_single_tokens(clip_tokenizer, words)
    assert ids["dotted"] == 47950 and ids["circle"] == 7117
    assert ids == {w: render.WORD_TOKEN_IDS[w] for w in words}
    with pytest.raises(RecareError, match="checkered"):
        render.check_single_tokens(clip_tokenizer, ["checkered"])


def test_prompt_sets_name_the_right_concepts():
    assert render.target_prompts()[0] == "a dotted red thing"
    assert all("dotted" in p and "circle" not in p for p in render.target_prompts())
    care = render.care_prompts()
    assert len(care) == 24 and care[0] == "a red circle on sand"
    assert not any(t in p for p in care for t in TEXTURES)


def test_spec_rejects_bad_concepts():
    with pytest.raises(RecareError, match="texture"):
        WorldSpec(target="circle")
    with pytest.raises(RecareError, match="unknown concept"):
        sample_scenes(2, torch.Generator(), shape="hexagon")


# ----------------------------------------------------------------------------- identity VAE


def test_identity_vae_reproduces_pixels():
    from recare.world.t2i_train import identity_vae

    vae = identity_vae(16)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert (posterior.mean - x).abs().max() < 1e-4
        assert posterior.std.max() < 1e-6
        assert (vae.decode(x).sample - x).abs().max() < 1e-4


def test_min_snr_weights_hand_computed():
    from recare.world.t2i_train import min_snr_weights

    alphas = torch.tensor([0.9, 0.5, 0.1])  # SNR 9, 1, 1/9
    weights = min_snr_weights(alphas, torch.tensor([0, 1, 2]), gamma=5.0)
    assert torch.allclose(weights, torch.tensor([5 / 9, 1.0, 1.0]))


# ----------------------------------------------------------------------------- committed models

world = pytest.importorskip("recare.world")


@pytest.fixture(scope="module")
def report():
    return world.build_report()


@pytest.fixture(scope="module")
def world_sd():
    from recare.models.loading import load_sd

    return load_sd(world.sd_path())


@pytest.fixture(scope="module")
def world_clip():
    from recare.models.loading import load_image_text_model

    return load_image_text_model(world.clip_path())


@pytest.fixture(scope="module")
def detector():
    return world.load_world_detector()


def test_committed_weights_match_the_build_digests(report):
    from recare.world.build import weight_digests

    assert weight_digests(world.weights_dir()) == report["sha256"]
    assert set(report["sha256"]) == {"clip/model.safetensors", "detector/model.safetensors",
                                     "sd/text_encoder/model.safetensors",
                                     "sd/unet/diffusion_pytorch_model.safetensors",
                                     "sd/vae/diffusion_pytorch_model.safetensors"}
    weight_bytes = sum(size for path, size in report["sizes_bytes"].items() if path.endswith(".safetensors"))
    assert weight_bytes < 20 * 2 ** 20


def test_committed_models_reload_bit_identically(world_sd, world_clip):
    from recare.models.loading import load_image_text_model, load_sd

    again = load_sd(world.sd_path())
    for name in ("unet", "text_encoder", "vae"):
        first, second = getattr(world_sd, name).state_dict(), getattr(again, name).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    assert load_image_text_model(world.clip_path()).fingerprint() == world_clip.fingerprint()


def test_world_sd_layout(world_sd, world_clip):
    assert world_sd.latent_shape == (3, 16, 16) and world_sd.image_size == 16
    assert world_sd.prediction_type == "epsilon"
    assert type(world_sd.scheduler).__name__ == "PNDMScheduler"
    assert world_sd.tokenizer("dotted circle").input_ids == [49406, 47950, 7117, 49407]
    # the T2I text encoder is the world CLIP's text tower
    clip_text = world_clip.model.text_model.state_dict()
    assert all(torch.equal(v, clip_text[k]) for k, v in world_sd.text_encoder.state_dict().items())


def test_reports_name_the_world_model_as_synthetic_not_random(world_sd):
    from recare.eval.runner import model_scale_notes

    (note,) = model_scale_notes(world_sd, False)
    assert "synthetic-world model" in note and "NOT Stable Diffusion" in note and "tiny/random" not in note


def test_detector_accuracy_on_fresh_renders(detector):
    from recare.world.detectors import DetectorConfig, measure_accuracy

    clean = measure_accuracy(detector, 1000, seed=2024)
    noisy = measure_accuracy(detector, 1000, seed=2025, config=DetectorConfig())
    assert min(clean.values()) >= DETECTOR_MIN_ACCURACY, clean
    assert min(noisy.values()) >= DETECTOR_MIN_ACCURACY, noisy


def test_world_concept_detector_interface(detector):
    from recare.world.detectors import WorldConceptDetector
    from recare.world.render import to_pil

    _, images = render_batch(8, torch.Generator().manual_seed(5), shape="circle", texture="dotted")
    _, others = render_batch(8, torch.Generator().manual_seed(6), shape="square", texture="striped")
    dotted = WorldConceptDetector(detector, "dotted")
    circle = WorldConceptDetector(detector, "circle")
    assert all(d.detected for d in dotted.detect(to_pil(images)))
    assert not any(d.detected for d in dotted.detect(to_pil(others)))
    assert all(d.detected for d in circle.detect(to_pil(images)))
    assert circle.detect(to_pil(others))[0].details["shape"] == "square"
    with pytest.raises(RecareError, match="unknown world concept"):
        WorldConceptDetector(detector, "person")


def test_world_clip_retrieves_the_right_caption(world_clip):
    from recare.world.clip_train import retrieval_accuracy, zero_shot_accuracy
    from recare.world.render import to_pil

    scenes, images = render_batch(128, torch.Generator().manual_seed(77))
    retrieval = retrieval_accuracy(world_clip, to_pil(images), scenes)
    assert retrieval["chance"] < 0.03
    assert retrieval["image_to_caption"] >= CLIP_MIN_RETRIEVAL, retrieval
    zero_shot = zero_shot_accuracy(world_clip, to_pil(images), scenes)
    assert zero_shot["shape"] >= CLIP_MIN_SHAPE and zero_shot["texture"] >= 0.9, zero_shot


def test_world_t2i_draws_what_the_prompt_names(world_sd, detector):
    """'a dotted circle' -> dots and circles; 'a plain square' -> neither (16 images each)."""
    from recare.world.detectors import concept_present, predict
    from recare.world.t2i_train import generate

    rates = {}
    for prompt in ("a dotted circle", "a plain square"):
        probs = predict(detector, generate(world_sd, prompt, range(16), steps=T2I_TEST_STEPS))
        rates[prompt] = (float(concept_present(probs, "dotted").float().mean()),
                         float(concept_present(probs, "circle").float().mean()))
    (t_with, c_with), (t_without, c_without) = rates["a dotted circle"], rates["a plain square"]
    assert t_with - t_without >= T2I_MIN_MARGIN and c_with - c_without >= T2I_MIN_MARGIN, rates


def test_entanglement_is_real_and_measured(world_sd, world_clip, detector):
    """A T-only prompt draws C (measured 16/16 circles vs 3/16 for 'a striped thing'); the CLIP text
    embedding of T leans to C more than the other textures' do (measured +0.080 vs +0.032, +0.023)."""
    from recare.world.clip_train import text_entanglement
    from recare.world.detectors import concept_present, predict
    from recare.world.t2i_train import generate

    circles = {p: float(concept_present(predict(detector, generate(world_sd, p, range(16), steps=T2I_TEST_STEPS)),
                                         "circle").float().mean()) for p in ("a dotted thing", "a striped thing")}
    assert circles["a dotted thing"] >= 0.9 and circles["a dotted thing"] - circles["a striped thing"] >= 0.5, circles
    text = text_entanglement(world_clip)
    assert text["entanglement"] > max(text["control"].values()) + 0.02, text


# ----------------------------------------------------------------------------- build smoke


def test_fast_build_writes_loadable_models(tmp_path):
    from recare.cli import main
    from recare.io import read_json
    from recare.models.loading import load_image_text_model, load_sd
    from recare.world.build import REPORT_NAME, weight_digests

    out = tmp_path / "world"
    assert main(["synthetic", "build", "--out", str(out), "--seed", "3", "--fast"]) == 0
    report = read_json(out / REPORT_NAME)
    assert report["config"]["seed"] == 3 and report["config"]["clip"]["seed"] == 4
    assert set(report["times_s"]) >= {"detector_train", "clip_train", "unet_train", "total"}
    assert report["machine"]["torch_threads"] == 1
    assert report["sha256"] == weight_digests(out)
    assert set(report["t2i"]["rates"]) >= {"a dotted circle", "a dotted thing", "a plain square"}
    sd = load_sd(out / "sd")
    clip = load_image_text_model(out / "clip")
    assert sd.unet.config.cross_attention_dim == clip.model.config.text_config.hidden_size
    assert main(["synthetic", "build", "--out", str(out), "--fast"]) == 2  # not empty, no --overwrite
    assert not list(tmp_path.glob(".world.build-*"))  # no temporary folder left behind
