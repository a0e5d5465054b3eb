"""What a training run writes besides weights: run.json, losses.csv, losses.png; output-folder checks.

run.json (format "recare-train/1"): status ("running", "stopped", "complete"), the run
identity (full TrainConfig and the inputs: model, UNet weights, CARE-set file and its SHA-256,
target image names), seeds, library versions, device, timings per phase, peak memory, learned
tokens, the trainable tensors (and LoRA adapter, if any) and output files. A folder whose run.json
has another identity holds another run: training refuses to touch it unless asked to overwrite.

losses.csv columns: stage, round, step, loss, erase, retain (stage in esd, erase, inversion,
stage2; erase/retain empty where they do not apply).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import resource
from pathlib import Path
from typing import Any, Sequence

import torch

from recare.errors import RecareError
from recare.io import atomic_path, json_ready, read_json, write_json_atomic, write_text_atomic
from recare.models.checkpoints import TRAIN_RECORD

logger = logging.getLogger(__name__)

RUN_FORMAT = "recare-train/1"
RUN_JSON = TRAIN_RECORD  # recare.models.checkpoints refuses weights beside an unfinished one
UNET_NAME = "unet.safetensors"
LORA_NAME = "lora.safetensors"
LOSSES_CSV = "losses.csv"
LOSSES_PNG = "losses.png"
LOSSES_SVG = "losses.svg"  # the same figure as vector graphics
LOSS_COLUMNS = ("stage", "round", "step", "loss", "erase", "retain")
OUTPUT_GLOBS = (RUN_JSON, UNET_NAME, LORA_NAME, LOSSES_CSV, LOSSES_PNG, LOSSES_SVG, "learned_embeds-*.safetensors",
                "learned_embeds-*.json", "train_state.safetensors", "stage1_state.safetensors")


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    from recare import __version__

    return {"recare": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def peak_memory(device: torch.device) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated on CUDA; the process's max RSS (getrusage) elsewhere."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device)),
                "gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"kind": "cpu_max_rss", "bytes": int(rss), "gib": round(rss / 2**30, 3)}


def check_output_folder(folder: str | os.PathLike, identity: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Decide what to do with `folder`: "new", "resume" or "complete"; RecareError when it is not ours.

    - no run.json and none of our files: "new".
    - run.json with another identity (or our files without run.json): RecareError unless overwrite,
      in which case the old outputs are deleted and the answer is "new".
    - the same identity: with resume, "complete" for a finished run else "resume"; without resume,
      RecareError unless overwrite.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RecareError(f"output path {folder} is a file, not a folder")
    ours = [p for pattern in OUTPUT_GLOBS for p in folder.glob(pattern)] if folder.is_dir() else []
    if not ours:
        return "new"
    run_file = folder / RUN_JSON
    run = read_json(run_file, "run file") if run_file.is_file() else None
    same = isinstance(run, dict) and json_ready(run.get("identity")) == json_ready(identity)
    if overwrite:
        for path in ours:
            path.unlink()
        logger.warning("--overwrite: removed %d files of the previous run in %s", len(ours), folder)
        return "new"
    if not same:
        what = "a run with another config or inputs" if run is not None else "training outputs without run.json"
        raise RecareError(f"output folder {folder} holds {what}; choose another folder or pass --overwrite")
    if not resume:
        raise RecareError(f"output folder {folder} already holds this run (status {run.get('status')!r}); "
                          "pass --resume to continue it or --overwrite to start again")
    return "complete" if run.get("status") == "complete" else "resume"


def write_run_json(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    path = Path(folder) / RUN_JSON
    write_json_atomic(path, {"format": RUN_FORMAT, **record})
    return path


def write_losses_csv(path: str | os.PathLike, rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LOSS_COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.8g}" if isinstance(v, float) else v) for v in row])
    write_text_atomic(path, buffer.getvalue())


PANELS_PER_ROW = 3  # the figure stays page-wide (3 x 4.2 in) however many stages and rounds ran


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """Steps averaged by the smoothed loss line: about n/20, at least 3 (1, i.e. none, below 6 steps)."""
    return 1 if n < 6 else min(n // 3, max(3, n // 20))


def plot_losses(path: str | os.PathLike, rows: Sequence[Sequence[Any]], title: str = "",
                svg_path: str | os.PathLike | None = None, stage1_from: str | None = None) -> None:
    """One panel per (stage, round): the raw loss per step (faint) and its moving average, plus
    erase/retain for stage 2; PNG at `path` and, given svg_path, the same figure as SVG.
    stage1_from: the run whose stage 1 was adopted (recare.train's stage1_from); its panels say so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[tuple[str, int], list[Sequence[Any]]] = {}
    for row in rows:
        panels.setdefault((row[0], row[1]), []).append(row)
    if not panels:
        return
    n_rows = -(-len(panels) // PANELS_PER_ROW)
    n_cols = min(len(panels), PANELS_PER_ROW)
    fig = Figure(figsize=(4.2 * n_cols, 3.2 * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, ((stage, rnd), items) in zip(axes, panels.items()):
        steps = [r[2] for r in items]
        window = smoothing_window(len(items))
        columns = [(3, "loss")] + ([(4, "erase"), (5, "retain")] if stage == "stage2" else [])
        for (col, name), colour in zip(columns, ("C0", "C1", "C2")):
            if any(r[col] is None for r in items):
                continue
            values = [float(r[col]) for r in items]
            ax.plot(steps, values, lw=0.6, alpha=0.35, color=colour)
            ax.plot(steps, moving_average(values, window), lw=1.4, color=colour,
                    label=f"{name} (mean of {window})" if window > 1 else name)
        ax.legend(fontsize=8, title="faint: every step" if window > 1 else None, title_fontsize=8)
        reused = f"\n(reused from run {stage1_from!r})" if stage1_from and stage != "stage2" else ""
        ax.set_title(f"{stage}" + (f" round {rnd}" if rnd else "") + reused, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (MSE)")
        ax.set_yscale("log" if all((r[3] or 0) > 0 for r in items) else "linear")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    if svg_path is not None:
        import matplotlib

        with atomic_path(svg_path) as tmp, matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text
            fig.savefig(tmp, format="svg")
