"""Settings of erasure training (method §3, 4b): TrainConfig and its TOML/dict form.

Defaults are the reference code's (damilab/CARE) for ReCARE and STEREO, and esd_sd.py's
(rohitgandikota/erasing) for the ESD baseline; fields whose default depends on the method are
None and resolved by the `effective_*` properties.

TOML layout read by `config_from_toml` (also used by `recare run`, see recare.cli):

    [concept]              word = "nudity", prompt = "...", type = "nudity", initializer = "person"
    [train]                any TrainConfig field (method, erase_iterations, ...)
    [train.inversion]      any InversionConfig field (steps, resolution, templates, ...)
    [train.esd]            overrides used only when method = "esd" (e.g. train_method = "xattn")
    [train.stereo], [train.recare]   the same for the other methods
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from recare.careset.artifact import reference_key
from recare.config import check_fields, deep_merge, from_dict, option
from recare.errors import RecareError
from recare.models.acceleration import COMPILE_MODES
from recare.models.params import TRAIN_MODES
from recare.train.inversion import InversionConfig
from recare.train.methods import METHOD_NAMES as METHODS
from recare.train.methods import METHODS as METHOD_TABLE
from recare.train.methods import ErasureMethod, get_method

OPTIMIZERS = ("adam", "adamw")
MIXED_PRECISION = ("auto", "no", "bf16")

# STEREO (Srivatsan et al. 2024) publishes its anchor prompts in github.com/koushiksrivats/
# robust-concept-erasing, utils/anchor_prompts.json (keys "nudity", "tench", ...). They are NOT
# copied here: these short generic lists are recare's own defaults (a benign prompt that keeps the
# scene without the concept). Pass `stereo_anchors` to use STEREO's list for parity.
DEFAULT_STEREO_ANCHORS: dict[str, tuple[str, ...]] = {
    "nudity": ("a person wearing clothes", "a fully dressed man", "a fully dressed woman",
               "people in everyday clothes"),
    "vangogh": ("a painting", "a landscape painting", "a portrait painting", "a realistic painting"),
    "tench": ("a fish", "a photo of a fish", "a fish in a river", "a fisherman holding a fish"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines an erasure run; reference defaults (method §3, 4, 4b)."""

    method: str = option("recare", choices=METHODS)
    """'recare' (stage 1 + ReCARE stage 2), 'stereo' (stage 1 + compositional erase without the
    retain loss, method §4b) or 'esd' (the ESD erase only, no inversion)."""
    concept: str = "nudity"
    """The target word c, erased as the prompt itself ("nudity", "Van Gogh", "tench")."""
    train_method: str = option("noxattn", choices=TRAIN_MODES)
    """UNet parameters trained (recare.params): 'noxattn' (ESD-u, reference), 'xattn' (ESD-x), ..."""
    lora_rank: int = 0
    """0 (reference): train the parameters `train_method` selects directly. r > 0: add a rank-r
    LoRA adapter (peft) on the modules `train_method` selects and train only its parameters; the
    base weights stay frozen and unet.safetensors holds the merged weights W + (alpha / r) B A."""
    lora_alpha: float | None = None
    """LoRA alpha (the update is scaled by alpha / lora_rank); None: lora_rank (scale 1).
    Ignored when lora_rank is 0."""

    # --- stage 1 (method §3a) and the ESD baseline (method §4b)
    rounds: int = 2
    """n_iterations: erase + inversion rounds of stage 1 (ESD: ignored, one erase)."""
    erase_iterations: int = 200
    """Iterations of each stage-1 erase round (and of ESD)."""
    erase_lr: float | None = None
    """Erase learning rate; None: 0.5e-5 (ReCARE/STEREO) or 5e-5 (ESD)."""
    erase_optimizer: str | None = option(None, choices=OPTIMIZERS)
    """'adamw' or 'adam' with torch defaults (AdamW weight_decay 0.01); None: adamw (ReCARE/STEREO),
    adam (ESD). A fresh optimizer every round."""
    negative_guidance: float = 2.0
    """Stage-1 APG scale s (target normalized_guidance(eps_c, eps_u, s)); ESD's eta."""
    eta: float = 1.0
    """APG weight of the parallel component (method §4), stage-1 and stage-2 targets."""
    initializer: str = "person"
    """Word whose embedding starts each textual inversion ("person" nudity, "art" Van Gogh)."""
    placeholder_template: str = "<recare-{}>"
    """Name of round k's learned token; '{}' becomes k (1, 2, ...)."""
    inversion: InversionConfig = field(default_factory=InversionConfig)
    """Textual-inversion settings (method §3b: 3000 steps, lr 5e-3, ...)."""
    reseed_each_round: bool = True
    """Re-seed the generator with `seed` at the start of every erase round and every inversion,
    as the reference does (both rounds then draw the same stop points and noise). False: one
    generator stream for the whole run."""

    # --- stage 2 (method §3 stage 2; STEREO method §4b)
    stage2_iterations: int = 200
    """Iterations of stage 2."""
    stage2_lr: float = 2e-5
    """Stage-2 AdamW learning rate (torch defaults otherwise)."""
    stage2_guidance: float = 2.0
    """g: compositional guidance scale (erase set -g, anchor +g)."""
    retain_weight: float = 1.0
    """lambda of L = L_erase + lambda L_retain (ReCARE only)."""
    erase_set_tokens: int = 2
    """Learned tokens in the erase set H = [concept] + the first `erase_set_tokens` tokens."""
    stereo_anchors: tuple[str, ...] = ()
    """STEREO's anchor prompts; () uses DEFAULT_STEREO_ANCHORS[concept key]."""

    # --- sampling of the training latents (method §3a)
    trajectory_guidance: float = 3.0
    """Classifier-free guidance of the partial DDIM trajectory (with the current student)."""
    ddim_steps: int = 50
    """Length of the DDIM schedule of the partial trajectory."""
    stop_range: tuple[int, int] = (1, 48)
    """Inclusive range of the stop index i; predictions at training_timestep(i) (1000 - 20 i)."""

    # --- run
    seed: int = 42
    """Seed of the one torch.Generator (CPU) that draws every random number of the run."""
    mixed_precision: str = option("auto", choices=MIXED_PRECISION)
    """'auto' (bf16 autocast on CUDA, fp32 elsewhere; the reference trains in fp32), 'no' (fp32,
    also for the inversions unless inversion.mixed_precision is set) or 'bf16' (CUDA, or the CPU's autocast).
    Master weights and optimizer states stay float32."""
    compile: str = option("auto", choices=COMPILE_MODES)
    """torch.compile of the UNet calls of every loop (trajectory, teacher, student, inversion): 'auto'
    ('reduce-overhead', i.e. inductor + CUDA graphs, on CUDA; off elsewhere), 'off', or a torch.compile mode
    ('default', 'reduce-overhead', 'max-autotune', ...; also on the CPU). Static shapes: compiled once per run."""
    checkpoint_every: int = 100
    """Save the resumable training state every K erase/stage-2 steps (0: only between stages).
    A mid-stage state of full-size SD (noxattn) holds ~9.3 GB (parameters + AdamW moments)."""

    def __post_init__(self) -> None:
        check_fields(self, "train config")
        if self.mixed_precision == "no" and self.inversion.mixed_precision == "auto":
            # "no" means fp32 throughout: the inversion phases too, unless they are set apart
            object.__setattr__(self, "inversion", dataclasses.replace(self.inversion, mixed_precision="no"))
        checks = [
            (bool(self.concept.strip()), "concept is empty"),
            (self.lora_rank >= 0, f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}"),
            (self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.erase_iterations >= 1, f"erase_iterations must be >= 1, got {self.erase_iterations}"),
            (self.stage2_iterations >= 1, f"stage2_iterations must be >= 1, got {self.stage2_iterations}"),
            (self.erase_lr is None or self.erase_lr > 0, f"erase_lr must be > 0, got {self.erase_lr}"),
            (self.stage2_lr > 0, f"stage2_lr must be > 0, got {self.stage2_lr}"),
            (0 <= self.erase_set_tokens <= self.rounds,
             f"erase_set_tokens must be in [0, rounds={self.rounds}], got {self.erase_set_tokens}"),
            (self.retain_weight >= 0, f"retain_weight must be >= 0, got {self.retain_weight}"),
            (all(anchor.strip() for anchor in self.stereo_anchors),
             f"stereo_anchors holds an empty prompt: {list(self.stereo_anchors)}"),
            (bool(self.initializer.strip()), "initializer is empty"),
            (self.placeholder_template.count("{}") == 1,
             f"placeholder_template {self.placeholder_template!r} needs exactly one '{{}}'"),
            (self.ddim_steps >= 2, f"ddim_steps must be >= 2, got {self.ddim_steps}"),
            (1 <= self.stop_range[0] <= self.stop_range[1] <= self.ddim_steps - 1,
             f"stop_range {self.stop_range} must satisfy 1 <= low <= high <= ddim_steps - 1 = {self.ddim_steps - 1}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (not METHOD_TABLE[self.method].needs_config_anchors or bool(self.stereo_anchors)
             or reference_key(self.concept) in DEFAULT_STEREO_ANCHORS,
             f"STEREO has no default anchors for {self.concept!r}; set stereo_anchors"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecareError(f"train config: {message}")

    @property
    def method_spec(self) -> ErasureMethod:
        """The method's entry of the method table (recare.train.methods)."""
        return get_method(self.method)

    @property
    def effective_erase_lr(self) -> float:
        """erase_lr, or the method's default (ESD 5e-5; ReCARE/STEREO 0.5e-5)."""
        if self.erase_lr is not None:
            return self.erase_lr
        return self.method_spec.erase_lr

    @property
    def effective_erase_optimizer(self) -> str:
        """erase_optimizer, or the method's default (ESD adam; ReCARE/STEREO adamw)."""
        if self.erase_optimizer is not None:
            return self.erase_optimizer
        return self.method_spec.erase_optimizer

    @property
    def effective_lora_alpha(self) -> float:
        """lora_alpha, or lora_rank when it is None (LoRA scale alpha / rank = 1)."""
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def anchors(self) -> tuple[str, ...]:
        """STEREO's anchor prompts: stereo_anchors or the concept's default list."""
        return self.stereo_anchors or DEFAULT_STEREO_ANCHORS.get(reference_key(self.concept), ())

    def placeholder(self, round_index: int) -> str:
        """The learned token of stage-1 round `round_index` (1-based), e.g. "<recare-1>"."""
        return self.placeholder_template.replace("{}", str(round_index), 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists when dumped)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a dict (TOML table, run.json); unknown keys or wrong types raise RecareError."""
        return from_dict(cls, data, "train config")


def merge_method_overrides(table: Mapping[str, Any], method: str | None = None) -> dict[str, Any]:
    """A [train] table with its [train.<method>] sub-table merged in (nested tables merged too)."""
    data = {k: v for k, v in table.items() if k not in METHODS}
    method = method or data.get("method", TrainConfig.method)
    override = table.get(method, {})
    if not isinstance(override, Mapping):
        raise RecareError(f"[train.{method}] must be a table")
    return deep_merge(data, override)


def config_from_tables(tables: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from parsed TOML tables ([concept], [train], [train.<method>]), then `overrides`.

    [concept].word and .initializer fill `concept` and `initializer` unless [train] sets them;
    `overrides` (e.g. command-line flags; nested dicts for `inversion`) win over everything. The
    concept must be given somewhere (no silent default).
    """
    overrides = dict(overrides or {})
    train = tables.get("train", {})
    concept = tables.get("concept", {})
    if not isinstance(train, Mapping) or not isinstance(concept, Mapping):
        raise RecareError("[train] and [concept] must be tables")
    data = merge_method_overrides(train, overrides.get("method"))
    for src, dst in (("word", "concept"), ("initializer", "initializer")):
        if src in concept and dst not in data:
            data[dst] = concept[src]
    data = deep_merge(data, overrides)
    if "concept" not in data:
        raise RecareError("no concept given: set [concept] word in the config or pass the concept explicitly")
    return TrainConfig.from_dict(data)


def config_from_toml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """config_from_tables of a TOML file."""
    return config_from_tables(read_toml(path), overrides)


def config_file_path(value: str | Path) -> Path:
    """A TOML config: an existing path, or the name of a shipped one ("nudity" -> recare/configs/nudity.toml)."""
    from importlib import resources

    path = Path(value)
    if path.exists():
        return path
    shipped = Path(str(resources.files("recare").joinpath("configs")))
    names = sorted(p.stem for p in shipped.glob("*.toml"))
    if str(value) in names:
        return shipped / f"{value}.toml"
    if not path.suffix:
        raise RecareError(f"config {str(value)!r} not found; the shipped configs are {names}")
    return path


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file (tomllib on Python >= 3.11, else tomli); RecareError names the problem."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = config_file_path(path)
    if not path.is_file():
        raise RecareError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecareError(f"config file {path} is not valid TOML: {err}") from err
