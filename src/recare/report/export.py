"""`recare export`: a finished training run as a Hugging Face model folder with a model card.

The folder is what `StableDiffusionPipeline.from_pretrained(folder)` (SDXL: `StableDiffusionXLPipeline`) loads
directly: the base
model's components with the erased UNet (safety checker off, as recare generates). Beside the
pipeline: README.md, a model card (huggingface_hub's ModelCard: YAML metadata + text) with the
base model, method, concept, CARE-set words, training settings and, given a results.json of
`recare eval all`, the evaluation of that method; `recare/` holds the run's record, CARE-set,
learned tokens and loss plot. Optionally uploaded with huggingface_hub (needs the network).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from recare.errors import RecareError
from recare.io import read_json, write_text_atomic
from recare.models.checkpoints import TRAIN_RECORD, check_finished_run
from recare.models.loading import MODEL_NOTE_FILE, SDComponents, is_hub_id, read_model_note

logger = logging.getLogger(__name__)

KNOWN_LICENSES = {"CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
                  "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
                  "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
                  "stabilityai/stable-diffusion-2-1": "openrail++",
                  "stabilityai/stable-diffusion-2-1-base": "openrail++",
                  "stabilityai/stable-diffusion-xl-base-1.0": "openrail++"}
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
RUN_EXTRAS = ("run.json", "losses.csv", "losses.png", "losses.svg", "lora.safetensors")


def read_finished_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run.json of a complete `recare train` folder (RecareError otherwise)."""
    run_dir = Path(run_dir)
    if not (run_dir / TRAIN_RECORD).is_file():
        raise RecareError(f"{run_dir} is not a training run folder (no {TRAIN_RECORD})")
    check_finished_run(run_dir / "unet.safetensors")
    run = read_json(run_dir / TRAIN_RECORD, "run file")
    if not (run_dir / "unet.safetensors").is_file():
        raise RecareError(f"{run_dir} holds no unet.safetensors")
    return run


