"""The oracle itself, against a brute-force Python reading of the contract on small inputs."""

from __future__ import annotations

import math

import pytest
import torch

from pecker_kernels.backends import eager
from pecker_kernels.backends.base import StepConfig, TensorGroup, budget, empty_masks

from .cases import gradients


def brute_force_selection(values: list[float], k: int) -> list[bool]:
    """Rank finite |v| descending, ties by index; take the first min(k, finite) of them."""
    finite = [(abs(v), i) for i, v in enumerate(values) if math.isfinite(abs(v))]
    order = sorted(finite, key=lambda pair: (-pair[0], pair[1]))
    chosen = {i for _, i in order[: min(k, len(order))]}
    return [i in chosen for i in range(len(values))]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.97])
def test_eager_selection_equals_brute_force(seed, ratio):
    sizes = (7, 0, 64, 129)
    grads = gradients(sizes, seed=seed)
    k = budget(ratio, sum(sizes))
    selection = eager.select(grads, None, "grad", [0] * len(sizes), [k])
    masks = empty_masks(grads)
    eager.write_masks(grads, None, "grad", [0] * len(sizes), selection, masks)
    got = torch.cat([eager.unpack(m, g.numel()) for m, g in zip(masks, grads, strict=True)]).tolist()
    assert got == brute_force_selection(torch.cat(grads).tolist(), k)
    assert sum(got) == min(k, sum(math.isfinite(v) for v in torch.cat(grads).tolist()))


def test_pack_and_unpack_round_trip_with_bit_order_and_zero_padding():
    mask = torch.zeros(70, dtype=torch.bool)
    mask[[0, 31, 32, 69]] = True
    words = eager.pack(mask)
    assert words.tolist() == [1 | -(2**31), 1, 1 << 5]
    assert torch.equal(eager.unpack(words, 70), mask)


def test_budget_is_floor_of_ratio_times_n_and_at_least_one():
    assert budget(0.5, 7) == 3 and budget(0.001, 10) == 1 and budget(1.0, 10) == 10 and budget(0.5, 0) == 1


def _all_selected(tensors):
    return [eager.pack(torch.ones(t.numel(), dtype=torch.bool)) for t in tensors]


@pytest.mark.parametrize(
    ("kind", "make_torch", "config_of_step"),
    [
        (
            "adamw",
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
            lambda step: StepConfig.adam("adamw", lr=1e-2, step=step, weight_decay=0.1),
        ),
        (
            "adam",
            lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=0.1, foreach=False),
            lambda step: StepConfig.adam("adam", lr=1e-2, step=step, betas=(0.0, 0.99), weight_decay=0.1),
        ),
        (
            "sgd",
            lambda ps: torch.optim.SGD(
                ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False
            ),
            lambda step: StepConfig.sgd(
                lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, momentum_init=step == 1
            ),
        ),
    ],
)
def test_eager_update_with_everything_selected_follows_torch_optim(kind, make_torch, config_of_step):
    torch.manual_seed(0)
    reference = [torch.randn(50, requires_grad=True), torch.randn(7, 3, requires_grad=True)]
    ours = [p.detach().clone() for p in reference]
    adam = kind != "sgd"
    config = config_of_step(1)
    exp_avg = [torch.zeros_like(p) for p in ours] if (not adam or config.beta1 > 0) else None
    group = TensorGroup(ours, [], exp_avg, [torch.zeros_like(p) for p in ours] if adam else None)
    optimizer = make_torch(reference)
    for step in range(1, 6):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(reference, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        group.grads = grads
        eager.update(group, config_of_step(step), "grad", [0, 0], masks_in=_all_selected(ours))
    for p, q in zip(ours, reference, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-6)


def _reference_bf16_moment_step(kind, p, g, m, v, chosen, step):
    """One step spelled out from StepConfig's formulas: fp32 math on the fp32 values of the bf16
    moments, each new moment rounded to bf16 once when stored; unselected elements untouched."""
    m32 = None if m is None else m.float()
    v32 = None if v is None else v.float()
    if kind == "sgd":
        buf = g if step == 1 else 0.9 * m32 + (1 - 0.1) * g
        return torch.where(chosen, p - 0.1 * buf, p), torch.where(chosen, buf.to(torch.bfloat16), m), None
    beta1, beta2, lr = (0.9, 0.999, 1e-2) if kind == "adamw" else (0.0, 0.99, 1e-2)
    decayed = p
    if kind == "adamw":
        decayed = p * (1 - lr * 0.1)
    else:
        g = g + 0.05 * p
    new_m = g if m is None else m32 + (1 - beta1) * (g - m32)
    new_v = beta2 * v32 + (1 - beta2) * g * g
    denom = new_v.sqrt() / math.sqrt(1 - beta2**step) + 1e-8
    new_p = decayed - lr / (1 - beta1**step) * new_m / denom  # the unrounded moments move p
    stored_m = None if m is None else torch.where(chosen, new_m.to(torch.bfloat16), m)
    return torch.where(chosen, new_p, p), stored_m, torch.where(chosen, new_v.to(torch.bfloat16), v)


@pytest.mark.parametrize("kind", ["adamw", "adam-beta1-0", "sgd-momentum"])
def test_eager_bf16_moments_are_fp32_math_rounded_once_per_step(kind):
    gen = torch.Generator().manual_seed(8)
    n = 1000
    p = torch.randn(n, generator=gen)
    m = None if kind == "adam-beta1-0" else torch.randn(n, generator=gen).to(torch.bfloat16)
    v = None if kind == "sgd-momentum" else torch.rand(n, generator=gen).to(torch.bfloat16)
    chosen = torch.rand(n, generator=gen) < 0.6
    want_p, want_m, want_v = p.clone(), m, v
    group = TensorGroup([p], [], None if m is None else [m.clone()], None if v is None else [v.clone()])
    for step in range(1, 4):
        g = torch.randn(n, generator=gen)
        if kind == "sgd-momentum":
            config = StepConfig.sgd(lr=0.1, momentum=0.9, dampening=0.1, momentum_init=step == 1)
        elif kind == "adamw":
            config = StepConfig.adam("adamw", lr=1e-2, step=step, weight_decay=0.1)
        else:
            config = StepConfig.adam("adam", lr=1e-2, step=step, betas=(0.0, 0.99), weight_decay=0.05)
        group.grads = [g]
        eager.update(group, config, "grad", [0], masks_in=[eager.pack(chosen)])
        want_p, want_m, want_v = _reference_bf16_moment_step(
            kind.split("-")[0], want_p, g, want_m, want_v, chosen, step
        )
    assert torch.equal(p, want_p)
    for got, want in ((group.exp_avg, want_m), (group.exp_avg_sq, want_v)):
        assert (got is None) == (want is None)
        if want is not None:
            assert got[0].dtype == torch.bfloat16
            assert torch.equal(got[0].view(torch.int16), want.view(torch.int16))
