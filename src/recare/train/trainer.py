"""Erasure training on Stable Diffusion: ESD, STEREO and ReCARE (method §3, 4, 4b), resumable.

Phases of a run (`plan_phases`):
- ReCARE / STEREO: for each stage-1 round r = 1..n: "erase-r" (erase the current concept:
  round 1 the target word, later rounds the previous round's learned token; the frozen teacher
  is the model as it stands after round r-1, the student starts from the same weights, fresh
  AdamW), then "inversion-r" (textual inversion of a new token "<recare-r>" against the erased
  model on round r's slice of the target images). Then "stage2" from the ORIGINAL UNet with the
  learned tokens: ReCARE's erase + CARE-retain loss, or STEREO's compositional erase with its
  anchors and no retain loss.
- ESD: one "esd" erase with ESD's target (Gandikota et al. 2023) and Adam.

Every erase/stage-2 iteration draws a stop index i ~ U[stop_range] and fresh noise, runs a
partial DDIM trajectory with the CURRENT student (guidance 3), and queries teacher and student at
training_timestep(i) (the reference's timestep quirk, see recare.sampling).

Speed by design (PERF.md): text embeddings are computed once per prompt; each iteration makes
ONE no-grad teacher UNet call for all teacher predictions (uncond + erase set + anchor +
retain) and ONE student call with gradients ([h, r] for ReCARE); the frozen teacher is not a
second UNet but a copy of the trainable parameters' values swapped in with
torch.func.functional_call (stored in bf16 under bf16 autocast, which gives the same predictions:
see teacher_copy); bf16 autocast on CUDA over float32 master weights; the VAE encodes
each target image once per inversion (recare.inversion). A test checks that the batched
iteration equals separate UNet calls.

LoRA (config.lora_rank > 0): a peft adapter on the modules `train_method` selects; its A/B
matrices are the trainable parameters and the base weights stay frozen. Nothing else changes:
B starts at zero, so the teacher copy of the initial adapter values IS the original model, and
stage 2 "from the original UNet" resets the adapter to those initial values. unet.safetensors
holds the merged weights W + (alpha / r) B A under the stock names; lora.safetensors the adapter.

Shared stage 1: stage 1 of ReCARE and STEREO is the same recipe, and stage 2 starts from the
original UNet, so what stage 2 takes from stage 1 is the learned tokens and the generator's
state. Every ReCARE/STEREO run keeps them in `stage1_state.safetensors` (a few KB); a run given
`stage1_from=<that run's folder>` with the same stage-1 settings adopts them and starts at stage 2,
giving the same result as running stage 1 itself (tested) for a fraction of the cost (stage 1 is
23 of the paper's 29.9 GPU minutes, PERF.md).

Randomness: one CPU torch.Generator (seed `seed`) draws everything; the reference re-seeds it at
the start of every erase round and every inversion (`reseed_each_round`, default True), stage 2
is not re-seeded. Its state is saved with the training state, so a resumed run is bit-identical
to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from recare.careset.artifact import CareSet
from recare.errors import RecareError
from recare.interrupts import Interrupted, stop_requested
from recare.io import atomic_path, json_ready
from recare.models.acceleration import compiled, mark_step, resolve_compile_mode
from recare.models.checkpoints import (
    load_learned_embeddings,
)
from recare.models.loading import SDComponents
from recare.models.precision import autocast_context, autocast_dtype
from recare.train.config import TrainConfig
from recare.train.inversion import image_slices, train_textual_inversion
from recare.train.sampling import (
    DDIMSchedule,
    make_ddim_scheduler,
    sample_partial_trajectory,
    training_timestep,
)
from recare.train.state import (
    STAGE1_NAME,
    TrainState,
    check_parameters,
    load_optimizer_tensors,
    load_state,
    optimizer_tensors,
    save_state,
    stage1_identity,
)
from recare.train.steps import (
    LOG_EVERY,
    Params,
    PromptEmbeddings,
    Stage2Rows,
    balanced_schedule,
    draw_start,
    stage1_loss,
    stage2_loss,
    table_rows,
    teacher_copy,
    trainable_parameters,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class Phase:
    """One stage of a run: kind 'esd', 'erase', 'inversion' or 'stage2'."""

    kind: str
    round: int
    steps: int

    @property
    def name(self) -> str:
        return self.kind if self.kind in ("esd", "stage2") else f"{self.kind}-{self.round}"


def plan_phases(config: TrainConfig) -> list[Phase]:
    """The phases of a run (module docstring)."""
    if not config.method_spec.learns_tokens:
        return [Phase("esd", 1, config.erase_iterations)]
    stage1 = [Phase(kind, r, config.erase_iterations if kind == "erase" else config.inversion.steps)
              for r in range(1, config.rounds + 1) for kind in ("erase", "inversion")]
    return stage1 + [Phase("stage2", 0, config.stage2_iterations)]




class _Stop(Exception):
    """Raised inside a phase when this invocation's step budget is used up (state is saved)."""


