"""`recare eval all`: several models on the three axes of method §5 in one run.

For every method (the base model first, then erased UNets / learned tokens):
- robustness: the attacks in `EvalConfig.attacks` ("plain", "cce", "unlearndiffatk"), ASR by
  the concept detector (recare.attacks);
- utility: CLIP score and FID (clean mode) of images of COCO prompts with their seeds;
- CARE score of the CARE prompts (recare.care_score);
- RATIO of the radar chart (recare.ratio) over the axes that were evaluated.
recare.report turns the result into results.json, report.md, report.html, radar.png and grids.

Caching: images live in `<cache_dir>/base-<model key>/<axis>-<settings key>` for the base
model and `<out_dir>/images/<method>/<axis>-<settings key>` for the others (the settings key
hashes the axis's settings and the paths of its input files); generation resumes
(recare.generate), so a second run with the same cache_dir generates nothing for the base
model, and UnlearnDiffAtk reuses the base model's plain images as the original model's
images. FID statistics of a reference folder are cached in cache_dir (recare.fid); CCE tokens
and UnlearnDiffAtk prefixes are saved next to their images and reused.

Several processes (`accelerate launch -m recare eval all ...`, torchrun): see recare.distributed;
every generation is sharded, the rest runs on every rank (scores) or on rank 0 (CCE inversion,
reports).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from recare.attacks.asr import DetectorArg
from recare.attacks.cce import learn_cce_token, run_cce_attack
from recare.attacks.plain import run_plain_attack
from recare.attacks.unlearndiff import run_unlearndiffatk
from recare.errors import RecareError
from recare.eval.config import (
    RESULTS_FORMAT,
    TINY_UNET_PARAMETERS,
    EvalConfig,
    MethodSpec,
    build_detector,
    check_methods,
    validate_inputs,
)
from recare.generate.images import generate_images
from recare.generate.prompts import PromptJob, prompt_file_path
from recare.generate.sharding import ShardedGenerator, ShardInfo, barrier
from recare.io import load_image_rgb
from recare.metrics.care_score import evaluate_care_score
from recare.metrics.clip_score import clip_score
from recare.metrics.fid import FeatureExtractor, FidStatistics, compute_fid, folder_statistics, load_statistics
from recare.metrics.ratio import compute_ratio
from recare.models.loading import SDComponents
from recare.models.precision import resolve_weights_dtype
from recare.provenance import environment, input_digest

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- notes


def model_scale_notes(components: SDComponents, flagged: bool) -> list[str]:
    """Automatic notes: the model folder's own note (SDComponents.note), else a warning for tiny/random models."""
    n_params = sum(p.numel() for p in components.unet.parameters())
    notes = []
    source = str(components.source)
    shown = Path(source).name if os.path.isabs(source) else source  # a folder's name, not this machine's path
    if components.note:
        notes.append(f"The model ({shown}, UNet with {n_params:,} parameters) is {components.note}")
    elif source.startswith("<") or re.search(r"tiny|random", source, re.IGNORECASE) or n_params < TINY_UNET_PARAMETERS:
        notes.append(f"The model ({shown}, UNet with {n_params:,} parameters) is a tiny/random test model: these "
                     "numbers check the code path and say NOTHING about erasure quality.")
    if flagged:
        notes.append("The caller flagged these models as random/tiny: the numbers are not meaningful.")
    return notes


# ----------------------------------------------------------------------------- folders


def settings_key(obj: Any) -> str:
    """12 hex digits of SHA-256 over the JSON of obj (folder names that change with the settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def slug(name: str) -> str:
    """A folder name for a method name."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return text or "method"


def _file_id(path: str | None) -> str | None:
    """The absolute path of an input file or folder (part of the image-folder keys)."""
    return None if path is None else str(Path(path).resolve())


@dataclass(frozen=True)
class MethodFolders:
    """Where one method's images go; the base model's live in the shared cache."""

    root: Path

    def axis(self, name: str, settings: Any) -> Path:
        return self.root / f"{name}-{settings_key(settings)}"


