"""Reports of `recare eval all`: results.json, report.md, report.html, radar.png and image grids.

The table follows the paper's (method §6): method, ASR per attack, CLIP, FID, CARE, RATIO. Every
report starts with the notes (random/tiny models are flagged there) and states the RATIO
normalisation next to the numbers.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from recare.errors import RecareError
from recare.io import atomic_path, load_image_rgb, read_json, write_json_atomic, write_text_atomic
from recare.metrics.ratio import radar_chart

logger = logging.getLogger(__name__)

GRID_CELL = 128  # pixels per grid image
GRID_LABEL_WIDTH = 140  # pixels of the method-name column
GRID_TITLE_HEIGHT = 44  # pixels of the prompt row
GRID_FONT_SIZE = 12  # points of the labels
GRID_SEEDS_PER_PROMPT = 2  # seeds of each prompt shown side by side in the image grids


# ----------------------------------------------------------------------------- table


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def attack_names(results: Mapping[str, Any]) -> list[str]:
    """Attack columns in first-appearance order over the methods."""
    names: list[str] = []
    for entry in results["methods"]:
        names += [a for a in entry.get("robustness", {}) if a not in names]
    return names


def results_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the paper-style table; ASR cells carry their 95% interval.

    One scale per quantity in every recare table: rates (ASR, CARE score) in percent, the CLIP
    score as a cosine (not x100), FID labelled with its feature space when that is not Inception.
    """
    attacks = attack_names(results)
    header = (["method"] + [f"ASR {a} (%)" for a in attacks]
              + ["CLIP", fid_label(results), "CARE (%)", "RATIO"])
    rows = []
    for entry in results["methods"]:
        row = [entry["name"]]
        for attack in attacks:
            r = entry.get("robustness", {}).get(attack)
            row.append("-" if r is None else f"{r['asr']:.2f} [{r['ci_low']:.1f}, {r['ci_high']:.1f}]")
        utility = entry.get("utility", {})
        row.append(_fmt(utility.get("clip_score", {}).get("mean"), 4))
        fid = utility.get("fid", {}).get("fid")
        row.append("-" if fid is None else f"{fid:.4g}")  # 4 significant digits: 14.12, and 0.04976 in the world
        care = entry.get("care", {}).get("score")
        row.append(_fmt(None if care is None else 100 * care, 1))
        row.append(_fmt((entry.get("ratio") or {}).get("ratio"), 3))
        rows.append(row)
    return header, rows


def fid_label(results: Mapping[str, Any]) -> str:
    """'FID', or 'FID (<feature space>)' when the features are not clean-fid's Inception ones."""
    spaces = {str((e.get("utility") or {}).get("fid", {}).get("extractor_id", "")).split(":")[0]
              for e in results.get("methods", []) if (e.get("utility") or {}).get("fid")}
    spaces.discard("")
    if not spaces or all("inception" in s.lower() for s in spaces):
        return "FID"
    return f"FID ({', '.join(sorted(spaces))})"


