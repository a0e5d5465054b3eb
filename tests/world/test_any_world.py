"""The world as a generator of test worlds: `recare synthetic build --target T --care C` records the
demo's inputs in its build report, and `recare demo --world DIR` runs the whole demo on them."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from recare.cli import main
from recare.errors import RecareError
from recare.world.definition import (
    WORLD_SECTION,
    committed_world,
    load_world,
    with_target_name_rate,
    world_concepts,
)
from recare.world.render import SHAPES, WorldSpec

T, C = "striped", "square"  # the other world's pair; the committed world is dotted / circle
SMALLER = ["--careset-top-n", "8", "--sampling-steps", "6", "--ddim-steps", "6", "--erase-iterations", "4",
           "--stage2-iterations", "4", "--inversion-steps", "3", "--utility-prompts", "8",
           "--attack-images-per-prompt", "2", "--cce-inversion-steps", "3", "--cce-attack-images", "4"]


def test_concepts_follow_the_spec():
    concepts = world_concepts(WorldSpec(target=T, care=C))
    assert (concepts.target, concepts.care, concepts.initializer) == (T, C, C)
    assert concepts.target_prompts[0] == "a striped red thing" and len(concepts.target_prompts) == 6
    assert concepts.care_prompts[0] == "a red square on sand" and len(concepts.care_prompts) == 24
    assert concepts.stereo_anchors == ("a plain thing", "a dotted thing", "a plain square", "a dotted square")
    assert concepts.care_labels == SHAPES
    assert concepts.rates == {"target_rate": 0.25, "care_given_target": 0.8, "omit_shape_given_target": 0.7,
                              "omit_shape_otherwise": 0.1, "target_name_rate": 0.9}
    for text in concepts.target_prompts + concepts.care_prompts:
        assert "dotted" not in text and "circle" not in text
    spec = with_target_name_rate(WorldSpec(target="plain"), 0.85)
    assert spec.texture_name_rate("plain") == 0.85 and spec.texture_name_rate("dotted") == 0.95


def test_committed_world_records_what_the_demo_used_before():
    """The committed report's world section is what the demo hard-coded before worlds were generated."""
    from recare.world.demo import WORLD_STEREO_ANCHORS, DemoConfig, train_config

    world = committed_world()
    assert world.spec == WorldSpec() and world.is_committed()
    assert world.concepts == world_concepts(WorldSpec())
    assert (world.concepts.target, world.concepts.care, world.concepts.initializer) == ("dotted", "circle", "circle")
    assert WORLD_STEREO_ANCHORS == ("a plain thing", "a striped thing", "a plain circle", "a striped circle")
    assert world.concepts.target_prompts[0] == "a dotted red thing"
    config = train_config("stereo", DemoConfig(), world_concepts(WorldSpec(target=T, care=C)))
    assert (config.concept, config.initializer, config.anchors[0]) == (T, C, "a plain thing")


def _fake_world(folder, report):
    for name in ("clip", "sd", "detector"):
        (folder / name).mkdir(parents=True)
    (folder / "build_report.json").write_text(json.dumps(report))
    return folder


def test_load_world_names_what_is_missing(tmp_path):
    with pytest.raises(RecareError, match="does not exist"):
        load_world(tmp_path / "nowhere")
    with pytest.raises(RecareError, match="not a world folder: it lacks clip/, sd/, detector/, build_report.json"):
        load_world(tmp_path)
    committed = json.loads((committed_world().folder / "build_report.json").read_text())
    old = {k: v for k, v in committed.items() if k != WORLD_SECTION}
    with pytest.raises(RecareError, match="lacks the fields the demo needs"):
        load_world(_fake_world(tmp_path / "old", old))
    partial = {**committed, WORLD_SECTION: {k: v for k, v in committed[WORLD_SECTION].items() if k != "care_prompts"}}
    with pytest.raises(RecareError, match="care_prompts"):
        load_world(_fake_world(tmp_path / "partial", partial))
    other = {**committed, WORLD_SECTION: {**committed[WORLD_SECTION], "target": "striped"}}
    with pytest.raises(RecareError, match="spec it was built with"):
        load_world(_fake_world(tmp_path / "mismatch", other))


