"""The `recare` command line: parses arguments, builds configs, calls the library.

Every subcommand is a thin wrapper: `_add_<name>` declares its arguments, `_run_<name>`
loads models (through recare.models) and calls one library function. User errors
(RecareError) are printed as one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from recare import __version__
from recare.errors import RecareError

logger = logging.getLogger("recare")

Formatter = argparse.ArgumentDefaultsHelpFormatter


def echo(text: str) -> None:
    """Write one line of command output to stdout (library code logs instead; see STYLE)."""
    print(text)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(name: str, device: str) -> str:
    """'auto' is fp16 on CUDA (the reference's generation dtype) and fp32 elsewhere."""
    if name != "auto":
        return name
    return "fp16" if device.startswith("cuda") else "fp32"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from recare.models import DEFAULT_SD_MODEL

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_SD_MODEL, help="Stable Diffusion Hub id or local diffusers folder")
    group.add_argument("--revision", default=None, help="Hub revision of --model")
    group.add_argument("--unet-weights", default=None, help="erased-UNet weights (.safetensors) loaded strictly")
    group.add_argument("--learned-embeddings", nargs="*", default=[], metavar="FILE",
                       help="textual-inversion .safetensors files whose tokens are added")
    group.add_argument("--text-encoder-weights", default=None,
                       help="replacement text encoder (file or folder, e.g. AdvUnlearn's), loaded strictly")
    group.add_argument("--device", default=default_device(), help="torch device")
    group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="weights dtype; auto = fp16 on CUDA, fp32 on CPU")


def _load_sd_from_args(args: argparse.Namespace):
    from recare.models import load_sd

    return load_sd(args.model, revision=args.revision, dtype=_resolve_dtype(args.dtype, args.device),
                   device=args.device, unet_weights=args.unet_weights, learned_embeddings=args.learned_embeddings,
                   text_encoder_weights=args.text_encoder_weights)


def _model_info(args: argparse.Namespace) -> dict:
    return {"unet_weights": args.unet_weights, "learned_embeddings": list(args.learned_embeddings),
            "text_encoder_weights": args.text_encoder_weights}


def _add_clip_args(parser: argparse.ArgumentParser) -> None:
    from recare.models import DEFAULT_CLIP_MODEL

    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP or SigLIP Hub id or local folder")
    parser.add_argument("--clip-revision", default=None, help="Hub revision of --clip-model")


def _load_clip_from_args(args: argparse.Namespace):
    from recare.models import load_image_text_model

    return load_image_text_model(args.clip_model, revision=args.clip_revision, device=args.device)


# ----------------------------------------------------------------------------- generate


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", formatter_class=Formatter,
                       help="generate target images (SPEC 1); resumes, writes manifest.json")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt, e.g. 'A photo of a nude person'")
    source.add_argument("--prompts", type=Path, help="prompt file: .txt (one per line) or .csv with a prompt column")
    p.add_argument("--num-images", type=int, default=500, help="images (per prompt with --prompts)")
    p.add_argument("--seed", type=int, default=42, help="image i gets seed SEED+i (CSV evaluation_seed wins)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT prompts of --prompts")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default="default", choices=["default", "ddim"],
                   help="the model's own scheduler (PNDM for SD v1.4) or DDIM")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from recare.generate import GenerationConfig, generate_images
    from recare.prompts import jobs_for_prompt, read_prompt_file

    config = GenerationConfig(num_inference_steps=args.steps, guidance_scale=args.guidance,
                              batch_size=args.batch_size, scheduler=args.scheduler)
    if args.prompt is not None:
        jobs = jobs_for_prompt(args.prompt, args.num_images, args.seed)
    else:
        jobs = read_prompt_file(args.prompts, args.num_images, args.seed, limit=args.limit)
    components = _load_sd_from_args(args)
    paths = generate_images(components, jobs, args.out, config, device=args.device, model_info=_model_info(args))
    logger.info("%d images in %s", len(paths), args.out)
    return 0


# ----------------------------------------------------------------------------- careset


