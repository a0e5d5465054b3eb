"""What makes the hot loops fast on a GPU without changing their numbers on the CPU (PERF.md).

- `compiled(module, mode)`: torch.compile of a module's calls for the duration of a block, in
  place (``nn.Module.compile``), so state-dict names, hooks and torch.func.functional_call keep
  working; static shapes (``dynamic=False``). The config option `compile` chooses the mode:
  'auto' = 'reduce-overhead' (inductor + CUDA graphs) on CUDA and off elsewhere; 'off'; or any
  torch.compile mode by name, which also runs on the CPU (inductor), e.g. to test the path.
- `to_device(tensor, device)`: a host tensor onto the device without a host synchronisation
  (pinned memory, non_blocking) on CUDA; a plain `.to` elsewhere. The loops draw their random
  numbers from a CPU torch.Generator (resumable, same numbers on every device) and move them
  with this, so no iteration waits for the GPU.
- `mark_step()`: tells CUDA-graph trees that a new training iteration starts (outputs of the
  previous replay may be overwritten), once per iteration, a no-op when nothing is compiled.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from recare.errors import RecareError

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
COMPILE_BACKEND = "inductor"
"""The torch.compile backend (tests may set 'aot_eager' to check the control flow quickly)."""


def resolve_compile_mode(mode: str, device: torch.device | str) -> str | None:
    """The torch.compile mode that `mode` means on `device`; None = eager."""
    if mode not in COMPILE_MODES:
        raise RecareError(f"unknown compile mode {mode!r}; choose one of {list(COMPILE_MODES)}")
    if mode == "auto":
        return "reduce-overhead" if torch.device(device).type == "cuda" else None
    return None if mode == "off" else mode


_active_modes: list[str] = []


@contextlib.contextmanager
def compiled(module: torch.nn.Module, mode: str | None) -> Iterator[torch.nn.Module]:
    """Compile `module`'s calls with torch.compile(mode) inside the block; eager again afterwards.

    mode None: nothing changes. Shapes are static (``dynamic=False``): every distinct input shape
    (the trajectory's [uncond; cond] batch, the teacher's prompt table, the student's batch) is
    compiled once and replayed for the rest of the run.
    """
    if mode is None:
        yield module
        return
    if getattr(module, "_compiled_call_impl", None) is not None:
        raise RecareError(f"{type(module).__name__} is compiled already; pass an eager module")
    logger.info("compiling %s with torch.compile(mode=%r, backend=%r); the first iterations include the "
                "compilation (set compile to 'off' to run eagerly)", type(module).__name__, mode, COMPILE_BACKEND)
    options = {} if COMPILE_BACKEND != "inductor" else {"mode": mode}
    module.compile(backend=COMPILE_BACKEND, dynamic=False, **options)
    _active_modes.append(mode)
    try:
        yield module
    finally:
        _active_modes.pop()
        module._compiled_call_impl = None


def mark_step() -> None:
    """Start a new CUDA-graph-tree generation (one per training iteration) when CUDA graphs are in use."""
    if any(mode in CUDA_GRAPH_MODES for mode in _active_modes) and torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the host) on `device`; on CUDA through pinned memory without waiting for the GPU."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