def method_folders(method: MethodSpec, config: EvalConfig, out_dir: Path, cache_dir: Path) -> MethodFolders:
    if method.is_base:
        key = settings_key({"model": config.model, "revision": config.revision, "dtype": config.dtype})
        return MethodFolders(cache_dir / f"base-{key}")
    return MethodFolders(out_dir / "images" / slug(method.name))


# ----------------------------------------------------------------------------- one method


@dataclass
class Resources:
    """Models and inputs shared by all methods (loaded once)."""

    base: SDComponents
    inputs: dict[str, Any]
    clip: Any = None  # ImageTextModel for CLIP score / CARE (None when neither runs)
    detector: DetectorArg | None = None  # Detector or callable (None without attacks)
    fid_extractor: FeatureExtractor | None = None  # InceptionFeatureExtractor by default (None without FID)
    fid_reference: FidStatistics | None = None  # reference statistics (cached)
    device: torch.device = torch.device("cpu")
    base_folders: MethodFolders | None = None
    shard: ShardInfo = ShardInfo()  # this process among the launched ones (generation is sharded)

    @property
    def generate(self) -> Callable[..., list]:
        """generate_images, or its sharded form when several processes run."""
        return ShardedGenerator(self.shard) if self.shard.distributed else generate_images


def evaluate_robustness(components: SDComponents, method: MethodSpec, config: EvalConfig, res: Resources,
                        folders: MethodFolders, progress: bool) -> dict[str, Any]:
    """Every attack of config.attacks on one model; {attack name: AttackResult.to_json()}."""
    info, gen = method.model_info(), config.generation
    jobs = res.inputs["benchmark"]
    out: dict[str, Any] = {}
    plain_key = [asdict(gen), _file_id(config.prompts)]
    base_plain = res.base_folders.axis("plain", plain_key)
    plain = folders.axis("plain", plain_key)
    for attack in config.attacks:
        if attack == "plain":
            result = run_plain_attack(components, jobs, res.detector, plain, gen, res.device, info, res.generate)
            out["plain"] = result.to_json()
        elif attack == "cce":
            for result in _run_cce(components, method, config, res, folders, progress):
                out[result.attack] = result.to_json()
        else:
            result = run_unlearndiffatk(components, res.base, jobs, res.detector,
                                        folders.axis("unlearndiffatk", [*plain_key, asdict(config.uda)]),
                                        config.uda, gen, res.device, info, original_image_dir=base_plain,
                                        original_model_info=MethodSpec("base").model_info(), plain_image_dir=plain,
                                        generate=res.generate, progress=progress, shard=res.shard)
            out["unlearndiffatk"] = result.to_json()
    return out


def _run_cce(components, method, config, res, folders, progress):
    """Learn the CCE token (rank 0 first; the other ranks then load its file) and attack."""
    folder = folders.axis("cce", [config.cce.to_json(), asdict(config.generation), _file_id(config.cce_images),
                                  config.cce_replace_word and _file_id(config.prompts)])
    if res.shard.distributed and not res.shard.is_main:
        barrier(res.shard)  # rank 0 learns the token
    token = learn_cce_token(components, res.inputs["cce_images"], folder, config.cce, res.device,
                            method.model_info(), progress)
    if res.shard.distributed and res.shard.is_main:
        barrier(res.shard)
    return run_cce_attack(components, token, res.detector, folder, config.cce, config.generation, res.device,
                          method.model_info(), benchmark_jobs=res.inputs["benchmark"],
                          concept_word=config.cce_replace_word, generate=res.generate)