def _add_careset(sub) -> None:
    from recare.careset import CONCEPT_TYPES, CareSetConfig
    from recare.vocab import VOCAB_MODES

    d = CareSetConfig()
    p = sub.add_parser("careset", formatter_class=Formatter, help="build the CARE-set from target images (SPEC 2)")
    p.add_argument("--images", type=Path, required=True, help="folder of target images (.jpg/.jpeg/.png)")
    p.add_argument("--reference-word", required=True, help="the target's word, e.g. 'nudity' or 'Van Gogh'")
    p.add_argument("--concept-type", default=d.concept_type, choices=CONCEPT_TYPES,
                   help="style -> retain prompts 'A painting of {w}', else 'A photo of {w}'")
    _add_clip_args(p)
    p.add_argument("--device", default=default_device(), help="torch device")
    p.add_argument("--top-k", type=int, default=d.top_k, help="tokens per image (K)")
    p.add_argument("--top-n", type=int, default=d.top_n, help="most frequent tokens kept (N)")
    p.add_argument("--clusters", type=int, default=d.n_clusters, help="k-means clusters (reference 7, paper 6)")
    p.add_argument("--drop-k", type=int, default=d.drop_k, help="clusters dropped at each residual extreme")
    p.add_argument("--perplexity", type=float, default=d.perplexity, help="t-SNE perplexity")
    p.add_argument("--alpha", type=float, default=d.alpha, help="refinement margin")
    p.add_argument("--min-cluster-size", type=int, default=d.min_cluster_size, help="smallest refined cluster")
    p.add_argument("--seed", type=int, default=d.seed, help="t-SNE / k-means random_state")
    p.add_argument("--vocab-mode", default=d.vocab_mode, choices=VOCAB_MODES,
                   help="word: whole words (default); raw: the reference's raw BPE strings")
    p.add_argument("--vocab-file", type=Path, default=None,
                   help="text file of words (one per line, # comments): search only these vocabulary words")
    p.add_argument("--cache-dtype", default=d.cache_dtype, choices=["float32", "float16"],
                   help="vocabulary features dtype (the reference rounds to float16)")
    p.add_argument("--cache-dir", type=Path, default=None, help="vocabulary cache ($RECARE_CACHE or ~/.cache/recare)")
    p.add_argument("--out", type=Path, required=True, help="CARE-set JSON to write")
    p.add_argument("--layout", default="recare", choices=["recare", "reference"],
                   help="recare: versioned JSON with diagnostics; reference: the reference code's careset.json")
    p.set_defaults(run=_run_careset)


