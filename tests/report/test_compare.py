"""Numbers from different configurations are never silently put side by side: the report refuses methods
measured differently, and runs summarised over seeds may differ only by their seed (recare.report.compare)."""

import copy

import pytest

from recare.errors import RecareError
from recare.report.compare import (
    check_comparable,
    check_methods_comparable,
    check_seed_runs,
    method_fields,
    results_fields,
)
from recare.report.writer import write_reports

DETECTOR = {"detector": "nudenet", "package": "nudenet", "version": "3.4.2", "model_sha256": "ab" * 32,
            "threshold": 0.6, "classes": ["FEMALE_BREAST_EXPOSED"]}
CLIP = {"source": "openai/clip-vit-base-patch32", "revision": None, "fingerprint": "cd" * 32}


def _method(name, detector=DETECTOR, steps=50, fid_id="inception-v3-clean", n_fid=1000, seeds=(1, 2)):
    plain = {"asr": 10.0, "ci_low": 5.0, "ci_high": 20.0, "n": 2, "detector": dict(detector),
             "settings": {"generation": {"num_inference_steps": steps, "guidance_scale": 7.5},
                          "model": {"source": name}, "image_dir": f"/x/{name}/plain"},
             "records": [{"prompt": "p", "seeds": list(seeds)}]}
    return {"name": name, "robustness": {"plain": plain},
            "utility": {"clip_score": {"mean": 0.31, "n": n_fid, "clip_model": dict(CLIP)},
                        "fid": {"fid": 14.1, "extractor_id": fid_id, "extractor_weights_sha256": "ef" * 32,
                                "n_images": n_fid, "n_reference": 5000, "mode": "clean", "method": "sqrtm"}}}


def _results(*methods, prompts_sha="11" * 32, seed=0):
    return {"format": "recare-eval/1", "detector": dict(DETECTOR), "notes": [],
            "config": {"generation": {"num_inference_steps": 50}, "care": {"seed": seed}, "prompts": "/abs/p.csv"},
            "inputs": {"prompts": {"sha256": prompts_sha}, "care_prompts": {"sha256": "22" * 32}},
            "methods": list(methods), "ratio_definition": {"normalisation": {}}}


def test_methods_measured_alike_pass_and_model_fields_are_ignored():
    check_methods_comparable(_results(_method("base"), _method("ESD")))  # image_dir / model differ: fine
    fields = method_fields(_method("ESD"))
    assert fields["fid.extractor_id"] == "inception-v3-clean" and fields["clip_score.clip_model.fingerprint"]
    assert fields["robustness.plain.detector.threshold"] == 0.6 and "robustness.plain.model" not in str(fields)


@pytest.mark.parametrize("other, field", [
    (dict(detector={**DETECTOR, "threshold": 0.45}), "robustness.plain.detector.threshold"),
    (dict(detector={**DETECTOR, "version": "3.0.8"}), "robustness.plain.detector.version"),
    (dict(steps=25), "robustness.plain.generation.num_inference_steps"),
    (dict(fid_id="world-clip-image-embedding:64d"), "fid.extractor_id"),
    (dict(n_fid=30), "fid.n_images"),
    (dict(seeds=(1, 3)), "robustness.plain.cases"),
])
def test_methods_measured_differently_are_an_error_naming_the_field(other, field, tmp_path):
    results = _results(_method("base"), _method("ESD", **other))
    with pytest.raises(RecareError, match="different configurations") as err:
        write_reports(results, tmp_path / "report")
    assert field in str(err.value) and "base = " in str(err.value) and "ESD = " in str(err.value)
    assert not (tmp_path / "report" / "results.json").exists()  # nothing written


def test_another_clip_model_is_an_error():
    other = _method("ESD")
    other["utility"]["clip_score"]["clip_model"]["fingerprint"] = "00" * 32
    with pytest.raises(RecareError, match="clip_score.clip_model.fingerprint"):
        check_methods_comparable(_results(_method("base"), other))


def test_results_files_compare_prompt_digests_detector_and_sampling():
    a, b = _results(_method("base")), _results(_method("base"), prompts_sha="33" * 32)
    with pytest.raises(RecareError, match="inputs.prompts"):
        check_comparable({"a.json": results_fields(a), "b.json": results_fields(b)}, "the results files")
    c = copy.deepcopy(a)
    c["detector"]["model_sha256"] = "99" * 32
    with pytest.raises(RecareError, match="detector.model_sha256"):
        check_comparable({"a": results_fields(a), "c": results_fields(c)}, "the results files")
    assert check_comparable({"a": results_fields(a), "a2": results_fields(copy.deepcopy(a))}, "x") == []


def _run(seed, prompts_sha=None, steps=50, recare="0.3.0"):
    results = _results(_method("base", seeds=(seed,)), prompts_sha=prompts_sha or f"{seed:02d}" * 32, seed=seed)
    return {"results": results, "config": {"seed": seed, "stage2_iterations": steps},
            "environment": {"recare": recare, "date_utc": f"2026-01-0{seed + 1}", "machine": {"cpu": "x"}}}


def test_seed_runs_may_differ_by_seed_only():
    assert check_seed_runs({"seed 0": _run(0), "seed 1": _run(1)}) == []  # seeds and seed-made inputs differ
    with pytest.raises(RecareError, match="run.stage2_iterations"):
        check_seed_runs({"seed 0": _run(0), "seed 1": _run(1, steps=200)})
    other = _run(1)
    other["results"]["inputs"]["care_prompts"]["sha256"] = "77" * 32  # not made from the seed
    with pytest.raises(RecareError, match="inputs.care_prompts"):
        check_seed_runs({"seed 0": _run(0), "seed 1": other})


def test_seed_runs_of_another_recare_version_are_a_recorded_warning(caplog):
    warnings = check_seed_runs({"seed 0": _run(0), "seed 1": _run(1, recare="0.4.0")})
    assert len(warnings) == 1 and "environment.recare" in warnings[0] and "0.4.0" in warnings[0]
    assert "environment.recare" in caplog.text


def test_demo_seed_summary_reads_each_seed_report_and_refuses_a_mixed_one(tmp_path):
    import json

    from recare.world.seeds import check_seed_summaries

    summaries = []
    for seed, steps in ((0, 50), (1, 50), (2, 25)):
        run = _run(seed)
        run["results"]["config"]["generation"]["num_inference_steps"] = steps
        (tmp_path / f"seed-{seed}" / "report").mkdir(parents=True)
        (tmp_path / f"seed-{seed}" / "report" / "results.json").write_text(json.dumps(run["results"]))
        summaries.append({"config": run["config"], "environment": run["environment"], "world": {"target": "dotted"}})
    assert check_seed_summaries(tmp_path, summaries[:2]) == []
    with pytest.raises(RecareError, match=r"config.generation.num_inference_steps.*seed 2 = 25"):
        check_seed_summaries(tmp_path, summaries)
