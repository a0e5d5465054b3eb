"""`recare demo`: the whole ReCARE pipeline on the synthetic world, offline, on a CPU, in minutes.

The world is the committed one (T = "dotted", C = "circle") or any world folder that `recare
synthetic build --target T --care C` wrote (`recare demo --world DIR`): T, C, the target and CARE
prompts, the initializer, STEREO's anchors and the CARE labels come from its build report
(recare.world.definition); the examples below are the committed world's.

Stages (each resumes from what an earlier, interrupted run left in the output folder):

1. world data: prompt files and real renders (the world's COCO: FID reference images);
2. target images of the original world model for "a dotted <colour> thing" (method §1), plus a
   held-out set (other seeds) for the CCE attack;
3. CARE-set from the target images with the world's CLIP (method §2);
4. ESD, STEREO and ReCARE from the one trainer (method §3, 4b); ReCARE adopts STEREO's stage 1
   (same recipe, settings and seed: recare.train's stage1_from gives the same result as rerunning it);
5. evaluation (recare.evaluate.evaluate_all): target presence under plain prompts and a CCE
   attack, scored by the world's ground-truth classifier; CLIP score and FID in the world
   CLIP's feature space; CARE score with the world CLIP and the world's 18 labels; RATIO;
6. ground truth: presence of C ("circle") in the CARE images by the ground-truth classifier,
   next to the CARE score (the check the paper made with human labels), in the report.

What is scaled down from the paper (DemoConfig holds every value; nothing else is changed):
- sampling: 20 PNDM steps instead of 50, and the partial DDIM trajectories of training have 20
  steps (stop index 1..18) instead of 50 (1..48);
- iterations: erase 60 per round (paper 200), stage 2 60 (200), textual inversion 100 steps
  (3000) at resolution 16 (the world's image size), CCE inversion 100 steps;
- learning rates of the UNet updates (ESD's and stage 1's erase, stage 2) are multiplied by
  200 / iterations, so that learning rate x iterations, the update budget, is the paper's; the
  same rule for every method and stage. (At the paper's rates, 60 iterations barely erase:
  measured for ESD, seed 0, T presence 0.98 -> 0.79; ReCARE 0.98 -> 0.98.) Textual inversion
  keeps its learning rate: its loss levels off within the 100 steps;
- CARE-set: the vocabulary is restricted to the 30 words the world's CLIP was trained on (its
  other 32,800 token rows are untrained noise, which real CLIP's are not), so top-K and top-N
  shrink with it: K = 10 (paper 50), N = 20 (100); t-SNE, k-means (7 clusters) and refinement
  keep the paper's settings;
- CARE score labels: the world's object categories, its 4 shapes. COCO's 80 labels name objects,
  never colours, textures or places; with all 18 world words as labels the world CLIP's top-1
  is mostly a colour (measured: 0.29 for original-model circle images whose ground truth is 0.83);
- guidance scales, eta, lambda, and the methods' losses are the paper's.
The initializer of textual inversion (and of CCE) is C ("circle"), the world's analogue of "person".
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from recare.errors import RecareError
from recare.io import (
    json_ready,
    read_json,
    save_image_atomic,
    write_json_atomic,
    write_text_atomic,
)
from recare.provenance import environment
from recare.world.benign import benign_scenes, world_normalisation
from recare.world.definition import World, WorldConcepts, committed_world, world_concepts
from recare.world.ground_truth import SYNTHETIC_NOTE, ground_truth, ground_truth_section, pearson
from recare.world.render import WorldSpec

logger = logging.getLogger(__name__)

DEMO_FORMAT = "recare-demo/1"
METHOD_NAMES = {"esd": "ESD", "stereo": "STEREO", "recare": "ReCARE"}
# The committed world's concepts (what its build report records). STEREO's anchors are "the target scene
# without the target" (for nudity: "a person wearing clothes", recare.train_config.DEFAULT_STEREO_ANCHORS);
# the world's analogue: things and C shapes of the other textures (recare.world.render.stereo_anchors).
DEFAULT_CONCEPTS = world_concepts(WorldSpec())
WORLD_STEREO_ANCHORS = DEFAULT_CONCEPTS.stereo_anchors


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; defaults fit about 10 minutes on a 2-core CPU (module docstring)."""

    seed: int = 0
    """Seed of training (TrainConfig.seed) and the base of every image seed of this run."""
    methods: tuple[str, ...] = ("esd", "stereo", "recare")
    """Erasers trained and evaluated, in report order."""
    sampling_steps: int = 20
    """Denoising steps of every generated image (the world model's PNDM scheduler; paper 50)."""
    target_images_per_prompt: int = 8
    """Target images per target prompt (6 prompts): the CARE-set and textual-inversion images."""
    cce_images_per_prompt: int = 4
    """Held-out target images per prompt (other seeds) that the CCE attack inverts."""
    careset_top_k: int = 10
    """K of the CARE-set over the world vocabulary (paper 50 over 32,849 words)."""
    careset_top_n: int = 20
    """N of the CARE-set (paper 100)."""
    erase_iterations: int = 60
    """Erase iterations (ESD; per stage-1 round of STEREO/ReCARE); paper 200."""
    stage2_iterations: int = 60
    """Stage-2 iterations (STEREO/ReCARE); paper 200."""
    inversion_steps: int = 100
    """Textual-inversion steps per stage-1 round; paper 3000."""
    ddim_steps: int = 20
    """Length of the training trajectories' DDIM schedule (stop index 1..ddim_steps-2); paper 50."""
    attack_images_per_prompt: int = 8
    """Plain-prompt images per target prompt in the evaluation (seeds after the target images')."""
    cce_inversion_steps: int = 100
    """Steps of the CCE attack's inversion; paper 3000."""
    cce_attack_images: int = 24
    """Images of the CCE generic prompt "a photo of a <token>"."""
    care_images_per_prompt: int = 2
    """Images per CARE prompt (24 prompts "a <colour> <C> <place>")."""
    utility_prompts: int = 96
    """Benign world captions (no dots) for CLIP score and FID; their renders are the FID reference."""
    batch_size: int = 64
    """Images per pipeline call (does not change the images)."""
    paper_iterations: int = 200
    """The paper's iterations per erase round and of stage 2: UNet learning rates are multiplied by
    paper_iterations / iterations (same update budget); equal to the iterations: the paper's rates."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise RecareError(f"demo methods must be a non-empty subset of {list(METHOD_NAMES)}, got {self.methods}")
        for name in ("sampling_steps", "target_images_per_prompt", "cce_images_per_prompt", "careset_top_k",
                     "careset_top_n", "erase_iterations", "stage2_iterations", "inversion_steps",
                     "attack_images_per_prompt", "cce_inversion_steps", "cce_attack_images",
                     "care_images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise RecareError(f"demo config: {name} must be >= 1, got {getattr(self, name)}")
        if self.paper_iterations < 1:
            raise RecareError(f"demo config: paper_iterations must be >= 1, got {self.paper_iterations}")
        if self.ddim_steps < 3:
            raise RecareError(f"demo config: ddim_steps must be >= 3, got {self.ddim_steps}")
        if self.utility_prompts < 2:
            raise RecareError(f"demo config: utility_prompts must be >= 2 (FID), got {self.utility_prompts}")

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        """A shortened demo for the end-to-end test (about 2 minutes on 2 cores)."""
        return cls(seed=seed, sampling_steps=20, target_images_per_prompt=2, cce_images_per_prompt=1,
                   careset_top_k=8, careset_top_n=12, erase_iterations=30, stage2_iterations=30,
                   inversion_steps=10, ddim_steps=10, attack_images_per_prompt=4, cce_inversion_steps=10,
                   cce_attack_images=8, care_images_per_prompt=1, utility_prompts=16)

    @classmethod
    def paper_scale(cls, seed: int = 0) -> "DemoConfig":
        """The paper's iteration counts and learning rates (200 erase iterations per round, 200 of
        stage 2, no learning-rate scaling); everything else as the default demo."""
        return cls(seed=seed, erase_iterations=200, stage2_iterations=200, paper_iterations=200)

    def seeds(self) -> dict[str, int]:
        """Image seed bases of this run (disjoint ranges, all derived from `seed`)."""
        base = 100_000 * self.seed
        return {"target": base, "cce_heldout": base + 10_000, "attack": base + 20_000, "cce_attack": base + 30_000,
                "care": base + 40_000, "utility": base + 50_000, "render": base + 60_000}


# ----------------------------------------------------------------------------- world data


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_world_data(data_dir: Path, config: DemoConfig, world: World) -> dict[str, Path]:
    """Prompt files of the run (the world's target and CARE prompts) and the FID reference renders."""
    from recare.world import render

    seeds = config.seeds()
    files = {"target_prompts": data_dir / "target_prompts.csv", "care_prompts": data_dir / "care_prompts.txt",
             "utility_prompts": data_dir / "utility_prompts.csv", "fid_reference": data_dir / "fid_reference",
             "vocabulary": data_dir / "world_vocabulary.txt"}
    targets = world.concepts.target_prompts
    rows = [{"case_number": f"{p:02d}-{i:02d}", "prompt": prompt, "evaluation_seed": seeds["attack"] + i}
            for p, prompt in enumerate(targets) for i in range(config.attack_images_per_prompt)]
    _write_csv(files["target_prompts"], rows)
    write_text_atomic(files["care_prompts"], "\n".join(world.concepts.care_prompts) + "\n")
    write_text_atomic(files["vocabulary"], "# every word of the world's caption grammar (recare.world.render)\n"
                      + "\n".join(render.vocabulary(world.spec)) + "\n")
    scenes, images, captions = benign_scenes(config.utility_prompts, seeds["render"], world.spec)
    _write_csv(files["utility_prompts"], [{"prompt": c, "evaluation_seed": seeds["utility"] + i}
                                          for i, c in enumerate(captions)])
    reference = files["fid_reference"]
    if len(list(reference.glob("*.png"))) != len(captions):
        for i, image in enumerate(render.to_pil(images)):
            save_image_atomic(image, reference / f"{i:05d}.png")
    return files


# ----------------------------------------------------------------------------- stages


@dataclass
class DemoState:
    """What the stages produce, in memory."""

    out_dir: Path
    config: DemoConfig
    world: World
    device: torch.device
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def timed(self, name: str):
        state = self

        class _Timer:
            def __enter__(self):
                logger.info("demo stage: %s", name)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                state.timings[name] = state.timings.get(name, 0.0) + time.perf_counter() - self.start
                return False

        return _Timer()


def _generation(config: DemoConfig) -> Any:
    from recare.generate.images import GenerationConfig

    return GenerationConfig(num_inference_steps=config.sampling_steps, batch_size=config.batch_size)


def generate_target_images(sd: Any, state: DemoState) -> tuple[list[Path], list[Path]]:
    """Target images (CARE-set, inversion) and held-out target images (CCE) of the original model."""
    from recare.generate.prompts import jobs_for_prompts
    from recare.pipeline import target_images_stage

    config, seeds = state.config, state.config.seeds()
    info = {"purpose": "demo target images"}
    folders = {"target": state.out_dir / "target_images", "cce_heldout": state.out_dir / "cce_heldout_images"}
    counts = {"target": config.target_images_per_prompt, "cce_heldout": config.cce_images_per_prompt}
    prompts = list(state.world.concepts.target_prompts)
    target, heldout = (target_images_stage(lambda purpose: sd, jobs_for_prompts(prompts, counts[k], seed=seeds[k]),
                                           folders[k], _generation(config), state.device, info)
                       for k in ("target", "cce_heldout"))
    return target, heldout


def build_demo_careset(clip: Any, images: Sequence[Path], vocabulary: Sequence[str], state: DemoState) -> Any:
    """The CARE-set over the world vocabulary; also records what the full 32,849-word vocabulary finds."""
    from recare.careset.config import CareSetConfig
    from recare.careset.report import format_report
    from recare.pipeline import careset_stage

    config, target, care = state.config, state.world.concepts.target, state.world.concepts.care
    careset_config = CareSetConfig(top_k=config.careset_top_k, top_n=config.careset_top_n,
                                   vocab_words=list(vocabulary))
    careset = careset_stage(lambda: clip, images, target, careset_config, state.out_dir / "careset.json",
                            cache_dir=state.out_dir / "cache", reuse=False, progress=state.progress)
    write_text_atomic(state.out_dir / "careset.txt", format_report(careset) + "\n")
    state.facts["careset"] = {
        "world_vocabulary": {"words": careset.words, "care_concept_kept": care in careset.words,
                             "candidates": [c.word for c in careset.diagnostics.candidates]},
        "full_vocabulary": _full_vocabulary_careset(clip, images, state)}
    logger.info("CARE-set (world vocabulary): %s", ", ".join(careset.words))
    return careset


def _full_vocabulary_careset(clip: Any, images: Sequence[Path], state: DemoState) -> dict[str, Any]:
    """The CARE-set with the paper's settings over CLIP's full vocabulary: a diagnostic (the world CLIP
    never saw most of those words). An untrained world (a --fast build) may rank too few distinct
    words for it; the error is then recorded in place of the result, and the demo goes on."""
    from recare.careset.build import build_careset
    from recare.careset.config import CareSetConfig
    from recare.careset.report import format_report

    target, care = state.world.concepts.target, state.world.concepts.care
    try:
        full = build_careset(clip, images, target, CareSetConfig(), cache_dir=state.out_dir / "cache",
                             progress=state.progress)
    except RecareError as err:
        logger.warning("CARE-set over the full vocabulary not built: %s", err)
        return {"error": str(err)}
    full.save(state.out_dir / "careset_full_vocabulary.json")
    write_text_atomic(state.out_dir / "careset_full_vocabulary.txt", format_report(full) + "\n")
    full_candidates = [c.word for c in full.diagnostics.candidates]
    return {"n_words": len(full.words), "care_concept_kept": care in full.words,
            "care_concept_among_candidates": care in full_candidates, "first_words": full.words[:12]}


def train_config(method: str, config: DemoConfig, concepts: WorldConcepts = DEFAULT_CONCEPTS) -> Any:
    """The TrainConfig of one eraser: paper settings with the demo's scaled iterations, for the world's
    concepts (T, initializer, STEREO anchors)."""
    from recare.train.config import TrainConfig
    from recare.train.inversion import InversionConfig

    anchors = concepts.stereo_anchors
    paper = TrainConfig(method=method, concept=concepts.target, stereo_anchors=anchors)
    erase_scale = config.paper_iterations / config.erase_iterations
    stage2_scale = config.paper_iterations / config.stage2_iterations
    return TrainConfig(method=method, concept=concepts.target, initializer=concepts.initializer,
                       erase_iterations=config.erase_iterations,
                       erase_lr=paper.effective_erase_lr * erase_scale, stage2_lr=paper.stage2_lr * stage2_scale,
                       stage2_iterations=config.stage2_iterations, ddim_steps=config.ddim_steps,
                       stop_range=(1, config.ddim_steps - 2),
                       inversion=InversionConfig(steps=config.inversion_steps, resolution=None),
                       stereo_anchors=anchors, seed=config.seed, checkpoint_every=0)


def train_methods(careset: Any, images: Sequence[Path], state: DemoState) -> dict[str, Path]:
    """Train every configured eraser (resuming finished runs); returns method -> run folder."""
    from recare.models.loading import load_sd
    from recare.pipeline import PipelineFolders, train_stage

    folders = PipelineFolders(state.out_dir / "target_images", state.out_dir / "careset.json", state.out_dir / "train")
    # ReCARE's stage 1 is STEREO's (same recipe, settings and seed): the pipeline starts it at stage 2 from STEREO's
    configs = [train_config(method, state.config, state.world.concepts) for method in state.config.methods]
    results = train_stage(lambda purpose: load_sd(state.world.sd_path(), device=state.device), configs, folders,
                          careset=careset, images=images, device=state.device, timer=state.timed, resume=True,
                          progress=state.progress)
    if any(result.interrupted for result in results.values()):
        raise KeyboardInterrupt  # the training state is saved; rerunning the demo resumes it
    return {method: folders.run(method) for method in state.config.methods}


def eval_config(files: dict[str, Path], state: DemoState, normalisation: Any, training_images: Path,
                cce_images: Path) -> Any:
    """The EvalConfig of the demo (plain + CCE, utility, CARE) over the world's files."""
    from recare.attacks.cce import CceConfig
    from recare.eval.config import EvalConfig
    from recare.metrics.care_score import CareScoreConfig
    from recare.train.inversion import InversionConfig

    config, seeds, world, concepts = state.config, state.config.seeds(), state.world, state.world.concepts
    cce = CceConfig(inversion=InversionConfig(steps=config.cce_inversion_steps, resolution=None),
                    initializer=concepts.initializer, num_images=config.cce_attack_images, seed=seeds["cce_attack"],
                    inversion_seed=config.seed)
    care = CareScoreConfig(images_per_prompt=config.care_images_per_prompt, seed=seeds["care"],
                           num_inference_steps=config.sampling_steps, batch_size=config.batch_size,
                           labels=concepts.care_labels)
    return EvalConfig(model=str(world.sd_path()), base_name="original", attacks=("plain", "cce"),
                      prompts=str(files["target_prompts"]), cce=cce, cce_images=str(cce_images),
                      training_images=str(training_images), coco_prompts=str(files["utility_prompts"]),
                      coco_limit=config.utility_prompts, fid_reference=str(files["fid_reference"]),
                      fid_method="eigh", clip_model=str(world.clip_path()), care_word=concepts.care,
                      care_prompts=str(files["care_prompts"]), care=care, generation=_generation(config),
                      normalisation=normalisation, notes=(SYNTHETIC_NOTE,))


# ----------------------------------------------------------------------------- the demo


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), device: str | torch.device = "cpu",
             progress: bool = True, world: World | None = None) -> dict[str, Any]:
    """Run the demo into out_dir (resuming an interrupted run there); returns the demo summary.

    world: a built world (recare.world.definition.load_world); default: the committed world.
    Writes demo.json (summary: world, timings, CARE-set, ground truth, correlation) and, under
    out_dir/report, the evaluation report (report.md, report.html, radar.png, grids, results.json).
    """
    from recare.eval.config import MethodSpec
    from recare.eval.runner import evaluate_all
    from recare.models.loading import load_image_text_model, load_sd
    from recare.world.detectors import WorldConceptDetector
    from recare.world.features import WorldClipFeatureExtractor
    from recare.world.render import vocabulary

    out_dir, world = Path(out_dir), committed_world() if world is None else world
    _claim_folder(out_dir, config, world)
    state = DemoState(out_dir, config, world, torch.device(device), progress)
    start = time.perf_counter()
    torch_threads = torch.get_num_threads()
    logger.info("demo world: T = %r, C = %r", world.concepts.target, world.concepts.care)
    state.facts["detector_accuracy_clean"] = world.detector_accuracy
    with state.timed("load world models"):
        clip = load_image_text_model(world.clip_path(), device=state.device)
        sd = load_sd(world.sd_path(), device=state.device)
        detector_model = world.load_detector()
        extractor = WorldClipFeatureExtractor(clip)
    with state.timed("world data"):
        files = write_world_data(out_dir / "data", config, world)
        normalisation, measured = world_normalisation(clip, extractor, max(config.utility_prompts, 64),
                                                      config.seeds()["render"] + 7, world.spec)
        state.facts["normalisation_measurements"] = measured
    with state.timed("target images"):
        target, heldout = generate_target_images(sd, state)
    with state.timed("CARE-set"):
        # word mode keeps words of >= 2 letters (recare.vocab), so the grammar's "a" is not searched
        careset = build_demo_careset(clip, target, [w for w in vocabulary(world.spec) if len(w) >= 2], state)
    del sd
    runs = train_methods(careset, target, state)
    state.facts["loss_plots"] = {METHOD_NAMES[m]: str(Path("..") / "train" / m / "losses.png") for m in runs}
    methods = [MethodSpec(METHOD_NAMES[m], str(runs[m] / "unet.safetensors")) for m in runs]
    with state.timed("evaluation"):
        cfg = eval_config(files, state, normalisation, out_dir / "target_images", out_dir / "cce_heldout_images")
        detector = WorldConceptDetector(detector_model, world.concepts.target)
        results = evaluate_all(cfg, methods, out_dir / "report", device=state.device, cache_dir=out_dir / "cache",
                               fid_extractor=extractor, detector=detector, progress=progress,
                               load_clip=lambda source: clip)
    with state.timed("ground truth and report"):
        rows = _ground_truth_report(results, detector_model, state, cfg.grid_columns)
    torch.set_num_threads(torch_threads)
    summary = {"format": DEMO_FORMAT, "note": SYNTHETIC_NOTE, "world": world.describe(), "config": asdict(config),
               "seconds": time.perf_counter() - start, "timings_s": state.timings,
               "machine": _machine(), "environment": environment(), "facts": state.facts, "ground_truth": rows,
               "ratio": {e["name"]: (e["ratio"] or {}).get("ratio") for e in results["methods"]},
               "utility": utility_of(results),
               "report": "report/report.html"}  # relative to the demo folder
    write_json_atomic(out_dir / "demo.json", summary)
    return summary