def _run_careset(args: argparse.Namespace) -> int:
    from recare.careset import CareSetConfig, build_careset_from_folder, format_report
    from recare.io import list_images
    from recare.vocab import read_word_list

    config = CareSetConfig(top_k=args.top_k, top_n=args.top_n, n_clusters=args.clusters, drop_k=args.drop_k,
                           perplexity=args.perplexity, alpha=args.alpha, min_cluster_size=args.min_cluster_size,
                           seed=args.seed, vocab_mode=args.vocab_mode, cache_dtype=args.cache_dtype,
                           concept_type=args.concept_type,
                           vocab_words=read_word_list(args.vocab_file) if args.vocab_file else None)
    list_images(args.images)  # fail on a missing/empty folder before loading CLIP
    clip = _load_clip_from_args(args)
    careset = build_careset_from_folder(clip, args.images, args.reference_word, config, args.cache_dir)
    careset.save(args.out, layout=args.layout)
    print(format_report(careset))
    print(f"CARE-set written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- eval care


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluation")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="{care,robustness,all}")
    _add_eval_care(eval_sub)
    from recare.cli_eval import add_eval_all, add_eval_robustness

    add_eval_robustness(eval_sub)
    add_eval_all(eval_sub)


def _add_eval_care(sub) -> None:
    from recare.care_score import CareScoreConfig

    d = CareScoreConfig()
    p = sub.add_parser("care", formatter_class=Formatter,
                       help="CARE score: CLIP R-Precision@1 of the CARE word on generated images (SPEC 5)")
    _add_model_args(p)
    _add_clip_args(p)
    p.add_argument("--care-word", required=True, help="w*, e.g. person (nudity), stars (Van Gogh), freshwater (tench)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="CARE prompt file; default: the shipped prompts for --care-word")
    p.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt, help="images per prompt (seeds SEED+i)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed of every prompt")
    p.add_argument("--steps", type=int, default=d.num_inference_steps, help="denoising steps")
    p.add_argument("--guidance", type=float, default=d.guidance_scale, help="classifier-free guidance")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per pipeline call")
    p.add_argument("--label-template", default=d.label_template,
                   help="CLIP text of a label: '{}' raw (reference) or e.g. 'a photo of a {}'")
    p.add_argument("--extra-labels", nargs="*", default=[], help="labels appended to the 82 defaults")
    p.add_argument("--save-images", type=Path, default=None, help="keep the generated images here (resumable)")
    p.add_argument("--out", type=Path, required=True, help="report JSON to write")
    p.set_defaults(run=_run_eval_care)


def _run_eval_care(args: argparse.Namespace) -> int:
    from recare.care_score import CareScoreConfig, check_labels, evaluate_care_score
    from recare.io import write_json_atomic
    from recare.labels import care_prompt_file
    from recare.prompts import read_prompts

    config = CareScoreConfig(images_per_prompt=args.images_per_prompt, seed=args.seed,
                             num_inference_steps=args.steps, guidance_scale=args.guidance,
                             batch_size=args.batch_size, label_template=args.label_template,
                             extra_labels=tuple(args.extra_labels))
    check_labels(config.label_list(), args.care_word)
    prompts = read_prompts(args.prompts if args.prompts is not None else care_prompt_file(args.care_word))
    components = _load_sd_from_args(args)
    clip = _load_clip_from_args(args)
    report = evaluate_care_score(components, clip, prompts, args.care_word, config, image_dir=args.save_images,
                                 device=args.device, model_info=_model_info(args))
    write_json_atomic(args.out, report.to_json())
    print(report.format_table())
    print(f"CARE score report written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- train


# CLI flag -> TrainConfig field ("inversion.x" for InversionConfig fields); None = not given.
_TRAIN_OVERRIDES = {
    "method": "method", "concept": "concept", "train_method": "train_method", "lora_rank": "lora_rank",
    "lora_alpha": "lora_alpha", "rounds": "rounds",
    "erase_iterations": "erase_iterations", "erase_lr": "erase_lr", "initializer": "initializer",
    "inversion_steps": "inversion.steps", "inversion_resolution": "inversion.resolution",
    "inversion_templates": "inversion.templates", "stage2_iterations": "stage2_iterations",
    "stage2_lr": "stage2_lr", "retain_weight": "retain_weight", "stereo_anchors": "stereo_anchors",
    "ddim_steps": "ddim_steps", "stop_range": "stop_range", "seed": "seed",
    "mixed_precision": "mixed_precision", "checkpoint_every": "checkpoint_every",
}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Output-folder flags shared by `train` and `run`."""
    p.add_argument("--resume", action="store_true", help="continue the run saved in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of another run in the folder")
    p.add_argument("--max-steps-this-run", type=int, default=None,
                   help="stop (resumably) after this many erase/stage-2 steps")
    p.add_argument("--device", default=default_device(), help="torch device")


def _add_train(sub) -> None:
    from recare.params import TRAIN_MODES
    from recare.train_config import METHODS, MIXED_PRECISION

    p = sub.add_parser("train", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="erase a concept: ESD, STEREO or ReCARE (SPEC 3, 4b)",
                       description="Settings: TrainConfig defaults (reference values), then --config FILE.toml "
                                   "([concept], [train], [train.<method>]), then the flags given here.")
    p.add_argument("--method", choices=METHODS, default=None, help="erasure method (default: config, else recare)")
    p.add_argument("--model", default=None, help="Stable Diffusion Hub id or local diffusers folder "
                                                 "(default: [model] source of --config, else SD v1.4)")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument("--unet-weights", default=None, help="start from these UNet weights (.safetensors, strict)")
    p.add_argument("--concept", default=None, help="target word, e.g. nudity, 'Van Gogh', tench")
    p.add_argument("--careset", type=Path, default=None, help="CARE-set JSON (ReCARE)")
    p.add_argument("--images", type=Path, default=None, help="target images for textual inversion (ReCARE, STEREO)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", type=Path, default=None, help="TOML config (see recare/configs/*.toml)")
    p.add_argument("--stage1-from", type=Path, default=None,
                   help="folder of a ReCARE/STEREO run with the same stage-1 settings: reuse its stage 1 "
                        "(learned tokens, generator state) and start at stage 2; same result, less time")
    _add_train_options(p)
    g = p.add_argument_group("overrides (default: config file, else the reference value)")
    g.add_argument("--train-method", choices=TRAIN_MODES, default=None, help="UNet parameters trained (noxattn)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train a rank-r LoRA adapter on the --train-method modules instead (0: off, the reference)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; update scale alpha/r (default: r)")
    g.add_argument("--rounds", type=int, default=None, help="stage-1 rounds (2)")
    g.add_argument("--erase-iterations", type=int, default=None, help="iterations per erase round (200)")
    g.add_argument("--erase-lr", type=float, default=None, help="erase lr (ReCARE/STEREO 0.5e-5, ESD 5e-5)")
    g.add_argument("--initializer", default=None, help="initializer word of the learned tokens (person)")
    g.add_argument("--inversion-steps", type=int, default=None, help="textual-inversion steps (3000)")
    g.add_argument("--inversion-resolution", type=int, default=None, help="textual-inversion image size (512)")
    g.add_argument("--inversion-templates", choices=["object", "style"], default=None, help="prompt templates")
    g.add_argument("--stage2-iterations", type=int, default=None, help="stage-2 iterations (200)")
    g.add_argument("--stage2-lr", type=float, default=None, help="stage-2 lr (2e-5)")
    g.add_argument("--retain-weight", type=float, default=None, help="lambda of the retain loss (1)")
    g.add_argument("--stereo-anchors", nargs="+", default=None, help="STEREO anchor prompts")
    g.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps of the trajectory (50)")
    g.add_argument("--stop-range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="stop-index range (1 48)")
    g.add_argument("--seed", type=int, default=None, help="seed (42)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=None, help="auto: bf16 on CUDA")
    g.add_argument("--checkpoint-every", type=int, default=None, help="save the state every K steps (100)")
    p.set_defaults(run=_run_train)


def _train_config_from_args(args: argparse.Namespace, toml: dict | None):
    """TrainConfig: defaults < TOML [concept]/[train]/[train.<method>] < flags."""
    from recare.train_config import config_from_tables

    overrides: dict = {}
    for flag, field in _TRAIN_OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is not None:
            head, _, tail = field.partition(".")
            if tail:
                overrides.setdefault(head, {})[tail] = value
            else:
                overrides[head] = value
    return config_from_tables(toml or {}, overrides)


def _train_inputs(config, careset_path: Path | None, images: Path | None):
    """The CARE-set (ReCARE) and target images (ReCARE/STEREO) the method needs, checked."""
    from recare.careset import CareSet
    from recare.io import list_images

    careset = None
    if config.method == "recare":
        if careset_path is None:
            raise RecareError("ReCARE needs --careset (the CARE-set JSON)")
        careset = CareSet.load(careset_path, reference_word=config.concept)
    paths = []
    if config.method != "esd":
        if images is None:
            raise RecareError(f"{config.method} needs --images (target images for textual inversion)")
        paths = list_images(images)
    return careset, paths


def _train_and_report(args, config, components, careset, images, info: dict) -> int:
    from recare.train import train

    result = train(components, config, args.out, careset=careset, images=images, device=args.device,
                   resume=args.resume, overwrite=args.overwrite, stop_after=args.max_steps_this_run, info=info,
                   unet_weights=getattr(args, "unet_weights", None), stage1_from=getattr(args, "stage1_from", None))
    if not result.complete:
        print(f"stopped early; continue with --resume. State in {args.out}")
        return 0
    print(f"{config.method} training of {config.concept!r} complete: outputs in {args.out}")
    for name, seconds in result.timings.items():
        print(f"  {name:<12} {seconds:9.1f} s")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from recare.models import DEFAULT_SD_MODEL, load_sd
    from recare.train_config import read_toml

    toml = read_toml(args.config) if args.config is not None else None
    config = _train_config_from_args(args, toml)
    careset, images = _train_inputs(config, args.careset, args.images)
    model = args.model or (toml or {}).get("model", {}).get("source", DEFAULT_SD_MODEL)
    components = load_sd(model, revision=args.revision, dtype="fp32", device=args.device,
                         unet_weights=args.unet_weights)
    info = {"model": model, "careset": str(args.careset) if careset else None,
            "images": str(args.images) if images else None, "config_file": str(args.config) if args.config else None}
    return _train_and_report(args, config, components, careset, images, info)


# ----------------------------------------------------------------------------- run


def _add_run(sub) -> None:
    p = sub.add_parser("run", formatter_class=Formatter,
                       help="target images -> CARE-set -> training, from one TOML file (recare/configs/*.toml)")
    p.add_argument("config", type=Path, help="TOML config: [concept], [model], [generate], [careset], [train]")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (images/, careset.json, <method>/); default: [run] out of the config")
    p.add_argument("--method", choices=["esd", "stereo", "recare"], default=None, help="override [train] method")
    _add_train_options(p)
    p.set_defaults(run=_run_run)


def _table(toml: dict, name: str) -> dict:
    table = toml.get(name, {})
    if not isinstance(table, dict):
        raise RecareError(f"[{name}] must be a table")
    return dict(table)


def _run_generate_step(toml: dict, model: dict, folder: Path, device: str) -> list[Path]:
    from recare.generate import GenerationConfig, generate_images
    from recare.models import load_sd
    from recare.prompts import jobs_for_prompt

    settings = _table(toml, "generate")
    prompt = _table(toml, "concept").get("prompt")
    if not prompt:
        raise RecareError("[concept] prompt is needed to generate the target images")
    jobs = jobs_for_prompt(prompt, settings.pop("num_images", 500), settings.pop("seed", 42))
    try:
        config = GenerationConfig(**settings)
    except TypeError as err:
        raise RecareError(f"[generate]: {err}") from err
    components = load_sd(model["source"], revision=model.get("revision"), dtype=_resolve_dtype("auto", device),
                         device=device)
    paths = generate_images(components, jobs, folder, config, device=device)
    del components
    return paths


def _run_careset_step(toml: dict, images: Path, path: Path, device: str):
    from recare.careset import CareSet, CareSetConfig, build_careset_from_folder
    from recare.models import load_image_text_model

    concept = _table(toml, "concept")
    if path.is_file():
        logger.info("reusing the CARE-set %s", path)
        return CareSet.load(path, reference_word=concept["word"])
    settings = _table(toml, "careset")
    clip_model = settings.pop("clip_model", "openai/clip-vit-base-patch32")
    clip_revision = settings.pop("clip_revision", None)
    cache_dir = settings.pop("cache_dir", None)
    settings.setdefault("concept_type", concept.get("type", "object"))
    clip = load_image_text_model(clip_model, revision=clip_revision, device=device)
    careset = build_careset_from_folder(clip, images, concept["word"], CareSetConfig.from_dict(settings), cache_dir)
    careset.save(path)
    return careset


def _run_run(args: argparse.Namespace) -> int:
    from recare.models import load_sd
    from recare.train_config import read_toml

    toml = read_toml(args.config)
    unknown = sorted(set(toml) - {"concept", "model", "generate", "careset", "train", "run"})
    if unknown:
        raise RecareError(f"{args.config}: unknown tables {unknown}")
    if "word" not in _table(toml, "concept"):
        raise RecareError(f"{args.config}: [concept] word is missing")
    config = _train_config_from_args(args, toml)
    root = args.out or _table(toml, "run").get("out")
    if root is None:
        raise RecareError("no run folder: give --out or [run] out in the config")
    root = Path(root)
    model = {"source": "CompVis/stable-diffusion-v1-4", **_table(toml, "model")}
    images: list[Path] = []
    careset = None
    if config.method != "esd":
        images = _run_generate_step(toml, model, root / "images", args.device)
    if config.method == "recare":
        careset = _run_careset_step(toml, root / "images", root / "careset.json", args.device)
    components = load_sd(model["source"], revision=model.get("revision"), dtype="fp32", device=args.device)
    args.out = root / config.method
    info = {"model": model["source"], "config_file": str(args.config), "careset": str(root / "careset.json")
            if careset else None, "images": str(root / "images") if images else None}
    return _train_and_report(args, config, components, careset, images, info)



# ----------------------------------------------------------------------------- synthetic


def _add_synthetic(sub) -> None:
    p = sub.add_parser("synthetic", help="the synthetic world: train its CLIP, text-to-image model and detectors")
    synthetic_sub = p.add_subparsers(dest="synthetic_command", required=True, metavar="{build}")
    b = synthetic_sub.add_parser("build", formatter_class=Formatter,
                                 help="train the world's detector, CLIP and T2I model from a seed")
    b.add_argument("--out", type=Path, required=True, help="output folder (clip/, sd/, detector/, build_report.json)")
    b.add_argument("--seed", type=int, default=0, help="base seed of every training run")
    b.add_argument("--fast", action="store_true", help="a few steps of everything (smoke test; untrained models)")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    b.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    b.set_defaults(run=_run_synthetic_build)


def _run_synthetic_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from recare.world.build import BuildConfig, build_world, format_summary

    config = BuildConfig.fast(args.seed) if args.fast else BuildConfig(seed=args.seed)
    report = build_world(args.out, replace(config, threads=args.threads), overwrite=args.overwrite)
    print(format_summary(report))
    print(f"world written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", formatter_class=Formatter,
                       help="the whole method on the built-in synthetic world, offline on a CPU (recare.world.demo)")
    p.add_argument("--out", type=Path, default=Path("recare-demo"),
                   help="output folder (an interrupted run in it resumes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (out/seed-<s>); with several, summary.md has mean and 95%% intervals")
    p.add_argument("--quick", action="store_true", help="a shortened demo (the end-to-end test's sizes)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from recare.world.demo import DemoConfig, format_seed_summary, run_demo, run_demo_seeds

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    if len(args.seeds) == 1:
        from dataclasses import replace

        summary = run_demo(args.out, replace(config, seed=args.seeds[0]), device=args.device)
        echo(f"demo finished in {summary['seconds']:.0f} s (synthetic world; see the report's notes)")
        for row in summary["ground_truth"]:
            echo(f"  {row['name']:<9} T plain {100 * row['plain_T']['rate']:5.1f}%  "
                 f"T under CCE {100 * row['cce_T']['rate']:5.1f}%  "
                 f"C kept (GT) {100 * row['care_images_C']['rate']:5.1f}%  "
                 f"CARE score {100 * row['care_score']['rate']:5.1f}%")
        echo(f"report: {summary['report']}")
        return 0
    summary = run_demo_seeds(args.out, args.seeds, config, device=args.device)
    echo(format_seed_summary(summary))
    echo(f"summary: {(args.out / 'summary.md').resolve()}")
    return 0


# ----------------------------------------------------------------------------- main


COMMANDS: tuple[Callable, ...] = (_add_generate, _add_careset, _add_eval, _add_train, _add_run, _add_synthetic,
                                  _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recare", formatter_class=Formatter,
                                     description="ReCARE concept erasure for Stable Diffusion (ICLR 2026).")
    parser.add_argument("--version", action="version", version=f"recare {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.run(args)
    except RecareError as err:
        print(f"recare: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
