"""What every command goes through (recare.cli.guard): outputs, devices, counts, images, OS errors,
signals. Each error is one `recare: error:` line with exit status 2, before any output is written."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image

from recare.cli import main
from recare.errors import RecareError
from recare.io import check_images, load_image_rgb


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def _generate(tiny_sd_dir, out, *extra):
    return ["generate", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--num-images", "1", "--steps", "1",
            "--out", str(out), *extra]


def test_argument_errors_are_one_line(capsys):
    assert main(["generate", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recare: error:") and "--out" in err and err.count("\n") == 1
    assert main(["--help"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["demo", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["synthetic", "build", "--out", "x", "--threads", "-2"], "must be >= 1, got -2"),
    (["train", "--out", "x", "--max-steps-this-run", "0"], "argument --max-steps-this-run: must be >= 1, got 0"),
    (["train", "--out", "x", "--max-steps-this-run", "-1"], "must be >= 1, got -1"),
    (["generate", "--prompt", "a", "--out", "x", "--num-images", "0"], "must be >= 1, got 0"),
    (["demo", "--threads", "two"], "must be an integer, got 'two'"),
])
def test_counts_are_checked_where_they_are_parsed(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_output_folder_that_is_a_file(tmp_path, tiny_sd_dir, cli_error):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    for argv in (_generate(tiny_sd_dir, path), ["demo", "--out", str(path)],
                 ["synthetic", "build", "--out", str(path)], ["train", "--concept", "x", "--out", str(path)],
                 ["eval", "all", "--out", str(path), "--method", "a=b"]):
        assert "is a file" in cli_error(argv), argv
    assert path.read_text() == "not a folder"
    nested = path / "below"
    assert "is a file, not a folder" in cli_error(_generate(tiny_sd_dir, nested))


def test_an_output_file_that_is_a_folder(tmp_path, image_folder, cli_error):
    err = cli_error(["careset", "--images", str(image_folder), "--reference-word", "nudity", "--out", str(tmp_path)])
    assert "is a folder" in err


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_a_read_only_output_location(tmp_path, tiny_sd_dir, cli_error):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "not writable" in cli_error(_generate(tiny_sd_dir, locked / "out"))
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("device, message", [
    ("nonsense", "unknown device 'nonsense'"),
    ("cuda:99", "cuda:99"),
    ("tpu", "unknown device 'tpu'"),
])
def test_devices_are_validated_first(device, message, tmp_path, tiny_sd_dir, cli_error):
    if device == "cuda:99" and not torch.cuda.is_available():
        message = "CUDA is not available"
    out = tmp_path / "demo"
    assert message in cli_error(["demo", "--out", str(out), "--device", device])
    assert not out.exists(), "nothing is written before the device is checked"
    assert message in cli_error(_generate(tiny_sd_dir, tmp_path / "gen", "--device", device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, tiny_sd_dir, cli_error):
    err = cli_error(_generate(tiny_sd_dir, tmp_path / "gen", "--device", "cuda"))
    assert "CUDA is not available on this machine" in err and "--device cpu" in err


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch, image_folder, cli_error):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 = 1024 > 2 x 100: PIL's bomb error
    with pytest.raises(RecareError, match="decompression-bomb limit"):
        load_image_rgb(image_folder / "00000.png")
    err = cli_error(["careset", "--images", str(image_folder), "--reference-word", "nudity",
                     "--clip-model", str(tmp_path / "no-clip-needed"), "--out", str(tmp_path / "c.json")])
    assert "decompression-bomb" in err and "00000.png" in err  # found before CLIP is loaded
    assert not (tmp_path / "c.json").exists()


def test_every_image_is_decoded_before_work(image_folder):
    (image_folder / "00009.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(RecareError, match="cannot read image .*00009.png"):
        check_images(sorted(image_folder.glob("*.png")))


def test_a_corrupt_training_image_stops_training_before_it_starts(tmp_path, tiny_sd_dir, image_folder, careset,
                                                                  cli_error):
    (image_folder / "00002.png").write_bytes(b"truncated")
    careset.save(tmp_path / "careset.json")
    out = tmp_path / "run"
    err = cli_error(["train", "--method", "recare", "--model", str(tiny_sd_dir), "--concept", "nudity",
                     "--careset", str(tmp_path / "careset.json"), "--images", str(image_folder),
                     "--out", str(out), "--device", "cpu"])
    assert "cannot read image" in err and "00002.png" in err
    assert not (out / "run.json").exists()


def test_an_os_error_nobody_foresaw_is_one_line(tmp_path, tiny_sd_dir, monkeypatch, cli_error):
    import recare.generate.images as images

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/somewhere.png")

    monkeypatch.setattr(images, "generate_images", refuse)
    err = cli_error(_generate(tiny_sd_dir, tmp_path / "gen"))
    assert "cannot access /data/somewhere.png: Permission denied" in err and "Traceback" not in err


def test_ctrl_c_outside_training_exits_130(tmp_path, tiny_sd_dir, monkeypatch, capsys):
    import recare.generate.images as images

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "generate_images", interrupted)
    assert main(_generate(tiny_sd_dir, tmp_path / "gen")) == 130
    assert "interrupted" in capsys.readouterr().err


def test_string_and_template_settings_are_checked(tmp_path):
    from recare.train.config import TrainConfig
    from recare.train.inversion import InversionConfig

    with pytest.raises(RecareError, match="stereo_anchors holds an empty prompt"):
        TrainConfig(method="stereo", stereo_anchors=("a fish", "  "))
    with pytest.raises(RecareError, match="initializer is empty"):
        TrainConfig(initializer=" ")
    templates = tmp_path / "templates.txt"
    templates.write_text("# mine\na photo of {}\n\na {} in a river\n")
    assert InversionConfig(templates=str(templates)).template_list() == ("a photo of {}", "a {} in a river")
    templates.write_text("a photo of\n")
    with pytest.raises(RecareError, match="exactly one"):
        InversionConfig(templates=str(templates))
    with pytest.raises(RecareError, match="unknown template set 'objects'"):
        InversionConfig(templates="objects")


def test_mixed_precision_no_covers_the_inversions():
    from recare.train.config import TrainConfig
    from recare.train.inversion import InversionConfig

    assert TrainConfig(mixed_precision="no").inversion.mixed_precision == "no"
    assert TrainConfig(mixed_precision="auto").inversion.mixed_precision == "auto"
    kept = TrainConfig(mixed_precision="no", inversion=InversionConfig(mixed_precision="bf16"))
    assert kept.inversion.mixed_precision == "bf16"  # set apart explicitly


def test_log_level_after_the_subcommand_and_quiet_libraries(tmp_path, tiny_sd_dir, capsys):
    import transformers

    from recare.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "a", "--out", "x", "--log-level", "DEBUG"])
    assert args.log_level == "DEBUG"
    assert build_parser().parse_args(["--log-level", "ERROR", "generate", "--prompt", "a", "--out", "x"]).log_level \
        == "ERROR"
    assert main(_generate(tiny_sd_dir, tmp_path / "gen")) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err  # transformers' loading bar only at DEBUG
    assert "safety checker is DISABLED" not in err  # the tiny model has no safety checker to disable
    assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
