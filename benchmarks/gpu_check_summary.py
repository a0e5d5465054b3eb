"""The last step of benchmarks/gpu_check.sh: one summary.json and a printed table from the steps' files.

Reads the steps' records (a TSV of name, exit status, seconds, timeout, status), the environment probe,
pytest's junit XML and every benchmark JSON in the output folder, and writes OUT/summary.json with each
step's outcome and the headline figures beside their targets:

    training at paper defaults <= 5 min (ratio to PERF.md's 29.9 min), peak <= 16 GiB (vs 27.2 GiB),
    generation >= 0.9 x bare diffusers, CARE-set (500 images) <= 15 s, steady-state syncs per step.

    python benchmarks/gpu_check_summary.py --out OUT --steps steps.tsv [--env env.json] [--junit tests.xml]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TARGETS = {"train_minutes": 5.0, "train_peak_gib": 16.0, "generate_ratio": 0.9, "careset_s": 15.0}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(path: Path) -> list[dict[str, Any]]:
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                name, rc, seconds, timeout, status = line.split("\t")[:5]
                steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "timeout_s": int(timeout),
                              "status": status})
    return steps


def read_junit(path: Path | None) -> dict[str, Any] | None:
    """Counts and failing tests of a pytest junit XML."""
    if path is None or not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"error": f"unreadable junit XML: {err}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                problems.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                 "message": (node.get("message") or "")[:500]})
    skipped = [f"{c.get('classname')}::{c.get('name')}: {(c.find('skipped').get('message') or '')[:200]}"
               for c in root.iter("testcase") if c.find("skipped") is not None]
    return {**counts, "problems": problems, "skipped_tests": skipped[:20]}


def headline(out: Path) -> dict[str, Any]:
    """The figures of each benchmark file that is there, beside the targets."""
    figures: dict[str, Any] = {}
    for name in ("train_eager", "train_compiled"):
        data = read_json(out / f"{name}.json")
        if not data:
            continue
        entry: dict[str, Any] = {"model": data.get("model"), "device": data.get("device"),
                                 "partial": data.get("partial", False), "compile": data.get("compile")}
        ratios = data.get("ratios")
        if ratios:
            entry.update({k: ratios[k] for k in ("recare_minutes", "reference_minutes", "speedup_vs_reference",
                                                 "erase_speedup", "inversion_speedup", "stage2_speedup", "peak_gib",
                                                 "peak_vs_reference", "peak_vs_target", "meets_time_target",
                                                 "meets_memory_target")})
        else:  # a run stopped by its timeout: what it had measured
            entry["erase_s_per_it_at_mean_stop"] = (data.get("erase") or {}).get("s_per_it_at_mean_stop")
            entry["inversion_s_per_step"] = data.get("inversion_s_per_step")
            entry["peak_gib_so_far"] = (data.get("peak_memory") or {}).get("gib")
        figures[name] = entry
    for name in ("generate", "generate_compiled"):
        data = read_json(out / f"{name}.json")
        if not data:
            continue
        figures[name] = {"model": data.get("model"), "device": data.get("device"), "dtype": data.get("dtype"),
                         "resolution": data.get("resolution"), "steps": data.get("steps"),
                         "batch_size": data.get("batch_size"),
                         "bare_images_per_s": data.get("bare", {}).get("median_images_per_s"),
                         "recare": {mode: {k: v for k, v in entry.items() if k != "images_per_s"}
                                    for mode, entry in data.get("recare", {}).items()},
                         "target_ratio": TARGETS["generate_ratio"]}
    data = read_json(out / "careset.json")
    if data:
        cold = (data.get("cold") or {}).get("total_s")
        figures["careset"] = {"model": data.get("model"), "device": data.get("device"), "images": data.get("images"),
                              "cold_s": cold,
                              "warm_new_images_s": data.get("warm_new_images_s"),
                              "warm_all_caches_s": data.get("warm_all_caches_s"), "target_s": TARGETS["careset_s"],
                              "cold_meets_target": cold is not None and cold <= TARGETS["careset_s"]}
    data = read_json(out / "sync.json")
    if data:
        figures["sync"] = {"model": data.get("model"), "device": data.get("device"), "cuda": data.get("cuda"),
                           "steady_state_syncs_per_step": data.get("steady_state_syncs_per_step"),
                           "first_step": {k: v.get("first_step") for k, v in data.get("loops", {}).items()}}
    return figures


def table(summary: dict[str, Any]) -> list[str]:
    lines = [f"{'step':<18} {'status':<9} {'rc':>4} {'seconds':>8} {'timeout':>8}", "-" * 51]
    for s in summary["steps"]:
        lines.append(f"{s['step']:<18} {s['status']:<9} {s['rc']:>4} {s['seconds']:>8} {s['timeout_s']:>8}")
    env = summary.get("environment") or {}
    lines.append(f"\nenvironment: {env.get('device', 'no CUDA device')}, torch {env.get('torch')}, diffusers "
                 f"{env.get('diffusers')}, transformers {env.get('transformers')}")
    tests = summary.get("tests")
    if tests and "tests" in tests:
        lines.append(f"\nCUDA tests (-m gpu): {tests['passed']} passed, {tests['failures']} failed, "
                     f"{tests['errors']} errors, {tests['skipped']} skipped")
        lines += [f"  {p['kind'].upper()} {p['test']}: {p['message'][:200]}" for p in tests["problems"]]
    fig = summary["figures"]
    for name in ("train_eager", "train_compiled"):
        t = fig.get(name)
        if t and "recare_minutes" in t:
            lines.append(f"{name} ({t['model']}, {t['device']}): {t['recare_minutes']:.2f} min at paper defaults "
                         f"(target <= {TARGETS['train_minutes']:.0f}; {t['speedup_vs_reference']:.2f}x the reference's "
                         f"{t['reference_minutes']} min), peak {t['peak_gib']:.2f} GiB (target <= "
                         f"{TARGETS['train_peak_gib']:.0f}; {t['peak_vs_reference']:.2f} x 27.2 GiB)")
        elif t:
            lines.append(f"{name}: PARTIAL (stopped early): {json.dumps(t)}")
    for name in ("generate", "generate_compiled"):
        g = fig.get(name)
        if g:
            parts = [f"{mode}: {e.get('median_images_per_s', float('nan')):.3f} img/s, ratio "
                     f"{e.get('ratio_vs_bare', float('nan')):.3f}" for mode, e in g["recare"].items()]
            lines.append(f"{name} ({g['model']}, {g['device']}, {g['dtype']}, {g['resolution']} px, {g['steps']} "
                         f"steps, batch {g['batch_size']}): bare {g['bare_images_per_s'] or float('nan'):.3f} "
                         "img/s; recare "
                         + "; ".join(parts) + f" (target ratio >= {TARGETS['generate_ratio']})")
    c = fig.get("careset")
    if c:
        lines.append(f"careset ({c['model']}, {c['device']}, {c['images']} images): cold {c['cold_s']:.1f} s, "
                     f"warm (new images) {c['warm_new_images_s']:.1f} s, "
                     f"warm (all caches) {c['warm_all_caches_s']:.1f} s "
                     f"(target <= {TARGETS['careset_s']:.0f} s)")
    s = fig.get("sync")
    if s:
        lines.append(f"sync ({s['model']}, {s['device']}; steady-state syncs per step, steps 2..N): "
                     f"{s['steady_state_syncs_per_step']}"
                     f"{'' if s['cuda'] else ' (no CUDA: dry run)'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=Path, required=True)
    parser.add_argument("--env", type=Path, default=None)
    parser.add_argument("--junit", type=Path, default=None)
    parser.add_argument("--wall-s", type=int, default=None)
    args = parser.parse_args(argv)
    summary = {"steps": read_steps(args.steps), "environment": read_json(args.env) if args.env else None,
               "tests": read_junit(args.junit), "figures": headline(args.out), "targets": TARGETS,
               "wall_s": args.wall_s,
               "files": sorted({p.name for p in args.out.iterdir() if p.is_file()} | {"summary.json"})}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(table(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
