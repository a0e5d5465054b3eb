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
from pathlib import Path
from typing import Any, Mapping, Sequence

from recare.io import atomic_path, write_json_atomic, write_text_atomic
from recare.metrics.ratio import radar_chart
from recare.report.compare import check_methods_comparable
from recare.report.figures import GRID_SEEDS_PER_PROMPT, write_grids

logger = logging.getLogger(__name__)


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
    lines += [f"- bounds: {ratio_bounds(results)}", ""]
    if files.get("radar"):
        lines += markdown_figure(files["radar"], RADAR_CAPTION, files.get("radar_svg"))
    lines += markdown_sections(results.get("sections", []))
    if files.get("grids"):
        lines += ["## Image grids", ""]
        for name, grid in files["grids"].items():
            lines += [f"### {name}", ""] + markdown_figure(grid["png"], grid_caption(name), grid.get("svg"))
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
            lines += markdown_figure(image["path"], image["name"], image.get("vector"))
    return lines


def ratio_bounds(results: Mapping[str, Any]) -> str:
    """The RATIO normalisation bounds for reading (4 significant digits; results.json keeps them exact)."""
    bounds = results["ratio_definition"]["normalisation"]
    return ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in bounds.items())


RADAR_CAPTION = "RATIO radar: one polygon per model, radii in [0, 1] (normalisation above)."


def grid_caption(name: str) -> str:
    """The caption of the image grid `name`."""
    if name == "CCE generic prompt":
        return ("CCE generic prompt: one row per model, each with the token the attack learned against it; "
                "the same seeds in every row.")
    return (f"{name}: one row per model; each column one prompt and seed (up to {GRID_SEEDS_PER_PROMPT} seeds "
            "per prompt), the same in every row.")


def markdown_figure(path: str, caption: str, vector: str | None = None) -> list[str]:
    """An image with its caption (and the link to its vector copy) right below it."""
    link = f" Vector graphics: [{vector}]({vector})." if vector else ""
    return [f"![{caption}]({path})", "", f"*{caption}*{link}", ""]


def html_figure(path: str, caption: str, vector: str | None = None, width: int | None = None) -> str:
    """<figure> with the image (at `width` CSS pixels, never wider than the page) and the caption (and vector
    link) inside it; the image links to itself at full resolution."""
    esc = html.escape
    link = f" (vector graphics: <a href='{esc(vector)}'>{esc(vector)}</a>)" if vector else ""
    size = f" style='width:{width}px'" if width else ""
    return (f"<figure><a href='{esc(path)}'><img src='{esc(path)}' alt='{esc(caption)}'{size}></a>"
            f"<figcaption>{esc(caption)}{link}</figcaption></figure>")


def display_width(path: Path) -> int | None:
    """CSS pixels of a PNG shown at its printed size (pixels x 96 / its dpi); None without a dpi or file.

    matplotlib writes 150-dpi PNGs: shown pixel for pixel they would be 1.6 times their intended size (a
    radar chart a screen high), so the report shows them at the size they were drawn for."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            dpi = image.info.get("dpi")
            return round(image.width * 96 / float(dpi[0])) if dpi and float(dpi[0]) > 0 else None
    except (OSError, UnidentifiedImageError):
        return None


def html_sections(sections: Sequence[Mapping[str, Any]], widths: Mapping[str, int | None] | None = None) -> list[str]:
    """The HTML form of markdown_sections; widths: image path -> CSS pixels (display_width)."""
    widths = widths or {}
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
        parts += [html_figure(i["path"], i["name"], i.get("vector"), widths.get(i["path"]))
                  for i in section.get("images", [])]
    return parts


def html_report(results: Mapping[str, Any], files: Mapping[str, Any],
                widths: Mapping[str, int | None] | None = None) -> str:
    """report.html; widths: image path -> CSS pixels of each figure (display_width), else shown pixel for pixel."""
    esc = html.escape
    widths = widths or {}
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
        f"<li>{esc(k)}: {esc(str(v))}</li>" for k, v in results["ratio_definition"].items() if k != "normalisation")
        + f"<li>bounds: {esc(ratio_bounds(results))}</li></ul>")
    if files.get("radar"):
        parts.append(html_figure(files["radar"], RADAR_CAPTION, files.get("radar_svg"), widths.get(files["radar"])))
    parts += html_sections(results.get("sections", []), widths)
    if files.get("grids"):
        parts.append("<h2>Image grids</h2>")
        for name, grid in files["grids"].items():
            parts += [f"<h3>{esc(name)}</h3>",
                      html_figure(grid["png"], grid_caption(name), grid.get("svg"), widths.get(grid["png"]))]
    parts.append("<h2>Settings</h2><pre>" + esc(json.dumps(_settings_summary(results), indent=2)) + "</pre>")
    provenance = provenance_lines(results)
    if provenance:
        parts.append("<h2>Provenance</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in provenance) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- all files


def write_reports(results: dict[str, Any], out_dir: str | os.PathLike, grid_columns: int = 4) -> dict[str, Any]:
    """Write results.json, radar.png (when every method has a RATIO), grids/, report.md, report.html.

    The folder is self-contained: section images from elsewhere are copied into figures/, and
    every path in the written files is relative to the folder (no absolute path of this machine).
    `results` itself keeps its paths (callers read images through them).
    """
    check_methods_comparable(results)  # before anything is written
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
    shown = [files.get("radar"), *(g["png"] for g in files["grids"].values()),
             *(i["path"] for section in written.get("sections", []) for i in section.get("images", []))]
    widths = {path: display_width(out_dir / path) for path in shown if path}
    write_text_atomic(out_dir / "report.html", html_report(written, files, widths))
    logger.info("reports written to %s", out_dir)
    return files


def portable_paths(obj: Any, root: Path) -> Any:
    """`obj` with every absolute path string replaced by portable_path."""
    if isinstance(obj, Mapping):
        return {key: portable_paths(value, root) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_paths(item, root) for item in obj]
    if isinstance(obj, str) and os.path.isabs(obj) and "\n" not in obj and len(obj) < 4096:
        return portable_path(obj, root)
    return obj


def portable_path(path: str, root: Path) -> str:
    """An absolute path as the report may record it, without this machine's folders:
    relative to `root` inside root's parent (the run folder: "images/x", "../cache/x"), "<recare>/..." inside
    the recare package (the synthetic world's weights), else "<elsewhere>/<name>" (the input digests and
    SHA-256s identify those files)."""
    import recare

    target, root = Path(path).resolve(), root.resolve()
    package = Path(recare.__file__).resolve().parent
    if target == root.parent or root.parent in target.parents:
        return os.path.relpath(target, root)
    if package in target.parents:
        return f"<recare>/{target.relative_to(package).as_posix()}"
    return f"<elsewhere>/{target.name}"


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
                if source.with_suffix(".svg").is_file():  # its vector copy beside it
                    with atomic_path((out_dir / relative).with_suffix(".svg")) as tmp:
                        shutil.copyfile(source.with_suffix(".svg"), tmp)
            path = str(relative) if relative is not None else image["path"]
            vector = Path(path).with_suffix(".svg")
            images.append({**image, "path": path, **({"vector": str(vector)} if (out_dir / vector).is_file() else {})})
        inside.append({**section, "images": images})
    return inside
