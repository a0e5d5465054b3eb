"""recare.world.demo: statistics by hand, the world's FID features, and the shortened demo end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recare.errors import RecareError
from recare.world.demo import WORLD_STEREO_ANCHORS, DemoConfig, benign_scenes, run_demo, train_config
from recare.world.ground_truth import pearson
from recare.world.seeds import format_seed_summary, summarize_seeds, t_interval

# ----------------------------------------------------------------------------- statistics


def test_pearson_hand_computed():
    # x = 1..4, y = 2, 4, 5, 9: sxy = 11, sxx = 5, syy = 26 -> r = 11 / sqrt(130) = 0.964764
    out = pearson([1, 2, 3, 4], [2, 4, 5, 9])
    assert out["r"] == pytest.approx(11 / math.sqrt(130), abs=1e-12)
    z, half = math.atanh(out["r"]), 1.959963984540054  # n - 3 = 1
    assert out["ci95"] == pytest.approx([math.tanh(z - half), math.tanh(z + half)])
    assert pearson([1, 2, 3], [5, 5, 5])["r"] is None  # constant y: undefined
    assert pearson([1, 2, 3], [3, 2, 1]) == {"r": -1.0, "ci95": None, "n": 3}


def test_t_interval_hand_computed():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138
    out = t_interval([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["sd"] == pytest.approx(1.0)
    assert out["ci95"] == pytest.approx([2 - 2.484138, 2 + 2.484138], abs=1e-5)
    assert t_interval([0.5]) == {"mean": 0.5, "ci95": None, "n": 1}


def _fake_summary(seed: int, rates: dict[str, tuple[float, float]]) -> dict:
    rows = []
    for name, (t_plain, c_gt) in rates.items():
        cell = lambda r: {"rate": r, "ci95": [r, r], "n": 10}  # noqa: E731
        rows.append({"name": name, "plain_T": cell(t_plain), "cce_T": cell(t_plain), "care_images_C": cell(c_gt),
                     "care_score": cell(c_gt / 2), "care_images_T": cell(0.0)})
    return {"config": {"seed": seed}, "ground_truth": rows, "ratio": {n: 0.5 for n in rates},
            "utility": {n: {"fid": 0.125 * (seed + 1), "clip_score": 0.25} for n in rates},
            "facts": {"careset": {"world_vocabulary": {"words": ["circle"]}}}}


def test_summarize_seeds_pairs_differences_by_seed():
    summaries = [_fake_summary(0, {"original": (1.0, 0.8), "ESD": (0.2, 0.4), "STEREO": (0.1, 0.5),
                                   "ReCARE": (0.1, 0.7)}),
                 _fake_summary(1, {"original": (0.9, 0.6), "ESD": (0.4, 0.2), "STEREO": (0.3, 0.3),
                                   "ReCARE": (0.2, 0.6)})]
    out = summarize_seeds(summaries)
    assert out["seeds"] == [0, 1]
    assert out["per_model"]["ESD"]["plain_T"]["mean"] == pytest.approx(0.3)
    diff = out["paired_differences"]["ReCARE - ESD"]["care_images_C"]
    assert diff["mean"] == pytest.approx(0.35)  # (0.3 + 0.4) / 2
    assert diff["sd"] == pytest.approx(math.sqrt(0.005))
    # CARE score = C / 2 at every point: a perfect correlation over the 8 (model, seed) points
    assert out["care_score_vs_ground_truth"]["r"] == pytest.approx(1.0) and out["care_score_vs_ground_truth"]["n"] == 8
    assert out["paired_differences"]["ESD - original"]["care_images_C"]["mean"] == pytest.approx(-0.4)
    assert out["per_model"]["original"]["plain_T"]["ci95"][1] == 1.0  # clipped to the rate's range
    assert out["per_model"]["ESD"]["fid"]["mean"] == pytest.approx(0.1875)  # (0.125 + 0.25) / 2
    text = format_seed_summary(out)
    assert "| ReCARE - ESD |" in text and "35.0" in text
    assert "| 0.188 [" in text and "| 0.2500 [" in text  # FID as is, the CLIP score as a cosine (not x100)


# ----------------------------------------------------------------------------- configuration and data


def test_demo_config_checks_and_train_settings():
    with pytest.raises(RecareError, match="non-empty subset"):
        DemoConfig(methods=("esd", "uce"))
    with pytest.raises(RecareError, match="erase_iterations must be >= 1"):
        DemoConfig(erase_iterations=0)
    config = train_config("recare", DemoConfig())
    # paper settings except the documented scaled-down ones
    assert (config.erase_iterations, config.stage2_iterations, config.inversion.steps) == (60, 60, 100)
    # learning rates x 200 / 60: the paper's update budget (lr x iterations)
    assert config.effective_erase_lr == pytest.approx(0.5e-5 * 200 / 60)
    assert config.stage2_lr == pytest.approx(2e-5 * 200 / 60)
    assert train_config("esd", DemoConfig()).effective_erase_lr == pytest.approx(5e-5 * 200 / 60)
    assert train_config("stereo", DemoConfig()).anchors == WORLD_STEREO_ANCHORS
    paper_rates = train_config("recare", DemoConfig(paper_iterations=60))
    assert (paper_rates.effective_erase_lr, paper_rates.stage2_lr) == (0.5e-5, 2e-5)
    assert (config.negative_guidance, config.stage2_guidance, config.eta, config.retain_weight) == (2.0, 2.0, 1.0, 1.0)
    assert (config.ddim_steps, config.stop_range, config.initializer, config.concept) == (20, (1, 18), "circle",
                                                                                          "dotted")
    seeds = DemoConfig(seed=3).seeds()
    assert len(set(seeds.values())) == len(seeds) and min(seeds.values()) == 300_000


def test_benign_scenes_have_no_target_and_full_captions():
    scenes, images, captions = benign_scenes(40, seed=5)
    assert len(scenes) == 40 and images.shape == (40, 3, 16, 16)
    assert all("dotted" not in c for c in captions)
    assert captions[0] == f"a {scenes.labels(0)['texture']} {scenes.labels(0)['colour']} {scenes.labels(0)['shape']}" \
        + captions[0].split(scenes.labels(0)['shape'], 1)[1]
    again = benign_scenes(40, seed=5)
    assert torch.equal(again[1], images) and again[2] == captions


def test_world_clip_features_and_normalisation():
    import recare.world as world
    from recare.models.loading import load_image_text_model
    from recare.world.demo import world_normalisation
    from recare.world.features import WorldClipFeatureExtractor

    clip = load_image_text_model(world.clip_path())
    extractor = WorldClipFeatureExtractor(clip)
    _, images, _ = benign_scenes(8, seed=1)
    from recare.world.render import to_pil

    features = extractor(to_pil(images))
    assert features.shape == (8, 64)
    assert features == pytest.approx(clip.encode_images(to_pil(images)).double().numpy())
    assert extractor.extractor_id.startswith("world-clip-image-embedding:64d")
    norm, measured = world_normalisation(clip, extractor, 64, seed=3)
    # own captions score higher than shuffled ones; two real sets are closer than backgrounds-only images
    assert measured["clip_shuffled_captions"] < measured["clip_own_captions"]
    assert 0 <= measured["fid_real_vs_real"] < measured["fid_backgrounds_only"]
    assert (norm.clip_low, norm.fid_worst) == (measured["clip_shuffled_captions"], measured["fid_backgrounds_only"])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, DemoConfig.quick(), progress=False)


def test_demo_completes_and_writes_every_report_file(demo_run):
    out, summary = demo_run
    report = out / "report"
    for name in ("report.md", "report.html", "results.json", "radar.png"):
        assert (report / name).is_file(), name
    assert list((report / "grids").glob("*.png"))
    for method in ("esd", "stereo", "recare"):
        assert (out / "train" / method / "unet.safetensors").is_file()
        assert (out / "train" / method / "losses.png").is_file()
    assert json.loads((out / "demo.json").read_text())["format"] == "recare-demo/1"
    markdown = (report / "report.md").read_text()
    assert "SYNTHETIC WORLD" in markdown and "## Ground truth (synthetic world)" in markdown
    assert summary["report"].endswith("report.html")


def test_demo_metrics_are_in_range(demo_run):
    out, summary = demo_run
    results = json.loads((out / "report" / "results.json").read_text())
    assert [e["name"] for e in results["methods"]] == ["original", "ESD", "STEREO", "ReCARE"]
    for entry in results["methods"]:
        for attack in ("plain", "cce"):
            assert 0.0 <= entry["robustness"][attack]["asr"] <= 100.0
        assert -1.0 <= entry["utility"]["clip_score"]["mean"] <= 1.0
        assert entry["utility"]["fid"]["fid"] >= 0.0
        assert 0.0 <= entry["care"]["score"] <= 1.0
        assert 0.0 <= entry["ratio"]["ratio"] <= 1.0
        assert summary["utility"][entry["name"]] == {"fid": entry["utility"]["fid"]["fid"],
                                                     "clip_score": entry["utility"]["clip_score"]["mean"]}
    for row in summary["ground_truth"]:
        for key in ("plain_T", "cce_T", "care_images_C", "care_score", "care_images_T"):
            low, high = row[key]["ci95"]
            assert 0.0 <= low <= row[key]["rate"] <= high <= 1.0


def test_demo_erasure_lowers_ground_truth_target_presence(demo_run):
    _, summary = demo_run
    rates = {row["name"]: row["plain_T"]["rate"] for row in summary["ground_truth"]}
    assert rates["original"] >= 0.5  # the world model draws dots for "a dotted <colour> thing"
    for name in ("ESD", "STEREO", "ReCARE"):
        assert rates[name] < rates["original"], (name, rates)


def test_demo_refuses_a_folder_with_other_settings(demo_run, tmp_path):
    out, _ = demo_run
    with pytest.raises(RecareError, match="other settings"):
        run_demo(out, DemoConfig.quick(seed=1), progress=False)
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(RecareError, match="not empty"):
        run_demo(tmp_path, DemoConfig.quick(), progress=False)


def test_paper_scale_config():
    from recare.cli import build_parser

    paper = DemoConfig.paper_scale(seed=2)
    assert (paper.seed, paper.erase_iterations, paper.stage2_iterations, paper.paper_iterations) == (2, 200, 200, 200)
    assert paper.inversion_steps == DemoConfig().inversion_steps  # everything else as the default demo
    # no learning-rate scaling: the paper's rates (ESD 5e-5; stage 1 0.5e-5; stage 2 2e-5)
    assert train_config("esd", paper).effective_erase_lr == pytest.approx(5e-5)
    recare = train_config("recare", paper)
    assert recare.effective_erase_lr == pytest.approx(0.5e-5) and recare.stage2_lr == pytest.approx(2e-5)
    assert build_parser().parse_args(["demo", "--paper-scale"]).paper_scale
