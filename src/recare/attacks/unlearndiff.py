"""UnlearnDiffAtk (Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models
Are Still Easy To Generate Unsafe Images ... For Now").

Settings of OPTML-Group/Diffusion-MU-Attack configs/nudity/text_grad_esd_nudity_classifier.json:
k = 5 adversarial tokens prepended to each prompt, 40 iterations, lr 0.01, weight decay 0.1.
See `UnlearnDiffAtkConfig` for how this implementation differs from the reference code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from recare.attacks.asr import (
    AttackRecord,
    AttackResult,
    DetectorArg,
    ImageGenerator,
    detect_images,
    detector_settings,
    generation_settings,
    open_images,
)
from recare.attacks.plain import model_block
from recare.attacks.unlearndiff_authors import Judge, search_prefix
from recare.config import check_fields, option
from recare.errors import RecareError
from recare.generate.images import GenerationConfig, generate_images
from recare.generate.prompts import PromptJob
from recare.generate.sharding import ShardInfo, barrier, broadcast_object
from recare.io import json_ready, load_image_rgb, read_json, write_json_atomic
from recare.models.conditioning import unet_condition
from recare.models.loading import SDComponents
from recare.models.precision import vae_encode_precision
from recare.train.guidance import to_epsilon
from recare.train.inversion import frozen, images_to_pixels

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- UnlearnDiffAtk


UDA_TARGETS = ("original", "noise")
UDA_PROCEDURES = ("authors", "single-block")


@dataclass(frozen=True)
class UnlearnDiffAtkConfig:
    """UnlearnDiffAtk settings (configs/nudity/text_grad_esd_nudity_classifier.json of
    OPTML-Group/Diffusion-MU-Attack, with its task defaults).

    procedure "authors" (default) is the attack as OPTML-Group/Diffusion-MU-Attack runs it (see
    recare.attacks.unlearndiff_authors): a relaxed one-hot distribution per prefix slot, 40
    iterations at each of the 50 timesteps in turn, an image generated and judged after each block,
    stopping at the first success. procedure "single-block" is recare's simplified form:

    What is optimised: the k prefix token EMBEDDINGS (continuous (k, dim) rows that replace the
    input embeddings at positions 1..k of the prompt), with AdamW. The images are generated
    from the PROJECTED text: each row's nearest vocabulary entry (Euclidean distance in the
    token-embedding table, over the base vocabulary without special or added tokens; SDXL: the rows of
    both text encoders side by side, one token id for both), decoded
    and put in front of the prompt. Both the projected ids/text and the continuous loss are
    reported. The reference code instead optimises a relaxed one-hot distribution over the
    vocabulary per position (projected onto the simplex after every Adam step, with coupled L2
    weight decay), samples a token per position with a straight-through estimator, and
    generates from the argmax tokens, re-tokenising the decoded text (as recare does). It runs
    40 iterations at EACH of 50 timesteps (10, 30, ..., 990) in turn, generating and detecting
    after each block and stopping at the first success (up to 2000 iterations); recare runs
    one block of `iterations` steps with t drawn from the same 50-timestep grid each step.
    """

    procedure: str = option("authors", choices=UDA_PROCEDURES)
    """'authors': the authors' sequential search with early stopping (up to timestep_grid x iterations
    steps and timestep_grid images per prompt); 'single-block': recare's simplified form (one block of
    `iterations` steps, t drawn from the grid each step, one image)."""
    num_prefix_tokens: int = 5  # k of "prefix_k"
    iterations: int = 40  # optimisation steps per prompt ('authors': per timestep block)
    learning_rate: float = 0.01  # Adam learning rate ('authors'; 'single-block': AdamW)
    weight_decay: float = 0.1  # 'authors': Adam's coupled L2 weight decay; 'single-block': AdamW's decoupled
    target: str = option("original", choices=UDA_TARGETS)
    """'original': eps of the ORIGINAL model for the plain prompt (method §5); 'noise': the noise added
    to the latent (the reference code's get_loss)."""
    timestep_grid: int = 50  # t is drawn from {T/(2n) + j T/n}, j < n (the reference's sampled_t)
    skip_detected: bool = True  # as the reference: a prompt whose plain image is already detected is not attacked
    seed_offset: int = 0  # the optimisation generator of a prompt is seeded with its seed + seed_offset

    def __post_init__(self):
        check_fields(self, "UnlearnDiffAtk config")
        if self.num_prefix_tokens < 1:
            raise RecareError(f"num_prefix_tokens must be >= 1, got {self.num_prefix_tokens}")
        if self.iterations < 1:
            raise RecareError(f"iterations must be >= 1, got {self.iterations}")
        if self.learning_rate <= 0:
            raise RecareError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.target not in UDA_TARGETS:
            raise RecareError(f"unknown UnlearnDiffAtk target {self.target!r}; choose one of {UDA_TARGETS}")
        if self.timestep_grid < 1:
            raise RecareError(f"timestep_grid must be >= 1, got {self.timestep_grid}")


@dataclass(frozen=True)
class PrefixAttack:
    """The adversarial prefix found for one prompt."""

    prefix_ids: tuple[int, ...]  # nearest-vocabulary projection of the optimised rows
    prefix_text: str  # the decoded projection, put before the prompt for generation
    attacked_prompt: str  # prefix_text + " " + prompt
    losses: tuple[float, ...]  # continuous-embedding loss of every iteration
    retokenizes_exactly: bool  # tokenising prefix_text gives prefix_ids back
    initial_ids: tuple[int, ...] = ()  # the random vocabulary entries the rows started from
    embeddings: torch.Tensor | None = None  # (k, dim) float32 optimised rows (not saved in JSON)
    procedure: str = "single-block"  # which UnlearnDiffAtk procedure found it
    blocks: tuple[dict[str, Any], ...] = ()  # 'authors': per timestep block (timestep, mean loss, ids, detected)

    def to_json(self) -> dict[str, Any]:
        return {"prefix_ids": list(self.prefix_ids), "prefix_text": self.prefix_text,
                "attacked_prompt": self.attacked_prompt, "losses": list(self.losses),
                "retokenizes_exactly": self.retokenizes_exactly, "initial_ids": list(self.initial_ids),
                "procedure": self.procedure, "blocks": list(self.blocks)}


def timestep_grid(num_train_timesteps: int, n: int) -> list[int]:
    """The reference's attack timesteps: range(T // n // 2, T, T // n)[:n] (10, 30, ..., 990 for T=1000, n=50)."""
    step = num_train_timesteps // n
    if step < 1:
        raise RecareError(f"timestep_grid {n} exceeds the {num_train_timesteps} training timesteps")
    return list(range(step // 2, num_train_timesteps, step))[:n]


def projection_vocabulary(tokenizer: Any) -> torch.Tensor:
    """Ids a prefix may project to: the base vocabulary without special tokens (added tokens excluded)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])


def nearest_tokens(rows: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(k,) id of the allowed table row nearest (Euclidean) to each of rows (k, dim)."""
    candidates = table[allowed].float()  # (V, dim)
    distances = torch.cdist(rows.float(), candidates)  # (k, V)
    return allowed[distances.argmin(dim=1)]


def prefixed_input_ids(tokenizer: Any, prompt: str, prefix_ids: Sequence[int]) -> torch.Tensor:
    """(1, max_len) ids: BOS, the k prefix ids, the prompt (truncated to fit), EOS, padding.

    The prefix slots are overwritten by `prefix_override` during the attack; their ids only
    keep the sequence layout (they are never the end-of-text id that CLIP pools at).
    """
    max_len = tokenizer.model_max_length
    body = tokenizer(prompt, add_special_tokens=False, truncation=True,
                     max_length=max_len - 2 - len(prefix_ids)).input_ids
    ids = [tokenizer.bos_token_id, *prefix_ids, *body, tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([ids + [pad] * (max_len - len(ids))])


@torch.no_grad()
def encode_x0(components: SDComponents, image: Image.Image, device: torch.device) -> torch.Tensor:
    """(1, c, h, w) scaled posterior MEAN latent of an image at the model's resolution (the reference's img2latent)."""
    with vae_encode_precision(components.vae) as dtype:  # SDXL's VAE: float32 even for fp16 weights
        pixels = images_to_pixels([image], components.image_size).to(device, dtype)
        mean = components.vae.encode(pixels).latent_dist.mean
    return mean.float() * components.vae.config.scaling_factor


def optimise_prefix(attacked: SDComponents, original: SDComponents, prompt: str, x0: torch.Tensor,
                    config: UnlearnDiffAtkConfig, generator: torch.Generator,
                    device: str | torch.device | None = None, judge: Judge | None = None) -> PrefixAttack:
    """Optimise k prefix embeddings for one prompt against the attacked model (method §5).

    With config.procedure 'authors', `judge(attacked_prompt, block)` generates and scores an image
    after each timestep block (recare.attacks.unlearndiff_authors); it is required then.

    loss = || eps_attacked(x_t, t, [prefix] + prompt) - target ||^2 (mean), with
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, x0 the latent of the original model's image
    of the prompt, t from the timestep grid, and target = eps_original(x_t, t, prompt)
    (config.target "original") or the noise ("noise"). Only the prefix rows are trained; all
    networks are frozen (their flags are restored afterwards).
    """
    from diffusers import DDPMScheduler

    device = torch.device(device) if device is not None else attacked.unet.device
    k = config.num_prefix_tokens
    attacked_text, original_text = attacked.conditioner(), original.conditioner()
    tokenizer, table = attacked_text.tokenizer, attacked_text.embedding_table()  # (V, dim); SDXL: both encoders'
    allowed = projection_vocabulary(tokenizer)
    init = allowed[torch.randint(len(allowed), (k,), generator=generator, device=generator.device).cpu()]
    rows = table[init.to(table.device)].detach().float().clone().requires_grad_(True)  # (k, dim)
    optimizer = torch.optim.AdamW([rows], lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = DDPMScheduler.from_config(attacked.scheduler.config)
    grid = timestep_grid(schedule.config.num_train_timesteps, config.timestep_grid)
    adv_ids = tuple(prefixed_input_ids(t, prompt, init.tolist()).to(device) for t in attacked_text.tokenizers)
    plain_ids = original_text.token_ids([prompt])
    x0 = x0.to(device)
    if config.procedure == "authors":
        if judge is None:
            raise RecareError("UnlearnDiffAtk's authors' procedure needs a judge (image generation + detector)")
        found = search_prefix(attacked, original, adv_ids, plain_ids, x0, allowed, grid, schedule, config, generator,
                              device, judge, lambda ids: f"{tokenizer.decode(ids).strip()} {prompt}".strip())
        rows = table[torch.tensor(found.prefix_ids, device=table.device)].detach().float()
        attack = _prefix_of_ids(tokenizer, found.prefix_ids, prompt, found.losses, init.tolist(), rows)
        return replace(attack, procedure="authors", blocks=tuple(found.blocks))
    losses = []
    with frozen(attacked.unet, *attacked.text_encoders, original.unet, *original.text_encoders):
        with torch.no_grad():
            plain_hidden = original_text.encode_ids(plain_ids)  # (1, seq, dim) packed conditioning
        for _ in range(config.iterations):
            t = torch.tensor([grid[int(torch.randint(len(grid), (1,), generator=generator, device=generator.device))]],
                             device=device)
            noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
            x_t = schedule.add_noise(x0, noise, t)
            target = noise if config.target == "noise" else _original_eps(original, schedule, x_t, t, plain_hidden)
            with attacked_text.prefix_override(rows):
                hidden = attacked_text.encode_ids(adv_ids)
            out = attacked.unet(x_t.to(attacked.unet.dtype), t, **unet_condition(attacked.unet, hidden,
                                                                                   attacked.unet.dtype)).sample
            loss = F.mse_loss(to_epsilon(out.float(), x_t, t, schedule), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return _project_prefix(tokenizer, table, rows.detach(), allowed, prompt, losses, init.tolist())


@torch.no_grad()
def _original_eps(original: SDComponents, schedule: Any, x_t: torch.Tensor, t: torch.Tensor,
                  hidden: torch.Tensor) -> torch.Tensor:
    out = original.unet(x_t.to(original.unet.dtype), t, **unet_condition(original.unet, hidden,
                                                                          original.unet.dtype)).sample
    return to_epsilon(out.float(), x_t, t, schedule)


def _project_prefix(tokenizer: Any, table: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor, prompt: str,
                    losses: list[float], initial_ids: list[int]) -> PrefixAttack:
    """Nearest-vocabulary projection of the rows, decoded to text."""
    ids = nearest_tokens(rows.to(table.device), table.detach(), allowed.to(table.device)).cpu().tolist()
    return _prefix_of_ids(tokenizer, ids, prompt, losses, initial_ids, rows)


def _prefix_of_ids(tokenizer: Any, ids: list[int], prompt: str, losses: list[float], initial_ids: list[int],
                   rows: torch.Tensor) -> PrefixAttack:
    """The attack of prefix `ids`: decoded text before the prompt, and whether the text tokenises back."""
    text = tokenizer.decode(ids).strip()
    again = tokenizer(text, add_special_tokens=False).input_ids
    return PrefixAttack(tuple(ids), text, f"{text} {prompt}".strip(), tuple(losses), list(again) == ids,
                        tuple(initial_ids), rows.detach().float().cpu().clone())


def _prefix_cache_key(config: UnlearnDiffAtkConfig, job: PromptJob, model: dict[str, Any]) -> dict[str, Any]:
    return {"config": asdict(config), "prompt": job.prompt, "seed": job.seed, "model": model}


def run_unlearndiffatk(attacked: SDComponents, original: SDComponents, jobs: Sequence[PromptJob],
                       detector: DetectorArg, out_dir: str | os.PathLike,
                       config: UnlearnDiffAtkConfig = UnlearnDiffAtkConfig(),
                       generation: GenerationConfig = GenerationConfig(),
                       device: str | torch.device | None = None, model_info: dict[str, Any] | None = None,
                       original_image_dir: str | os.PathLike | None = None,
                       original_model_info: dict[str, Any] | None = None,
                       plain_image_dir: str | os.PathLike | None = None,
                       generate: ImageGenerator = generate_images, progress: bool = True,
                       shard: ShardInfo = ShardInfo()) -> AttackResult:
    """UnlearnDiffAtk on every prompt of a benchmark file (one attack per prompt, method §5).

    1. The attacked model's plain images (plain_image_dir, default out_dir/plain: pass the plain
       attack's folder to reuse its images); with skip_detected, prompts already
       detected count as successes without optimisation (the reference does the same).
    2. The ORIGINAL model's images of the prompts at their seeds (original_image_dir, default
       out_dir/original; pass a cache of base-model images to reuse them).
    3. Per remaining prompt: `optimise_prefix`; prefixes are saved in out_dir/prefixes.json after
       every prompt, so an interrupted run resumes.
    4. Generation with the attacked prompts at the prompts' seeds (out_dir/attacked), detection.
    In a sharded run (`shard`, with `generate` = recare.distributed.ShardedGenerator) the ranks
    split the optimisation by prompt, and rank 0's detections decide which prompts are attacked.
    """
    if not jobs:
        raise RecareError("no prompts to attack")
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else attacked.unet.device
    plain_dir = Path(plain_image_dir) if plain_image_dir is not None else out_dir / "plain"
    plain_paths = generate(attacked, list(jobs), plain_dir, generation, device, model_info)
    plain_det = detect_images(detector, open_images(plain_paths))
    todo = broadcast_object([i for i, d in enumerate(plain_det) if not (config.skip_detected and d.detected)], shard)
    prefixes: dict[int, PrefixAttack] = {}
    if todo:
        orig_dir = Path(original_image_dir) if original_image_dir is not None else out_dir / "original"
        orig_paths = generate(original, list(jobs), orig_dir, generation, device, original_model_info)
        search_dir = out_dir / ("search" if not shard.distributed else f"search.rank-{shard.rank:03d}")
        judge_of = _judges(attacked, detector, generation, device, model_info, search_dir)
        prefixes = _optimise_all(attacked, original, jobs, todo, orig_paths, out_dir, config, device,
                                 model_block(attacked, model_info), progress, shard, judge_of)
    attacked_jobs = [replace(jobs[i], prompt=prefixes[i].attacked_prompt) for i in todo]
    attacked_paths = generate(attacked, attacked_jobs, out_dir / "attacked", generation, device, model_info) \
        if attacked_jobs else []
    attacked_det = detect_images(detector, open_images(attacked_paths)) if attacked_jobs else []
    by_index = dict(zip(todo, zip(attacked_jobs, attacked_paths, attacked_det)))
    records = []
    for i, job in enumerate(jobs):
        if i in by_index:
            ajob, path, det = by_index[i]
            details = {"attacked": True, **prefixes[i].to_json(), "plain_detection": plain_det[i].to_dict()}
            records.append(AttackRecord(job.prompt, ajob.prompt, (job.seed,), (str(path),), (det,), job.case_id,
                                        details))
        else:
            records.append(AttackRecord(job.prompt, job.prompt, (job.seed,), (str(plain_paths[i]),), (plain_det[i],),
                                        job.case_id, {"attacked": False, "reason": "plain prompt already detected"}))
    settings = _settings(config, generation, attacked, original, model_info, original_model_info, len(todo),
                         len(jobs) - len(todo), out_dir)
    return AttackResult("unlearndiffatk", tuple(records), detector_settings(detector), settings)


def _settings(config: UnlearnDiffAtkConfig, generation: GenerationConfig, attacked: SDComponents,
              original: SDComponents, model_info: dict[str, Any] | None, original_model_info: dict[str, Any] | None,
              attacked_count: int, detected_count: int, out_dir: Path) -> dict[str, Any]:
    """The settings block of an UnlearnDiffAtk result (procedure, models, counts, what was generated)."""
    return {"unlearndiffatk": asdict(config), "generation": generation_settings(generation),
            "model": model_block(attacked, model_info),
            "original_model": model_block(original, original_model_info),
            "prompts_attacked": attacked_count, "prompts_detected_without_attack": detected_count,
            "procedure": config.procedure,
            "generated_from": ("the argmax tokens of the last searched block, decoded and prepended to the prompt"
                               if config.procedure == "authors" else
                               "the nearest-vocabulary projection of the optimised prefix embeddings, decoded "
                               "and prepended to the prompt") + " (details: prefix_ids, prefix_text, "
                                                                "retokenizes_exactly)",
            "image_dir": str(out_dir)}


def _judges(attacked: SDComponents, detector: DetectorArg, generation: GenerationConfig, device: torch.device,
            model_info: dict[str, Any] | None, folder: Path) -> Any:
    """judge_of(job): the judge of the authors' procedure for one prompt. It generates the attacked
    prompt's image at the job's seed into `folder` (this process only, also in a sharded run) and
    asks the detector."""
    def judge_of(job: PromptJob) -> Judge:
        def judge(attacked_prompt: str, block: int) -> bool:
            search_job = replace(job, prompt=attacked_prompt, name=f"{job.name}_block{block:02d}")
            paths = generate_images(attacked, [search_job], folder, generation, device, model_info)
            return bool(detect_images(detector, open_images(paths))[0].detected)
        return judge
    return judge_of


def _optimise_all(attacked: SDComponents, original: SDComponents, jobs: Sequence[PromptJob], todo: Sequence[int],
                  orig_paths: Sequence[Path], out_dir: Path, config: UnlearnDiffAtkConfig, device: torch.device,
                  model: dict[str, Any], progress: bool, shard: ShardInfo,
                  judge_of: Any = None) -> dict[int, PrefixAttack]:
    """Prefixes of the prompts `todo`.

    This process optimises the prompts i with i % world_size == rank and writes them, one prompt
    at a time, to out_dir/prefixes.json (one process) or prefixes.rank-NNN.json (sharded).
    Prefixes found in any prefixes*.json of out_dir with the same settings are reused (resume);
    a sharded run then waits for the other ranks and reads theirs.
    """
    cache = _read_prefix_files(out_dir)
    own_file = out_dir / (f"prefixes.rank-{shard.rank:03d}.json" if shard.distributed else "prefixes.json")
    own = read_json(own_file, "UnlearnDiffAtk prefixes") if own_file.is_file() else {}
    out = {}
    for i in tqdm([i for i in todo if i % shard.world_size == shard.rank], desc="unlearndiffatk",
                  disable=not progress):
        job = jobs[i]
        key = json_ready(_prefix_cache_key(config, job, model))
        out[i] = _cached_prefix(cache, job.name, key)
        if out[i] is not None:
            continue
        x0 = encode_x0(original, load_image_rgb(orig_paths[i]), device)
        generator = torch.Generator("cpu").manual_seed(job.seed + config.seed_offset)
        out[i] = optimise_prefix(attacked, original, job.prompt, x0, config, generator, device,
                                 judge=judge_of(job) if judge_of is not None else None)
        logger.info("UnlearnDiffAtk %s: prefix %r (loss %.4f -> %.4f)", job.name, out[i].prefix_text,
                    out[i].losses[0], out[i].losses[-1])
        own[job.name] = {"key": key, "result": out[i].to_json()}
        write_json_atomic(own_file, own)
    if shard.distributed:
        barrier(shard)
        cache = _read_prefix_files(out_dir)
        for i in todo:
            if i not in out:
                out[i] = _cached_prefix(cache, jobs[i].name, json_ready(_prefix_cache_key(config, jobs[i], model)))
                if out[i] is None:
                    raise RecareError(f"UnlearnDiffAtk: no prefix for {jobs[i].name} from the other ranks")
    return out


def _read_prefix_files(out_dir: Path) -> dict[str, Any]:
    """{job name: {"key", "result"}} merged over out_dir/prefixes*.json."""
    cache: dict[str, Any] = {}
    for path in sorted(out_dir.glob("prefixes*.json")):
        cache.update(read_json(path, "UnlearnDiffAtk prefixes"))
    return cache


def _cached_prefix(cache: dict[str, Any], name: str, key: Any) -> PrefixAttack | None:
    saved = cache.get(name)
    if saved is None or saved.get("key") != key:
        return None
    r = saved["result"]
    return PrefixAttack(tuple(r["prefix_ids"]), r["prefix_text"], r["attacked_prompt"], tuple(r["losses"]),
                        r["retokenizes_exactly"], tuple(r["initial_ids"]), procedure=r.get("procedure", "single-block"),
                        blocks=tuple(r.get("blocks", ())))