def evaluate_utility(components: SDComponents, method: MethodSpec, config: EvalConfig, res: Resources,
                     folders: MethodFolders) -> dict[str, Any]:
    """CLIP score and FID of the COCO images (method §5)."""
    jobs: list[PromptJob] = res.inputs["coco"]
    folder = folders.axis("coco", [asdict(config.generation), _file_id(config.coco_prompts)])
    paths = res.generate(components, jobs, folder, config.generation, res.device, method.model_info())
    out: dict[str, Any] = {"image_dir": str(folder), "n_images": len(paths)}
    per_image = []
    for start in range(0, len(paths), 256):
        images = [load_image_rgb(p) for p in paths[start:start + 256]]
        per_image.append(clip_score(res.clip, images, [j.prompt for j in jobs[start:start + 256]]).per_image)
    scores = torch.cat(per_image)
    out["clip_score"] = {"mean": float(scores.mean()), "n": len(scores), "clip_model": _clip_record(res.clip)}
    if res.fid_reference is not None:
        features = res.fid_extractor.features_of_files(paths)
        stats = FidStatistics.from_features(features, res.fid_extractor.extractor_id, str(folder))
        out["fid"] = compute_fid(stats, res.fid_reference, res.fid_extractor, method=config.fid_method).to_dict()
    return out


def evaluate_care(components: SDComponents, method: MethodSpec, config: EvalConfig, res: Resources,
                  folders: MethodFolders) -> dict[str, Any]:
    """CARE score (method §5) of the CARE prompts."""
    folder = folders.axis("care", [asdict(config.care), list(res.inputs["care"])])
    if res.shard.distributed:  # make the images sharded; evaluate_care_score then finds them all
        from recare.generate.prompts import jobs_for_prompts

        jobs = jobs_for_prompts(list(res.inputs["care"]), config.care.images_per_prompt, config.care.seed)
        res.generate(components, jobs, folder, config.care.generation_config(), res.device, method.model_info())
    report = evaluate_care_score(components, res.clip, res.inputs["care"], config.care_word, config.care,
                                 image_dir=folder, device=res.device, model_info=method.model_info())
    return {**report.to_json(), "clip_model": _clip_record(res.clip), "image_dir": str(folder)}


def _clip_record(clip: Any) -> dict[str, Any]:
    """Source, revision and weight fingerprint of the CLIP model (what makes CLIP and CARE scores comparable)."""
    fingerprint = getattr(clip, "fingerprint", None)
    return {"source": getattr(clip, "source", None), "revision": getattr(clip, "revision", None),
            "fingerprint": fingerprint() if callable(fingerprint) else None}


def ratio_of(entry: Mapping[str, Any], config: EvalConfig) -> dict[str, Any] | None:
    """RATIO over the evaluated axes (attacks in order, CLIP, FID, CARE); None with fewer than 3."""
    asr = {name: r["asr"] for name, r in entry.get("robustness", {}).items()}
    utility = entry.get("utility", {})
    clip = utility.get("clip_score", {}).get("mean")
    fid = utility.get("fid", {}).get("fid")
    care = entry.get("care", {}).get("score")
    if len(asr) + sum(v is not None for v in (clip, fid, care)) < 3:
        return None
    return compute_ratio(asr, clip, fid, care, config.normalisation).to_dict()


def evaluate_method(components: SDComponents, method: MethodSpec, config: EvalConfig, res: Resources,
                    folders: MethodFolders, progress: bool = True) -> dict[str, Any]:
    """All axes of one model; the entry of results.json's "methods" list."""
    entry: dict[str, Any] = {"name": method.name, "is_base": method.is_base,
                             "model": {"source": components.source, "revision": components.revision,
                                       **method.model_info()},
                             "image_root": str(folders.root), "timings_s": {}}
    steps = [("robustness", bool(config.attacks), evaluate_robustness),
             ("utility", bool(res.inputs["coco"]), evaluate_utility),
             ("care", config.care_word is not None, evaluate_care)]
    for axis, wanted, run in steps:
        if not wanted:
            continue
        start = time.perf_counter()
        logger.info("%s: %s", method.name, axis)
        kwargs = {"progress": progress} if axis == "robustness" else {}
        entry[axis] = run(components, method, config, res, folders, **kwargs)
        entry["timings_s"][axis] = time.perf_counter() - start
    entry["ratio"] = ratio_of(entry, config)
    return entry


# ----------------------------------------------------------------------------- all methods


