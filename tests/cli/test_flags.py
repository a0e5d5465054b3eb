"""Flags generated from the config dataclasses: every field reachable, old names kept, defaults shown once."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from recare.cli import build_parser
from recare.cli.eval import _overrides
from recare.cli.train import _train_config_from_args
from recare.config import from_dict, given_overrides
from recare.eval.config import EvalConfig, eval_config_from
from recare.metrics.care_score import CareScoreConfig
from recare.train.config import TrainConfig


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            paths += _leaf_paths(hint, prefix + f.name + ".")
        else:
            paths.append(prefix + f.name)
    return paths


def _parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_every_train_config_field_has_a_flag():
    args = _parse(["train", "--out", "x"])
    reachable = set(args.train_flags.values()) | {"concept"}  # --concept is written by hand
    assert set(_leaf_paths(TrainConfig)) <= reachable


def test_train_flags_reach_the_config():
    argv = ["train", "--out", "x", "--concept", "tench", "--method", "esd", "--negative-guidance", "1.5",
            "--eta", "0.5", "--trajectory-guidance", "4", "--stage2-guidance", "3", "--erase-optimizer", "adamw",
            "--inversion-steps", "7", "--inversion-adam-betas", "0.8", "0.9", "--no-reseed-each-round",
            "--stop-range", "2", "5", "--stereo-anchors", "a fish", "a river", "--inversion-templates", "style"]
    config = _train_config_from_args(_parse(argv), None)
    assert (config.concept, config.method, config.negative_guidance, config.eta) == ("tench", "esd", 1.5, 0.5)
    assert (config.trajectory_guidance, config.stage2_guidance, config.erase_optimizer) == (4.0, 3.0, "adamw")
    assert config.inversion.steps == 7 and config.inversion.adam_betas == (0.8, 0.9)
    assert config.inversion.templates == "style"
    assert config.reseed_each_round is False and config.stop_range == (2, 5)
    assert config.stereo_anchors == ("a fish", "a river")


def test_train_flags_not_given_leave_the_config_file_alone():
    tables = {"concept": {"word": "tench"}, "train": {"rounds": 5, "inversion": {"steps": 9}}}
    config = _train_config_from_args(_parse(["train", "--out", "x", "--seed", "42"]), tables)
    assert (config.rounds, config.inversion.steps, config.seed) == (5, 9, 42)
    config = _train_config_from_args(_parse(["train", "--out", "x", "--rounds", "2"]), tables)
    assert config.rounds == 2  # a flag equal to the default still wins over the file


def test_run_takes_the_train_flags():
    args = _parse(["run", "cfg.toml", "--erase-iterations", "3", "--method", "esd"])
    assert given_overrides(args, args.train_flags) == {"erase_iterations": 3, "method": "esd"}


@pytest.mark.parametrize("command", [["eval", "all", "--out", "x"], ["eval", "robustness", "--attack", "plain",
                                                                      "--out", "x"]])
def test_every_eval_config_field_has_a_flag(command):
    args = _parse(command)
    hand_written = {"attacks", "notes", "random_models", "uda.skip_detected", "generation.num_inference_steps",
                    "generation.guidance_scale", "generation.batch_size", "generation.scheduler"}
    expected = set(_leaf_paths(EvalConfig))
    if command[1] == "robustness":  # one model, one attack: no utility, CARE or report settings
        expected = {p for p in expected if p.split(".")[0] in {
            "model", "revision", "dtype", "prompts", "prompt_limit", "detector", "cce", "cce_images",
            "training_images", "cce_replace_word", "uda", "generation", "clip_model"}}
    else:
        hand_written |= {f"care.{name}" for name in ("num_inference_steps", "guidance_scale", "batch_size",
                                                     "scheduler")}
    assert expected <= set(args.eval_flags.values()) | hand_written


def test_eval_flags_keep_their_names_and_fill_nested_fields():
    argv = ["eval", "all", "--out", "x", "--limit", "3", "--detector", "imagenet", "--imagenet-class", "tench",
            "--nudity-threshold", "0.5", "--inversion-steps", "11", "--cce-templates", "style", "--steps", "4",
            "--images-per-prompt", "2", "--uda-attack-detected", "--care-label-template", "a photo of a {}",
            "--normalisation-fid-worst", "40", "--cce-inversion-learning-rate", "0.1", "--attacks", "plain"]
    config = eval_config_from(None, _overrides(_parse(argv), ["plain"]))
    assert config.prompt_limit == 3 and config.detector.name == "imagenet" and config.detector.threshold == 0.5
    assert config.detector.target_class == "tench"
    assert config.cce.inversion.steps == 11 and config.cce.inversion.templates == "style"
    assert config.cce.inversion.learning_rate == 0.1
    assert config.generation.num_inference_steps == 4 and config.care.num_inference_steps == 4
    assert config.care.images_per_prompt == 2 and config.care.label_template == "a photo of a {}"
    assert config.uda.skip_detected is False and config.normalisation.fid_worst == 40.0


def test_eval_spec_values_survive_flags_not_given():
    config = eval_config_from({"coco_limit": 50, "detector": {"name": "nudenet", "threshold": 0.6}},
                              _overrides(_parse(["eval", "all", "--out", "x"]), None))
    assert config.coco_limit == 50 and config.detector.threshold == 0.6


def test_eval_care_flags_build_the_care_config():
    args = _parse(["eval", "care", "--care-word", "person", "--out", "x", "--steps", "3", "--guidance", "2",
                   "--extra-labels", "tench", "--scheduler", "ddim"])
    config = from_dict(CareScoreConfig, given_overrides(args, args.care_flags), "CARE-score settings")
    assert (config.num_inference_steps, config.guidance_scale, config.scheduler) == (3, 2.0, "ddim")
    assert config.extra_labels == ("tench",)


@pytest.mark.parametrize("command", [["train"], ["run"], ["eval", "all"], ["eval", "robustness"], ["eval", "care"],
                                     ["generate"], ["careset"]])
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        _parse([*command, "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert not re.search(r"\(\d[\d.e-]*\)\s+\(default:", text), "a default restated by hand before argparse's"
    for block in re.split(r"\n  (?=-)", text):
        assert block.count("default:") <= 1, block