def _settings_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The settings every report records (method §5): detector, attacks, generation, FID and CARE."""
    config = results["config"]
    keys = ("attacks", "prompts", "prompt_limit", "cce", "cce_images", "cce_replace_word", "uda", "generation",
            "coco_prompts", "coco_limit", "fid_reference", "clip_model", "care_word", "care_prompts", "care")
    return {"detector": results.get("detector"), **{k: config.get(k) for k in keys}}


def _unevaluated(results: Mapping[str, Any]) -> list[str]:
    config = results["config"]
    missing = []
    if not config.get("coco_prompts"):
        missing.append("CLIP score and FID: no COCO prompt file given")
    elif not config.get("fid_reference"):
        missing.append("FID: no reference images or statistics given")
    if not config.get("care_word"):
        missing.append("CARE score: no CARE word given")
    if not config.get("attacks"):
        missing.append("robustness: no attacks requested")
    if any(e.get("ratio") is None for e in results["methods"]):
        missing.append("RATIO: fewer than 3 axes evaluated")
    return missing


# ----------------------------------------------------------------------------- markdown / html


def markdown_report(results: Mapping[str, Any], files: Mapping[str, Any]) -> str:
    header, rows = results_table(results)
    lines = ["# recare evaluation", ""]
    if results["notes"]:
        lines += ["**Notes**", ""] + [f"- {note}" for note in results["notes"]] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "ASR: attack success rate in percent (lower is better) with its Wilson 95% interval. "
              "CLIP: mean CLIP cosine (higher is better). FID: clean-mode FID (lower is better). "
              "CARE: percent of CARE images classified as the CARE word (higher is better)."]
    for item in _unevaluated(results):
        lines.append(f"- not evaluated: {item}")
    lines += ["", "## RATIO normalisation", ""]
    lines += [f"- {k}: {v}" for k, v in results["ratio_definition"].items() if k != "normalisation"]
    lines += [f"- bounds: {json.dumps(results['ratio_definition']['normalisation'])}", ""]
    if files.get("radar"):
        vector = files["radar_svg"]
        lines += [f"![radar]({files['radar']})", "", f"Vector graphics: [{vector}]({vector})", ""]
    lines += markdown_sections(results.get("sections", []))
    if files.get("grids"):
        lines += ["## Image grids (same prompts and seeds for every model)", ""]
        lines += [f"### {name}\n\n![{name}]({path})\n" for name, path in files["grids"].items()]
    lines += ["## Settings", "", "```json", json.dumps(_settings_summary(results), indent=2), "```", ""]
    provenance = provenance_lines(results)
    if provenance:
        lines += ["## Provenance", ""] + [f"- {line}" for line in provenance] + [""]
    return "\n".join(lines)


def provenance_lines(results: Mapping[str, Any]) -> list[str]:
    """recare version and commit, date, machine, package versions and input digests, one line each."""
    env = results.get("environment")
    if not env:
        return []
    git = env.get("git")
    commit = f", commit {git['commit'][:12]}{' (modified)' if git.get('dirty') else ''}" if git else ""
    machine = env.get("machine", {})
    gpus = ", ".join(machine.get("cuda_devices") or []) or "no GPU"
    lines = [f"recare {env.get('recare')}{commit}, {env.get('date_utc')}",
             f"machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs, {machine.get('torch_threads')} torch "
             f"threads), {gpus}; {machine.get('platform')}, Python {machine.get('python')}",
             "packages: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)]
    for name, digest in (results.get("inputs") or {}).items():
        if digest and digest.get("sha256"):
            extent = f", {digest['images']} images" if "images" in digest else f", {digest.get('bytes')} bytes"
            lines.append(f"input {name}: {digest['name']} ({digest['kind']}{extent}), sha256 {digest['sha256']}")
    return lines


def markdown_sections(sections: Sequence[Mapping[str, Any]]) -> list[str]:
    """Extra sections a caller adds to results["sections"]: {"title", "text": [paragraphs],
    "table": {"header", "rows"}, "images": [{"name", "path"}]} (e.g. recare.world.demo's ground truth)."""
    lines: list[str] = []
    for section in sections:
        lines += [f"## {section['title']}", ""]
        for paragraph in section.get("text", []):
            lines += [paragraph, ""]
        table = section.get("table")
        if table:
            lines += ["| " + " | ".join(table["header"]) + " |", "|" + "---|" * len(table["header"])]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]] + [""]
        for image in section.get("images", []):
            lines += [f"![{image['name']}]({image['path']})", ""]
    return lines


def html_sections(sections: Sequence[Mapping[str, Any]]) -> list[str]:
    """The HTML form of markdown_sections."""
    esc = html.escape
    parts: list[str] = []
    for section in sections:
        parts.append(f"<h2>{esc(section['title'])}</h2>")
        parts += [f"<p>{esc(p)}</p>" for p in section.get("text", [])]
        table = section.get("table")
        if table:
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table["header"]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in table["rows"]]
            parts.append("</table>")
        parts += [f"<figure><img src='{esc(i['path'])}' alt='{esc(i['name'])}'><figcaption>{esc(i['name'])}"
                  "</figcaption></figure>" for i in section.get("images", [])]
    return parts


