"""Sharding evaluation work across processes (`accelerate launch -m recare eval ...`, torchrun).

A launcher starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK (plus
MASTER_ADDR / MASTER_PORT); `process_shard` asks accelerate's process state (`accelerate.PartialState`,
which joins the process group: NCCL on CUDA, gloo on the CPU) for this process's index and the number
of processes. Without a launcher everything runs in one process. `shard_info_from_env` only reads the
launcher's variables, without joining anything (the command-line guard uses it to refuse sharding in
commands that do not shard).

`generate_images_sharded`: process `rank` makes the images of jobs i with i % world_size == rank
(the job list, not the pending list, decides: a restart gives every job to the same rank).
Each image keeps its own seed (recare.generate), so the images are those of a single-process
run. Ranks write into their own staging folders (out_dir/.shards/rank-NNN, each with its own
manifest); after a barrier rank 0 moves the images into out_dir and merges the manifests into
out_dir/manifest.json (the format of recare.generate, so single-process runs resume the folder
and vice versa); a second barrier lets every rank read the result. Images already listed in
out_dir/manifest.json are skipped on restart; images finished in a staging folder before a
crash are picked up there.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from recare.errors import RecareError
from recare.generate.images import MANIFEST_NAME, GenerationConfig, build_manifest, generate_images, read_manifest
from recare.generate.prompts import PromptJob
from recare.io import write_json_atomic
from recare.models.loading import SDComponents

logger = logging.getLogger(__name__)

STAGING_DIR = ".shards"
PROCESS_GROUP_TIMEOUT_S = 4 * 3600  # ranks wait this long while rank 0 does unsharded work (e.g. the CCE inversion)


@dataclass(frozen=True)
class ShardInfo:
    """This process's place among the launched processes."""

    rank: int = 0  # global index of this process (accelerate: process_index)
    world_size: int = 1  # number of processes (accelerate: num_processes)
    local_rank: int = 0  # index on this machine, i.e. which GPU (accelerate: local_process_index)

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise RecareError(f"bad shard: rank {self.rank} of world size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def shard_info_from_env(env: Mapping[str, str] | None = None) -> ShardInfo:
    """ShardInfo from the launcher's RANK / WORLD_SIZE / LOCAL_RANK, without joining a process group."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise RecareError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err
    return ShardInfo(rank, world, local)


def process_shard(device: str | torch.device | None = None,
                  timeout_s: float = PROCESS_GROUP_TIMEOUT_S) -> ShardInfo:
    """This process among the launched ones, from accelerate's process state (joins the process group).

    device: the device the work runs on; a non-CUDA device (or none, without CUDA) makes accelerate use
    its CPU backend (gloo). In a single process (no launcher) this is ShardInfo() and nothing is joined.
    """
    from accelerate import PartialState

    launched = shard_info_from_env()  # checked first: a bad RANK raises RecareError, not a launcher error
    if not launched.distributed:
        return ShardInfo()
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    state = PartialState(cpu=kind != "cuda", timeout=datetime.timedelta(seconds=timeout_s))
    shard = ShardInfo(state.process_index, state.num_processes, state.local_process_index)
    if shard.world_size != launched.world_size:
        raise RecareError(f"WORLD_SIZE is {launched.world_size} but accelerate sees {shard.world_size} processes "
                          f"({state.distributed_type}); launch with torchrun or accelerate launch")
    return shard


def _state():
    from accelerate import PartialState

    return PartialState()


def shard_indices(n: int, shard: ShardInfo) -> list[int]:
    """Indices i < n with i % world_size == rank."""
    return list(range(shard.rank, n, shard.world_size))


def barrier(shard: ShardInfo) -> None:
    """Wait for every rank (no-op in a single process; accelerate's wait_for_everyone otherwise)."""
    if shard.distributed:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RecareError("distributed run without a process group: call process_shard first")
        _state().wait_for_everyone()


def broadcast_object(obj: Any, shard: ShardInfo) -> Any:
    """Rank 0's `obj` on every rank (a picklable Python object; identity in a single process).

    Used where a decision (e.g. which prompts UnlearnDiffAtk attacks) must be the same on every
    rank although each rank computed it on its own device.
    """
    if not shard.distributed:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def shard_device(device: str | torch.device, shard: ShardInfo) -> torch.device:
    """The device of this rank: 'cuda' becomes cuda:<local_rank> in a distributed run."""
    device = torch.device(device)
    if shard.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", shard.local_rank)
    return device


# ----------------------------------------------------------------------------- sharded generation


def _guidance(job: PromptJob, config: GenerationConfig) -> float:
    return float(job.guidance if job.guidance is not None else config.guidance_scale)


def finished_jobs(out_dir: Path, jobs: Sequence[PromptJob], header: dict[str, Any],
                  config: GenerationConfig) -> set[str]:
    """Names of jobs whose image out_dir/manifest.json lists (same prompt, seed, guidance) and
    whose file exists. RecareError when the manifest is another run's or lists another image."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return set()
    old = read_manifest(out_dir)
    for block in ("format", "model", "settings"):
        if old.get(block) != header[block]:
            raise RecareError(f"{out_dir} holds images of another run ({block} differs); use another folder")
    entries = {e["file"]: e for e in old.get("images", [])}
    done = set()
    for job in jobs:
        file = f"{job.name}.{config.image_format}"
        entry = entries.get(file)
        if entry is None:
            continue
        if (entry.get("prompt"), entry.get("seed"), entry.get("guidance")) != (job.prompt, job.seed,
                                                                                _guidance(job, config)):
            raise RecareError(f"{out_dir / file} was made from another job; use another folder")
        if (out_dir / file).is_file():
            done.add(job.name)
    return done


def merge_shards(out_dir: Path, header: dict[str, Any]) -> int:
    """Move every staging folder's images into out_dir and merge the manifests (rank 0 only).

    The main manifest is rewritten after each staging folder, so an interruption loses nothing
    that was moved. Returns the number of images moved.
    """
    staging = out_dir / STAGING_DIR
    if not staging.is_dir():
        return 0
    main = read_manifest(out_dir) if (out_dir / MANIFEST_NAME).is_file() else {**header, "images": []}
    entries = {e["file"]: e for e in main.get("images", [])}
    moved = 0
    for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
        if not (folder / MANIFEST_NAME).is_file():
            continue
        for entry in read_manifest(folder).get("images", []):
            source = folder / entry["file"]
            if source.is_file():
                os.replace(source, out_dir / entry["file"])
                entries[entry["file"]] = entry
                moved += 1
        write_json_atomic(out_dir / MANIFEST_NAME, {**header, "images": [entries[k] for k in sorted(entries)]})
        shutil.rmtree(folder)
    shutil.rmtree(staging, ignore_errors=True)
    return moved


def generate_images_sharded(components: SDComponents, jobs: Sequence[PromptJob], out_dir: str | os.PathLike,
                            config: GenerationConfig = GenerationConfig(), device: str | torch.device | None = None,
                            model_info: dict[str, Any] | None = None, shard: ShardInfo | None = None) -> list[Path]:
    """recare.generate.generate_images with the jobs split over the ranks (module docstring).

    Every rank must call it with the same jobs, folder and settings; it returns all paths (in
    job order) once the merged folder is complete. In a single process it IS generate_images.
    """
    shard = shard or shard_info_from_env()
    if not shard.distributed:
        return generate_images(components, jobs, out_dir, config, device, model_info)
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else components.unet.device
    header = build_manifest(components, config, device, model_info)
    done = finished_jobs(out_dir, jobs, header, config)
    mine = [jobs[i] for i in shard_indices(len(jobs), shard) if jobs[i].name not in done]
    staging = out_dir / STAGING_DIR / f"rank-{shard.rank:03d}"
    logger.info("rank %d/%d: %d of its %d images to make in %s", shard.rank, shard.world_size, len(mine),
                len(shard_indices(len(jobs), shard)), out_dir)
    generate_images(components, mine, staging, config, device, model_info)
    barrier(shard)
    if shard.is_main:
        merge_shards(out_dir, header)
    barrier(shard)
    return [out_dir / f"{job.name}.{config.image_format}" for job in jobs]


class ShardedGenerator:
    """A drop-in for recare.generate.generate_images (the `generate` argument of recare.attacks)
    that shards every call over the ranks of `shard`."""

    def __init__(self, shard: ShardInfo):
        self.shard = shard

    def __call__(self, components: SDComponents, jobs: Sequence[PromptJob], out_dir: str | os.PathLike,
                 config: GenerationConfig = GenerationConfig(), device: str | torch.device | None = None,
                 model_info: dict[str, Any] | None = None) -> list[Path]:
        return generate_images_sharded(components, jobs, out_dir, config, device, model_info, self.shard)
