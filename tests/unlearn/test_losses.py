"""The SiD loss against a direct, element-by-element implementation of the recipe's formula
(docs/RECIPE.md)."""

import math

import pytest
import torch

from pecker_kernels.unlearn.diffusion import OneStepGenerator, Schedule
from pecker_kernels.unlearn.losses import class_weights, denoising_loss, sid_loss, weighted_mean


def direct_sid(x0, f_t, f_p, alpha):
    """L_b = sum_pixels (f_T - f_P) * ((f_T - x0) - alpha (f_T - f_P)) / w_b, w_b = max(mean|f_T - x0|, 1e-5),
    written as plain loops over samples and pixels (w treated as a constant for gradients)."""
    out = []
    for b in range(x0.shape[0]):
        xs, ts, ps = x0[b].flatten(), f_t[b].flatten(), f_p[b].flatten()
        n = xs.numel()
        w = max(sum(abs(float(ts[i].detach() - xs[i].detach())) for i in range(n)) / n, 1e-5)
        total = 0.0
        for i in range(n):
            d = ts[i] - ps[i]
            total = total + d * ((ts[i] - xs[i]) - alpha * d)
        out.append(total / w)
    return torch.stack(out)


@pytest.mark.parametrize("alpha", [1.2, 0.5])
def test_sid_loss_matches_formula_values_and_gradients(alpha):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    f_p = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ours = sid_loss(x0, f_t, f_p, alpha)
    ref = direct_sid(x0, f_t, f_p, alpha)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours.sum(), (x0, f_t, f_p))
    ref_grads = torch.autograd.grad(ref.sum(), (x0, f_t, f_p))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_sid_loss_weight_floor():
    x0 = torch.zeros(1, 1, 2, 2)
    f = torch.zeros(1, 1, 2, 2)
    f_p = torch.full((1, 1, 2, 2), 0.5)
    # f_T == x0: w hits the 1e-5 floor; L = sum(0.5 * (0 - 1.2 * 0.5)) / 1e-5 = 4 * -0.3 / 1e-5
    assert math.isclose(float(sid_loss(x0, f, f_p)), 4 * 0.5 * (-1.2 * 0.5) / 1e-5, rel_tol=1e-5)


def test_weights_and_denoising_loss():
    w = class_weights(torch.tensor([False, True, False]), 0.01)
    assert w.tolist() == pytest.approx([1.0, 0.01, 1.0])
    assert float(weighted_mean(torch.tensor([1.0, 100.0, 3.0]), w)) == pytest.approx((1 + 1 + 3) / 3)
    assert denoising_loss(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)).tolist() == [1.0, 1.0]


def test_schedule_and_one_step_generator():
    s = Schedule()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert float(s.abar[440]) == pytest.approx(float(torch.prod(1 - betas[:441])), rel=1e-5)
    x0 = torch.randn(2, 1, 4, 4)
    eps = torch.randn(2, 1, 4, 4)
    t = torch.tensor([38, 711])
    torch.testing.assert_close(s.x0_from_eps(s.q_sample(x0, t, eps), t, eps), x0, atol=1e-4, rtol=1e-4)

    class Zero(torch.nn.Module):
        def forward(self, x, t, c):
            return torch.zeros_like(x)

    z = torch.randn(2, 1, 4, 4)
    a = s.abar[440]
    # eps = 0: G(z) = sqrt(1 - abar) z / sqrt(abar)
    torch.testing.assert_close(OneStepGenerator(Zero(), s, 440)(z, None), (1 - a).sqrt() * z / a.sqrt())