def html_report(results: Mapping[str, Any], files: Mapping[str, Any]) -> str:
    esc = html.escape
    header, rows = results_table(results)
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>recare evaluation</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.notes{background:#fff3cd;padding:8px 12px}"
             "pre{background:#f4f4f4;padding:8px;overflow:auto}"
             "img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:90%;color:#444}"
             "</style></head><body>",
             "<h1>recare evaluation</h1>"]
    if results["notes"]:
        parts.append("<div class='notes'><b>Notes</b><ul>" + "".join(f"<li>{esc(n)}</li>" for n in results["notes"])
                     + "</ul></div>")
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</table><p>ASR in percent with Wilson 95% intervals (lower is better); CLIP higher, FID lower, "
                 "CARE higher is better.</p>")
    missing = _unevaluated(results)
    if missing:
        parts.append("<ul>" + "".join(f"<li>not evaluated: {esc(m)}</li>" for m in missing) + "</ul>")
    parts.append("<h2>RATIO normalisation</h2><ul>" + "".join(
        f"<li>{esc(k)}: {esc(str(v))}</li>" for k, v in results["ratio_definition"].items()) + "</ul>")
    if files.get("radar"):
        parts.append(f"<figure><img src='{esc(files['radar'])}' alt='radar chart'><figcaption>RATIO radar (vector "
                     f"graphics: <a href='{esc(files['radar_svg'])}'>{esc(files['radar_svg'])}</a>)</figcaption>"
                     "</figure>")
    parts += html_sections(results.get("sections", []))
    if files.get("grids"):
        parts.append("<h2>Image grids (same prompts and seeds for every model)</h2>")
        parts += [f"<h3>{esc(name)}</h3><img src='{esc(path)}' alt='{esc(name)}'>"
                  for name, path in files["grids"].items()]
    parts.append("<h2>Settings</h2><pre>" + esc(json.dumps(_settings_summary(results), indent=2)) + "</pre>")
    provenance = provenance_lines(results)
    if provenance:
        parts.append("<h2>Provenance</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in provenance) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- grids


def image_grid(rows: Mapping[str, Sequence[str | os.PathLike]], column_titles: Sequence[str],
               path: str | os.PathLike, cell: int = GRID_CELL) -> Path:
    """A PNG grid: one row per method (name on the left), one column per prompt (title on top)."""
    if not rows:
        raise RecareError("image grid: no rows")
    n_cols = len(column_titles)
    if any(len(images) != n_cols for images in rows.values()):
        raise RecareError("image grid: every row needs one image per column")
    try:
        font = ImageFont.load_default(size=GRID_FONT_SIZE)  # Pillow >= 10.1: a scalable font
    except TypeError:  # pragma: no cover - older Pillow
        font = ImageFont.load_default()
    width = GRID_LABEL_WIDTH + n_cols * cell
    height = GRID_TITLE_HEIGHT + len(rows) * cell
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles):
        text = "\n".join(textwrap.wrap(title, width=cell // 6)[:3])
        draw.multiline_text((GRID_LABEL_WIDTH + c * cell + 2, 2), text, fill="black", font=font)
    for r, (name, images) in enumerate(rows.items()):
        y = GRID_TITLE_HEIGHT + r * cell
        draw.multiline_text((4, y + cell // 2 - 6), "\n".join(textwrap.wrap(name, 20)[:3]), fill="black", font=font)
        for c, image_path in enumerate(images):
            tile = load_image_rgb(image_path)
            # small images (the 16x16 world) are enlarged pixel for pixel, large ones filtered down
            resample = Image.Resampling.NEAREST if tile.width < cell else Image.Resampling.LANCZOS
            tile = tile.resize((cell, cell), resample)
            canvas.paste(tile, (GRID_LABEL_WIDTH + c * cell, y))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def images_by_prompt(folder: str | os.PathLike, columns: int, seeds_per_prompt: int = 1) -> list[tuple[str, Path]]:
    """(title, image path) of at most `columns` images of an image folder: the lowest `seeds_per_prompt` seeds
    (fewer where a prompt has fewer images) of each of its first prompts, prompts in file-name order, read from its
    manifest.json; titles are "<prompt> (seed s)"."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json", "image manifest")
    by_prompt: dict[str, list[tuple[int, str]]] = {}
    for entry in manifest["images"]:
        by_prompt.setdefault(entry["prompt"], []).append((int(entry["seed"]), entry["file"]))
    if not by_prompt:
        return []
    seeds = max(1, min(seeds_per_prompt, columns, min(len(images) for images in by_prompt.values())))
    ordered = sorted(by_prompt.items(), key=lambda kv: min(file for _, file in kv[1]))[:max(1, columns // seeds)]
    return [(f"{prompt} (seed {seed})", folder / file)
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


def write_grids(results: Mapping[str, Any], out_dir: Path, columns: int) -> dict[str, str]:
    """One grid per image set shared by all methods; returns name -> path relative to out_dir.

    Each grid has `columns` columns: GRID_SEEDS_PER_PROMPT seeds of each of the first prompts. The CCE grid shows
    the first `columns` seeds of the generic prompt (each model has its own learned token, so the prompt text
    differs between rows).
    """
    per_method = [(_grid_sources(e), e["name"]) for e in results["methods"]]
    names = [n for n in per_method[0][0] if all(n in s for s, _ in per_method)]
    grids = {}
    for name in names:
        rows, titles = {}, None
        for sources, method in per_method:
            if name == "CCE generic prompt":
                paths = sorted(sources[name].glob("generic_*.png"))[:columns]
                cells = [(f"seed {i}", p) for i, p in enumerate(paths)]
            else:  # GRID_SEEDS_PER_PROMPT seeds of each prompt side by side: one seed says little
                cells = images_by_prompt(sources[name], columns, GRID_SEEDS_PER_PROMPT)
            titles = titles or [title for title, _ in cells]
            rows[method] = [p for _, p in cells]
        if not titles or any(len(r) != len(titles) for r in rows.values()):
            logger.warning("grid %r skipped: the models do not have the same images", name)
            continue
        file = Path("grids") / f"{name.lower().replace(' ', '_')}.png"
        image_grid(rows, titles, out_dir / file)
        grids[name] = str(file)
    return grids


# ----------------------------------------------------------------------------- all files


def write_reports(results: dict[str, Any], out_dir: str | os.PathLike, grid_columns: int = 4) -> dict[str, Any]:
    """Write results.json, radar.png (when every method has a RATIO), grids/, report.md, report.html.

    The folder is self-contained: section images from elsewhere are copied into figures/, and
    every path in the written files is relative to the folder (no absolute path of this machine).
    `results` itself keeps its paths (callers read images through them).
    """
    out_dir = Path(out_dir)
    files: dict[str, Any] = {"results": "results.json", "markdown": "report.md", "html": "report.html"}
    ratios = {e["name"]: e["ratio"]["radii"] for e in results["methods"] if e.get("ratio")}
    if ratios and len(ratios) == len(results["methods"]):
        radar_chart(ratios, out_dir / "radar.png", title=results.get("radar_title", "RATIO radar (radii in [0, 1])"))
        files["radar"] = "radar.png"
        files["radar_svg"] = "radar.svg"
    files["grids"] = write_grids(results, out_dir, grid_columns)
    results["files"] = files
    written = portable_paths({**results, "sections": _sections_inside(results.get("sections", []), out_dir)}, out_dir)
    write_json_atomic(out_dir / "results.json", written)
    write_text_atomic(out_dir / "report.md", markdown_report(written, files))
    write_text_atomic(out_dir / "report.html", html_report(written, files))
    logger.info("reports written to %s", out_dir)
    return files


def portable_paths(obj: Any, root: Path) -> Any:
    """`obj` with every absolute path string made relative to `root` (os.path.relpath)."""
    if isinstance(obj, Mapping):
        return {key: portable_paths(value, root) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_paths(item, root) for item in obj]
    if isinstance(obj, str) and os.path.isabs(obj) and "\n" not in obj and len(obj) < 4096:
        return os.path.relpath(obj, root.resolve())
    return obj


def _sections_inside(sections: Sequence[Mapping[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    """Sections whose images lie outside out_dir get copies in out_dir/figures/ (paths made relative)."""
    import shutil

    inside = []
    for section in sections:
        images = []
        for image in section.get("images", []):
            source = Path(image["path"])
            source = source if source.is_absolute() else out_dir / source
            try:
                relative = source.resolve().relative_to(out_dir.resolve())
            except ValueError:
                relative = None
            if relative is None and source.is_file():
                stem = re.sub(r"[^A-Za-z0-9_]+", "-", image["name"]).strip("-") or "figure"
                relative = Path("figures") / f"{stem}{source.suffix}"
                (out_dir / "figures").mkdir(parents=True, exist_ok=True)
                with atomic_path(out_dir / relative) as tmp:
                    shutil.copyfile(source, tmp)
                for extra in (".svg",):  # a vector copy beside it, when there is one
                    if source.with_suffix(extra).is_file():
                        with atomic_path((out_dir / relative).with_suffix(extra)) as tmp:
                            shutil.copyfile(source.with_suffix(extra), tmp)
            images.append({**image, "path": str(relative) if relative is not None else image["path"]})
        inside.append({**section, "images": images})
    return inside