def _ground_truth_report(results: dict[str, Any], detector_model: Any, state: DemoState,
                         grid_columns: int) -> list[dict[str, Any]]:
    """Ground-truth rows and their correlation with the CARE score; writes the report with their section."""
    from recare.report.writer import write_reports

    concepts = state.world.concepts
    rows = ground_truth(results, detector_model, concepts.target, concepts.care)
    state.facts["care_score_vs_ground_truth"] = pearson([r["care_score"]["rate"] for r in rows],
                                                        [r["care_images_C"]["rate"] for r in rows])
    results["sections"] = [ground_truth_section(rows, state.facts, concepts)]
    results["radar_title"] = (f"SYNTHETIC WORLD (not SD; T = {concepts.target}, C = {concepts.care}), "
                              f"seed {state.config.seed}: RATIO radar")
    write_reports(results, state.out_dir / "report", grid_columns)
    return rows


def _claim_folder(out_dir: Path, config: DemoConfig, world: World) -> None:
    """Mark out_dir as this demo's (demo_config.json); refuse a folder of another run or other files.

    The marker holds the demo config and, for a world other than the committed one, the world's
    description (so a folder of another world's run is refused too)."""
    marker = out_dir / "demo_config.json"
    claim = asdict(config) if world.is_committed() else {**asdict(config), "world": world.describe()}
    if marker.is_file():
        previous = read_json(marker, "demo config")
        if previous != json_ready(claim):
            raise RecareError(f"{out_dir} holds a demo run with other settings or another world ({marker}); "
                              "use another --out")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise RecareError(f"{out_dir} is not empty and holds no demo run; use an empty or new folder")
    write_json_atomic(marker, claim)


def _machine() -> dict[str, Any]:
    from recare.world.build import machine_info

    return machine_info()


def utility_of(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per model of an evaluate_all result: FID (world-CLIP feature space) and mean CLIP score."""
    out = {}
    for entry in results["methods"]:
        utility = entry.get("utility", {})
        out[entry["name"]] = {"fid": utility.get("fid", {}).get("fid"),
                              "clip_score": utility.get("clip_score", {}).get("mean")}
    return out
