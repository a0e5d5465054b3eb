"""`recare demo --seeds`: the demo at several seeds, with t intervals of the differences between methods."""

from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from recare.errors import RecareError
from recare.io import read_json, write_json_atomic, write_text_atomic
from recare.report.compare import check_seed_runs
from recare.world.demo import DemoConfig, run_demo
from recare.world.ground_truth import SYNTHETIC_NOTE, _fmt_r, pearson

logger = logging.getLogger(__name__)


def t_interval(values: Sequence[float], level: float = 0.95,
               bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean and Student-t interval over independent runs (seeds); no interval for fewer than 2.

    bounds clips the interval to the quantity's range (a rate to [0, 1]): with 3 seeds the t-interval
    of a rate near 0 or 1 reaches past it."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    sd = statistics.stdev(values)
    if sd == 0:
        low = high = mean
    else:
        low, high = (float(v) for v in stats.t.interval(level, n - 1, loc=mean, scale=sd / math.sqrt(n)))
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "ci95": [low, high], "n": n, "sd": sd}


def summarize_seeds(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: per model the mean and t-interval of every ground-truth rate and of RATIO;
    the paired differences ReCARE - ESD and ReCARE - STEREO; and the CARE-score / GT correlation
    over all (model, seed) points."""
    keys = ("plain_T", "cce_T", "care_images_C", "care_score", "care_images_T")
    names = [r["name"] for r in summaries[0]["ground_truth"]]
    per_model = {}
    for name in names:
        rows = [next(r for r in s["ground_truth"] if r["name"] == name) for s in summaries]
        per_model[name] = {k: t_interval([r[k]["rate"] for r in rows], bounds=(0.0, 1.0)) for k in keys}
        ratios = [s["ratio"].get(name) for s in summaries]
        if all(v is not None for v in ratios):
            per_model[name]["ratio"] = t_interval(ratios)
        for key in ("fid", "clip_score"):
            values = [s.get("utility", {}).get(name, {}).get(key) for s in summaries]
            if all(v is not None for v in values):
                per_model[name][key] = t_interval(values, bounds=(0.0, math.inf) if key == "fid" else (-1.0, 1.0))
    differences = {}
    pairs = [(m, "original") for m in ("ESD", "STEREO", "ReCARE")] + [("ReCARE", "ESD"), ("ReCARE", "STEREO")]
    for method, other in pairs:
        if method in names and other in names:
            differences[f"{method} - {other}"] = {
                k: t_interval([_rate(s, method, k) - _rate(s, other, k) for s in summaries], bounds=(-1.0, 1.0))
                for k in keys}
    points = [(r["care_score"]["rate"], r["care_images_C"]["rate"]) for s in summaries for r in s["ground_truth"]]
    return {"format": "recare-demo-seeds/1", "note": SYNTHETIC_NOTE, "world": summaries[0].get("world"),
            "seeds": [s["config"]["seed"] for s in summaries],
            "per_model": per_model, "paired_differences": differences,
            "care_score_vs_ground_truth": pearson([p[0] for p in points], [p[1] for p in points]),
            "careset_words": {s["config"]["seed"]: s["facts"]["careset"]["world_vocabulary"]["words"]
                              for s in summaries}}


def _rate(summary: dict[str, Any], name: str, key: str) -> float:
    return next(r for r in summary["ground_truth"] if r["name"] == name)[key]["rate"]


def format_seed_summary(summary: dict[str, Any]) -> str:
    """Markdown tables of summarize_seeds (percent, mean [95% t-interval] over seeds)."""
    def cell(v: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
        if v is None:
            return "-"
        if v["ci95"] is None:
            return f"{scale * v['mean']:.{digits}f}"
        return f"{scale * v['mean']:.{digits}f} [{scale * v['ci95'][0]:.{digits}f}, {scale * v['ci95'][1]:.{digits}f}]"

    world = summary.get("world")
    named = f" (T = {world['target']}, C = {world['care']})" if world else ""
    lines = [f"Synthetic world{named}, seeds {summary['seeds']}: mean [95% t-interval over seeds]; rates in percent, "
             "FID in the world CLIP's 64-d image-embedding space (not Inception FID), CLIP score as a cosine.", "",
             "| model | T plain (GT) % | T under CCE (GT) % | C in CARE images (GT) % | CARE score % "
             "| FID (world CLIP) | CLIP score | RATIO |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in summary["per_model"].items():
        lines.append(f"| {name} | {cell(v['plain_T'])} | {cell(v['cce_T'])} | {cell(v['care_images_C'])} | "
                     f"{cell(v['care_score'])} | {cell(v.get('fid'), 1.0, 3)} | {cell(v.get('clip_score'), 1.0, 4)} | "
                     f"{cell(v.get('ratio'), 1.0, 3)} |")
    if summary["paired_differences"]:
        lines += ["", "Paired differences (same seed), percentage points:", "",
                  "| paired difference | T plain | T under CCE | C in CARE images (GT) | CARE score |",
                  "|---|---|---|---|---|"]
        for name, v in summary["paired_differences"].items():
            lines.append(f"| {name} | {cell(v['plain_T'])} | {cell(v['cce_T'])} | {cell(v['care_images_C'])} | "
                         f"{cell(v['care_score'])} |")
    corr = summary["care_score_vs_ground_truth"]
    lines += ["", f"CARE score vs ground-truth C presence over all (model, seed) points: Pearson r = {_fmt_r(corr)} "
              f"(n = {corr['n']}, Fisher-z 95% interval)."]
    if summary.get("configuration_warnings"):
        lines += ["", "**Warning: the seed runs differ in more than their seed** (recare.report.compare):", ""]
        lines += [f"- {line}" for line in summary["configuration_warnings"]]
    return "\n".join(lines) + "\n"


def run_demo_seeds(out_dir: str | os.PathLike, seeds: Sequence[int], config: DemoConfig = DemoConfig(),
                   device: str | torch.device = "cpu", progress: bool = True, world: Any = None) -> dict[str, Any]:
    """run_demo for every seed into out_dir/seed-<s>, then summary.json and summary.md over the seeds;
    world: a recare.world.definition.World (default: the committed world)."""
    if not seeds:
        raise RecareError("no seeds given")
    out_dir = Path(out_dir)
    summaries = [run_demo(out_dir / f"seed-{s}", replace(config, seed=int(s)), device, progress, world)
                 for s in seeds]
    summary = summarize_seeds(summaries)
    summary["configuration_warnings"] = check_seed_summaries(out_dir, summaries)
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "summary.md", format_seed_summary(summary))
    return summary


def check_seed_summaries(out_dir: Path, summaries: Sequence[dict[str, Any]]) -> list[str]:
    """RecareError unless the seed runs (out_dir/seed-<s>) differ only by their seed: demo settings, world,
    detector, CLIP and FID extractor, sampling settings and the prompt files not made from the seed
    (recare.report.compare.check_seed_runs); returns the warnings to record (other recare or package versions)."""
    runs = {}
    for s in summaries:
        seed = s["config"]["seed"]
        results = read_json(out_dir / f"seed-{seed}" / "report" / "results.json", "demo results")
        runs[f"seed {seed}"] = {"results": results, "config": {**s["config"], "world": s.get("world")},
                                "environment": s.get("environment")}
    return check_seed_runs(runs)
