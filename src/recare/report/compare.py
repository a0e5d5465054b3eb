"""The configuration behind a number, and the check that numbers put side by side share one.

A table, a radar chart or a summary over seeds compares numbers; they mean something side by side only
when they were measured the same way: the same detector (package, version, model SHA-256, threshold,
classes), the same prompt files (SHA-256), seeds and sampling settings, the same CLIP (fingerprint of
its weights) and FID feature extractor (id, weight SHA-256, numbers of images). `method_fields` and
`results_fields` flatten those settings to dotted keys ("fid.extractor_id"); `check_comparable` raises
RecareError naming every key that differs, and only warns (logged, and returned for the caller to
record) about keys where a difference is legitimate, e.g. package versions between seed runs.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any, Mapping, Sequence

from recare.errors import RecareError

logger = logging.getLogger(__name__)

CONFIG_KEYS = ("model", "revision", "dtype", "attacks", "prompt_limit", "detector", "cce", "cce_replace_word",
               "uda", "coco_limit", "fid_method", "care_word", "care", "generation", "normalisation")
"""EvalConfig fields a number depends on (paths are left out: the inputs' SHA-256 stand for them)."""

ATTACK_SETTINGS = ("generation", "cce", "unlearndiffatk", "concept_word")
"""Keys of an attack's settings that are the same for every model (the rest names the model or its files)."""

FID_KEYS = ("extractor_id", "extractor_weights_sha256", "n_images", "n_reference", "mode", "method")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested mappings; lists and other values are leaves."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def method_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What one method's numbers in a results.json depend on, besides the model itself."""
    fields: dict[str, Any] = {}
    for attack, result in (entry.get("robustness") or {}).items():
        settings = result.get("settings") or {}
        fields[f"robustness.{attack}"] = {"detector": result.get("detector"), "n": result.get("n"),
                                          **{k: settings[k] for k in ATTACK_SETTINGS if k in settings}}
        if attack == "plain":  # the same prompts and seeds for every model
            fields[f"robustness.{attack}"]["cases"] = [[r.get("prompt"), r.get("seeds")]
                                                       for r in result.get("records", [])]
    utility = entry.get("utility") or {}
    if "clip_score" in utility:
        fields["clip_score"] = {"clip_model": utility["clip_score"].get("clip_model"),
                                "n": utility["clip_score"].get("n")}
    if "fid" in utility:
        fields["fid"] = {k: utility["fid"].get(k) for k in FID_KEYS}
    care = entry.get("care")
    if care:
        fields["care"] = {k: care.get(k) for k in ("care_word", "labels", "label_template", "clip_model", "n")}
        fields["care"]["settings"] = (care.get("settings") or {}).get("care_score")
        fields["care"]["prompts"] = [p.get("prompt") for p in care.get("per_prompt", [])]
    if entry.get("ratio"):
        fields["ratio.normalisation"] = entry["ratio"].get("normalisation")
    return flatten(fields)


def results_fields(results: Mapping[str, Any]) -> dict[str, Any]:
    """What every number of a results.json (`recare eval all`) depends on, besides the models."""
    config = results.get("config") or {}
    fields: dict[str, Any] = {"format": results.get("format"), "detector": results.get("detector"),
                              "config": {k: config.get(k) for k in CONFIG_KEYS if k in config},
                              "inputs": {name: (digest or {}).get("sha256")
                                         for name, digest in (results.get("inputs") or {}).items()}}
    methods = results.get("methods") or []
    if methods:  # check_methods_comparable keeps the methods of one file alike: the first speaks for all
        fields["measured"] = method_fields(methods[0])
    return flatten(fields)


def differences(named: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{field: {name: value}} of every field whose value is not the same for all names."""
    keys = sorted({k for fields in named.values() for k in fields})
    missing = object()
    out = {}
    for key in keys:
        values = {name: fields.get(key, missing) for name, fields in named.items()}
        if len({repr(v) for v in values.values()}) > 1:
            out[key] = {name: ("<missing>" if v is missing else v) for name, v in values.items()}
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns)


def check_comparable(named: Mapping[str, Mapping[str, Any]], what: str, ignore: Sequence[str] = (),
                     warn: Sequence[str] = ()) -> list[str]:
    """RecareError naming the fields (dotted keys) that differ between the `named` field sets.

    Args:
        named: source name (a method, a seed, a file) -> its fields (method_fields / results_fields).
        what: the comparison, for the message ("the report's methods").
        ignore: patterns (fnmatch, or a key prefix) of fields allowed to differ (e.g. "*seed*" across seeds).
        warn: patterns of fields whose difference is legitimate but worth recording: logged as a warning.
    Returns:
        The warnings (one line per field), for the caller to record next to the numbers.
    """
    diffs = {k: v for k, v in differences(named).items() if not _matches(k, ignore)}
    errors = {k: v for k, v in diffs.items() if not _matches(k, warn)}
    if errors:
        lines = [f"  {key}: " + "; ".join(f"{name} = {_short(value)}" for name, value in values.items())
                 for key, values in list(errors.items())[:20]]
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise RecareError(f"{what} were measured under different configurations; they cannot be compared. "
                          f"Fields that differ:\n" + "\n".join(lines) + more)
    warnings = [f"{key} differs: " + "; ".join(f"{name} = {_short(value)}" for name, value in values.items())
                for key, values in diffs.items()]
    for line in warnings:
        logger.warning("%s: %s", what, line)
    return warnings


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_methods_comparable(results: Mapping[str, Any]) -> None:
    """RecareError when the methods of one results dict were not measured alike (see the module docstring).

    `recare eval all` measures every method under one configuration; this catches a results dict
    assembled from several runs (e.g. method entries copied from another results.json)."""
    methods = results.get("methods") or []
    named = {str(e.get("name")): method_fields(e) for e in methods}
    if len(named) != len(methods):
        raise RecareError("the results list two methods under one name")
    # an axis a method lacks is "not evaluated" in the table, not a different configuration
    present = set.intersection(*({_axis(k) for k in f} for f in named.values())) if named else set()
    shared = {name: {k: v for k, v in f.items() if _axis(k) in present} for name, f in named.items()}
    check_comparable(shared, "the methods of this report")


def _axis(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "robustness" else parts[0]


SEED_DEPENDENT = ("*seed*", "measured.robustness.*.cases", "inputs.prompts", "inputs.coco_prompts",
                  "inputs.fid_reference", "inputs.cce_images", "inputs.training_images", "environment.date_utc")
"""Fields that differ between runs of one recipe at different seeds: seeds, and the inputs made from them."""

SEED_RUN_WARNINGS = ("environment", "config.normalisation", "measured.ratio.normalisation")
"""Fields whose difference between seed runs is legitimate but recorded: the software and machine, and RATIO
bounds measured per seed (the synthetic world's)."""


def check_seed_runs(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Check that runs summarised over seeds differ only by their seed; returns the warnings to record.

    Args:
        runs: label (e.g. "seed 1") -> {"results": the run's results.json, "config": the run's own settings
            (e.g. the demo's, with its seed), "environment": recare.provenance.environment() of the run}.
    """
    named = {}
    for label, run in runs.items():
        env = run.get("environment") or {}
        environment = {"recare": env.get("recare"), "git": env.get("git"), "packages": env.get("packages"),
                       "cpu": (env.get("machine") or {}).get("cpu")}
        named[label] = {**results_fields(run["results"]), **flatten({"run": run.get("config") or {}}),
                        **flatten({"environment": environment})}
    return check_comparable(named, "the runs summarised over seeds", ignore=SEED_DEPENDENT, warn=SEED_RUN_WARNINGS)
