"""The GPU path's guarantees, checked on the CPU (tiny random SD): the precomputed DDIM step equals
diffusers', compiled loops equal eager ones, the compiled UNet calls have no graph breaks and are
compiled once per run, and no loop reads a device value back to the host at every step."""

from __future__ import annotations

import contextlib
import json
import traceback

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recare.errors import RecareError
from recare.models import acceleration
from recare.models.acceleration import compiled, resolve_compile_mode
from recare.models.loading import load_sd
from recare.train.config import TrainConfig
from recare.train.inversion import LOSS_LOG_EVERY, InversionConfig
from recare.train.run import train
from recare.train.sampling import DDIMSchedule, guided_epsilon, make_ddim_scheduler
from recare.train.steps import LOG_EVERY, student_epsilon, teacher_copy, teacher_epsilon, trainable_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**overrides) -> TrainConfig:
    settings = dict(method="recare", erase_iterations=3, rounds=1, erase_set_tokens=1, stage2_iterations=3,
                    ddim_steps=4, stop_range=(1, 3), inversion=InversionConfig(steps=3, resolution=32),
                    checkpoint_every=0)
    return TrainConfig(**{**settings, **overrides})


# ----------------------------------------------------------------------------- the DDIM step


@pytest.mark.parametrize("steps", [4, 50])
def test_precomputed_ddim_step_is_bit_identical_to_diffusers(tiny_sd, steps):
    """DDIMSchedule.step (no scheduler state, no host sync) gives exactly diffusers' DDIM step (eta 0)."""
    ddim = make_ddim_scheduler(tiny_sd.scheduler, steps)
    schedule = DDIMSchedule(ddim, steps, "cpu")
    assert schedule.exact
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    for index, t in enumerate(ddim.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=generator)
        expected = ddim.step(eps, t, latents, eta=0.0).prev_sample
        assert torch.equal(schedule.step(eps, index, latents), expected), f"step {index} (t = {int(t)})"
        latents = expected


def test_ddim_schedulers_that_clip_x0_are_stepped_by_diffusers(tiny_sd):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(tiny_sd.scheduler.config, clip_sample=True, clip_sample_range=0.5)
    schedule = DDIMSchedule(ddim, 4, "cpu")
    assert not schedule.exact
    latents, eps = torch.randn(1, 4, 8, 8) * 3, torch.randn(1, 4, 8, 8)
    expected = ddim.step(eps, ddim.timesteps[1], latents, eta=0.0).prev_sample
    assert torch.equal(schedule.step(eps, 1, latents), expected)


# ----------------------------------------------------------------------------- the compile option


def test_compile_modes_resolve_per_device():
    assert resolve_compile_mode("auto", "cpu") is None
    assert resolve_compile_mode("auto", torch.device("cuda")) == "reduce-overhead"  # no GPU needed to ask
    assert resolve_compile_mode("off", "cuda") is None
    assert resolve_compile_mode("default", "cpu") == "default"
    with pytest.raises(RecareError, match="unknown compile mode 'fast'"):
        resolve_compile_mode("fast", "cpu")
    with pytest.raises(RecareError, match="compile"):
        TrainConfig(compile="fast")


def test_compiled_is_undone_after_the_block(tiny_sd):
    unet = tiny_sd.unet
    with compiled(unet, "default"):
        assert unet._compiled_call_impl is not None
        with pytest.raises(RecareError, match="compiled already"), compiled(unet, "default"):
            pass
    assert unet._compiled_call_impl is None
    with compiled(unet, None):
        assert unet._compiled_call_impl is None


def test_compile_is_not_part_of_the_run_identity(tiny_sd, images, careset):
    """How a run executes (compiled or not) does not change which run it is: a compiled run resumes eagerly."""
    from recare.train.state import run_identity

    eager = run_identity(tiny_sd, small_config(compile="off"), careset, images)
    assert eager == run_identity(tiny_sd, small_config(compile="default"), careset, images)
    assert "compile" not in eager["config"]


