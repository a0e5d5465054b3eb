"""CARE-set construction (SPEC 2): hand-computed stage tests, the CareSet artifact, an end-to-end build."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from recare.careset.algorithm import (
    global_clustering,
    intra_cluster_refinement,
    leave_one_out_scores,
    orthogonal_residual,
    ranked_top_k,
    select_clusters,
    top_k_candidates,
)
from recare.careset.artifact import DROPPED_HIGH, DROPPED_LOW, DROPPED_REFINEMENT, KEPT, CareSet, reference_key
from recare.careset.build import build_careset, build_careset_from_folder, check_reference_word
from recare.careset.config import CareSetConfig
from recare.careset.report import format_report
from recare.errors import RecareError

# ----------------------------------------------------------------------------- 2.2 candidates

VOCAB = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
# Image i0 = (1, 0): sims (1, 0, .8, .6, -1) -> top-2 [0, 2]
# Image i1 = (0, 1): sims (0, 1, .6, .8, 0) -> top-2 [1, 3]
# Image i2 = (.6, .8): sims (.6, .8, .96, 1, -.6) -> top-2 [3, 2]
I0, I1, I2 = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]


def test_top_k_candidates_hand_computed():
    # positions (image * k + rank): 0->0, 2->1, 1->2, 3->3, 3->4, 2->5; counts 2:2, 3:2, 0:1, 1:1
    cands = top_k_candidates(torch.tensor([I0, I1, I2]), VOCAB, k=2, n=3)
    assert cands.indices.tolist() == [2, 3, 0]  # 2 and 3 both twice: 2 seen first (pos 1 < 3)
    assert cands.counts.tolist() == [2, 2, 1]
    torch.testing.assert_close(cands.mean_similarity, torch.tensor([0.88, 0.90, 1.00]))  # (.8+.96)/2, (.8+1)/2
    assert cands.first_seen.tolist() == [1, 3, 0]
    assert cands.n_distinct == 4


def test_top_k_candidates_ties_follow_image_order():
    # images in order i1, i0, i2: 1->0, 3->1, 0->2, 2->3, 3->4, 2->5: token 3 is now seen before 2
    cands = top_k_candidates(torch.tensor([I1, I0, I2]), VOCAB, k=2, n=4)
    assert cands.indices.tolist() == [3, 2, 1, 0]
    assert cands.counts.tolist() == [2, 2, 1, 1]


def test_top_n_larger_than_distinct_candidates_names_both_numbers():
    with pytest.raises(RecareError, match=r"top-N = 5 is larger than the 4 distinct"):
        top_k_candidates(torch.tensor([I0, I1, I2]), VOCAB, k=2, n=5)


def test_top_k_candidates_refuses_bad_input():
    with pytest.raises(RecareError, match="top-K must be between 1 and the vocabulary size 5"):
        top_k_candidates(torch.tensor([I0]), VOCAB, k=6, n=1)
    with pytest.raises(RecareError, match="dimension 3 but vocabulary features 2"):
        top_k_candidates(torch.ones(1, 3), VOCAB, k=1, n=1)
    with pytest.raises(RecareError, match="non-empty"):
        top_k_candidates(torch.zeros(0, 2), VOCAB, k=1, n=1)


def test_ranked_top_k_breaks_ties_by_lower_index():
    sims = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    values, columns = ranked_top_k(sims, 3)
    assert columns.tolist() == [[1, 0, 2], [0, 1, 2]]
    torch.testing.assert_close(values, torch.tensor([[0.9, 0.5, 0.5], [0.2, 0.2, 0.2]]))


# ----------------------------------------------------------------------------- 2.3 residual


def test_orthogonal_residual_hand_computed():
    e_c = torch.tensor([1.0, 0.0, 0.0])
    e = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(orthogonal_residual(e, e_c), torch.tensor([0.8, 0.0, 3.0]))
    torch.testing.assert_close(orthogonal_residual(e, 2 * e_c), torch.tensor([0.8, 0.0, 3.0]))  # e_c normalised
    # e_c = (1, 1, 0)/sqrt(2): (1, 0, 0) - 0.5 (1, 1, 0) = (0.5, -0.5, 0), norm sqrt(0.5)
    torch.testing.assert_close(orthogonal_residual(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])),
                               torch.tensor(0.5 ** 0.5))


def test_orthogonal_residual_refuses_zero_reference():
    with pytest.raises(RecareError, match="reference embedding is zero"):
        orthogonal_residual(torch.ones(2, 3), torch.zeros(3))


# ----------------------------------------------------------------------------- 2.4 clustering


def test_select_clusters_hand_computed():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    residuals = np.array([0.1, 0.3, 0.9, 0.7, 0.5, 0.5, 0.6])  # means 0: .2, 1: .8, 2: .5, 3: .6
    order, means, low, high, kept, k = select_clusters(labels, residuals, drop_k=1)
    assert order == [0, 2, 3, 1]
    assert means == pytest.approx({0: 0.2, 1: 0.8, 2: 0.5, 3: 0.6})
    assert (low, high, kept, k) == ([0], [1], [2, 3], 1)
    assert select_clusters(labels, residuals, drop_k=5)[2:] == ([0, 2], [3, 1], [], 2)  # clamped to 4 // 2
    assert select_clusters(labels, residuals, drop_k=0)[2:] == ([], [], [0, 1, 2, 3], 0)
    assert select_clusters(np.array([0, 1, 2]), np.array([0.3, 0.1, 0.2]), drop_k=3)[2:] == ([1], [0], [2], 1)


def test_global_clustering_finds_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 10
    points = np.concatenate([c + 0.1 * rng.standard_normal((12, 8)) for c in centres]).astype(np.float32)
    residuals = np.repeat([0.2, 0.5, 0.9], 12)
    result = global_clustering(points, residuals, n_clusters=3, drop_k=1, perplexity=10, seed=42)
    groups = [set(result.labels[i * 12:(i + 1) * 12].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    (low,), (mid,), (high,) = groups
    assert (result.dropped_low, result.kept, result.dropped_high) == ([low], [mid], [high])
    assert result.effective_perplexity == 10 and result.coords.shape == (36, 2)
    again = global_clustering(points, residuals, n_clusters=3, drop_k=1, perplexity=10, seed=42)
    np.testing.assert_array_equal(result.coords, again.coords)


def test_global_clustering_adapts_perplexity_and_says_so(caplog):
    points = np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="recare.careset"):
        result = global_clustering(points, np.linspace(0, 1, 12), n_clusters=3, perplexity=30)
    assert result.effective_perplexity == 11
    assert "perplexity 30 needs more than 12 candidates; using perplexity 11" in caplog.text


def test_global_clustering_refuses_fewer_tokens_than_clusters():
    with pytest.raises(RecareError, match="5 candidate tokens cannot form 7 clusters"):
        global_clustering(np.zeros((5, 4), np.float32), np.zeros(5), n_clusters=7)


# ----------------------------------------------------------------------------- 2.5 refinement

E3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
E_C = torch.tensor([1.0, 0.0, 0.0])


def test_leave_one_out_scores_hand_computed():
    # e_-0 = (0, .5, .5): r^2 = .5; e_-1 = (.5, 0, .5): r^2 = .25; e_-2 = (.5, .5, 0): r^2 = .25
    torch.testing.assert_close(leave_one_out_scores(E3, E_C), torch.tensor([0.5, 0.25, 0.25]))


def test_intra_cluster_refinement_hand_computed():
    # thresholds 1.01 * mean of the others: 0: 1.01 * .25 = .2525; 1, 2: 1.01 * .375 = .37875
    result = intra_cluster_refinement(E3, E_C, np.array([0, 0, 0]), kept_clusters=[0], alpha=0.01)
    assert result.removed.tolist() == [True, False, False]  # the token aligned with e_c goes
    np.testing.assert_allclose(result.scores, [0.5, 0.25, 0.25], atol=1e-6)
    np.testing.assert_allclose(result.thresholds, [0.2525, 0.37875, 0.37875], atol=1e-6)
    # alpha = 1: threshold for token 0 is 2 * .25 = .5, and .5 > .5 is false
    assert not intra_cluster_refinement(E3, E_C, np.array([0, 0, 0]), [0], alpha=1.0).removed.any()


def test_refinement_of_two_tokens_removes_the_aligned_one():
    # d_0 = r(e_1)^2 = 0 (e_1 = e_c); d_1 = r(e_0)^2 = .8^2 = .64 > 1.01 * 0 -> token 1 removed
    e = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    result = intra_cluster_refinement(e, E_C, np.array([4, 4]), kept_clusters=[4])
    assert result.removed.tolist() == [False, True]
    np.testing.assert_allclose(result.scores, [0.0, 0.64], atol=1e-6)


def test_refinement_skips_dropped_and_small_clusters():
    embeddings = torch.cat([E3, torch.tensor([[0.0, 1.0, 1.0]])])
    result = intra_cluster_refinement(embeddings, E_C, np.array([0, 0, 0, 1]), kept_clusters=[1])
    assert not result.removed.any()  # cluster 0 is not kept; cluster 1 has one token (< min size 2)
    assert np.isnan(result.scores).all() and np.isnan(result.thresholds).all()
    with pytest.raises(RecareError, match="min_size >= 2"):
        intra_cluster_refinement(E3, E_C, np.array([0, 0, 0]), [0], min_size=1)


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_the_reference_code_defaults():
    config = CareSetConfig()
    assert (config.top_k, config.top_n, config.n_clusters, config.drop_k) == (50, 100, 7, 1)
    assert (config.perplexity, config.alpha, config.min_cluster_size, config.seed) == (30.0, 0.01, 2, 42)
    assert (config.vocab_mode, config.cache_dtype, config.anchor_template) == ("word", "float32", "A {}")
    assert config.retain_prompt_template == "A photo of {}"
    assert CareSetConfig(concept_type="nudity").retain_prompt_template == "A photo of {}"
    assert CareSetConfig(concept_type="style").retain_prompt_template == "A painting of {}"
    assert CareSetConfig(retain_template="An image of {}").retain_prompt_template == "An image of {}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 3


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_k": "50"}, "'top_k' must be int, got '50'"),
    ({"alpha": -0.1}, "alpha must be >= 0"),
    ({"perplexity": 0}, "perplexity must be > 0"),
    ({"drop_k": -1}, "drop_k must be >= 0"),
    ({"min_cluster_size": 1}, "min_cluster_size must be >= 2"),
    ({"vocab_mode": "words"}, "unknown vocabulary mode 'words'"),
    ({"cache_dtype": "fp16"}, "unknown cache dtype 'fp16'"),
    ({"concept_type": "art"}, "unknown concept type 'art'"),
    ({"anchor_template": "A"}, "anchor_template 'A' must contain exactly one"),
    ({"retain_template": "{} {}"}, "retain_template"),
])
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(RecareError, match=message):
        CareSetConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_key():
    config = CareSetConfig(top_n=40, concept_type="style")
    assert CareSetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(RecareError, match=r"unknown key\(s\) \['topk'\]"):
        CareSetConfig.from_dict({"topk": 3})


# ----------------------------------------------------------------------------- artifact


def _small_careset() -> CareSet:
    return CareSet.from_words("Van Gogh", ["starry sky", "river"], concept_type="style")


def test_from_words_fills_templates():
    careset = _small_careset()
    assert careset.anchors == ["A starry sky", "A river"]
    assert careset.retain_prompts == ["A painting of starry sky", "A painting of river"]
    assert careset.reference_key == "vangogh"
    assert reference_key(" Nu-dity_2! ") == "nu-dity_2"  # the reference code keeps [a-z0-9_-]
    with pytest.raises(RecareError, match="'words' is an empty list"):
        CareSet.from_words("nudity", [])
    with pytest.raises(RecareError, match="empty reference word"):
        CareSet.from_words(" ", ["person"])
    with pytest.raises(RecareError, match="no \\[a-z0-9_-\\] characters"):
        CareSet.from_words("!!", ["person"]).to_reference_dict()


def test_reference_layout_written_and_read(tmp_path):
    careset = _small_careset()
    assert careset.to_reference_dict() == {"vangogh_care_word": ["A starry sky", "A river"],
                                           "vangogh_care_word_painting": ["A painting of starry sky",
                                                                          "A painting of river"]}
    path = careset.save(tmp_path / "careset.json", layout="reference")
    loaded = CareSet.load(path, reference_word="Van Gogh")
    assert (loaded.reference_word, loaded.concept_type) == ("vangogh", "style")
    assert (loaded.words, loaded.anchors, loaded.retain_prompts) == (careset.words, careset.anchors,
                                                                      careset.retain_prompts)
    assert loaded.config is None and loaded.diagnostics is None


def test_reference_layout_photo_file(tmp_path):
    path = tmp_path / "careset.json"
    path.write_text(json.dumps({"nudity_care_word": ["A person", "A woman"],
                                "nudity_care_word_photo": ["A photo of person", "A photo of woman"]}))
    loaded = CareSet.load(path)
    assert (loaded.reference_word, loaded.concept_type, loaded.words) == ("nudity", "object", ["person", "woman"])
    with pytest.raises(RecareError, match="is for reference word 'nudity', not 'tench'"):
        CareSet.load(path, reference_word="tench")


@pytest.mark.parametrize("data, message", [
    ({"nudity_care_word": ["A person"], "nudity_care_word_photo": ["A photo of person"], "x": []}, "neither"),
    ({"nudity_care_word": ["A person"], "tench_care_word_photo": ["A photo of person"]}, "different or empty"),
    ({"nudity_care_word_photo": ["A person"], "nudity_care_word_painting": ["A p"]}, "one '{ref}_care_word' key"),
    ({"nudity_care_word": ["A person", "A man"], "nudity_care_word_photo": ["A photo of person"]},
     "'nudity_care_word' has 2 entries but 'nudity_care_word_photo' has 1"),
    ({"nudity_care_word": [], "nudity_care_word_photo": []}, "'nudity_care_word' is an empty list"),
])
def test_malformed_reference_layout(tmp_path, data, message):
    _assert_load_error(tmp_path, data, message)


def _assert_load_error(tmp_path, data, message):
    """CareSet.load of `data` raises RecareError matching `message` and naming the file."""
    path = tmp_path / "careset.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecareError, match=message) as info:
        CareSet.load(path)
    assert str(path) in str(info.value)


def _drop(key):
    return lambda d: d.pop(key)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    (_drop("anchors"), r"missing key\(s\) \['anchors'\]"),
    (_set("anchors", "A river"), "'anchors' must be list"),
    (_set("words", []), "'words' is an empty list"),
    (_set("retain_prompts", ["A painting of river"]), "'anchors' has 2 entries but 'retain_prompts' has 1"),
    (_set("words", ["river"]), "'anchors' has 2 entries but 'words' has 1"),
    (_set("anchors", ["A river", ""]), r"'anchors'\[1\] must be a non-empty string"),
    (_set("format_version", 2), "unknown CARE-set format_version 2"),
    (_set("concept_type", "painting"), "unknown concept type 'painting'"),
    (_set("reference_word", " "), "'reference_word' is empty"),
    (_set("colour", "red"), r"unknown key\(s\) \['colour'\]"),
    (_set("config", {"top_k": "many"}), "CARE-set config: 'top_k' must be int"),
    (_set("clip_model", {"source": "x"}), r"clip_model is missing key\(s\) \['revision', 'fingerprint'\]"),
    (_set("diagnostics", {"n_images": 1}), "diagnostics is missing key"),
])
def test_malformed_recare_file_names_the_problem(tmp_path, edit, message):
    data = _small_careset().to_dict()
    edit(data)
    _assert_load_error(tmp_path, data, message)


def test_unreadable_careset_files(tmp_path):
    with pytest.raises(RecareError, match="CARE-set file not found"):
        CareSet.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecareError, match="is not valid JSON"):
        CareSet.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(RecareError, match="expected a JSON object, got list"):
        CareSet.load(tmp_path / "list.json")
    with pytest.raises(RecareError, match="unknown CARE-set layout"):
        _small_careset().save(tmp_path / "x.json", layout="csv")


# ----------------------------------------------------------------------------- end to end


def _random_images(n: int = 6, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("recare-cache")


@pytest.fixture(scope="module")
def built(tiny_clip, cache_dir):
    """A CARE-set from the tiny random CLIP and 6 random images (cold vocabulary cache)."""
    return build_careset(tiny_clip, _random_images(), "nudity", CareSetConfig(top_k=50, top_n=40),
                         cache_dir=cache_dir, progress=False)


def test_build_careset_end_to_end(built, tiny_clip):
    assert built.words and built.anchors == [f"A {w}" for w in built.words]
    assert built.retain_prompts == [f"A photo of {w}" for w in built.words]
    diag = built.diagnostics
    assert (diag.n_images, diag.vocab_mode, diag.vocab_size, len(diag.candidates)) == (6, "word", 32849, 40)
    assert diag.effective_perplexity == 30 and diag.effective_drop_k == 1
    assert [c.status for c in diag.clusters].count(DROPPED_LOW) == 1
    assert [c.status for c in diag.clusters].count(DROPPED_HIGH) == 1
    assert diag.clusters[0].status == DROPPED_LOW and diag.clusters[-1].status == DROPPED_HIGH
    assert {c.status for c in diag.candidates} <= {KEPT, DROPPED_LOW, DROPPED_HIGH, DROPPED_REFINEMENT}
    assert [c.word for c in diag.candidates if c.status == KEPT] == built.words
    counts = [c.count for c in diag.candidates]
    assert counts == sorted(counts, reverse=True) and counts[0] <= 6
    assert built.clip_model.fingerprint == tiny_clip.fingerprint()


def test_build_careset_is_deterministic_and_uses_the_cache(built, tiny_clip, cache_dir, monkeypatch):
    import recare.careset.vocab

    def no_encoding(*args, **kwargs):
        raise AssertionError("the vocabulary should come from the cache")

    monkeypatch.setattr(recare.careset.vocab, "encode_texts_by_length", no_encoding)
    again = build_careset(tiny_clip, _random_images(), "nudity", CareSetConfig(top_k=50, top_n=40),
                          cache_dir=cache_dir, progress=False)
    assert again == built


def test_careset_json_round_trip(built, tmp_path):
    path = built.save(tmp_path / "careset.json")
    loaded = CareSet.load(path, reference_word="nudity")
    assert loaded == built
    assert json.loads(path.read_text())["format_version"] == 1
    reference = CareSet.load(built.save(tmp_path / "reference.json", layout="reference"))
    assert (reference.anchors, reference.retain_prompts) == (built.anchors, built.retain_prompts)


def test_format_report_lists_clusters_drops_and_kept_words(built):
    report = format_report(built)
    assert "CARE-set for 'nudity'" in report and "dropped: low-residual cluster" in report
    assert f"Kept CARE words ({len(built.words)}):" in report
    assert all(word in report for word in built.words)
    refined = [c.word for c in built.diagnostics.candidates if c.status == DROPPED_REFINEMENT]
    assert all(f"x {word} (" in report for word in refined)
    assert "Kept CARE words (2):" in format_report(_small_careset())


def test_small_top_n_adapts_perplexity(tiny_clip, cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="recare.careset"):
        careset = build_careset(tiny_clip, _random_images(), "nudity", CareSetConfig(top_k=20, top_n=12, n_clusters=3),
                                cache_dir=cache_dir, progress=False)
    assert careset.diagnostics.effective_perplexity == 11
    assert "using perplexity 11" in caplog.text


def test_dropping_every_cluster_is_an_error(tiny_clip, cache_dir):
    with pytest.raises(RecareError, match="all 40 candidates were dropped"):
        build_careset(tiny_clip, _random_images(), "nudity", CareSetConfig(top_n=40, n_clusters=2),
                      cache_dir=cache_dir, progress=False)


def test_build_from_folder_matches_pil_images(built, tiny_clip, cache_dir, tmp_path):
    for i, image in enumerate(_random_images()):
        image.save(tmp_path / f"img_{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    careset = build_careset_from_folder(tiny_clip, tmp_path, "nudity", CareSetConfig(top_k=50, top_n=40),
                                        cache_dir=cache_dir, progress=False)
    assert careset == built


def test_image_features_are_cached_by_file_content(built, tiny_clip, cache_dir, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_random_images()):
        image.save(folder / f"img_{i:02d}.png")
    config = CareSetConfig(top_k=50, top_n=40)
    first = build_careset_from_folder(tiny_clip, folder, "nudity", config, cache_dir=cache_dir, progress=False)
    assert len(list((cache_dir / "images").glob("*.safetensors"))) >= 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the image features should come from the cache")

    monkeypatch.setattr(tiny_clip, "encode_images", no_encoding)
    assert build_careset_from_folder(tiny_clip, folder, "nudity", config, cache_dir=cache_dir, progress=False) == first
    _random_images(seed=5)[0].save(folder / "img_00.png")  # same name, other pixels: must miss
    with pytest.raises(AssertionError, match="from the cache"):
        build_careset_from_folder(tiny_clip, folder, "nudity", config, cache_dir=cache_dir, progress=False)


def test_folder_and_image_errors(tiny_clip, cache_dir, tmp_path):
    with pytest.raises(RecareError, match="image folder does not exist"):
        build_careset_from_folder(tiny_clip, tmp_path / "missing", "nudity", cache_dir=cache_dir)
    with pytest.raises(RecareError, match="no .jpg/.jpeg/.png images"):
        build_careset_from_folder(tiny_clip, tmp_path, "nudity", cache_dir=cache_dir)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(RecareError, match="cannot read image .*broken.png"):
        build_careset_from_folder(tiny_clip, tmp_path, "nudity", cache_dir=cache_dir)
    with pytest.raises(RecareError, match="no images given"):
        build_careset(tiny_clip, [], "nudity", cache_dir=cache_dir)
    with pytest.raises(RecareError, match="not a single one"):
        build_careset(tiny_clip, _random_images(1)[0], "nudity", cache_dir=cache_dir)


@pytest.mark.parametrize("word, message", [("", "empty reference word"), ("   ", "empty reference word"),
                                           ("<|endoftext|>", "maps only to unknown tokens")])
def test_bad_reference_word(tiny_clip, word, message):
    with pytest.raises(RecareError, match=message):
        check_reference_word(tiny_clip, word)
    with pytest.raises(RecareError, match=message):
        build_careset(tiny_clip, _random_images(1), word)


def test_good_reference_word_is_stripped(tiny_clip):
    assert check_reference_word(tiny_clip, " Van Gogh ") == "Van Gogh"


def test_vocab_words_restrict_the_search(tiny_clip, cache_dir):
    words = ["person", "woman", "man", "tree", "sky", "river", "cat", "dog", "night", "star", "red", "sun"]
    config = CareSetConfig(top_k=8, top_n=6, n_clusters=3, vocab_words=words)
    careset = build_careset(tiny_clip, _random_images(), "nudity", config, cache_dir=cache_dir, progress=False)
    assert careset.diagnostics.vocab_size == 12
    assert {c.word for c in careset.diagnostics.candidates} <= set(words)
    assert CareSetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(RecareError, match="vocab_words is empty"):
        CareSetConfig(vocab_words=[])
