"""Interruptions of `recare train` on tiny RANDOM models: a kill in each kind of atomic write, a
full disk, Ctrl-C, a second writer. After --resume the outputs must be bit-identical to an
uninterrupted run, stage1_state.safetensors present, no temporary file left, and no command may
take an unfinished run's weights as finished."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recare.cli import main
from recare.io import is_temporary, output_lock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = """
[train]
erase_iterations = 3
rounds = 2
stage2_iterations = 3
ddim_steps = 4
stop_range = [1, 3]
checkpoint_every = 1

[train.inversion]
steps = 2
resolution = 32
"""

# Runs the CLI with os.replace patched: when the n-th rename onto `target` comes, the process ends
# with os._exit(137), as SIGKILL would: no finally, no cleanup; the finished temporary file stays.
KILLER = """
import os, sys
import torch
torch.set_num_threads(1)
target, nth = sys.argv[1], int(sys.argv[2])
real, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == target:
        seen[0] += 1
        if seen[0] == nth:
            os._exit(137)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from recare.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, images, careset):
    """A folder with the conftest's target images (linked), CARE-set and the tiny config."""
    root = tmp_path_factory.mktemp("interrupt")
    (root / "images").symlink_to(images[0].parent, target_is_directory=True)
    careset.save(root / "careset.json")
    (root / "tiny.toml").write_text(TINY)
    return root


def _args(inputs, model, out, *extra):
    return ["train", "--method", "recare", "--model", str(model), "--concept", "nudity",
            "--careset", str(inputs / "careset.json"), "--images", str(inputs / "images"), "--out", str(out),
            "--config", str(inputs / "tiny.toml"), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def reference(inputs, tiny_sd_dir):
    """An uninterrupted run: the bytes every interrupted-and-resumed run must reproduce."""
    out = inputs / "reference"
    assert main(_args(inputs, tiny_sd_dir, out)) == 0
    return out


def _final_bytes(out: Path) -> dict[str, tuple[dict[str, str], dict[str, bytes]]]:
    """Per output file: its metadata and the raw bytes of every tensor (safetensors orders its
    header's metadata by a per-process hash seed, so the files' bytes differ in that order only)."""
    from safetensors import safe_open

    result = {}
    for name in ["unet.safetensors", "learned_embeds-1.safetensors", "learned_embeds-2.safetensors"]:
        with safe_open(str(out / name), framework="numpy") as handle:
            tensors = {key: handle.get_tensor(key).tobytes() for key in handle.keys()}
            result[name] = (dict(handle.metadata() or {}), tensors)
    return result


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if is_temporary(p)]


def _status(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["status"]


@pytest.mark.parametrize("target, nth", [
    ("train_state.safetensors", 3),       # a mid-stage checkpoint
    ("stage1_state.safetensors", 1),      # what --stage1-from needs
    ("learned_embeds-2.safetensors", 1),  # the second round's token
    ("unet.safetensors", 1),              # the final UNet
    ("run.json", 2),                      # after the final outputs, before "complete" is recorded
])
def test_kill_during_an_atomic_write_then_resume(inputs, tiny_sd_dir, reference, tmp_path, target, nth, cli_error):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, target, str(nth), *_args(inputs, tiny_sd_dir, out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert _temporaries(out), "the kill left its temporary file (as SIGKILL does)"
    assert _status(out) != "complete"
    if (out / "unet.safetensors").is_file():  # a final-looking UNet beside an unfinished record
        err = cli_error(["eval", "robustness", "--attack", "plain", "--model", str(tiny_sd_dir),
                         "--unet-weights", str(out / "unet.safetensors"), "--prompts", "x.csv",
                         "--out", str(tmp_path / "r.json"), "--device", "cpu"])
        assert "unfinished training run" in err
        err = cli_error(["eval", "all", "--model", str(tiny_sd_dir), "--method", f"X={out / 'unet.safetensors'}",
                         "--out", str(tmp_path / "eval"), "--device", "cpu", "--attacks", "plain",
                         "--prompts", "x.csv"])
        assert "unfinished training run" in err
    assert main(_args(inputs, tiny_sd_dir, out, "--resume")) == 0
    assert _status(out) == "complete"
    assert _final_bytes(out) == _final_bytes(reference)
    assert (out / "stage1_state.safetensors").is_file()
    assert not _temporaries(out)
    assert not list(out.glob("*.tmp"))


def test_full_disk_records_the_failure(inputs, tiny_sd_dir, reference, tmp_path, monkeypatch, cli_error):
    out = tmp_path / "run"
    real = os.replace

    def no_space(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == "train_state.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", no_space)
    err = cli_error(_args(inputs, tiny_sd_dir, out))
    assert "cannot write" in err and "train_state.safetensors" in err and "No space left on device" in err
    assert err.count("recare: error:") == 1 and "Traceback" not in err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "No space left on device" in run["error"]
    assert not _temporaries(out)
    monkeypatch.setattr(os, "replace", real)
    assert main(_args(inputs, tiny_sd_dir, out, "--resume")) == 0
    assert _final_bytes(out) == _final_bytes(reference)


def test_failure_is_recorded_in_place_when_even_run_json_cannot_be_replaced(inputs, tiny_sd_dir, tmp_path,
                                                                            monkeypatch, cli_error):
    out = tmp_path / "run"
    real, state = os.replace, {"full": False}

    def filling(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == "train_state.safetensors":
            state["full"] = True
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", filling)
    cli_error(_args(inputs, tiny_sd_dir, out))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_ctrl_c_saves_a_resumable_state(inputs, tiny_sd_dir, reference, tmp_path, monkeypatch, capsys):
    from recare.train import trainer

    out = tmp_path / "run"
    real_update, calls = trainer.Trainer._update, [0]

    def update_then_signal(self, optimizer, loss):
        real_update(self, optimizer, loss)
        calls[0] += 1
        if calls[0] == 4:  # during the second erase round
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer.Trainer, "_update", update_then_signal)
    assert main(_args(inputs, tiny_sd_dir, out)) == 130
    captured = capsys.readouterr()
    assert "--resume" in captured.out + captured.err
    assert _status(out) == "interrupted" and (out / "train_state.safetensors").is_file()
    monkeypatch.setattr(trainer.Trainer, "_update", real_update)
    assert main(_args(inputs, tiny_sd_dir, out, "--resume")) == 0
    assert _final_bytes(out) == _final_bytes(reference)


def test_a_second_writer_is_refused(inputs, tiny_sd_dir, tmp_path, cli_error):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from recare.io import output_lock\n"
                               "with output_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = cli_error(_args(inputs, tiny_sd_dir, out))
        assert "another process is writing" in err
        assert not out.exists() or not any(out.iterdir())
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # free again once the holder is gone
        pass


def test_training_refuses_to_run_under_several_processes(inputs, tiny_sd_dir, tmp_path, monkeypatch, cli_error):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    err = cli_error(_args(inputs, tiny_sd_dir, tmp_path / "run"))
    assert "does not shard" in err and "rank 1 of 2" in err
    assert not (tmp_path / "run").exists()


def test_stale_temporaries_are_removed(inputs, tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".unet.safetensors.ab12cd34.tmp"
    stale.write_bytes(b"half a UNet")
    older = out / ".train_state.safetensors.zz99yy88.tmp.safetensors"  # the older naming
    older.write_bytes(b"x")
    assert main(_args(inputs, tiny_sd_dir, out, "--max-steps-this-run", "1")) == 0
    assert not stale.exists() and not older.exists()