def _unet_inputs(tiny_sd, batch: int):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    emb = tiny_sd.conditioner().encode(["", "a photo of a cat", "a red bus"][:batch])  # packed (SDXL: + 1 row)
    return latents, torch.tensor(500), emb


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_compiled_unet_calls_have_no_graph_breaks(tiny_model, lora):
    """torch._dynamo.explain over the three calls a training iteration makes: trajectory (guided, no grad),
    teacher (functional_call with the frozen copy) and student (with gradients); plain UNet and LoRA UNet;
    SD 1.x and SDXL conditioning (unpacked inside the traced call)."""
    tiny_sd = tiny_model
    unet, ddim = tiny_sd.unet, make_ddim_scheduler(tiny_sd.scheduler, 4)
    config = small_config(lora_rank=2) if lora else small_config()
    trainable = trainable_parameters(unet, config)
    if lora:
        assert any("lora" in name for name in trainable)
    teacher = teacher_copy(trainable, None)
    latents, t, emb = _unet_inputs(tiny_sd, 2)
    with torch.no_grad():
        trajectory = torch._dynamo.explain(guided_epsilon)(unet, ddim, latents[:1], t, emb, 3.0)
        frozen = torch._dynamo.explain(teacher_epsilon)(unet, teacher, ddim, latents[:1], t, emb)
    student = torch._dynamo.explain(student_epsilon)(unet, ddim, latents[:1], t, emb[:1])
    for name, report in (("trajectory", trajectory), ("teacher", frozen), ("student", student)):
        assert report.graph_break_count == 0, f"{name}: {report.break_reasons}"
        assert report.graph_count == 1, name


def _weights(folder):
    return load_file(folder / "unet.safetensors")


def test_compiled_training_equals_eager_with_inductor(tiny_sd_dir, images, careset, tmp_path):
    """Every phase of ReCARE (erase, inversion, stage 2) with compile='default' (inductor on the CPU)
    against eager. Tolerance: losses within 1e-4 relative and weights within 1e-5 absolute (measured on
    this 2-core CPU: inductor's fused kernels round differently; weights differ by 2.1e-6, losses by 3.2e-6
    relative)."""
    eager = train(load_sd(tiny_sd_dir), small_config(compile="off"), tmp_path / "eager", careset=careset,
                  images=images, progress=False)
    torch._dynamo.reset()
    fast = train(load_sd(tiny_sd_dir), small_config(compile="default"), tmp_path / "compiled", careset=careset,
                 images=images, progress=False)
    assert fast.complete and eager.complete
    assert [row[:3] for row in fast.losses] == [row[:3] for row in eager.losses]
    np.testing.assert_allclose([row[3] for row in fast.losses], [row[3] for row in eager.losses], rtol=1e-4, atol=1e-7)
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    run = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert run["execution"]["compile_mode"] == "default"
    assert json.loads((tmp_path / "eager" / "run.json").read_text())["execution"]["compile_mode"] == "off"


def _compiled_graphs(tiny_sd_dir, images, careset, folder, iterations: int) -> int:
    """Graphs dynamo compiled during a whole ReCARE run of `iterations` per phase (fresh dynamo state)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = small_config(compile="default", erase_iterations=iterations, stage2_iterations=iterations,
                          inversion=InversionConfig(steps=iterations, resolution=32))
    assert train(load_sd(tiny_sd_dir), config, folder, careset=careset, images=images, progress=False).complete
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_loops_do_not_recompile_between_iterations(tiny_sd_dir, images, careset, tmp_path, monkeypatch):
    """The stop index changes only how often the step runs: a run of 8 iterations per phase compiles
    exactly the graphs of a run of 2 (backend 'eager': dynamo's capture and guards, which decide recompilation,
    without inductor's code generation)."""
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "eager")
    short = _compiled_graphs(tiny_sd_dir, images, careset, tmp_path / "short", 2)
    long = _compiled_graphs(tiny_sd_dir, images, careset, tmp_path / "long", 8)
    assert 0 < short == long
    torch._dynamo.reset()