def load_resources(config: EvalConfig, inputs: dict[str, Any], device: torch.device, cache_dir: Path,
                   load_sd: Callable[..., SDComponents], load_clip: Callable[[str], Any],
                   fid_extractor: FeatureExtractor | None = None, detector: DetectorArg | None = None,
                   shard: ShardInfo = ShardInfo()) -> Resources:
    """Load the base model, CLIP, detector, FID network and reference statistics once."""
    dtype = resolve_weights_dtype(config.dtype, device)
    base = load_sd(config.model, revision=config.revision, dtype=dtype, device=device)
    res = Resources(base, inputs, device=device, shard=shard)
    clips: dict[str, Any] = {}

    def clip_of(source: str | None) -> Any:
        source = source or config.clip_model
        if source not in clips:
            clips[source] = load_clip(source)
        return clips[source]

    if inputs["coco"] or config.care_word is not None:
        res.clip = clip_of(None)
    if config.attacks:
        res.detector = detector if detector is not None else build_detector(config.detector, device, clip_of)
    if config.fid_reference is not None:
        if fid_extractor is None:
            from recare.metrics.fid import InceptionFeatureExtractor

            fid_extractor = InceptionFeatureExtractor.load(device=device)
        res.fid_extractor = fid_extractor
        ref = Path(config.fid_reference)
        if ref.is_file():
            res.fid_reference = load_statistics(ref)
        else:  # rank 0 computes and caches the statistics; the other ranks read the cache
            if shard.distributed and not shard.is_main:
                barrier(shard)
            res.fid_reference = folder_statistics(ref, fid_extractor, cache_dir)
            if shard.distributed and shard.is_main:
                barrier(shard)
    return res


def evaluate_all(config: EvalConfig, methods: Sequence[MethodSpec], out_dir: str | os.PathLike,
                 device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                 fid_extractor: FeatureExtractor | None = None, detector: DetectorArg | None = None,
                 progress: bool = True,
                 load_sd: Callable[..., SDComponents] | None = None,
                 load_clip: Callable[[str], Any] | None = None, shard: ShardInfo = ShardInfo()) -> dict[str, Any]:
    """Evaluate the base model and `methods` on every configured axis; write the reports.

    Args:
        config: what to evaluate (EvalConfig).
        methods: the erased models; the base model (config.model) is always evaluated first.
        out_dir: results.json, report.md, report.html, radar.png, grids/, images/.
        cache_dir: base-model images and FID reference statistics (default out_dir/cache);
            share it between evaluations of the same base model.
        fid_extractor, detector: injected instead of the Inception network / the detector of
            config.detector (tests, custom detectors).
        load_sd, load_clip: model loaders (default recare.models.load_sd / load_image_text_model).
        shard: this process among several (recare.distributed, e.g. under `accelerate launch`):
            every generation is sharded; rank 0 learns CCE tokens and writes the reports; the
            scores are computed on every rank.
    Returns:
        The results dict written to results.json (by rank 0).
    """
    from recare import models
    from recare.report.writer import write_reports

    out_dir, device = Path(out_dir), torch.device(device)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    check_methods(methods)
    if any(m.is_base for m in methods):
        raise RecareError("the base model is always evaluated; give methods with unet_weights or learned_embeddings")
    if any(m.name == config.base_name for m in methods):
        raise RecareError(f"method name {config.base_name!r} is the base model's name (base_name)")
    inputs = validate_inputs(config)
    load_sd = load_sd or models.load_sd
    load_clip = load_clip or (lambda source: models.load_image_text_model(source, device=device))
    res = load_resources(config, inputs, device, cache_dir, load_sd, load_clip, fid_extractor, detector, shard)
    progress = progress and shard.is_main
    base_method = MethodSpec(config.base_name)
    res.base_folders = method_folders(base_method, config, out_dir, cache_dir)
    notes = list(config.notes) + model_scale_notes(res.base, config.random_models)
    entries = [evaluate_method(res.base, base_method, config, res, res.base_folders, progress)]
    for method in methods:
        components = load_sd(config.model, revision=config.revision, dtype=resolve_weights_dtype(config.dtype, device),
                              device=device, unet_weights=method.unet_weights,
                              learned_embeddings=list(method.learned_embeddings),
                              text_encoder_weights=method.text_encoder_weights)
        entries.append(evaluate_method(components, method, config, res,
                                       method_folders(method, config, out_dir, cache_dir), progress))
        del components
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = {"format": RESULTS_FORMAT, "notes": notes, "config": config.to_json(),
               "detector": _detector_settings(res.detector), "methods": entries,
               "ratio_definition": _ratio_definition(config), "environment": environment(),
               "inputs": input_digests(config)}
    if shard.is_main:
        write_reports(results, out_dir, config.grid_columns)
    return results


