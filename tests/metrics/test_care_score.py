"""CARE score (SPEC 5): the pure metric on hand-made features, Wilson intervals, the report,
the label list and shipped prompt files, and an end-to-end run with tiny random models."""

import json
import math

import pytest
import torch
from PIL import Image

from recare.errors import RecareError
from recare.generate.prompts import read_prompts
from recare.metrics.care_score import (
    CareScoreConfig,
    CareScoreReport,
    CareTally,
    care_hits,
    evaluate_care_score,
    proportion_ci,
    score_care_images,
)
from recare.metrics.labels import (
    CARE_EXTRA_LABELS,
    CARE_WORDS,
    COCO_LABELS,
    care_prompt_file,
    data_path,
    default_care_labels,
)

R = 1 / math.sqrt(2)
# labels in 2-d: L0 = east, L1 = north, L2 = north-east
LABELS_2D = torch.tensor([[1.0, 0.0], [0.0, 1.0], [R, R]])


# ----------------------------------------------------------------------------- pure metric


def test_care_hits_on_hand_made_features():
    images = torch.tensor([
        [1.0, 0.1],  # cos: L0 0.995, L1 0.0995, L2 0.774 -> L0 wins
        [1.0, 1.0],  # cos: L0 0.707, L1 0.707, L2 1.0 -> L2 wins
        [0.1, 1.0],  # cos: L0 0.0995, L1 0.995, L2 0.774 -> L1 wins
        [-1.0, 0.0],  # cos: L0 -1, L1 0, L2 -0.707 -> L1 wins
    ])
    assert care_hits(images, LABELS_2D, 0).tolist() == [True, False, False, False]
    assert care_hits(images, LABELS_2D, 1).tolist() == [False, False, True, True]
    assert care_hits(images, LABELS_2D, 2).tolist() == [False, True, False, False]


def test_care_hits_uses_cosine_not_dot_product():
    # unnormalised: the long label vector would win a dot product, but the cosine decides
    labels = torch.tensor([[10.0, 0.0], [R, R]])
    image = torch.tensor([[1.0, 1.5]])  # cos: L0 0.555, L1 0.981
    assert care_hits(image, labels, 1).tolist() == [True]
    assert care_hits(image * 7, labels, 0).tolist() == [False]


def test_care_hits_tie_is_a_failure_for_every_tied_label():
    labels = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 0.0]])  # L0 and L1 point the same way
    image = torch.tensor([[3.0, 3.0]])
    assert care_hits(image, labels, 0).tolist() == [False]
    assert care_hits(image, labels, 1).tolist() == [False]
    assert care_hits(image, labels, 2).tolist() == [False]


def test_care_hits_bad_shapes_and_index():
    with pytest.raises(ValueError, match="out of range"):
        care_hits(torch.ones(1, 2), LABELS_2D, 3)
    with pytest.raises(ValueError, match="expected"):
        care_hits(torch.ones(1, 3), LABELS_2D, 0)


@pytest.mark.parametrize("successes, n, level, low, high", [
    # hand-computed: centre = (p + z^2/2n)/(1 + z^2/n), half = z/(1 + z^2/n) sqrt(p(1-p)/n + z^2/4n^2)
    (8, 10, 0.95, 0.4902, 0.9433),  # z^2 = 3.8415: centre 0.99207/1.38415 = 0.7167, half 0.2266
    (5, 10, 0.95, 0.2366, 0.7634),  # centre 0.5, half 1.41601 * 0.18602 = 0.2634
    (0, 10, 0.95, 0.0, 0.2775),  # upper = z^2/(n + z^2) = 3.8415/13.8415
    (10, 10, 0.95, 0.7225, 1.0),
    (8, 10, 0.90, 0.5408, 0.9314),  # z = 1.6449
])
def test_wilson_interval_hand_values(successes, n, level, low, high):
    got = proportion_ci(successes, n, level)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_bad_input():
    with pytest.raises(ValueError):
        proportion_ci(3, 0)
    with pytest.raises(ValueError):
        proportion_ci(11, 10)
    with pytest.raises(ValueError):
        proportion_ci(1, 10, level=1.0)