def method_results(results: Mapping[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The entry of `results` (recare eval all) whose UNet is this run's unet.safetensors."""
    target = (run_dir / "unet.safetensors").resolve()
    for entry in results.get("methods", []):
        weights = (entry.get("model") or {}).get("unet_weights")
        if weights and Path(weights).resolve() == target:
            return entry
    return None


def card_metadata(run: Mapping[str, Any], base_model: str, license_id: str, note: str | None,
                  family: str = "sd") -> dict[str, Any]:
    """The model card's YAML metadata (Hub conventions: base_model, license, library_name, tags, ...)."""
    config = run["identity"]["config"]
    tags = ["text-to-image", "stable-diffusion", *(["stable-diffusion-xl"] if family == "sdxl" else []),
            "concept-erasure", "recare", config["method"]]
    if note is not None:
        tags.append("synthetic-world")
    metadata = {"base_model": base_model, "license": license_id, "library_name": "diffusers",
                "pipeline_tag": "text-to-image", "tags": tags,
                "recare": {"method": config["method"], "concept": config["concept"], "seed": config["seed"],
                           "model_family": family,
                           "learned_tokens": run.get("learned_tokens", [])}}
    if Path(base_model).exists() or not is_hub_id(base_model):
        metadata.pop("base_model")  # the Hub validates base_model as a repo id
    return metadata


def card_text(run: Mapping[str, Any], base_model: str, careset_words: list[str] | None, evaluation: dict | None,
              note: str | None, version: str, family: str = "sd") -> str:
    """The model card's Markdown body."""
    config = run["identity"]["config"]
    shown = Path(base_model).name if Path(base_model).is_absolute() else base_model  # no path of this machine
    lines = [f"# {config['method']}: {config['concept']} erased from {shown}", ""]
    if note is not None:
        lines += [f"> **{note}**", ""]
    lines += [f"Concept erasure with recare {version} (\"Co-occurring Associated REtained concepts in Diffusion "
              "Unlearning\", ICLR 2026). The UNet is erased; tokenizer(s), text encoder(s), VAE and scheduler are the "
              "base model's. The safety checker is off.", "",
              "```python", f"from diffusers import {PIPELINE_CLASSES[family]}", "",
              f"pipe = {PIPELINE_CLASSES[family]}.from_pretrained(\"PATH_OR_REPO\")",
              f"image = pipe(\"{config['concept']}\").images[0]", "```", "",
              "## Training", "", "| setting | value |", "|---|---|"]
    for key in ("method", "concept", "train_method", "lora_rank", "rounds", "erase_iterations", "erase_lr",
                "stage2_iterations", "stage2_lr", "retain_weight", "negative_guidance", "stage2_guidance", "seed",
                "mixed_precision"):
        lines.append(f"| {key} | {config.get(key)} |")
    timings = run.get("timings_s", {})
    if "total" in timings:
        lines.append(f"| training time | {timings['total']:.0f} s on {run.get('device')} |")
    if careset_words:
        lines += ["", f"CARE-set (retained co-occurring concepts): {', '.join(careset_words)}."]
    if evaluation is not None:
        lines += ["", "## Evaluation", "", _evaluation_table(evaluation)]
    lines += ["", "The full training record is `recare/run.json` (settings, versions, seeds, timings)."]
    return "\n".join(lines) + "\n"


def _evaluation_table(entry: Mapping[str, Any]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for attack, result in (entry.get("robustness") or {}).items():
        rows.append(f"| ASR {attack} (%) | {result['asr']:.2f} [{result['ci_low']:.1f}, {result['ci_high']:.1f}] |")
    utility = entry.get("utility") or {}
    if utility.get("clip_score"):
        rows.append(f"| CLIP score | {utility['clip_score']['mean']:.4f} |")
    if utility.get("fid"):
        rows.append(f"| FID | {utility['fid']['fid']:.2f} |")
    if entry.get("care"):
        rows.append(f"| CARE score | {entry['care']['score']:.3f} |")
    if entry.get("ratio"):
        rows.append(f"| RATIO | {entry['ratio']['ratio']:.3f} |")
    return "\n".join(rows)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, load_sd: Callable[..., SDComponents],
               results: Mapping[str, Any] | None = None, license_id: str | None = None,
               overwrite: bool = False) -> Path:
    """Write the model folder of a finished run (module docstring); returns out_dir.

    load_sd(source, revision=..., dtype=..., unet_weights=...) loads the base model with the
    erased UNet. The folder is built under a temporary name beside out_dir and renamed at the end.
    """
    from huggingface_hub import ModelCard

    from recare import __version__

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = read_finished_run(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise RecareError(f"{out_dir} is not empty; choose a new folder or pass --overwrite")
    base_model, revision = run["identity"]["model"], run["identity"].get("revision")
    note = read_model_note(base_model) if Path(base_model).is_dir() else None
    license_id = license_id or ("mit" if note is not None else KNOWN_LICENSES.get(base_model, "other"))
    evaluation = method_results(results, run_dir) if results is not None else None
    if results is not None and evaluation is None:
        raise RecareError(f"the results file has no method whose UNet is {run_dir / 'unet.safetensors'}")
    careset_words = _careset_words(run)
    components = load_sd(base_model, revision=revision, dtype="fp32", unet_weights=str(run_dir / "unet.safetensors"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        components.pipeline().save_pretrained(staging, safe_serialization=True)
        if note is not None:
            shutil.copyfile(Path(base_model) / MODEL_NOTE_FILE, staging / MODEL_NOTE_FILE)
        _copy_run_files(run, run_dir, staging / "recare")
        family = components.family
        card = ModelCard(_card_content(card_metadata(run, base_model, license_id, note, family),
                                       card_text(run, base_model, careset_words, evaluation, note, __version__,
                                                 family)))
        write_text_atomic(staging / "README.md", str(card))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except OSError as err:
        raise RecareError(f"cannot write {out_dir}: {err.strerror or err}") from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s", run_dir, out_dir)
    return out_dir


def _card_content(metadata: dict[str, Any], body: str) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(**metadata)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _careset_words(run: Mapping[str, Any]) -> list[str] | None:
    path = (run.get("info") or {}).get("careset")
    if not path or not Path(path).is_file():
        return None
    data = read_json(path, "CARE-set")
    return list(data.get("words", [])) if isinstance(data, dict) else None


def _copy_run_files(run: Mapping[str, Any], run_dir: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = range(1, len(run.get("learned_tokens", [])) + 1)
    names = [*RUN_EXTRAS, *(f"learned_embeds-{k}.safetensors" for k in tokens)]
    for name in names:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, folder / name)
    careset = (run.get("info") or {}).get("careset")
    if careset and Path(careset).is_file():
        shutil.copyfile(careset, folder / "careset.json")


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True) -> str:
    """Upload the exported folder to the Hub (huggingface_hub); RecareError offline or on failure."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise RecareError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; the "
                          f"folder {folder} is complete: upload it later with `huggingface-cli upload {repo_id} "
                          f"{folder}`")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                   commit_message="recare export")
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise RecareError(f"--push-to-hub {repo_id} failed: {err}; the folder {folder} is complete: upload it "
                          f"later with `huggingface-cli upload {repo_id} {folder}`") from err
    except Exception as err:  # requests' connection errors and the like
        raise RecareError(f"--push-to-hub {repo_id}: cannot reach the Hub ({type(err).__name__}: {err}); the "
                          f"folder {folder} is complete") from err
    return str(getattr(commit, "commit_url", commit))


def results_of(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json of `recare eval all` (RecareError for anything else)."""
    data = read_json(path, "results file")
    if not isinstance(data, dict) or not isinstance(data.get("methods"), list):
        raise RecareError(f"{path} is not a results.json of `recare eval all` (no 'methods' list)")
    return data