class Trainer:
    """Runs the phases of one training run over a live UNet; state in a TrainState."""

    def __init__(self, components: SDComponents, config: TrainConfig, out_dir: Path, device: torch.device,
                 careset: CareSet | None, images: Sequence[str | os.PathLike], identity: dict,
                 info: dict, progress: bool = True):
        self.components, self.config, self.out_dir, self.device = components, config, out_dir, device
        self.careset, self.identity, self.info, self.progress = careset, identity, info, progress
        self.unet = components.unet
        self.slices = image_slices(list(images), config.rounds) if config.method_spec.needs_images else []
        self.trainable = trainable_parameters(self.unet, config)
        self.teacher_dtype = autocast_dtype(config.mixed_precision, device)
        # Original values of the trainable parameters: the teacher of round 1 and stage 2, and the
        # start of stage 2 (with LoRA: the initial adapter, B = 0, i.e. the original UNet). Without
        # autocast one copy on the device serves both; with bf16 autocast an fp32 master copy waits
        # on the CPU and a bf16 teacher copy lives on the device only while needed (not during
        # rounds >= 2, which have their own teacher).
        self.original_master = teacher_copy(self.trainable, None) if self.teacher_dtype is None else {
            name: p.detach().to("cpu", copy=True) for name, p in self.trainable.items()}
        self._original: Params | None = None
        self.ddim = make_ddim_scheduler(components.scheduler, config.ddim_steps)
        self.schedule = DDIMSchedule(self.ddim, config.ddim_steps, device)  # precomputed once: no per-step setup
        self.compile_mode = resolve_compile_mode(config.compile, device)
        self.timesteps = {i: torch.tensor(training_timestep(self.ddim, i, config.ddim_steps), device=device)
                          for i in range(config.stop_range[0], config.stop_range[1] + 1)}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.conditioner = components.conditioner()
        self.embeddings = PromptEmbeddings(self.conditioner)
        self.phases = plan_phases(config)
        self.state = TrainState(identity=identity)
        self.budget: int | None = None
        self._pending: list[tuple] = []
        self._clock = time.perf_counter()

    # --- state

    def restore(self, state: TrainState) -> None:
        """Continue from a saved state: parameters, learned tokens and generator (others per phase)."""
        if json_ready(state.identity) != json_ready(self.identity):
            raise RecareError(f"the training state in {self.out_dir} belongs to another run")
        check_parameters(state.group("param"), self.trainable, f"training state in {self.out_dir}")
        self._load_learned_tokens(state, "saved in the training state")
        self._copy_into_trainable(state.group("param"))
        self.generator.set_state(state.tensors["rng.main"])
        self.state = state
        logger.info("resuming at %s step %d", self.phases[state.phase].name if state.phase < len(self.phases)
                    else "the end", state.step)

    def checkpoint(self, optimizer: torch.optim.Optimizer | None = None, teacher: Params | None = None) -> None:
        """Flush losses and timings and save the state (with optimizer/teacher when mid-phase)."""
        self.flush()
        self.state.set_group("param", self.trainable)
        self.state.set_group("teacher", teacher or {})
        self.state.set_group("optim", optimizer_tensors(optimizer, list(self.trainable)) if optimizer else {})
        self.state.tensors["rng.main"] = self.generator.get_state()
        save_state(self.state, self.out_dir)

    def _load_learned_tokens(self, state: TrainState, origin: str) -> None:
        """Load out_dir's learned_embeds-k files of `state`'s tokens; each must equal the state's embedding."""
        embeds = state.group("embed")
        for k, token in enumerate(state.learned_tokens, start=1):
            path = self.out_dir / f"learned_embeds-{k}.safetensors"
            load_learned_embeddings(self.conditioner, path)
            row = self.conditioner.token_row(self.conditioner.tokenizer.convert_tokens_to_ids(token))
            if token not in embeds or not torch.equal(row.detach().float().cpu(), embeds[token]):
                raise RecareError(f"{path} does not hold the embedding of {token!r} {origin}")

    def save_stage1(self) -> None:
        """Keep what stage 2 takes from stage 1 (learned embeddings, generator state) in stage1_state.safetensors."""
        self.flush()
        self.state.tensors["rng.main"] = self.generator.get_state()
        kept = {k: v for k, v in self.state.tensors.items() if k.startswith(("embed.", "rng."))}
        save_state(TrainState(identity=stage1_identity(self.identity), phase=self.state.phase, step=0,
                              losses=list(self.state.losses), timings=dict(self.state.timings),
                              learned_tokens=list(self.state.learned_tokens), tensors=kept),
                   self.out_dir, STAGE1_NAME)

    def adopt_stage1(self, folder: str | os.PathLike) -> None:
        """Start at stage 2 with the stage 1 of the run in `folder` (same stage-1 settings and inputs)."""
        folder = Path(folder)
        if not self.config.method_spec.has_stage1:
            raise RecareError(f"stage1_from: {self.config.method_spec.display_name} has no stage 1")
        saved = load_state(folder, STAGE1_NAME)
        if saved is None:
            raise RecareError(f"{folder} holds no finished stage 1 ({STAGE1_NAME}); give the folder of a "
                              "ReCARE or STEREO run that got past stage 1")
        mine, theirs = json_ready(stage1_identity(self.identity)), json_ready(saved.identity)
        if mine != theirs:
            keys = sorted({k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k)} - {"config"})
            cfg_a, cfg_b = mine.get("config", {}), theirs.get("config", {})
            keys += sorted(f"config.{k}" for k in {*cfg_a, *cfg_b} if cfg_a.get(k) != cfg_b.get(k))
            raise RecareError(f"the stage 1 in {folder} was trained with other settings or inputs: {', '.join(keys)}")
        stage2 = next(i for i, p in enumerate(self.phases) if p.kind == "stage2")
        if saved.phase != stage2:
            raise RecareError(f"{folder / STAGE1_NAME} does not end at stage 2 (phase {saved.phase})")
        for k in range(1, len(saved.learned_tokens) + 1):
            source = folder / f"learned_embeds-{k}.safetensors"
            if not source.is_file():
                raise RecareError(f"{source} is missing: the stage 1 in {folder} is incomplete")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out_dir / source.name) as tmp:
                shutil.copyfile(source, tmp)
        self._load_learned_tokens(saved, f"the stage 1 of {folder}")
        self.generator.set_state(saved.tensors["rng.main"])
        self.state = TrainState(identity=self.identity, phase=stage2, step=0, losses=saved.losses,
                                timings=saved.timings, learned_tokens=saved.learned_tokens, tensors=saved.tensors)
        self.info = {**self.info, "stage1_from": str(folder.resolve())}
        logger.info("stage 1 adopted from %s (tokens %s); starting at stage 2", folder,
                    ", ".join(saved.learned_tokens))

    def original_teacher(self) -> Params:
        """The original values as a teacher copy on the device (see teacher_copy)."""
        if self._original is None:
            dtype = self.teacher_dtype
            self._original = {k: v.to(self.device, dtype or v.dtype) for k, v in self.original_master.items()}
        return self._original

    def _release_original(self) -> None:
        if self.teacher_dtype is not None:  # the master copy stays on the CPU
            self._original = None

    def _copy_into_trainable(self, values: Params) -> None:
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(values[name])

    def flush(self) -> None:
        """Move pending loss tensors to the host (one sync), check them, and book the elapsed time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._pending:
            values = iter(torch.stack([v for row in self._pending for v in row[3:] if v is not None]).cpu().tolist())
            for row in self._pending:
                numbers = [None if v is None else next(values) for v in row[3:]]
                if not math.isfinite(numbers[0]):
                    raise RecareError(f"{row[0]} loss is {numbers[0]} at round {row[1]} step {row[2]}")
                self.state.losses.append([*row[:3], *numbers])
            self._pending = []
        now = time.perf_counter()
        if self.state.phase < len(self.phases):
            name = self.phases[self.state.phase].name
            self.state.timings[name] = self.state.timings.get(name, 0.0) + now - self._clock
        self._clock = now

    # --- loop

    def run(self, budget: int | None = None) -> bool:
        """Run the remaining phases; False when `budget` erase/stage-2 steps ran out first.

        Timings include the checkpoint writes.
        """
        self.budget = budget
        self._clock = time.perf_counter()
        with compiled(self.unet, self.compile_mode):
            return self._run_phases()

    def _run_phases(self) -> bool:
        try:
            while self.state.phase < len(self.phases):
                phase = self.phases[self.state.phase]
                if (self.budget is not None and self.budget <= 0) or stop_requested():
                    raise _Stop
                self.run_phase(phase)
                self.flush()
                self.state.phase, self.state.step = self.state.phase + 1, 0
                if self.state.phase < len(self.phases):
                    if self.phases[self.state.phase].kind == "stage2":
                        self.save_stage1()  # before the checkpoint: a resume from it never rewrites stage 1
                    self.checkpoint()
        except (_Stop, Interrupted):  # Interrupted: an inversion saw the signal; the last checkpoint resumes
            return False
        self.flush()
        return True

    def run_phase(self, phase: Phase) -> None:
        """Run one phase from the state's step (no checkpoint at its end; `run` does that)."""
        runners = {"esd": self._erase, "erase": self._erase, "inversion": self._inversion, "stage2": self._stage2}
        runners[phase.kind](phase)

    def _steps(self, phase: Phase, optimizer: torch.optim.Optimizer, teacher: Params | None) -> Iterator[int]:
        """Step indices of `phase` from the saved position; periodic checkpoints and the step budget."""
        every = self.config.checkpoint_every
        with tqdm(total=phase.steps, initial=self.state.step, desc=phase.name, disable=not self.progress) as bar:
            for step in range(self.state.step, phase.steps):
                yield step
                self.state.step = step + 1
                bar.update()
                if self.budget is not None:
                    self.budget -= 1
                if self._pending and self.state.step % LOG_EVERY == 0:
                    bar.set_postfix(loss=f"{self._pending[-1][3].item():.4g}", refresh=False)
                if self.state.step == phase.steps:
                    break  # run() checkpoints between phases
                out_of_budget = self.budget == 0 or stop_requested()
                if out_of_budget or (every and self.state.step % every == 0):
                    self.checkpoint(optimizer, teacher)
                if out_of_budget:
                    raise _Stop

    def _optimizer(self, kind: str, lr: float) -> torch.optim.Optimizer:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        fused = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = cls(list(self.trainable.values()), lr=lr, **fused)
        if self.state.step > 0:
            load_optimizer_tensors(optimizer, list(self.trainable), self.state.group("optim"))
        return optimizer

    def _update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def _erase(self, phase: Phase) -> None:
        """Stage-1 erase round (method §3a) or the ESD erase (method §4b)."""
        config = self.config
        if self.state.step == 0 and config.reseed_each_round:
            self.generator.manual_seed(config.seed)
        concept = config.concept if phase.round == 1 else self.state.learned_tokens[phase.round - 2]
        if phase.round > 1:
            self._release_original()
        teacher = self.original_teacher() if phase.round == 1 else self._round_teacher()
        emb = self.embeddings([concept, ""])
        optimizer = self._optimizer(config.effective_erase_optimizer, config.effective_erase_lr)
        stage = "esd" if phase.kind == "esd" else "erase"
        for step in self._steps(phase, optimizer, None if phase.round == 1 else teacher):
            mark_step()
            stop, noise = draw_start(self.generator, self.unet, self.ddim, config)
            with autocast_context(config.mixed_precision, self.device):
                z = sample_partial_trajectory(self.unet, self.ddim, emb[:1], emb[1:], stop, config.trajectory_guidance,
                                              latents=noise, num_steps=config.ddim_steps, schedule=self.schedule)
                loss = stage1_loss(self.unet, teacher, self.ddim, z, self.timesteps[stop], emb[:1], emb[1:], config)
            self._update(optimizer, loss)
            self._pending.append((stage, phase.round, step + 1, loss.detach(), None, None))
        self._drop_gradients()

    def _drop_gradients(self) -> None:
        """Free the gradients after a phase (they would sit in memory during the next one)."""
        for param in self.trainable.values():
            param.grad = None

    def _round_teacher(self) -> Params:
        """The frozen model of round r >= 2: the weights after round r-1 (saved in the state mid-round)."""
        saved = self.state.group("teacher")
        if self.state.step > 0:
            check_parameters(saved, self.trainable, f"teacher in the training state of {self.out_dir}")
            return {k: v.to(self.device) for k, v in saved.items()}
        return teacher_copy(self.trainable, self.teacher_dtype)

    def _inversion(self, phase: Phase) -> None:
        """Textual inversion of round r's token against the erased UNet (method §3b)."""
        config = self.config
        if config.reseed_each_round:
            self.generator.manual_seed(config.seed)
        token = config.placeholder(phase.round)
        learned = train_textual_inversion(self.components, self.slices[phase.round - 1], token, config.initializer,
                                          config.inversion, self.generator, device=self.device, unet=self.unet,
                                          progress=self.progress)
        learned.save(self.out_dir / f"learned_embeds-{phase.round}.safetensors", config.inversion)
        self.state.learned_tokens.append(token)
        self.state.set_group("embed", {**self.state.group("embed"), token: learned.embedding})
        self.state.losses.extend(["inversion", phase.round, i + 1, loss, None, None]
                                 for i, loss in enumerate(learned.losses))

    def _stage2_prompts(self) -> tuple[list[str], list[str], list[str]]:
        """(erase set H, anchors, retain prompts) of stage 2, as the method table says (STEREO: no retain)."""
        config, method = self.config, self.config.method_spec
        erase = [config.concept, *self.state.learned_tokens[:config.erase_set_tokens]]
        anchors = config.anchors if method.needs_config_anchors else self.careset.anchors
        retain = self.careset.retain_prompts if method.retain_loss else []
        return erase, list(anchors), list(retain)

    def _stage2(self, phase: Phase) -> None:
        """ReCARE stage 2 (method §3) or STEREO's compositional erase (method §4b), from the original UNet."""
        config = self.config
        erase, anchors, retain = self._stage2_prompts()
        if self.state.step == 0:
            self._copy_into_trainable(self.original_master)
            self.state.schedules = {name: balanced_schedule(list(range(len(items))), phase.steps, self.generator)
                                    for name, items in (("erase", erase), ("anchor", anchors), ("retain", retain))
                                    if items}
        prompts = list(dict.fromkeys(["", *erase, *anchors, *retain]))
        row = {p: i for i, p in enumerate(prompts)}
        table = self.embeddings(prompts)  # (P, L, D)
        erase_rows = tuple(row[p] for p in erase)
        optimizer = self._optimizer("adamw", config.stage2_lr)
        teacher = self.original_teacher()
        sched = self.state.schedules
        for step in self._steps(phase, optimizer, None):
            retain_row = row[retain[sched["retain"][step]]] if retain else None
            rows = Stage2Rows(row[""], erase_rows, erase_rows[sched["erase"][step]],
                              row[anchors[sched["anchor"][step]]], retain_row)
            mark_step()
            stop, noise = draw_start(self.generator, self.unet, self.ddim, config)
            with autocast_context(config.mixed_precision, self.device):
                z = sample_partial_trajectory(self.unet, self.ddim, table_rows(table, [rows.concept]),
                                              table_rows(table, [rows.uncond]), stop,
                                              config.trajectory_guidance, latents=noise, num_steps=config.ddim_steps,
                                              schedule=self.schedule)
                total, erase_loss, retain_loss = stage2_loss(self.unet, teacher, self.ddim, z,
                                                             self.timesteps[stop], table, rows, config)
            self._update(optimizer, total)
            self._pending.append(("stage2", 0, step + 1, total.detach(), erase_loss.detach(),
                                  None if retain_loss is None else retain_loss.detach()))
        self._drop_gradients()


# ----------------------------------------------------------------------------- entry point