# ----------------------------------------------------------------------------- labels and prompt files


def test_label_list_is_the_reference_82():
    labels = default_care_labels()
    assert len(COCO_LABELS) == 80 and len(set(COCO_LABELS)) == 80
    assert COCO_LABELS[:3] == ("person", "bicycle", "car") and COCO_LABELS[-1] == "toothbrush"
    assert len(labels) == 82 and len(set(labels)) == 82
    assert labels[-2:] == list(CARE_EXTRA_LABELS) == ["stars", "freshwater"]
    assert CARE_WORDS == {"nudity": "person", "vangogh": "stars", "tench": "freshwater"}
    assert all(word in labels for word in CARE_WORDS.values())


@pytest.mark.parametrize("word", ["person", "stars", "freshwater"])
def test_shipped_care_prompt_files(word):
    prompts = read_prompts(care_prompt_file(word))
    assert len(prompts) >= 20 and len(set(prompts)) == len(prompts)
    assert all(word in p.lower() for p in prompts)
    assert data_path("README.md").is_file()


def test_missing_data_file_is_an_error():
    with pytest.raises(RecareError, match="no data file"):
        data_path("nope.txt")
    with pytest.raises(RecareError, match="no shipped CARE prompt file for 'cat'"):
        care_prompt_file("cat")


# ----------------------------------------------------------------------------- scoring and report


class FakeClip:
    """An ImageTextModel stand-in with hand-made features: the red channel picks the image direction."""

    source, revision = "<fake-clip>", None

    def __init__(self):
        self.texts = []

    def encode_text(self, texts, batch_size=256):
        self.texts = list(texts)
        table = {"person": [1.0, 0.0], "cat": [0.0, 1.0], "stars": [R, R],
                 "a photo of a person": [1.0, 0.0], "a photo of a cat": [0.0, 1.0], "a photo of a stars": [R, R]}
        return torch.tensor([table[t] for t in texts])

    def encode_images(self, images, batch_size=64):
        # red 255 -> (1, 0.1) (a person); red 0 -> (0.1, 1) (a cat)
        return torch.tensor([[1.0, 0.1] if im.getpixel((0, 0))[0] > 127 else [0.1, 1.0] for im in images])


def solid(red):
    return Image.new("RGB", (4, 4), (red, 0, 0))


def test_score_care_images_counts_per_prompt_and_overall():
    clip = FakeClip()
    images = [solid(255), solid(255), solid(0), solid(255), solid(0), solid(0)]
    prompts = ["p1", "p1", "p1", "p2", "p2", "p2"]
    report = score_care_images(clip, images, prompts, "person", labels=["cat", "person", "stars"],
                               template="a photo of a {}", settings={"note": "x"})
    assert clip.texts == ["a photo of a cat", "a photo of a person", "a photo of a stars"]
    assert report.prompts == ("p1", "p2")
    assert [(t.successes, t.n) for t in report.per_prompt] == [(2, 3), (1, 3)]
    assert (report.overall.successes, report.overall.n, report.score) == (3, 6, 0.5)
    # cos(image, person): person images 1/sqrt(1.01) = 0.99504, cat images 0.1/sqrt(1.01) = 0.09950
    assert report.per_prompt[0].mean_target_cosine == pytest.approx((2 * 0.99504 + 0.09950) / 3, abs=1e-4)
    assert report.settings == {"note": "x"} and report.clip_model == {"source": "<fake-clip>", "revision": None}


def test_care_word_must_be_on_the_label_list():
    with pytest.raises(RecareError, match="'freshwater' is not in the label list.*must be on the list"):
        score_care_images(FakeClip(), [solid(0)], ["p"], "freshwater", labels=["cat", "person", "stars"])
    with pytest.raises(RecareError, match="duplicates"):
        score_care_images(FakeClip(), [solid(0)], ["p"], "cat", labels=["cat", "cat"])
    with pytest.raises(RecareError, match="template"):
        score_care_images(FakeClip(), [solid(0)], ["p"], "cat", labels=["cat", "person"], template="photo")