def test_compiled_generation_equals_eager(tiny_sd, tmp_path):
    from recare.generate.images import GenerationConfig, generate_images
    from recare.generate.prompts import PromptJob

    jobs = [PromptJob(name=f"{i}", prompt="a photo of a cat", seed=i) for i in range(2)]
    outputs = {}
    for mode in ("off", "default"):
        folder = tmp_path / mode
        generate_images(tiny_sd, jobs, folder, GenerationConfig(num_inference_steps=3, batch_size=2, compile=mode))
        outputs[mode] = [np.asarray(Image.open(folder / f"{i}.png"), dtype=np.int16) for i in range(2)]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["execution"]["compile"] == mode
    assert tiny_sd.unet._compiled_call_impl is None
    for eager, fast in zip(outputs["off"], outputs["default"]):
        assert np.abs(eager - fast).max() <= 1  # 8-bit pixels; measured: identical or off by one level
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- host synchronisation

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
HOST_SIDE = {"sample_stop_index", "_image_order", "_draw_batch", "_get_value"}
"""Reads of values that live on the host by design, which never wait for a device: draws of the CPU
generator, and torch.optim's step counter of non-fused optimizers (`_get_value`; the fused CUDA
optimizers the loops use on a GPU keep it on the device)."""


@contextlib.contextmanager
def counting_host_reads():
    """Count Tensor -> Python reads (a sync on a GPU) outside the host-RNG draws, by caller."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            frames = traceback.extract_stack(limit=14)[:-1]
            if not {frame.name for frame in frames} & HOST_SIDE:
                calls.append(f"{name} in {frames[-1].name} ({frames[-1].filename.rsplit('/', 1)[-1]})")
            return original(self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _host_reads(tiny_sd_dir, images, careset, folder, iterations: int) -> list[str]:
    config = small_config(erase_iterations=iterations, stage2_iterations=iterations,
                          inversion=InversionConfig(steps=iterations, resolution=32))
    components = load_sd(tiny_sd_dir)
    with counting_host_reads() as calls:
        assert train(components, config, folder, careset=careset, images=images, progress=False).complete
    return calls


@pytest.mark.parametrize("model_dir", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_no_loop_reads_a_device_value_at_every_step(model_dir, images, careset, tmp_path, request):
    """Erase, inversion and stage 2 read losses back to the host only every LOG_EVERY steps: 30 more
    steps of each loop (90 in all) add at most 2 reads per LOG_EVERY steps (the stacked losses and the
    progress bar's value); a per-step .item() anywhere in the loops would add 90. SD 1.x and SDXL."""
    tiny_sd_dir = request.getfixturevalue(model_dir)
    assert LOG_EVERY == LOSS_LOG_EVERY == 10
    short = _host_reads(tiny_sd_dir, images, careset, tmp_path / "short", 10)
    long = _host_reads(tiny_sd_dir, images, careset, tmp_path / "long", 40)
    extra = len(long) - len(short)
    added = sorted(set(long) - set(short)) or sorted({c for c in long if long.count(c) > short.count(c)})
    assert extra <= 3 * 90 // LOG_EVERY, f"{extra} more host reads for 90 more steps: {added[:10]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_compiled_with_cuda_graphs_equal_eager(tiny_sd_dir, images, careset, tmp_path):
    """On CUDA the defaults (bf16 autocast, compile 'auto' = inductor + CUDA graphs) run every phase and stay
    close to the same run eager (bf16 rounding: losses within 5% relative, weights within 1e-3)."""
    results = {}
    for mode in ("off", "auto"):
        torch._dynamo.reset()
        components = load_sd(tiny_sd_dir, device="cuda")
        result = train(components, small_config(compile=mode), tmp_path / mode, careset=careset, images=images,
                       device="cuda", progress=False)
        assert result.complete
        results[mode] = result
    expected = "reduce-overhead"
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["execution"]["compile_mode"] == expected
    np.testing.assert_allclose([r[3] for r in results["auto"].losses], [r[3] for r in results["off"].losses],
                               rtol=5e-2, atol=1e-6)
    a, b = _weights(tmp_path / "off"), _weights(tmp_path / "auto")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-3


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_training_refuses_low_precision_master_weights(tiny_sd_dir, images, careset, tmp_path, dtype):
    """Low precision is autocast's job: an fp16/bf16 UNet would be trained, and saved, in that precision."""
    with pytest.raises(RecareError, match="float32 master weights"):
        train(load_sd(tiny_sd_dir, dtype=dtype), small_config(), tmp_path / "run", careset=careset, images=images,
              progress=False)
    assert not (tmp_path / "run").exists()
