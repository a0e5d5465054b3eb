"""Image grids of a report, drawn with matplotlib: PNG for the page and SVG (vector text, the images
embedded) for a paper.

Layout in inches, fixed by the content (no automatic layout): a column of method names on the left,
one row per method, one column per image; consecutive columns of the same prompt share one prompt
heading above their "seed s" labels. Images smaller than a cell (the 16x16 synthetic world) are
enlarged pixel for pixel (nearest neighbour; in the SVG the browser is told to keep the pixels
sharp), larger ones are filtered down.
"""

from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Mapping, Sequence

from recare.errors import RecareError
from recare.io import atomic_path, load_image_rgb, read_json

logger = logging.getLogger(__name__)

CELL_IN = 1.6  # inches per image cell (240 px in the PNG at PNG_DPI, 154 CSS px in report.html)
GAP_IN = 0.05  # inches between cells
LABEL_IN = 1.5  # inches of the method-name column
FONT_PT = 11  # points of every label (11 pt = 15 CSS px in report.html)
PROMPT_LINES = 3  # at most this many lines of a prompt heading
PNG_DPI = 150  # pixels per inch of the PNG
CHAR_IN = 0.55 * FONT_PT / 72  # average width of one character of the label font, inches (bold: 1.25x)
LINE_IN = 1.3 * FONT_PT / 72  # height of one text line, inches
GRID_SEEDS_PER_PROMPT = 2  # seeds of each prompt shown side by side in a report's grids


@dataclass(frozen=True)
class GridColumn:
    """One column of a grid: its prompt (shared by neighbouring columns) and its own label."""

    prompt: str
    label: str = ""  # e.g. "seed 43"


def _wrap(text: str, width_in: float, lines: int, char_in: float = CHAR_IN) -> str:
    chars = max(8, int(width_in / char_in))
    wrapped = textwrap.wrap(text, width=chars) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: chars - 1].rstrip() + "…"
    return "\n".join(wrapped)


def _groups(columns: Sequence[GridColumn]) -> list[tuple[str, int, int]]:
    """(prompt, first column, number of columns) of each run of equal prompts."""
    out, start = [], 0
    for prompt, run in groupby(columns, key=lambda c: c.prompt):
        n = len(list(run))
        out.append((prompt, start, n))
        start += n
    return out