def evaluate_robustness_of(config: EvalConfig, method: MethodSpec, work_dir: str | os.PathLike,
                           device: str | torch.device = "cpu", detector: DetectorArg | None = None,
                           progress: bool = True,
                           load_sd: Callable[..., SDComponents] | None = None,
                           load_clip: Callable[[str], Any] | None = None,
                           shard: ShardInfo = ShardInfo()) -> dict[str, Any]:
    """`recare eval robustness`: the attacks of config.attacks on ONE model (method §5).

    config.model (+ revision) is the original model; `method` adds the erased weights / tokens
    (a method without them attacks the original model itself). Images go to work_dir.
    Returns {"notes", "model", "detector", "attacks": {name: AttackResult.to_json()}}.
    """
    from recare import models

    work_dir, device = Path(work_dir), torch.device(device)
    check_methods([method])
    inputs = validate_inputs(config)
    load_sd = load_sd or models.load_sd
    load_clip = load_clip or (lambda source: models.load_image_text_model(source, device=device))
    res = load_resources(config, inputs, device, work_dir / "cache", load_sd, load_clip, None, detector, shard)
    progress = progress and shard.is_main
    res.base_folders = MethodFolders(work_dir / "original")
    components, folders = res.base, res.base_folders
    if not method.is_base:
        components = load_sd(config.model, revision=config.revision, dtype=resolve_weights_dtype(config.dtype, device),
                             device=device, unet_weights=method.unet_weights,
                             learned_embeddings=list(method.learned_embeddings),
                              text_encoder_weights=method.text_encoder_weights)
        folders = MethodFolders(work_dir / "attacked")
    attacks = evaluate_robustness(components, method, config, res, folders, progress)
    return {"format": "recare-robustness/1", "notes": list(config.notes) + model_scale_notes(components,
                                                                                              config.random_models),
            "model": {"source": components.source, "revision": components.revision, **method.model_info()},
            "detector": _detector_settings(res.detector), "attacks": attacks, "config": config.to_json(),
            "environment": environment(), "inputs": input_digests(config)}


def input_digests(config: EvalConfig) -> dict[str, Any]:
    """SHA-256 of every input file and image folder the evaluation read (recare.provenance)."""
    paths = {"prompts": config.prompts, "coco_prompts": config.coco_prompts, "care_prompts": config.care_prompts,
             "cce_images": config.cce_images, "training_images": config.training_images,
             "fid_reference": config.fid_reference}
    files = {"prompts", "coco_prompts", "care_prompts"}
    return {name: input_digest(prompt_file_path(path) if name in files else path)
            for name, path in paths.items() if path is not None}


def _detector_settings(detector: DetectorArg | None) -> dict[str, Any] | None:
    if detector is None:
        return None
    from recare.attacks.asr import detector_settings

    return detector_settings(detector)


def _ratio_definition(config: EvalConfig) -> dict[str, Any]:
    n = config.normalisation
    return {
        "axes": "one defence axis (100 - ASR)/100 per attack, in the order run; then CLIP, FID, CARE when evaluated",
        "clip": f"r = (clip - {n.clip_low:.4g}) / ({n.clip_high:.4g} - {n.clip_low:.4g}), clipped to [0, 1]",
        "fid": f"r = ({n.fid_worst:.4g} - fid) / ({n.fid_worst:.4g} - {n.fid_best:.4g}), clipped to [0, 1]",
        "care": "r = CARE score as a fraction (the tables show it in percent)",
        "ratio": "RATIO = (1/N) sum_i r_i r_(i+1) = radar polygon area / area with every r_i = 1",
        "normalisation": asdict(n),
    }
