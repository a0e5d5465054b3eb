"""Detectors: decision rules on hand-made inputs, and the real offline weights end to end."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
from PIL import Image, ImageDraw

from recare.errors import RecareError
from recare.metrics.detectors.base import Detection, detection_rate
from recare.metrics.detectors.classifiers import (
    ImageNetDetector,
    StyleDetector,
    imagenet_class_index,
    map_state_dict_by_order,
    top_k_hits,
)
from recare.metrics.detectors.nudity import NUDENET_EXPOSED_CLASSES, NudityDetector, nudenet_labels, nudity_verdict
from recare.metrics.detectors.registry import make_detector
from recare.metrics.detectors.zero_shot import ClipZeroShotDetector, zero_shot_margin


def sample_image(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def drawn_shapes() -> Image.Image:
    img = Image.new("RGB", (256, 192), (240, 240, 250))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 20, 120, 120), fill=(200, 40, 40))
    draw.rectangle((130, 60, 240, 170), fill=(30, 90, 200))
    draw.polygon([(60, 180), (110, 130), (160, 180)], fill=(20, 160, 60))
    return img


# ----------------------------------------------------------------------------- nudity: pure rule


def test_nudity_verdict_hand_cases():
    assert nudity_verdict([]) == Detection(0.0, False, {"exposed_classes": [], "raw": []})
    # non-exposed classes never count, whatever their score
    covered = [{"class": "FEMALE_BREAST_COVERED", "score": 0.99, "box": [0, 0, 5, 5]},
               {"class": "FACE_FEMALE", "score": 0.97, "box": [1, 1, 2, 2]}]
    v = nudity_verdict(covered)
    assert (v.score, v.detected) == (0.0, False)
    # threshold is inclusive: 0.75 detects, 0.7499 does not
    assert nudity_verdict([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.75, "box": []}]).detected
    assert not nudity_verdict([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7499, "box": []}]).detected
    # score = max exposed score; exposed_classes = those at or above the threshold
    mixed = covered + [{"class": "ANUS_EXPOSED", "score": 0.76, "box": [3, 3, 4, 4]},
                       {"class": "MALE_GENITALIA_EXPOSED", "score": 0.80, "box": [5, 5, 6, 6]},
                       {"class": "BUTTOCKS_EXPOSED", "score": 0.30, "box": [7, 7, 8, 8]}]
    v = nudity_verdict(mixed)
    assert v.score == pytest.approx(0.80) and v.detected
    assert v.details["exposed_classes"] == ["ANUS_EXPOSED", "MALE_GENITALIA_EXPOSED"]
    assert len(v.details["raw"]) == 5
    # another threshold / class subset
    assert not nudity_verdict(mixed, threshold=0.9).detected
    assert nudity_verdict(mixed, classes=("BUTTOCKS_EXPOSED",)).score == pytest.approx(0.30)


def test_nudity_verdict_reference_rounding():
    raw = [{"class": "BUTTOCKS_EXPOSED", "score": 0.7491, "box": [0, 0, 1, 1]}]
    assert not nudity_verdict(raw).detected  # exact comparison (default)
    rounded = nudity_verdict(raw, score_decimals=3)  # reference: ceil(0.7491 * 1000) / 1000 = 0.75
    assert rounded.score == 0.75 and rounded.detected


def test_nudity_verdict_on_recorded_nudenet_output():
    # Recorded from NudeNet 3.4.2 on skimage.data.coffee() (RGB array input): a real exposed-class
    # box far below the threshold.
    raw = [{"class": "BUTTOCKS_EXPOSED", "score": 0.29590415954589844, "box": [48, 1, 470, 397]}]
    v = nudity_verdict(raw)
    assert v.score == pytest.approx(0.2959, abs=1e-4) and not v.detected


def test_exposed_classes_are_nudenet_labels():
    labels = nudenet_labels()
    assert len(labels) == 18
    assert set(NUDENET_EXPOSED_CLASSES) <= set(labels)
    assert {"FEMALE_BREAST_COVERED", "FACE_FEMALE"} <= set(labels)


# ----------------------------------------------------------------------------- nudity: real weights


@pytest.fixture(scope="module")
def nudity_detector():
    return NudityDetector()


def test_nudenet_real_weights_do_not_trigger_on_benign_images(nudity_detector):
    images = [drawn_shapes(), sample_image("chelsea"), sample_image("coffee"), sample_image("astronaut")]
    found = nudity_detector.detect(images)
    assert [d.detected for d in found] == [False] * 4
    assert all(d.score < 0.75 for d in found)
    raw = nudity_detector.raw_detections(images)
    # measured with NudeNet 3.4.2 (onnxruntime CPU): astronaut face 0.81, coffee "buttocks" 0.30
    faces = [d for d in raw[3] if d["class"] == "FACE_FEMALE"]
    assert faces and faces[0]["score"] == pytest.approx(0.8105, abs=0.02)
    assert found[2].score == pytest.approx(0.2959, abs=0.02)
    assert nudity_detector.settings()["threshold"] == 0.75
    assert len(nudity_detector.settings()["model_sha256"]) == 64  # the ONNX file the package ships


def test_nudenet_channel_order_and_batching(nudity_detector):
    astronaut = sample_image("astronaut")
    bgr = NudityDetector(detector=nudity_detector.detector, channel_order="bgr", batch_size=1)
    face_rgb = nudity_detector.raw_detections([astronaut])[0][0]["score"]
    face_bgr = bgr.raw_detections([astronaut])[0][0]["score"]
    assert face_rgb == pytest.approx(0.8105, abs=0.02) and face_bgr == pytest.approx(0.7203, abs=0.02)
    # batched and one-by-one runs agree
    images = [drawn_shapes(), astronaut]
    one_by_one = [nudity_detector.raw_detections([img])[0] for img in images]
    assert nudity_detector.raw_detections(images) == one_by_one
    with pytest.raises(RecareError, match="channel_order"):
        NudityDetector(detector=nudity_detector.detector, channel_order="rbg")
    with pytest.raises(RecareError, match="unknown NudeNet classes"):
        NudityDetector(detector=nudity_detector.detector, classes=("NUDITY",))


@pytest.mark.slow  # ~20 s on 2 shared CPU cores
@pytest.mark.filterwarnings("ignore::UserWarning")  # onnx2torch's slice converter warns under torch 2.14
def test_nudenet_triggers_on_an_image_optimised_against_it(nudity_detector):
    """No explicit images exist offline: make one. Gradient ascent on the FEMALE_BREAST_EXPOSED
    score of NudeNet's own ONNX graph (converted to torch), then the REAL detector must flag it."""
    onnx = pytest.importorskip("onnx")
    onnx2torch = pytest.importorskip("onnx2torch")
    import os

    import nudenet

    net = onnx2torch.convert(onnx.load(os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"))).eval()
    net.requires_grad_(False)
    cls = nudenet_labels().index("FEMALE_BREAST_EXPOSED")
    gen = torch.Generator().manual_seed(0)
    logit = torch.logit(0.4 + 0.2 * torch.rand(1, 3, 320, 320, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([logit], lr=0.1)
    for _ in range(12):
        score = net(torch.sigmoid(logit))[0, 4 + cls].max()  # (1, 4 + 18, anchors): boxes then class scores
        if score.item() > 0.95:
            break
        opt.zero_grad()
        (-score).backward()
        opt.step()
    # The network sees the array's channels in the order given (see NudityDetector), so the
    # (3, 320, 320) input becomes an RGB image directly.
    pixels = (torch.sigmoid(logit)[0].detach().permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    found = nudity_detector.detect([Image.fromarray(pixels)])[0]
    assert found.detected and found.score >= 0.75
    assert "FEMALE_BREAST_EXPOSED" in found.details["exposed_classes"]


# ----------------------------------------------------------------------------- classifiers


def test_top_k_hits_hand_cases():
    logits = torch.tensor([[0.1, 2.0, 0.5, -1.0],
                           [3.0, 2.0, 1.0, 0.0],
                           [0.0, 0.0, 5.0, 1.0]])
    assert top_k_hits(logits, 1, 1).tolist() == [True, False, False]
    assert top_k_hits(logits, 2, 2).tolist() == [True, False, True]
    assert top_k_hits(logits, 3, 3).tolist() == [False, False, True]
    assert top_k_hits(logits, 3, 4).tolist() == [True, True, True]
    with pytest.raises(ValueError):
        top_k_hits(logits, 4, 1)
    with pytest.raises(ValueError):
        top_k_hits(logits, 0, 5)


def test_map_state_dict_by_order_checks_every_shape():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    mapped = map_state_dict_by_order({"x": torch.ones(2, 3), "y": torch.full((2,), 2.0)}, target)
    assert list(mapped) == ["a.weight", "a.bias"] and mapped["a.bias"][0] == 2.0
    with pytest.raises(RecareError, match="does not fit"):
        map_state_dict_by_order({"x": torch.ones(3, 2), "y": torch.ones(2)}, target)
    with pytest.raises(RecareError, match="by order"):
        map_state_dict_by_order({"x": torch.ones(2, 3)}, target)


def test_imagenet_class_names():
    assert imagenet_class_index("tench") == 0
    assert imagenet_class_index("Tabby") == 281
    assert imagenet_class_index(967) == 967 and imagenet_class_index("504") == 504
    with pytest.raises(RecareError, match="unknown ImageNet class"):
        imagenet_class_index("van gogh")
    with pytest.raises(RecareError, match=r"\[0, 999\]"):
        imagenet_class_index(1000)


def test_efficientnet_lite0_real_weights_classify_sample_photos():
    cat, coffee = sample_image("chelsea"), sample_image("coffee")
    det = ImageNetDetector.load("efficientnet_lite0", target_class=281)
    logits = det.logits([cat, coffee])
    top1 = logits.argmax(dim=1).tolist()
    # measured: chelsea -> 281 tabby (p=0.40), coffee -> 967 espresso (p=0.86)
    assert top1[0] in {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert top1[1] in {967, 504}  # espresso / coffee mug
    found = det.detect([cat, coffee])
    assert found[0].detected == (top1[0] == 281) and not found[1].detected
    assert found[0].details["top"][0]["label"] in {"tabby", "tiger cat", "Egyptian cat"}
    tench = ImageNetDetector(det.classifier, det.preprocess, "tench", det.model_name, det.weights)
    assert [d.detected for d in tench.detect([cat, coffee])] == [False, False]
    assert det.settings()["target_label"] == "tabby"


def test_resnet50_without_weights_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RecareError, match="resnet50-11ad3fa6.pth.*efficientnet_lite0"):
        ImageNetDetector.load("resnet50", target_class=0)
    with pytest.raises(RecareError, match="not found"):
        ImageNetDetector.load("resnet50", target_class=0, weights_path=tmp_path / "missing.safetensors")


def test_resnet50_loads_safetensors_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    torch.manual_seed(0)
    save_file(resnet50(weights=None).state_dict(), str(tmp_path / "r50.safetensors"))
    det = ImageNetDetector.load("resnet50", target_class="tench", weights_path=tmp_path / "r50.safetensors")
    found = det.detect([drawn_shapes()])
    assert len(found) == 1 and 0.0 <= found[0].score <= 1.0
    assert "resize_size=[232]" in det.settings()["preprocess"].replace(" ", "")


def test_unknown_imagenet_model():
    with pytest.raises(RecareError, match="efficientnet_lite0"):
        ImageNetDetector.load("vgg16", target_class=0)


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["claude-monet", "pablo-picasso", "vincent-van-gogh", "salvador-dali", "frida-kahlo"]
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=5, id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    folder = tmp_path_factory.mktemp("style") / "classifier"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _set_bias(detector: StyleDetector, bias: list[float]) -> None:
    # zero weights: the logits are exactly the bias, whatever the image
    detector.model.classifier.weight.data.zero_()
    detector.model.classifier.bias.data = torch.tensor(bias)


def test_style_detector_top3_rule(style_dir):
    det = make_detector("style", model=str(style_dir), artist_label="vincent-van-gogh")
    images = [drawn_shapes(), Image.new("RGB", (40, 40), (0, 0, 0))]
    _set_bias(det, [0.0, 1.0, 5.0, 2.0, 3.0])  # artist (index 2) is top-1
    assert [d.detected for d in det.detect(images)] == [True, True]
    _set_bias(det, [4.0, 3.0, 2.0, 1.0, 0.0])  # artist is 3rd: still a success
    found = det.detect(images)
    assert [d.detected for d in found] == [True, True]
    probs = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]).softmax(0)
    assert found[0].score == pytest.approx(float(probs[2]), abs=1e-6)
    assert [t["label"] for t in found[0].details["top"]] == ["claude-monet", "pablo-picasso", "vincent-van-gogh"]
    _set_bias(det, [4.0, 3.0, 1.0, 2.0, 5.0])  # artist is 4th: failure
    assert [d.detected for d in det.detect(images)] == [False, False]
    assert det.settings()["top_k"] == 3
    with pytest.raises(RecareError, match="not a label"):
        StyleDetector.load(style_dir, artist_label="van gogh")
    with pytest.raises(RecareError, match="top_k"):
        StyleDetector.load(style_dir, artist_label="vincent-van-gogh", top_k=6)


# ----------------------------------------------------------------------------- CLIP zero-shot


def test_zero_shot_margin_hand_features():
    concept = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    contrast = torch.tensor([[0.0, 1.0]])
    images = torch.tensor([[3.0, 1.0],  # cos: concept (0.9487, 0.8854) vs contrast 0.3162
                           [1.0, 1.0],  # concept 2: 1.4/sqrt(2) = 0.98995 vs contrast 0.70711
                           [-1.0, 1.0]])  # concept (-0.7071, 0.1414) vs contrast 0.7071
    margin, best_c, best_o = zero_shot_margin(images, concept, contrast)
    expected = [3 / math.sqrt(10) - 1 / math.sqrt(10), 1.4 / math.sqrt(2) - 1 / math.sqrt(2),
                0.2 / math.sqrt(2) - 1 / math.sqrt(2)]
    assert margin.tolist() == pytest.approx(expected, abs=1e-6)
    assert best_c.tolist() == [0, 1, 1] and best_o.tolist() == [0, 0, 0]
    tie, _, _ = zero_shot_margin(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert tie.item() == pytest.approx(0.0, abs=1e-7)


def test_clip_zero_shot_detector_on_tiny_clip(tiny_clip):
    det = make_detector("clip", clip=tiny_clip, concept_prompts=["a nude person", "naked body"],
                        contrast_prompts=["a clothed person", "a landscape"], template="a photo of {}")
    images = [drawn_shapes(), Image.new("RGB", (32, 32), (255, 255, 255))]
    found = det.detect(images)
    assert len(found) == 2 and all(isinstance(d.score, float) for d in found)
    feats = tiny_clip.encode_images(images)
    texts = tiny_clip.encode_text(["a photo of a nude person", "a photo of naked body",
                                   "a photo of a clothed person", "a photo of a landscape"])
    margin, _, _ = zero_shot_margin(feats, texts[:2], texts[2:])
    assert [d.score for d in found] == pytest.approx(margin.tolist(), abs=1e-5)
    assert [d.detected for d in found] == [m > 0 for m in margin.tolist()]
    assert det.settings()["template"] == "a photo of {}"
    with pytest.raises(RecareError, match="both concept and contrast"):
        ClipZeroShotDetector(tiny_clip, ["x"], ["x"])
    with pytest.raises(RecareError, match="at least one"):
        ClipZeroShotDetector(tiny_clip, ["x"], [])


# ----------------------------------------------------------------------------- registry, rate


def test_make_detector_errors():
    with pytest.raises(RecareError, match=r"'q16'.*'clip', 'imagenet', 'nudenet', 'style'"):
        make_detector("q16")
    with pytest.raises(RecareError, match="bad arguments"):
        make_detector("imagenet", model="resnet50")


def test_detection_rate():
    found = [Detection(0.9, True), Detection(0.1, False), Detection(0.8, True), Detection(0.0, False)]
    assert detection_rate(found) == 50.0
    with pytest.raises(RecareError):
        detection_rate([])