def make_report():
    return CareScoreReport(
        care_word="person", labels=("cat", "person"), label_template="{}", prompts=("A photo of a person", "A person"),
        per_prompt=(CareTally(8, 10, 0.25), CareTally(10, 10, 0.3)), overall=CareTally(18, 20, 0.275),
        clip_model={"source": "openai/clip-vit-base-patch32", "revision": None}, settings={"steps": 50})


def test_report_json():
    data = json.loads(json.dumps(make_report().to_json()))
    assert data["metric"] == "care_score" and data["care_word"] == "person"
    assert (data["score"], data["successes"], data["n"]) == (0.9, 18, 20)
    assert data["per_prompt"][0]["prompt"] == "A photo of a person"
    first = data["per_prompt"][0]
    assert (first["ci_low"], first["ci_high"]) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    assert data["clip_model"]["source"] == "openai/clip-vit-base-patch32"
    assert data["labels"] == ["cat", "person"] and data["settings"] == {"steps": 50}


def test_report_table():
    table = make_report().format_table()
    lines = table.splitlines()
    assert "CARE score for 'person'" in lines[0] and "95% Wilson CI" in lines[0]
    assert lines[2].startswith("A photo of a person") and "8/10" in lines[2] and "0.800" in lines[2]
    assert "[0.490, 0.943]" in lines[2]
    assert lines[-1].startswith("ALL") and "18/20" in lines[-1] and "0.900" in lines[-1]


# ----------------------------------------------------------------------------- end to end (tiny random models)


def test_evaluate_care_score_tiny_models(tiny_sd, tiny_clip, tmp_path):
    config = CareScoreConfig(images_per_prompt=2, num_inference_steps=2, batch_size=4)
    prompts = ["A photo of a person", "A person walking in a park"]
    report = evaluate_care_score(tiny_sd, tiny_clip, prompts, "person", config, image_dir=tmp_path,
                                 model_info={"note": "random tiny models"})
    assert report.prompts == tuple(prompts)
    assert [t.n for t in report.per_prompt] == [2, 2] and report.overall.n == 4
    assert 0.0 <= report.score <= 1.0 and all(0.0 <= t.score <= 1.0 for t in report.per_prompt)
    assert len(report.labels) == 82
    data = report.to_json()
    assert data["clip_model"]["source"] == "<tiny-random-clip>"
    assert data["settings"]["care_score"]["images_per_prompt"] == 2
    assert data["settings"]["sd_model"]["note"] == "random tiny models"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(e["prompt"], e["seed"]) for e in manifest["images"]] == [
        (prompts[0], 42), (prompts[0], 43), (prompts[1], 42), (prompts[1], 43)]
    # scoring the saved images again gives the same numbers (no randomness in scoring)
    again = score_care_images(tiny_clip, [Image.open(tmp_path / e["file"]).convert("RGB") for e in manifest["images"]],
                              [e["prompt"] for e in manifest["images"]], "person")
    assert again.overall == report.overall


def test_evaluate_care_score_checks_before_generating(tiny_sd, tiny_clip):
    with pytest.raises(RecareError, match="'cat tail' is not in the label list"):
        evaluate_care_score(tiny_sd, tiny_clip, ["a cat"], "cat tail", CareScoreConfig(num_inference_steps=1))
    with pytest.raises(RecareError, match="more than once"):
        evaluate_care_score(tiny_sd, tiny_clip, ["a", "a"], "person", CareScoreConfig(num_inference_steps=1))
    with pytest.raises(RecareError, match="images_per_prompt"):
        CareScoreConfig(images_per_prompt=0)
    assert CareScoreConfig(extra_labels=("woman",)).label_list()[-1] == "woman"
