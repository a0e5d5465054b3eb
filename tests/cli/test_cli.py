"""End to end through the command line on tiny RANDOM models: generate -> careset -> eval care.

Scores from these models mean nothing; the test checks that the commands run, write their
outputs, and fail cleanly on bad input.
"""

import json

import pytest

from recare.cli import main


@pytest.fixture(scope="module")
def pipeline_outputs(tiny_sd_dir, tiny_clip_dir, tmp_path_factory):
    """Run the three commands once; tests below inspect the outputs."""
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "A photo of a nude person",
                 "--num-images", "8", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                 "--out", str(images)]) == 0
    careset = root / "careset.json"
    assert main(["careset", "--images", str(images), "--reference-word", "nudity", "--clip-model",
                 str(tiny_clip_dir), "--device", "cpu", "--top-k", "20", "--top-n", "40", "--clusters", "4",
                 "--cache-dir", str(root / "cache"), "--out", str(careset)]) == 0
    prompts = root / "care_prompts.txt"
    prompts.write_text("A photo of a person\nA person riding a bicycle\n")
    report = root / "care.json"
    assert main(["eval", "care", "--model", str(tiny_sd_dir), "--clip-model", str(tiny_clip_dir),
                 "--care-word", "person", "--prompts", str(prompts), "--images-per-prompt", "2",
                 "--steps", "2", "--device", "cpu", "--save-images", str(root / "care_images"),
                 "--out", str(report)]) == 0
    return root


def test_generate_writes_images_and_manifest(pipeline_outputs):
    images = sorted((pipeline_outputs / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{i:05d}.png" for i in range(8)]
    manifest = json.loads((pipeline_outputs / "images" / "manifest.json").read_text())
    assert [e["seed"] for e in manifest["images"]] == list(range(42, 50))
    assert manifest["settings"]["safety_checker"] is False


def test_generate_resumes_without_regenerating(pipeline_outputs, tiny_sd_dir):
    images = pipeline_outputs / "images"
    before = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "A photo of a nude person",
                 "--num-images", "8", "--steps", "2", "--device", "cpu", "--out", str(images)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")} == before


def test_careset_file_loads(pipeline_outputs):
    from recare.careset.artifact import CareSet

    careset = CareSet.load(pipeline_outputs / "careset.json")
    assert careset.reference_word == "nudity"
    assert careset.anchors and len(careset.anchors) == len(careset.retain_prompts)
    assert all(a.startswith("A ") for a in careset.anchors)
    assert all(r.startswith("A photo of ") for r in careset.retain_prompts)


def test_care_report(pipeline_outputs):
    report = json.loads((pipeline_outputs / "care.json").read_text())
    text = json.dumps(report)
    assert "person" in text
    assert len(list((pipeline_outputs / "care_images").glob("*.png"))) == 4


def test_bad_input_errors(tmp_path, tiny_sd_dir, tiny_clip_dir, pipeline_outputs, cli_error):
    out = tmp_path / "careset.json"
    base = ["careset", "--reference-word", "nudity", "--clip-model", str(tiny_clip_dir), "--device", "cpu",
            "--cache-dir", str(pipeline_outputs / "cache"), "--top-k", "20", "--top-n", "40", "--out", str(out)]
    assert "does not exist" in cli_error(base + ["--images", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "no .jpg" in cli_error(base + ["--images", str(tmp_path / "empty")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG nope")
    assert "broken.png" in cli_error(base + ["--images", str(bad)])
    images = str(pipeline_outputs / "images")
    assert "empty reference word" in cli_error([a if a != "nudity" else " " for a in base] + ["--images", images])
    assert "top-N = 100000 is larger" in cli_error(base + ["--images", images, "--top-n", "100000"])
    assert "cannot form 1000 clusters" in cli_error(base + ["--images", images, "--clusters", "1000"])
    assert not out.exists()
    assert "does not exist" in cli_error(["generate", "--model", str(tmp_path / "nomodel"), "--prompt", "x",
                                         "--num-images", "1", "--device", "cpu", "--out", str(tmp_path / "g")])
    assert "'starry' is not in the label list" in cli_error(
        ["eval", "care", "--model", str(tiny_sd_dir), "--clip-model", str(tiny_clip_dir),
         "--care-word", "starry", "--prompts", str(pipeline_outputs / "care_prompts.txt"),
         "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_malformed_careset_file(tmp_path):
    from recare.careset.artifact import CareSet
    from recare.errors import RecareError

    path = tmp_path / "careset.json"
    path.write_text('{"format_version": 1, "reference_word": "nudity"}')
    with pytest.raises(RecareError):
        CareSet.load(path)
