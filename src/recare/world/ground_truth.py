"""The demo's ground truth: presence of the CARE concept C in the CARE images by the world's
classifier, beside the CARE score (the check the paper made with human labels)."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from recare.io import list_images, load_image_rgb

logger = logging.getLogger(__name__)

SYNTHETIC_NOTE = ("SYNTHETIC WORLD: every number here comes from recare's 16x16 procedural world (a 1.7M-parameter "
                  "pixel-space text-to-image model and a 2.9M-parameter CLIP trained on it), not from Stable "
                  "Diffusion. Iterations, sampling steps and the CARE-set vocabulary are scaled down "
                  "(recare.world.demo); the numbers test the method's claim in this world only.")


def ground_truth(results: dict[str, Any], detector_model: Any, target: str, care_concept: str) -> list[dict[str, Any]]:
    """Per model: ground-truth presence of T (target) in the plain-prompt images and of C (care_concept)
    in the CARE images."""
    from recare.metrics.care_score import proportion_ci
    from recare.world.detectors import WorldConceptDetector

    rows = []
    for entry in results["methods"]:
        row: dict[str, Any] = {"name": entry["name"]}
        for key, concept, folder in (("care_images_C", care_concept, entry["care"]["image_dir"]),
                                     ("care_images_T", target, entry["care"]["image_dir"])):
            images = [load_image_rgb(p) for p in list_images(folder)]
            hits = sum(d.detected for d in WorldConceptDetector(detector_model, concept).detect(images))
            row[key] = {"rate": hits / len(images), "ci95": list(proportion_ci(hits, len(images))), "n": len(images)}
        for attack in ("plain", "cce"):
            r = entry["robustness"][attack]
            row[f"{attack}_T"] = {"rate": r["asr"] / 100.0, "ci95": [r["ci_low"] / 100.0, r["ci_high"] / 100.0],
                                  "n": r["n"]}
        care = entry["care"]
        row["care_score"] = {"rate": care["score"], "ci95": [care["ci_low"], care["ci_high"]], "n": care["n"]}
        rows.append(row)
    return rows


def pearson(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson's r with its Fisher-z 95% interval (Fisher 1921), by scipy.stats.pearsonr; None where
    undefined (r: n < 3 or a constant; the interval: n < 4 or |r| = 1)."""
    from scipy import stats

    n = len(x)
    if n != len(y):
        raise ValueError("x and y need the same length")
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"r": None, "ci95": None, "n": n}
    result = stats.pearsonr(x, y)
    r = max(-1.0, min(1.0, float(result.statistic)))
    if abs(abs(r) - 1.0) < 1e-12:  # a perfect (anti)correlation, up to scipy's rounding
        r = math.copysign(1.0, r)
    if n < 4 or abs(r) == 1.0:
        return {"r": r, "ci95": None, "n": n}
    interval = result.confidence_interval(confidence_level=0.95)
    return {"r": r, "ci95": [float(interval.low), float(interval.high)], "n": n}


def _pct(value: dict[str, Any]) -> str:
    low, high = value["ci95"]
    return f"{100 * value['rate']:.1f} [{100 * low:.0f}, {100 * high:.0f}]"


def ground_truth_section(rows: list[dict[str, Any]], facts: dict[str, Any], concepts: Any) -> dict[str, Any]:
    """The report section (recare.report 'sections') with the ground-truth table; concepts: the world's
    recare.world.definition.WorldConcepts (T, C, the CARE labels)."""
    target, care, labels = concepts.target, concepts.care, list(concepts.care_labels)
    header = ["model", "T plain (GT) %", "T under CCE (GT) %", "C in CARE images (GT) %",
              "CARE score (world CLIP) %", "T in CARE images (GT) %"]
    table = [[r["name"], _pct(r["plain_T"]), _pct(r["cce_T"]), _pct(r["care_images_C"]), _pct(r["care_score"]),
              _pct(r["care_images_T"])] for r in rows]
    corr = facts.get("care_score_vs_ground_truth", {})
    text = [SYNTHETIC_NOTE,
            f"T = '{target}' (the target), C = '{care}' (its co-occurring concept). GT: the world's ground-truth "
            f"classifier ({_accuracy(facts)}). CARE score: the "
            f"world CLIP's top-1 among the world's object labels ({', '.join(labels)}) is '{care}'. Wilson 95% "
            "intervals in brackets.",
            f"CARE score vs ground-truth C presence across these models: Pearson r = "
            f"{_fmt_r(corr)} (n = {corr.get('n', 0)} models)."]
    careset = facts.get("careset", {})
    if careset:
        text.append(f"CARE-set (world vocabulary): {', '.join(careset['world_vocabulary']['words'])}. "
                    + _full_vocabulary_text(careset["full_vocabulary"], care))
    return {"title": "Ground truth (synthetic world)", "text": text, "table": {"header": header, "rows": table},
            "images": [{"name": f"training losses: {m}", "path": p} for m, p in facts.get("loss_plots", {}).items()]}


def _full_vocabulary_text(full: dict[str, Any], care: str) -> str:
    if "error" in full:
        return f"With the full 32,849-word vocabulary no CARE-set was built: {full['error']}."
    return (f"With the full 32,849-word vocabulary, '{care}' {'is' if full['care_concept_kept'] else 'is NOT'} kept "
            "(the world CLIP never saw the other words; their embeddings are untrained noise).")


def _accuracy(facts: dict[str, Any]) -> str:
    accuracy = facts.get("detector_accuracy_clean")
    if not accuracy:
        return "its accuracy is in the world's build report"
    return f"accuracy >= {min(accuracy.values()):.3f} per attribute on clean renders, measured at the build"


def _fmt_r(corr: dict[str, Any]) -> str:
    if corr.get("r") is None:
        return "undefined"
    ci = corr.get("ci95")
    return f"{corr['r']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