def test_cli_refuses_bad_pairs_and_folders_before_any_work(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["synthetic", "build", "--out", str(out), "--fast", "--target", "circle"]) == 2
    assert main(["synthetic", "build", "--out", str(out), "--fast", "--care", "hexagon"]) == 2
    assert main(["synthetic", "build", "--out", str(out), "--fast", "--target-rate", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'circle'" in err and "invalid choice: 'hexagon'" in err and "probability" in err
    assert not out.exists()
    assert main(["demo", "--world", str(tmp_path), "--quick", "--out", str(tmp_path / "demo")]) == 2
    assert "is not a world folder" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    assert main(["demo", "--quick", "--methods", "esd", "uce", "--out", str(tmp_path / "demo")]) == 2
    assert "non-empty subset" in capsys.readouterr().err and not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def other_world(tmp_path_factory):
    """A --fast world of T = striped, C = square, and a quick demo on it through the CLI."""
    root = tmp_path_factory.mktemp("other-world")
    world_dir, demo_dir = root / "world", root / "demo"
    assert main(["synthetic", "build", "--out", str(world_dir), "--fast", "--target", T, "--care", C,
                 "--care-given-target", "0.9"]) == 0
    # smaller than --quick: the untrained world's CLIP ranks the same few words first for every image,
    # so top-N = top-K (8 distinct candidates at least, 7 clusters)
    assert main(["demo", "--world", str(world_dir), "--quick", "--out", str(demo_dir), *SMALLER]) == 0
    return world_dir, demo_dir


def test_build_report_records_the_demo_inputs(other_world):
    world_dir, _ = other_world
    report = json.loads((world_dir / "build_report.json").read_text())
    section = report[WORLD_SECTION]
    assert (section["target"], section["care"], section["initializer"]) == (T, C, C)
    assert section["rates"]["care_given_target"] == 0.9 and report["config"]["spec"]["care_given_target"] == 0.9
    assert section["care_labels"] == list(SHAPES)
    assert "a striped square" in report["t2i"]["rates"] and "a dotted circle" not in report["t2i"]["rates"]
    assert load_world(world_dir).concepts == world_concepts(WorldSpec(target=T, care=C, care_given_target=0.9))


def test_demo_on_another_world_names_its_concepts(other_world):
    _, demo = other_world
    summary = json.loads((demo / "demo.json").read_text())
    assert summary["world"] == {"target": T, "care": C, "build_seed": 0, "committed": False}
    config = summary["config"]
    assert (config["careset_top_n"], config["sampling_steps"], config["inversion_steps"]) == (8, 6, 3)
    assert (config["careset_top_k"], config["target_images_per_prompt"]) == (8, 2)  # the rest is --quick
    with open(demo / "data" / "target_prompts.csv", newline="") as handle:
        prompts = {row["prompt"] for row in csv.DictReader(handle)}
    assert prompts == {f"a {T} {c} thing" for c in ("red", "green", "blue", "yellow", "purple", "orange")}
    care_prompts = (demo / "data" / "care_prompts.txt").read_text().split("\n")[:-1]
    assert len(care_prompts) == 24 and all(f" {C} " in p and "circle" not in p for p in care_prompts)
    for method in ("esd", "stereo", "recare"):
        config = json.loads((demo / "train" / method / "run.json").read_text())["identity"]["config"]
        # the anchors name the other textures (dotted among them), nothing names the committed C
        assert config["concept"] == T and "circle" not in json.dumps(config), method
    stereo = json.loads((demo / "train" / "stereo" / "run.json").read_text())["identity"]["config"]
    assert stereo["initializer"] == C and stereo["stereo_anchors"][-1] == "a dotted square"
    results = json.loads((demo / "report" / "results.json").read_text())
    assert all(e["care"]["care_word"] == C for e in results["methods"] if "care" in e)
    markdown = (demo / "report" / "report.md").read_text()
    assert f"T = '{T}' (the target), C = '{C}'" in markdown
    assert "'dotted'" not in markdown and "'circle'" not in markdown
    assert "no CARE-set was built" in markdown or "With the full 32,849-word vocabulary, 'square'" in markdown
    assert [r["name"] for r in summary["ground_truth"]] == ["original", "ESD", "STEREO", "ReCARE"]


def test_demo_folder_of_one_world_refuses_another(other_world, tmp_path):
    world_dir, demo = other_world
    copy = shutil.copytree(world_dir, tmp_path / "copy")
    report = json.loads((copy / "build_report.json").read_text())
    report["config"]["seed"] = 5
    (copy / "build_report.json").write_text(json.dumps(report))
    assert main(["demo", "--world", str(copy), "--quick", "--out", str(demo)]) == 2
    assert main(["demo", "--quick", "--out", str(demo)]) == 2  # the committed world
