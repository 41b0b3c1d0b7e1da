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
