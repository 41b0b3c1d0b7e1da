"""The SiD loss against a direct, element-by-element implementation of the recipe's formula
(docs/RECIPE.md)."""

import math
import types

import pytest
import torch

from pecker_kernels.unlearn.diffusion import OneStepGenerator, Schedule, ddim_sample
from pecker_kernels.unlearn.losses import class_weights, denoising_loss, sid_loss, weighted_mean
from pecker_kernels.unlearn.nets import EpsNet


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


def test_schedule_is_ddpm_schedulers_defaults():
    from diffusers import DDPMScheduler

    s = Schedule()
    assert s.steps == 1000 and s.prediction_type == "epsilon"
    torch.testing.assert_close(s.abar, DDPMScheduler().alphas_cumprod, rtol=0, atol=0)


class _Stub(torch.nn.Module):
    """A stand-in UNet: its output is whatever ``fn(x, t)`` says, wrapped like diffusers' output."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, class_labels=None):
        return types.SimpleNamespace(sample=self.fn(x, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_eps_net_turns_every_prediction_type_into_noise(prediction_type):
    from diffusers import DDPMScheduler

    s = Schedule(DDPMScheduler(prediction_type=prediction_type))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([10, 400, 900])
    a, n = s.coefficients(t)
    target = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - n * x0}[prediction_type]
    net = EpsNet(_Stub(lambda x, t: target), s)
    torch.testing.assert_close(net(s.q_sample(x0, t, eps), t, None), eps, atol=1e-4, rtol=1e-4)


def test_ddim_sampling_follows_the_deterministic_update_from_t_minus_1():
    s = Schedule()
    net = EpsNet(_Stub(lambda x, t: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000), s)
    labels = torch.zeros(4, dtype=torch.long)
    got = ddim_sample(net, s, labels, (1, 4, 4), 2, torch.Generator().manual_seed(5))
    x = torch.randn((4, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    for t, t_next in [(999, 499), (499, None)]:  # two "trailing" steps: T - 1, then T / 2 - 1
        tt = torch.full((4,), t)
        a, n = s.coefficients(tt)
        x0 = ((x - n * net(x, tt, labels)) / a).clamp(-1, 1)
        if t_next is None:
            x = x0
            break
        eps = (x - a * x0) / n  # the noise that goes with the clipped x0
        a_next, n_next = s.coefficients(torch.full((4,), t_next))
        x = a_next * x0 + n_next * eps
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)
