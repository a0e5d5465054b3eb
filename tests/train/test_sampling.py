"""Partial DDIM trajectories and the reference timestep quirk (SPEC 3a) on the tiny SD."""

import pytest
import torch

from recare.models.tiny import build_tiny_sd
from recare.train.sampling import (
    initial_latents,
    make_ddim_scheduler,
    sample_partial_trajectory,
    sample_stop_index,
    training_timestep,
)


def embeddings(batch, seed=0, length=8, dim=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, dim, generator=gen), torch.randn(1, length, dim, generator=gen)


# Batched and separate UNet calls differ by ~1e-6 in fp32; guidance 3 and the DDIM steps near
# t = 981 (x0 = (x - sigma eps) / 0.07) amplify that to ~5e-5 after a few steps.
ATOL = 2e-4


def manual_trajectory(unet, ddim, cond, uncond, latents, stop_index, scale):
    """Diffusers' own loop: separate UNet calls, guidance on the raw output, ddim.step (eta 0)."""
    ddim.set_timesteps(50)
    for t in ddim.timesteps[:stop_index]:
        out_c = unet(latents, t, encoder_hidden_states=cond).sample
        out_u = unet(latents, t, encoder_hidden_states=uncond.expand_as(cond)).sample
        latents = ddim.step(out_u + scale * (out_c - out_u), t, latents, eta=0.0).prev_sample
    return latents


def test_make_ddim_scheduler_keeps_sd_config(tiny_sd):
    ddim = make_ddim_scheduler(tiny_sd.scheduler)
    assert type(ddim).__name__ == "DDIMScheduler"
    assert ddim.config.steps_offset == 1 and ddim.config.beta_schedule == "scaled_linear"
    assert ddim.timesteps.tolist()[:3] == [981, 961, 941] and ddim.timesteps.tolist()[-1] == 1
    assert len(ddim.timesteps) == 50


def test_training_timestep_reference_quirk(tiny_sd):
    # SD v1.4 config: predictions at 1000 - 20 i (SPEC 3a) while the latent sits at 981 - 20 i.
    ddim = make_ddim_scheduler(tiny_sd.scheduler)
    assert training_timestep(ddim, 1) == 980
    assert training_timestep(ddim, 48) == 40
    assert [training_timestep(ddim, i) for i in range(1, 49)] == [1000 - 20 * i for i in range(1, 49)]
    assert [int(ddim.timesteps[i]) for i in (1, 48)] == [961, 21]
    assert len(ddim.timesteps) == 50  # the caller's scheduler is untouched


def test_sample_stop_index_bounds_and_determinism():
    draws = [sample_stop_index(torch.Generator().manual_seed(s)) for s in range(400)]
    assert min(draws) == 1 and max(draws) == 48
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [sample_stop_index(gen_a) for _ in range(5)] == [sample_stop_index(gen_b) for _ in range(5)]
    assert sample_stop_index(torch.Generator().manual_seed(0), low=3, high=3) == 3
    with pytest.raises(ValueError, match="empty"):
        sample_stop_index(None, low=5, high=4)


def test_determinism_with_seeded_generator(tiny_sd):
    ddim = make_ddim_scheduler(tiny_sd.scheduler)
    cond, uncond = embeddings(1)
    run = lambda seed: sample_partial_trajectory(tiny_sd.unet, ddim, cond, uncond, 3,
                                                 generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 4, 16, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_stop_index_zero_returns_initial_noise(tiny_sd):
    ddim = make_ddim_scheduler(tiny_sd.scheduler)
    cond, uncond = embeddings(2)
    out = sample_partial_trajectory(tiny_sd.unet, ddim, cond, uncond, 0, generator=torch.Generator().manual_seed(3))
    noise = initial_latents(tiny_sd.unet, ddim, 2, torch.Generator().manual_seed(3))
    assert torch.equal(out, noise)
    assert noise.std().item() == pytest.approx(1.0, abs=0.1)  # init_noise_sigma of DDIM is 1


def test_guided_trajectory_matches_diffusers_loop_with_one_batched_call(tiny_sd, monkeypatch):
    unet, ddim = tiny_sd.unet, make_ddim_scheduler(tiny_sd.scheduler)
    cond, uncond = embeddings(1)
    noise = initial_latents(unet, ddim, 1, torch.Generator().manual_seed(4))
    batches = []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x, *a, **k: batches.append(x.shape[0]) or forward(x, *a, **k))
    guided = sample_partial_trajectory(unet, ddim, cond, uncond, 4, guidance_scale=3.0, latents=noise)
    plain = sample_partial_trajectory(unet, ddim, cond, uncond, 4, guidance_scale=1.0, latents=noise)
    assert batches == [2] * 4 + [1] * 4  # one UNet call per step; no uncond half at scale 1
    monkeypatch.undo()
    torch.testing.assert_close(guided, manual_trajectory(unet, ddim, cond, uncond, noise, 4, 3.0), atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, manual_trajectory(unet, ddim, cond, uncond, noise, 4, 1.0), atol=ATOL, rtol=0)
    assert not torch.allclose(guided, plain)


def test_batch_of_prompts_equals_single_runs(tiny_sd):
    unet, ddim = tiny_sd.unet, make_ddim_scheduler(tiny_sd.scheduler)
    cond, uncond = embeddings(2)
    noise = initial_latents(unet, ddim, 2, torch.Generator().manual_seed(5))
    both = sample_partial_trajectory(unet, ddim, cond, uncond, 3, latents=noise)
    for i in range(2):
        single = sample_partial_trajectory(unet, ddim, cond[i:i + 1], uncond, 3, latents=noise[i:i + 1])
        torch.testing.assert_close(both[i:i + 1], single, atol=ATOL, rtol=0)
    assert not torch.allclose(both[0], both[1])


def test_v_prediction_matches_diffusers_v_step():
    # Guidance in epsilon space (to_epsilon) + epsilon DDIM step == diffusers' v-prediction DDIM loop.
    sd = build_tiny_sd(seed=0, prediction_type="v_prediction")
    ddim = make_ddim_scheduler(sd.scheduler)
    assert ddim.config.prediction_type == "v_prediction"
    cond, uncond = embeddings(1)
    noise = initial_latents(sd.unet, ddim, 1, torch.Generator().manual_seed(6))
    ours = sample_partial_trajectory(sd.unet, ddim, cond, uncond, 3, latents=noise)
    torch.testing.assert_close(ours, manual_trajectory(sd.unet, ddim, cond, uncond, noise, 3, 3.0), atol=ATOL, rtol=0)
    assert ddim.config.prediction_type == "v_prediction"


def test_rejects_bad_arguments(tiny_sd):
    ddim = make_ddim_scheduler(tiny_sd.scheduler)
    cond, uncond = embeddings(2)
    with pytest.raises(ValueError, match="stop_index"):
        sample_partial_trajectory(tiny_sd.unet, ddim, cond, uncond, 51)
    with pytest.raises(ValueError, match="latents batch"):
        sample_partial_trajectory(tiny_sd.unet, ddim, cond, uncond, 1, latents=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="uncond_emb"):
        sample_partial_trajectory(tiny_sd.unet, ddim, cond, torch.zeros(3, 8, 32), 1)
