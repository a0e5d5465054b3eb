"""Loss targets (SPEC 3, 4b) on toy tensors with hand-computed numbers.

Vectors are (1, 1, 1, 2) tensors written as [x, y].
"""

import pytest
import torch

from recare.train.losses import esd_target, mse, recare_erase_target, recare_loss, retain_target, stage1_erase_target


def vec(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 1, 2)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


EPS_C, EPS_U = vec([3.0, 4.0]), vec([2.0, 4.0])  # d = [1, 0]; see test_guidance for the projection


def test_esd_target_hand_values():
    # c_from = c: eps_c - 2 (eps_c - eps_u) = [3, 4] - [2, 0] = [1, 4] = 2 eps_u - eps_c
    close(esd_target(EPS_C, EPS_C, EPS_U), vec([1.0, 4.0]))
    # c_from = [0, 1], eta 3: [0, 1] - 3 [1, 0] = [-3, 1]
    close(esd_target(vec([0.0, 1.0]), EPS_C, EPS_U, negative_guidance=3.0), vec([-3.0, 1.0]))


def test_stage1_target_is_uncond_at_defaults_and_differs_from_esd():
    close(stage1_erase_target(EPS_C, EPS_U), EPS_U)
    assert not torch.allclose(stage1_erase_target(EPS_C, EPS_U), esd_target(EPS_C, EPS_C, EPS_U))


@pytest.mark.parametrize("scale, eta, expected", [
    (2.0, 0.0, [2.36, 4.48]),  # eps_c - orth, orth = [0.64, -0.48]
    (3.0, 0.5, [1.36, 4.48]),  # eps_c - 2 (orth + 0.5 par), par = [0.36, 0.48]
])
def test_stage1_target_eta_not_one(scale, eta, expected):
    close(stage1_erase_target(EPS_C, EPS_U, scale, eta), vec(expected))


def test_recare_erase_target_hand_values():
    e1, e2, anchor = vec([3.0, 4.0]), vec([2.0, 6.0]), vec([0.0, 5.0])
    # eta 1: eps_u + d_a - 3 mean(d_e1, d_e2) = [2,4] + [-2,1] - 3 [0.5, 1] = [-1.5, 2]
    close(recare_erase_target([e1, e2], anchor, EPS_U), vec([-1.5, 2.0]), atol=2e-6)
    # eta 0.5 (projections in test_guidance): [-0.78, 3.21]
    close(recare_erase_target([e1, e2], anchor, EPS_U, eta=0.5), vec([-0.78, 3.21]), atol=2e-6)
    # g = 3, eta 1: eps_u + 2 d_a - 4 mean d_h = [2,4] + [-4,2] - [2,4] = [-4, 2]
    close(recare_erase_target([e1, e2], [anchor], EPS_U, guidance=3.0), vec([-4.0, 2.0]), atol=2e-6)


def test_recare_erase_target_needs_both_lists():
    with pytest.raises(ValueError, match="at least one"):
        recare_erase_target([], EPS_C, EPS_U)
    with pytest.raises(ValueError, match="at least one"):
        recare_erase_target([EPS_C], [], EPS_U)


def test_retain_target_is_detached_teacher_prediction():
    teacher = vec([1.0, 2.0]).requires_grad_(True)
    target = retain_target(teacher)
    assert not target.requires_grad
    close(target, vec([1.0, 2.0]))


def test_recare_loss_hand_values_and_gradients():
    pred_erase = vec([1.0, 2.0]).requires_grad_(True)
    pred_retain = vec([0.0, 0.0]).requires_grad_(True)
    target_erase = vec([0.0, 0.0]).requires_grad_(True)
    # erase MSE = (1 + 4) / 2 = 2.5; retain MSE = (9 + 16) / 2 = 12.5; total = 2.5 + 0.5 * 12.5 = 8.75
    total, erase, retain = recare_loss(pred_erase, target_erase, pred_retain, vec([3.0, 4.0]), retain_weight=0.5)
    assert (total.item(), erase.item(), retain.item()) == (8.75, 2.5, 12.5)
    total.backward()
    close(pred_erase.grad, vec([1.0, 2.0]))      # d/dp mean((p - 0)^2) = 2 p / 2
    close(pred_retain.grad, vec([-1.5, -2.0]))  # 0.5 * 2 (p - r) / 2
    assert target_erase.grad is None


def test_mse_upcasts_half_precision():
    loss = mse(vec([300.0, 0.0]).half(), vec([0.0, 0.0]).half())  # 90000 / 2 overflows fp16 (max 65504)
    assert loss.dtype == torch.float32 and loss.item() == 45000.0
