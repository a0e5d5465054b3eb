"""APG guidance (SPEC 4) and to_epsilon (SPEC 4c) against hand-computed values.

Vectors are (1, 1, 1, 2) tensors written as [x, y]; the hand computations are in comments.
"""

import pytest
import torch

from recare.train.guidance import compositional_guidance, normalized_guidance, project, to_epsilon


def vec(*rows):
    """[[x, y], ...] -> (B, 1, 1, 2) float32."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 1, 2)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# Shared example: cond = [3, 4] (unit [0.6, 0.8]), uncond = [2, 4], d = cond - uncond = [1, 0].
# <d, unit> = 0.6 -> par = [0.36, 0.48], orth = [0.64, -0.48].
COND, UNCOND = vec([3.0, 4.0]), vec([2.0, 4.0])


def test_project_hand_values():
    par, orth = project(vec([3.0, 4.0]), vec([1.0, 0.0]))
    close(par, vec([3.0, 0.0]))
    close(orth, vec([0.0, 4.0]))
    par, orth = project(vec([1.0, 0.0]), vec([3.0, 4.0]))
    close(par, vec([0.36, 0.48]))
    close(orth, vec([0.64, -0.48]))


def test_project_norm_is_per_item_over_chw():
    # Item 0 as above; item 1: v0 = [0, 2], v1 = [1, 1] -> unit [1,1]/sqrt2, <v0,unit> = sqrt2,
    # par = [1, 1], orth = [-1, 1]. A norm over the whole batch would give other numbers.
    par, orth = project(vec([1.0, 0.0], [0.0, 2.0]), vec([3.0, 4.0], [1.0, 1.0]))
    close(par, vec([0.36, 0.48], [1.0, 1.0]))
    close(orth, vec([0.64, -0.48], [-1.0, 1.0]))


def test_project_over_channels_and_pixels():
    # (1, 2, 1, 1): v0 = [1, 1] across channels, v1 = [2, 0] -> par = [1, 0], orth = [0, 1].
    par, orth = project(torch.tensor([1.0, 1.0]).reshape(1, 2, 1, 1), torch.tensor([2.0, 0.0]).reshape(1, 2, 1, 1))
    close(par.flatten(), torch.tensor([1.0, 0.0]))
    close(orth.flatten(), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_preserved(dtype):
    par, orth = project(COND.to(dtype), UNCOND.to(dtype))
    assert par.dtype == orth.dtype == dtype
    assert normalized_guidance(COND.to(dtype), UNCOND.to(dtype), 2.0, 0.5).dtype == dtype
    assert compositional_guidance([COND.to(dtype)], UNCOND.to(dtype), [-2.0]).dtype == dtype


@pytest.mark.parametrize("scale, eta, expected", [
    (2.0, 0.0, [2.36, 4.48]),   # cond - 1 * orth = [3 - 0.64, 4 + 0.48]
    (3.0, 0.5, [1.36, 4.48]),   # update = orth + 0.5 par = [0.82, -0.24]; cond - 2 * update
    (2.0, 1.0, [2.0, 4.0]),     # cond - d = uncond
    (1.0, 0.5, [3.0, 4.0]),     # scale 1: no guidance
])
def test_normalized_guidance_hand_values(scale, eta, expected):
    close(normalized_guidance(COND, UNCOND, scale, eta), vec(expected))


def test_normalized_guidance_scale2_eta1_is_uncond_in_fp32():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    out = normalized_guidance(cond, uncond, 2.0)
    assert (out - uncond).abs().max() <= 4e-7 * max(1.0, cond.abs().max().item())
    assert not torch.equal(out, cond)


def test_normalized_guidance_batch_is_per_item():
    cond = vec([3.0, 4.0], [0.0, 5.0])
    uncond = vec([2.0, 4.0], [2.0, 4.0])
    out = normalized_guidance(cond, uncond, 2.0, 0.0)
    for i in range(2):
        close(out[i:i + 1], normalized_guidance(cond[i:i + 1], uncond[i:i + 1], 2.0, 0.0))
    # item 1: d = [-2, 1], unit cond = [0, 1] -> par = [0, 1], orth = [-2, 0]; eta 0: [0, 5] - [-2, 0]
    close(out[1:], vec([2.0, 5.0]))


# Compositional example, uncond = [2, 4]:
#   erase e1 = [3, 4]: d = [1, 0]: par [0.36, 0.48], orth [0.64, -0.48]
#   erase e2 = [2, 6]: d = [0, 2]: unit [2,6]/sqrt40, <d,unit> = 12/sqrt40 -> par [0.6, 1.8], orth [-0.6, 0.2]
#   anchor a = [0, 5]: d = [-2, 1]: par [0, 1], orth [-2, 0]
E1, E2, ANCHOR = vec([3.0, 4.0]), vec([2.0, 6.0]), vec([0.0, 5.0])


@pytest.mark.parametrize("eta, expected", [
    # u_e1 = [0.82, -0.24], u_e2 = [-0.3, 1.1], u_a = [-2, 0.5]
    # Q = -3 * mean(u_e1, u_e2) = -3 * [0.26, 0.43] = [-0.78, -1.29]; P = u_a
    (0.5, [2.0 - 2.0 - 0.78, 4.0 + 0.5 - 1.29]),
    # u = orth: mean(e1, e2) = [0.02, -0.14] -> Q = [-0.06, 0.42]; P = [-2, 0]
    (0.0, [-0.06, 4.42]),
    # eta 1: uncond + d_a - 3 mean(d_e1, d_e2) = [2,4] + [-2,1] - 3*[0.5, 1] = [-1.5, 2]
    (1.0, [-1.5, 2.0]),
])
def test_compositional_guidance_hand_values(eta, expected):
    out = compositional_guidance([E1, E2, ANCHOR], UNCOND, [-2.0, -2.0, 2.0], eta)
    close(out, vec(expected), atol=2e-6)


def test_compositional_single_negative_and_order_independence():
    # one erase concept only, eta 0.5: uncond - 3 * [0.82, -0.24] = [-0.46, 4.72]
    close(compositional_guidance([E1], UNCOND, [-2.0], 0.5), vec([-0.46, 4.72]))
    a = compositional_guidance([E1, ANCHOR, E2], UNCOND, [-2.0, 2.0, -2.0], 0.5)
    b = compositional_guidance([ANCHOR, E2, E1], UNCOND, [2.0, -2.0, -2.0], 0.5)
    close(a, b)


def test_compositional_positive_scales_averaged():
    # two anchors at +3: P = mean(2 u_a, 2 u_e1) with eta 0: 2 * mean([-2, 0], [0.64, -0.48]) = [-1.36, -0.48]
    close(compositional_guidance([ANCHOR, E1], UNCOND, [3.0, 3.0], 0.0), vec([0.64, 3.52]))


def test_compositional_eta1_reduces_to_spec_formula_random():
    gen = torch.Generator().manual_seed(1)
    uncond, a, h1, h2, h3 = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(5))
    out = compositional_guidance([h1, h2, h3, a], uncond, [-2.0, -2.0, -2.0, 2.0])
    expected = uncond + (a - uncond) - 3 * ((h1 - uncond) + (h2 - uncond) + (h3 - uncond)) / 3
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)  # fp32 rounding of |values| up to ~10


def test_compositional_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        compositional_guidance([], UNCOND, [])
    with pytest.raises(ValueError, match="scales"):
        compositional_guidance([E1], UNCOND, [2.0, -2.0])


class _Sched:
    """Minimal scheduler stand-in: alphas_cumprod = [0.64, 0.32] (betas 0.36, 0.5)."""

    def __init__(self, prediction_type):
        self.config = {"prediction_type": prediction_type}
        self.alphas_cumprod = torch.tensor([0.64, 0.32])


def test_to_epsilon_v_prediction_hand_values():
    # t = 0: alpha = 0.8, sigma = 0.6; v = [1, -1], x = [2, 0.5] -> eps = [0.8 + 1.2, -0.8 + 0.3]
    out = to_epsilon(vec([1.0, -1.0]), vec([2.0, 0.5]), 0, _Sched("v_prediction"))
    close(out, vec([2.0, -0.5]))
    # per-item timesteps [0, 1]: item 1 has alpha = sqrt(.32), sigma = sqrt(.68); v = [1, 0], x = [0, 1]
    out = to_epsilon(vec([1.0, -1.0], [1.0, 0.0]), vec([2.0, 0.5], [0.0, 1.0]), torch.tensor([0, 1]),
                     _Sched("v_prediction"))
    close(out, vec([2.0, -0.5], [0.32 ** 0.5, 0.68 ** 0.5]))


def test_to_epsilon_inverts_v_parameterisation_with_diffusers_schedule():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    t = torch.tensor([10, 900])
    abar = sched.alphas_cumprod[t].reshape(2, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = sched.get_velocity(x0, eps, t)
    torch.testing.assert_close(to_epsilon(v, x_t, t, sched), eps, atol=1e-5, rtol=0)


def test_to_epsilon_identity_and_errors():
    v = vec([1.0, 2.0])
    assert to_epsilon(v, vec([0.0, 0.0]), 0, _Sched("epsilon")) is v
    with pytest.raises(ValueError, match="sample"):
        to_epsilon(v, v, 0, _Sched("sample"))
    with pytest.raises(ValueError, match="outside"):
        to_epsilon(v, v, 2, _Sched("v_prediction"))


# ----------------------------------------------------------------------------- norm_threshold


@pytest.mark.parametrize("threshold, expected", [
    # d = [1, 0] clipped to norm 0.5 -> [0.5, 0]: par [0.18, 0.24], orth [0.32, -0.24];
    # update = orth + 0.5 par = [0.41, -0.12]; cond - 2 * update = [2.18, 4.24]
    (0.5, [2.18, 4.24]),
    (2.0, [1.36, 4.48]),  # ||d|| = 1 is below the threshold: as without it
    (0.0, [1.36, 4.48]),  # 0: off (the reference's training)
])
def test_normalized_guidance_norm_threshold_hand_values(threshold, expected):
    close(normalized_guidance(COND, UNCOND, 3.0, 0.5, norm_threshold=threshold), vec(expected))


def test_compositional_guidance_norm_threshold_hand_values():
    # threshold 1: d_e1 = [1, 0] stays, d_e2 = [0, 2] -> [0, 1], d_a = [-2, 1] -> [-2, 1] / sqrt 5;
    # eta 1: uncond + d_a' - 3 mean(d_e1, d_e2') = [2 - 2/sqrt5 - 1.5, 4 + 1/sqrt5 - 1.5]
    out = compositional_guidance([E1, E2, ANCHOR], UNCOND, [-2.0, -2.0, 2.0], 1.0, norm_threshold=1.0)
    root5 = 5 ** 0.5
    close(out, vec([0.5 - 2 / root5, 2.5 + 1 / root5]), atol=2e-6)


def test_norm_threshold_is_per_item_and_rejects_negative():
    cond, uncond = vec([3.0, 4.0], [3.0, 4.0]), vec([2.0, 4.0], [0.0, 4.0])  # ||d|| = 1 and 3
    out = normalized_guidance(cond, uncond, 2.0, 1.0, norm_threshold=1.5)
    close(out[:1], vec([2.0, 4.0]))  # item 0 unclipped: uncond
    close(out[1:], vec([1.5, 4.0]))  # item 1: d = [3, 0] -> [1.5, 0]; cond - d' = [1.5, 4]
    with pytest.raises(ValueError, match="norm_threshold must be >= 0"):
        normalized_guidance(COND, UNCOND, 2.0, norm_threshold=-1.0)