def image_grid(rows: Mapping[str, Sequence[str | os.PathLike]], columns: Sequence[GridColumn | str],
               path: str | os.PathLike, cell_in: float = CELL_IN) -> tuple[Path, Path]:
    """A grid of images, one row per method (name on the left), one column per prompt and seed.

    Args:
        rows: method name -> one image file per column.
        columns: GridColumn (prompt, label) per column, or plain strings (a prompt per column).
        path: the PNG; the SVG goes beside it (same name, .svg).
        cell_in: size of one image cell in inches.
    Returns:
        (PNG path, SVG path).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [c if isinstance(c, GridColumn) else GridColumn(str(c)) for c in columns]
    if not rows or not columns:
        raise RecareError("image grid: no rows or no columns")
    if any(len(images) != len(columns) for images in rows.values()):
        raise RecareError("image grid: every row needs one image per column")
    step = cell_in + GAP_IN
    groups = _groups(columns)
    headings = {start: _wrap(prompt, n * step - GAP_IN, PROMPT_LINES) for prompt, start, n in groups}
    has_labels = any(c.label for c in columns)
    header_in = (max(h.count("\n") + 1 for h in headings.values()) + has_labels) * LINE_IN + 0.15
    width, height = LABEL_IN + len(columns) * step, header_in + len(rows) * step
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    for r, (name, images) in enumerate(rows.items()):
        top = header_in + r * step
        label = _wrap(name, LABEL_IN - 0.2, 4, 1.25 * CHAR_IN)
        fig.text((LABEL_IN - 0.1) / width, 1 - (top + cell_in / 2) / height, label, ha="right", va="center",
                 fontsize=FONT_PT, fontweight="bold")
        for c, image_path in enumerate(images):
            _draw_cell(fig, load_image_rgb(image_path), (LABEL_IN + c * step) / width,
                       1 - (top + cell_in) / height, cell_in / width, cell_in / height, cell_in * PNG_DPI)
    for _, start, n in groups:
        centre = (LABEL_IN + start * step + (n * step - GAP_IN) / 2) / width
        fig.text(centre, 1 - (header_in - 0.08 - has_labels * LINE_IN) / height, headings[start], ha="center",
                 va="bottom", fontsize=FONT_PT)
    if has_labels:
        for c, column in enumerate(columns):
            fig.text((LABEL_IN + c * step + cell_in / 2) / width, 1 - (header_in - 0.04) / height, column.label,
                     ha="center", va="bottom", fontsize=FONT_PT - 1, color="#333333")
    return save_figure(fig, path)


def _draw_cell(fig, image, left: float, bottom: float, w: float, h: float, cell_px: float) -> None:
    import numpy as np

    ax = fig.add_axes((left, bottom, w, h))
    small = max(image.size) < cell_px  # enlarged: keep the pixels ("none" = unresampled, drawn sharp)
    ax.imshow(np.asarray(image), interpolation="none" if small else "antialiased")
    ax.set_axis_off()


def save_figure(fig, path: str | os.PathLike, dpi: int = PNG_DPI) -> tuple[Path, Path]:
    """`fig` as PNG at `path` and as SVG beside it (text kept as text), both written atomically."""
    import matplotlib

    path = Path(path)
    svg = path.with_suffix(".svg")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    with atomic_path(svg) as tmp, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "recare"}):
        fig.savefig(tmp, format="svg", dpi=dpi, metadata={"Date": None})
    return path, svg


# ----------------------------------------------------------------------------- the grids of a report


def images_by_prompt(folder: str | os.PathLike, columns: int,
                     seeds_per_prompt: int = 1) -> list[tuple[GridColumn, Path]]:
    """(column, image path) of at most `columns` images of an image folder: the lowest `seeds_per_prompt` seeds
    (fewer where a prompt has fewer images) of each of its first prompts, prompts in file-name order, read from its
    manifest.json; each column is (prompt, "seed s")."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json", "image manifest")
    by_prompt: dict[str, list[tuple[int, str]]] = {}
    for entry in manifest["images"]:
        by_prompt.setdefault(entry["prompt"], []).append((int(entry["seed"]), entry["file"]))
    if not by_prompt:
        return []
    seeds = max(1, min(seeds_per_prompt, columns, min(len(images) for images in by_prompt.values())))
    ordered = sorted(by_prompt.items(), key=lambda kv: min(file for _, file in kv[1]))[:max(1, columns // seeds)]
    return [(GridColumn(prompt, f"seed {seed}"), folder / file)
            for prompt, images in ordered for seed, file in sorted(images)[:seeds]]


def _grid_sources(entry: Mapping[str, Any]) -> dict[str, Path]:
    """Grid name -> image folder of one method."""
    sources = {}
    robustness = entry.get("robustness", {})
    if "plain" in robustness:
        sources["target prompts"] = Path(robustness["plain"]["settings"]["image_dir"])
    elif "unlearndiffatk" in robustness:
        sources["target prompts"] = Path(robustness["unlearndiffatk"]["settings"]["image_dir"]) / "plain"
    if "cce" in robustness:
        sources["CCE generic prompt"] = Path(robustness["cce"]["settings"]["image_dir"])
    if "care" in entry:
        sources["CARE prompts"] = Path(entry["care"]["image_dir"])
    if "utility" in entry:
        sources["COCO prompts"] = Path(entry["utility"]["image_dir"])
    return sources


def _grid_cells(name: str, folder: Path, columns: int) -> list[tuple[GridColumn, Path]]:
    if name == "CCE generic prompt":  # each model has its own learned token: one heading for the row of seeds
        paths = sorted(folder.glob("generic_*.png"))[:columns]
        return [(GridColumn("generic prompt with the model's own learned CCE token", f"seed {i}"), p)
                for i, p in enumerate(paths)]
    return images_by_prompt(folder, columns, GRID_SEEDS_PER_PROMPT)  # several seeds: one says little


def write_grids(results: Mapping[str, Any], out_dir: Path, columns: int) -> dict[str, dict[str, str]]:
    """One grid per image set shared by all methods; returns name -> {"png", "svg"} relative to out_dir.

    Each grid has `columns` columns: GRID_SEEDS_PER_PROMPT seeds of each of the first prompts. The CCE grid shows
    the first `columns` seeds of the generic prompt (each model has its own learned token, so the prompt text
    differs between rows).
    """
    per_method = [(_grid_sources(e), e["name"]) for e in results["methods"]]
    names = [n for n in per_method[0][0] if all(n in s for s, _ in per_method)]
    grids = {}
    for name in names:
        rows, heads = {}, None
        for sources, method in per_method:
            cells = _grid_cells(name, sources[name], columns)
            heads = heads or [column for column, _ in cells]
            rows[method] = [p for _, p in cells]
        if not heads or any(len(r) != len(heads) for r in rows.values()):
            logger.warning("grid %r skipped: the models do not have the same images", name)
            continue
        file = Path("grids") / f"{name.lower().replace(' ', '_')}.png"
        image_grid(rows, heads, out_dir / file)
        grids[name] = {"png": str(file), "svg": str(file.with_suffix(".svg"))}
    return grids
