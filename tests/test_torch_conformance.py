"""torch.optim's own generic optimizer tests, ported to the Salient optimizers at ``ratio=1.0``.

At ``ratio=1.0`` every element is selected, so each optimizer must behave exactly like the torch.optim
optimizer it replaces: same trajectory, same state, same state_dict, hook, scheduler and param-group
semantics, and the same errors for bad hyper-parameters. Every check runs torch.optim on the same inputs
and compares; nothing is compared against values our own code produced before.

The configurations follow torch's OptimizerInfo database (``optim_inputs_func_adam``/``_adamw``/``_sgd``
and the ``optim_error_inputs_func_*``), CPU only, without the ones we do not support (amsgrad,
differentiable), plus our own edge (Adam with beta1 = 0 keeps no first moment).
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    ExponentialLR,
    LinearLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import pecker_kernels as pk

CPU_BACKENDS = ["eager", "cpu"]

# The tolerances of tests/test_optim.py's torch-parity test (fp32, tens of steps).
RTOL, ATOL = 1e-5, 1e-6
STEPS = 8

OURS = {"adamw": pk.SalientAdamW, "adam": pk.SalientAdam, "sgd": pk.SalientSGD}
THEIRS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}

# The hyper-parameter keys of torch's param groups that are part of our API, per optimizer.
ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable")
ADAM_KEYS += ("differentiable", "fused")
SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach")
GROUP_KEYS = {
    "adamw": ADAM_KEYS,
    "adam": (*ADAM_KEYS, "decoupled_weight_decay"),
    "sgd": (*SGD_KEYS, "differentiable", "fused"),
}

# torch's CPU configurations (optim_inputs_func_adam / _adamw / _sgd) minus amsgrad, plus ours.
ADAM_CONFIGS = {
    "default": {},
    "non_default_lr": {"lr": 0.01},
    "weight_decay": {"weight_decay": 0.1},
    "maximize": {"weight_decay": 0.1, "maximize": True},
    "betas_eps": {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-4},
    "beta1_zero": {"lr": 0.01, "betas": (0.0, 0.99)},
}
SGD_CONFIGS = {
    "default": {},
    "non_default_lr": {"lr": 1e-2},
    "tensor_lr": {"lr": torch.tensor(0.001)},
    "weight_decay": {"weight_decay": 0.5},
    "momentum": {"momentum": 0.9},
    "maximize": {"weight_decay": 0.1, "maximize": True},
    "dampening": {"momentum": 0.9, "dampening": 0.5},
    "weight_decay_momentum": {"momentum": 0.9, "weight_decay": 0.1},
    "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "nesterov_maximize": {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "maximize": True},
}
CONFIGS = {
    "adamw": ADAM_CONFIGS,
    "adam": {**ADAM_CONFIGS, "decoupled_weight_decay": {"weight_decay": 0.1, "decoupled_weight_decay": True}},
    "sgd": SGD_CONFIGS,
}

# The global "cliquey" flags torch adds to every configuration; ours accept them and change nothing.
IMPLS = {
    "plain": {},
    "forloop": {"foreach": False, "fused": False, "differentiable": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
ADAM_IMPLS = {**IMPLS, "capturable": {"capturable": True}, "not_capturable": {"capturable": False}}

PARITY_CASES = [
    pytest.param(kind, name, impl, id=f"{kind}-{name}-{impl}")
    for kind, configs in CONFIGS.items()
    for name in configs
    for impl in (IMPLS if kind == "sgd" else ADAM_IMPLS)
]


# ---- helpers -------------------------------------------------------------------------------------


def _config(kind, name):
    return copy.deepcopy(CONFIGS[kind][name])  # fresh tensors (tensor lr) for every optimizer


def _ours(kind, params, backend, **kwargs):
    return OURS[kind](params, ratio=1.0, backend=backend, **kwargs)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _inputs(steps=STEPS, seed=1, shape=(8, 6)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


def _loss(model, x):
    return model(x).pow(2).mean()


def _train(model, optimizer, inputs, closure=False, schedulers=()):
    """One step per input; returns the losses ``step`` handed back (with a closure) or computed."""
    losses = []
    for x in inputs:

        def loss_fn(x=x):
            optimizer.zero_grad()
            loss = _loss(model, x)
            loss.backward()
            return loss

        if closure:
            loss = optimizer.step(loss_fn)
        else:
            loss = loss_fn()
            optimizer.step()
        losses.append(float(torch.as_tensor(loss).detach()))
        for scheduler in schedulers:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(losses[-1])
            else:
                scheduler.step()
    return losses


def _assert_params_close(ours, theirs, rtol=RTOL, atol=ATOL):
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs)
    for p, q in zip(ours, theirs, strict=True):
        assert p.dtype == q.dtype and p.shape == q.shape
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


def _assert_state_like_torch(ours, theirs, ours_params, theirs_params):
    """Every state entry torch keeps (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) is
    in ours with the same values; Adam with beta1 = 0 may keep no ``exp_avg`` (torch keeps the grad).
    Our own extra entries (mask, selection step) are not compared."""
    for p, q in zip(ours_params, theirs_params, strict=True):
        if q not in theirs.state:
            continue  # (ours may still keep its step count and mask there)
        group = next(g for g in theirs.param_groups if any(q is x for x in g["params"]))
        for key, value in theirs.state[q].items():
            if key == "exp_avg" and group["betas"][0] == 0:
                continue
            assert key in ours.state[p], key
            mine = torch.as_tensor(ours.state[p][key]).to(torch.float64)
            torch.testing.assert_close(mine, torch.as_tensor(value).to(torch.float64), rtol=RTOL, atol=ATOL)


def _assert_equal_nested(a, b, path="state_dict"):
    """Exact equality of (nested) state dicts: tensors with torch.equal, the rest with ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            _assert_equal_nested(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_nested(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


# ---- trajectories: every torch configuration -------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "name", "impl"), PARITY_CASES)
def test_ratio_one_follows_torch_trajectory_and_state_for_every_torch_configuration(
    kind, name, impl, backend
):
    flags = (ADAM_IMPLS if kind != "sgd" else IMPLS)[impl]
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name), **flags)
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    inputs = _inputs()
    _train(model, ours, inputs)
    _train(reference, theirs, inputs)
    _assert_params_close(model.parameters(), reference.parameters())
    _assert_state_like_torch(ours, theirs, list(model.parameters()), list(reference.parameters()))
    assert all(len(state) > 0 for state in ours.state.values())  # torch's test_non_empty_state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "args"),
    [
        ("adamw", (0.01, (0.8, 0.99), 1e-6, 0.05, False)),
        ("adam", (0.01, (0.8, 0.99), 1e-6, 0.05, False)),
        ("sgd", (0.05, 0.9, 0.2, 1e-3, False)),
    ],
)
def test_positional_arguments_follow_torch_order(kind, args, backend):
    model, reference = _model(), _model()
    ours = OURS[kind](model.parameters(), *args, ratio=1.0, backend=backend)
    theirs = THEIRS[kind](reference.parameters(), *args)
    inputs = _inputs()
    _train(model, ours, inputs)
    _train(reference, theirs, inputs)
    _assert_params_close(model.parameters(), reference.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "name"), [("adamw", "maximize"), ("adam", "beta1_zero"), ("sgd", "nesterov")]
)
def test_step_with_closure_returns_its_loss_and_follows_torch(kind, name, backend):
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    inputs = _inputs()
    ours_losses = _train(model, ours, inputs, closure=True)
    theirs_losses = _train(reference, theirs, inputs, closure=True)
    torch.testing.assert_close(ours_losses, theirs_losses, rtol=RTOL, atol=ATOL)
    _assert_params_close(model.parameters(), reference.parameters())

    calls = []
    sentinel = torch.tensor(3.0)

    def closure():
        calls.append(1)
        return sentinel

    assert ours.step(closure) is sentinel and len(calls) == 1  # handed back as is, called once


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "name"), [("adamw", "default"), ("adam", "maximize"), ("sgd", "momentum")])
def test_all_grads_none_step_is_a_noop_that_does_not_count_a_step_like_torch(kind, name, backend):
    """As torch's derived-optimizer test: one step in the middle sees only None gradients."""
    model, reference = _model(), _model()
    for m in (model, reference):
        m[2].bias.requires_grad_(False)  # never gets a gradient: no state, never moves
    frozen_before = model[2].bias.detach().clone()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    for m, optimizer in ((model, ours), (reference, theirs)):
        for i, x in enumerate(_inputs()):
            optimizer.zero_grad()
            if i == 3:
                assert all(p.grad is None for p in m.parameters())  # zero_grad sets them to None
            else:
                _loss(m, x).backward()
            optimizer.step()
    _assert_params_close(model.parameters(), reference.parameters())
    _assert_state_like_torch(ours, theirs, list(model.parameters()), list(reference.parameters()))
    assert torch.equal(model[2].bias, frozen_before) and model[2].bias not in ours.state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_step_is_a_noop_when_no_parameter_requires_grad(kind, backend):
    params = [torch.randn(2, 3) for _ in range(2)]
    before = [p.clone() for p in params]
    optimizer = _ours(kind, params, backend)
    loss = optimizer.step(lambda: torch.tensor([1.0]))
    assert float(loss) == 1.0
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert not any(optimizer.state.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "name"), [("adamw", "default"), ("adam", "default"), ("sgd", "momentum")])
def test_zero_gradients_move_parameters_exactly_as_torch(kind, name, backend):
    """Zero gradients: Adam and SGD without weight decay leave parameters untouched; AdamW decays them
    like torch. ``zero_grad(set_to_none=False)`` keeps zero tensors, as torch's does."""
    ours_params = [torch.nn.Parameter(torch.randn(5, 1)), torch.nn.Parameter(torch.randn(3))]
    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    before = [p.detach().clone() for p in ours_params]
    ours = _ours(kind, ours_params, backend, **_config(kind, name))
    theirs = THEIRS[kind](theirs_params, **_config(kind, name))
    for params, optimizer in ((ours_params, ours), (theirs_params, theirs)):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in params)
        for _ in range(3):
            optimizer.step()
    _assert_params_close(ours_params, theirs_params)
    if kind != "adamw":
        assert all(torch.equal(p, b) for p, b in zip(ours_params, before, strict=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_named_parameters_are_accepted_and_their_names_saved_like_torch(kind, backend):
    model, reference = _model(), _model()
    ours = _ours(kind, model.named_parameters(), backend, lr=0.01)
    theirs = THEIRS[kind](reference.named_parameters(), lr=0.01)
    inputs = _inputs()
    _train(model, ours, inputs)
    _train(reference, theirs, inputs)
    _assert_params_close(model.parameters(), reference.parameters())
    ours_groups = ours.state_dict()["param_groups"]
    theirs_groups = theirs.state_dict()["param_groups"]
    assert [g["param_names"] for g in ours_groups] == [g["param_names"] for g in theirs_groups]


# ---- state_dict ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("adamw", "default"),
        ("adam", "maximize"),
        ("adam", "beta1_zero"),
        ("sgd", "dampening"),
        ("sgd", "default"),
    ],
)
def test_state_dict_round_trip_continues_like_the_uninterrupted_run_and_torch(kind, name, backend):
    inputs = _inputs(10)
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    _train(model, ours, inputs[:5])
    _train(reference, theirs, inputs[:5])

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": ours.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    _assert_equal_nested(saved["optim"], ours.state_dict())  # survives torch.save / weights_only load
    untouched = copy.deepcopy(saved["optim"])

    restored = _model(seed=7)
    restored.load_state_dict(saved["model"])
    again = _ours(kind, restored.parameters(), backend, **_config(kind, name))
    again.load_state_dict(saved["optim"])
    _assert_equal_nested(saved["optim"], untouched)  # loading does not modify the given state dict

    _train(model, ours, inputs[5:])
    _train(restored, again, inputs[5:])
    _train(reference, theirs, inputs[5:])
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)
    _assert_equal_nested(ours.state_dict(), again.state_dict())  # deterministic, equal not identical
    _assert_params_close(restored.parameters(), reference.parameters())


LOAD_FROM_TORCH = [
    ("adamw", "default"),
    ("adamw", "maximize"),
    ("adam", "weight_decay"),
    ("adam", "beta1_zero"),
    ("sgd", "default"),
    ("sgd", "momentum"),
    ("sgd", "dampening"),
    ("sgd", "nesterov"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "name"), LOAD_FROM_TORCH)
def test_loading_a_state_dict_saved_by_torch_continues_like_torch(kind, name, backend):
    """A checkpoint of torch.optim's optimizer loads into ours (its param groups replace ours, as
    torch's load_state_dict does: here lr) and continues on torch's trajectory."""
    inputs = _inputs(8)
    reference = _model()
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    _train(reference, theirs, inputs[:4])
    saved = copy.deepcopy(theirs.state_dict())
    untouched = copy.deepcopy(saved)

    model = copy.deepcopy(reference)
    ours = _ours(kind, model.parameters(), backend, **{**_config(kind, name), "lr": 0.5})
    ours.load_state_dict(saved)
    _assert_equal_nested(saved, untouched)
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]

    _train(reference, theirs, inputs[4:])
    _train(model, ours, inputs[4:])
    _assert_params_close(model.parameters(), reference.parameters())
    _assert_state_like_torch(ours, theirs, list(model.parameters()), list(reference.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "name"), [("adamw", "weight_decay"), ("adam", "maximize"), ("sgd", "dampening")]
)
def test_torch_optimizer_loads_our_state_dict_and_continues_on_the_same_trajectory(kind, name, backend):
    inputs = _inputs(8)
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    _train(model, ours, inputs[:4])
    _train(reference, theirs, inputs[:4])

    handed_over = copy.deepcopy(model)
    torch_from_ours = THEIRS[kind](handed_over.parameters(), **_config(kind, name))
    torch_from_ours.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train(handed_over, torch_from_ours, inputs[4:])
    _train(reference, theirs, inputs[4:])
    _assert_params_close(handed_over.parameters(), reference.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "name"), [("adamw", "default"), ("adam", "weight_decay")])
def test_state_dict_with_a_python_float_step_loads_and_continues_like_torch(kind, name, backend):
    """torch's test_load_nontensor_step: ``step`` saved as a Python number (older checkpoints)."""
    torch.manual_seed(2)
    start = [torch.randn(2, 3) for _ in range(2)]
    runs = []
    makers = (
        lambda ps: _ours(kind, ps, backend, **_config(kind, name)),
        lambda ps: THEIRS[kind](ps, **_config(kind, name)),
    )
    for make in makers:
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(ps)
        for seed in range(3):
            _set_grads(ps, seed)
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for state in state_dict["state"].values():
            state["step"] = float(state["step"])
        optimizer.load_state_dict(state_dict)
        for seed in range(3, 6):
            _set_grads(ps, seed)
            optimizer.step()
        runs.append((ps, optimizer))
    (ours_params, ours), (theirs_params, theirs) = runs
    _assert_params_close(ours_params, theirs_params)
    _assert_state_like_torch(ours, theirs, ours_params, theirs_params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "name"), [("adamw", "weight_decay"), ("adam", "default"), ("sgd", "nesterov")]
)
def test_state_dict_without_the_newer_flags_loads_and_continues_like_torch(kind, name, backend):
    """torch's test_can_load_older_state_dict: groups saved before maximize/foreach/fused/capturable/
    differentiable (and decoupled_weight_decay) existed."""
    newer = ("foreach", "differentiable", "fused", "maximize", "capturable", "decoupled_weight_decay")
    inputs = _inputs(6)
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    for m, optimizer in ((model, ours), (reference, theirs)):
        _train(m, optimizer, inputs[:3])
        old = copy.deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            for flag in newer:
                group.pop(flag, None)
        optimizer.load_state_dict(old)
        _train(m, optimizer, inputs[3:])
    _assert_params_close(model.parameters(), reference.parameters())


# ---- copies --------------------------------------------------------------------------------------


def _public_attrs(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize(
    ("kind", "name"), [("adamw", "maximize"), ("adam", "beta1_zero"), ("sgd", "momentum")]
)
def test_copied_optimizer_steps_its_own_parameters_like_a_copied_torch_optimizer(kind, name, copier, backend):
    def duplicate(optimizer):
        if copier == "deepcopy":
            return copy.deepcopy(optimizer)
        return pickle.loads(pickle.dumps(optimizer))

    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    inputs = _inputs(3)
    _train(model, ours, inputs)
    _train(reference, theirs, inputs)
    ours_copy, theirs_copy = duplicate(ours), duplicate(theirs)
    assert _public_attrs(ours_copy) == _public_attrs(ours)
    originals = [p.detach().clone() for p in model.parameters()]

    copies = []
    for optimizer in (ours_copy, theirs_copy):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for seed in range(10, 13):
            _set_grads(params, seed)
            optimizer.step()
        copies.append(params)
    _assert_params_close(*copies)
    _assert_state_like_torch(ours_copy, theirs_copy, *copies)
    for p, b in zip(model.parameters(), originals, strict=True):
        assert torch.equal(p, b)  # the copy owns its own parameters and state


# ---- lr schedulers -------------------------------------------------------------------------------

SCHEDULERS = {
    "step": lambda opt: [StepLR(opt, step_size=3, gamma=0.5)],
    "linear": lambda opt: [LinearLR(opt, start_factor=0.4, end_factor=0.8, total_iters=4)],
    "constant_then_exponential": lambda opt: [
        ConstantLR(opt, factor=0.4, total_iters=4),
        ExponentialLR(opt, gamma=0.9),
    ],
    "exponential_and_plateau": lambda opt: [
        ExponentialLR(opt, gamma=0.9),
        ReduceLROnPlateau(opt, factor=0.5, patience=0),
    ],
    "polynomial": lambda opt: [PolynomialLR(opt, power=0.9, total_iters=4)],
    # Cycles betas[0] (Adam) or momentum (SGD) as well: the step must read them from the group.
    "one_cycle": lambda opt: [OneCycleLR(opt, max_lr=0.05, total_steps=12)],
}
SCHEDULED = {
    "adamw": {"lr": 0.01},
    "adam": {"lr": 0.01, "weight_decay": 0.1},
    "sgd": {"lr": 0.05, "momentum": 0.9},
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("schedule", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", sorted(OURS))
def test_lr_schedulers_drive_our_optimizer_exactly_as_torch(kind, schedule, backend):
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **SCHEDULED[kind])
    theirs = THEIRS[kind](reference.parameters(), **SCHEDULED[kind])
    histories = []
    for m, optimizer in ((model, ours), (reference, theirs)):
        schedulers = SCHEDULERS[schedule](optimizer)
        history = []
        for x in _inputs(10):
            _train(m, optimizer, [x], schedulers=schedulers)
            group = optimizer.param_groups[0]
            history.append((group["lr"], group.get("betas"), group.get("momentum")))
        histories.append(history)
    assert histories[0] == histories[1]
    _assert_params_close(model.parameters(), reference.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_param_group_lr_scheduled_next_to_a_default_group_follows_torch(kind, backend):
    """torch's test_param_group_with_lrscheduler_goes_right_direction, compared step by step."""
    model, reference = _model(), _model()
    runs = []
    for m, make in ((model, lambda g: _ours(kind, g, backend)), (reference, THEIRS[kind])):
        groups = [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "lr": 0.01}]
        optimizer = make(groups)
        schedulers = [StepLR(optimizer, step_size=2, gamma=0.5), ReduceLROnPlateau(optimizer, patience=0)]
        runs.append(_train(m, optimizer, _inputs(1) * 10, closure=True, schedulers=schedulers))
        assert runs[-1][-1] < runs[-1][0]  # goes the right direction
        runs.append([g["lr"] for g in optimizer.param_groups])
    assert runs[1] == runs[3]
    torch.testing.assert_close(runs[0], runs[2], rtol=RTOL, atol=ATOL)
    _assert_params_close(model.parameters(), reference.parameters())


# ---- param groups --------------------------------------------------------------------------------

GROUP_OPTIONS = {
    "adamw": ({"lr": 1e-3}, {"lr": 0.02, "weight_decay": 0.1, "maximize": True}, {"betas": (0.8, 0.95)}),
    "adam": ({}, {"lr": 0.02, "betas": (0.0, 0.99), "weight_decay": 0.05, "maximize": True}, {"eps": 1e-4}),
    "sgd": (
        {"lr": 0.01, "momentum": 0.5},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True},
        {"dampening": 0.3},
    ),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_options_given_in_param_group_dicts_behave_as_in_torch(kind, backend):
    """maximize, weight_decay, lr (and betas/eps, momentum/nesterov/dampening) set per group; a group
    at lr 1e-28 does not move, as in torch's test_param_groups_lr."""
    outer, first, second = GROUP_OPTIONS[kind]
    model, reference = _model(), _model()
    still = torch.randn(2)
    params = []
    makers = (lambda g: _ours(kind, g, backend, **outer), lambda g: THEIRS[kind](g, **outer))
    for m, make in zip((model, reference), makers, strict=True):
        irrelevant = torch.nn.Parameter(still.clone())
        options = [first, second, {"lr": 1e-28}]
        params_of = [list(m[0].parameters()), list(m[2].parameters()), [irrelevant]]
        optimizer = make([{"params": ps, **o} for ps, o in zip(params_of, options, strict=True)])
        for i, x in enumerate(_inputs()):
            optimizer.zero_grad()
            _loss(m, x).backward()
            _set_grads([irrelevant], seed=100 + i)
            optimizer.step()
        params.append([*m.parameters(), irrelevant])
        for group, given in zip(optimizer.param_groups, options, strict=True):
            assert all(group[k] == v for k, v in given.items())
            assert all(group[k] == v for k, v in outer.items() if k not in given)
    _assert_params_close(*params)
    assert torch.equal(params[0][-1], still)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_param_groups_weight_decay_only_on_weights_follows_torch(kind, backend):
    """torch's test_param_groups_weight_decay: one config for weights, the same with weight_decay 0
    for the biases."""
    options = {"lr": 0.01, "weight_decay": 0.1, "maximize": kind == "adam"}
    model, reference = _model(), _model()
    results = []
    for m, make in ((model, lambda g: _ours(kind, g, backend)), (reference, THEIRS[kind])):
        weights = [p for n, p in m.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in m.named_parameters() if n.endswith("bias")]
        optimizer = make([{"params": weights, **options}, {"params": biases, **options, "weight_decay": 0.0}])
        results.append(_train(m, optimizer, _inputs()))
    torch.testing.assert_close(results[0], results[1], rtol=RTOL, atol=ATOL)
    _assert_params_close(model.parameters(), reference.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_add_param_group_mid_training_follows_torch_and_fills_defaults_like_torch(kind, backend):
    options = {"lr": 0.01, "weight_decay": 0.05, "maximize": True}
    if kind == "sgd":
        options["momentum"] = 0.9
    inputs = _inputs(6)
    model, reference = _model(), _model()
    ours = _ours(kind, model[0].parameters(), backend, **options)
    theirs = THEIRS[kind](reference[0].parameters(), **options)
    for m, optimizer in ((model, ours), (reference, theirs)):
        _train(m, optimizer, inputs[:3])
        optimizer.add_param_group({"params": list(m[2].parameters()), "lr": 0.03})
        _train(m, optimizer, inputs[3:])
    _assert_params_close(model.parameters(), reference.parameters())
    for key in GROUP_KEYS[kind]:
        assert ours.param_groups[1][key] == theirs.param_groups[1][key], key


@pytest.mark.parametrize("kind", sorted(OURS))
def test_param_groups_and_defaults_hold_torch_hyper_parameter_keys_and_values(kind):
    options = {"lr": 0.02, "weight_decay": 0.1, "maximize": True, "foreach": False, "fused": None}
    ours_param, theirs_param = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    ours = OURS[kind]([ours_param], ratio=1.0, **options)
    theirs = THEIRS[kind]([theirs_param], **options)
    for key in GROUP_KEYS[kind]:
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
        assert ours.defaults[key] == theirs.defaults[key], key
    text = repr(ours)  # torch's test_optimizer_can_be_printed, in torch's layout for the shared keys
    assert text.startswith(f"{type(ours).__name__} (") and "Parameter Group 0" in text
    for key in GROUP_KEYS[kind]:
        assert f"\n    {key}: " in text, key


# ---- layouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "name"), [("adamw", "maximize"), ("adam", "beta1_zero"), ("sgd", "nesterov")]
)
def test_non_contiguous_parameters_train_like_torch_and_keep_their_layout(kind, name, backend):
    """torch's test_forloop_goes_right_direction with contiguous=False, compared to torch."""
    torch.manual_seed(3)
    weight = torch.randn(10, 5, 2)[..., 0]
    bias = torch.randn(10, 2)[..., 0]
    inputs = _inputs(shape=(5,))
    runs = []
    for make in (lambda ps: _ours(kind, ps, backend, **_config(kind, name)), None):
        w = torch.nn.Parameter(torch.empty(10, 5, 2)[..., 0].copy_(weight))
        b = torch.nn.Parameter(torch.empty(10, 2)[..., 0].copy_(bias))
        assert not w.is_contiguous() and not b.is_contiguous()
        strides, pointers = (w.stride(), b.stride()), (w.data_ptr(), b.data_ptr())
        optimizer = make([w, b]) if make else THEIRS[kind]([w, b], **_config(kind, name))
        for x in inputs:
            optimizer.zero_grad()
            (w.mv(x) + b).pow(2).sum().backward()
            optimizer.step()
        assert (w.stride(), b.stride()) == strides and (w.data_ptr(), b.data_ptr()) == pointers
        runs.append([w, b])
    _assert_params_close(*runs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "name"), [("adamw", "weight_decay"), ("adam", "maximize"), ("sgd", "momentum")]
)
def test_channels_last_conv_parameters_train_like_torch_and_stay_channels_last(kind, name, backend):
    def conv_model():
        torch.manual_seed(4)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 2))
        return net.to(memory_format=torch.channels_last)

    model, reference = conv_model(), conv_model()
    assert not model[0].weight.is_contiguous()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last) for _ in range(5)]
    for m, optimizer in ((model, ours), (reference, theirs)):
        for x in inputs:
            optimizer.zero_grad()
            m(x).pow(2).mean().backward()
            optimizer.step()
    _assert_params_close(model.parameters(), reference.parameters())
    for conv in (model[0], model[2]):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", sorted(OURS))
def test_half_precision_parameters_stay_close_to_torch_in_fp32(kind, dtype, backend):
    """Loose: half-precision parameters (fp32 math inside) against torch training the same rounded
    start in fp32; only the per-step rounding of the parameters and the half-precision gradients may
    differ. (torch's own fp16 Adam is further off with a small eps: it does its math in fp16.)"""
    options = {"lr": 0.01, "eps": 1e-3} if kind != "sgd" else {"lr": 0.05, "momentum": 0.9}
    model, reference = _model().to(dtype), _model().to(dtype).float()
    ours = _ours(kind, model.parameters(), backend, **options)
    theirs = THEIRS[kind](reference.parameters(), **options)
    inputs = [x.to(dtype) for x in _inputs(5)]
    _train(model, ours, inputs)
    _train(reference, theirs, [x.float() for x in inputs])
    atol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), q, rtol=0, atol=atol)


# ---- dtypes and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.float64])
@pytest.mark.parametrize("kind", sorted(OURS))
def test_complex_and_double_parameters_are_rejected(kind, dtype):
    real = torch.nn.Parameter(torch.randn(4))
    odd = torch.randn(3, 2, dtype=dtype, requires_grad=True)
    with pytest.raises(TypeError):
        optimizer = OURS[kind]([real, odd], ratio=1.0)
        real.grad, odd.grad = torch.ones_like(real), torch.ones_like(odd)
        optimizer.step()
    optimizer = OURS[kind]([real], ratio=1.0)
    with pytest.raises(TypeError):
        optimizer.add_param_group({"params": [odd]})


def _one():
    return torch.nn.Parameter(torch.randn(1, 1))


NAN = float("nan")
ARG = {
    "lr": r"(?i)\blr\b|learning rate",
    "eps": r"(?i)eps",
    "beta": r"(?i)beta",
    "weight_decay": r"(?i)weight.?decay",
    "momentum": r"(?i)momentum",
    "nesterov": r"(?i)nesterov",
}
ADAM_ERRORS = [
    ("lr_negative", {"lr": -1.0}, "lr"),
    ("lr_nan", {"lr": NAN}, "lr"),
    ("eps_negative", {"eps": -1e-8}, "eps"),
    ("eps_nan", {"eps": NAN}, "eps"),
    ("beta1_one", {"lr": 1e-2, "betas": (1.0, 0.0)}, "beta"),
    ("beta1_negative", {"betas": (-0.1, 0.99)}, "beta"),
    ("beta1_nan", {"betas": (NAN, 0.99)}, "beta"),
    ("beta2_one", {"betas": (0.9, 1.0)}, "beta"),
    ("beta2_nan", {"betas": (0.9, NAN)}, "beta"),
    ("weight_decay_negative", {"lr": 1e-2, "weight_decay": -1}, "weight_decay"),
    ("weight_decay_nan", {"weight_decay": NAN}, "weight_decay"),
    ("tensor_lr_two_elements", {"lr": torch.tensor([0.001, 0.001])}, "lr"),
]
SGD_ERRORS = [
    ("lr_negative", {"lr": -1.0}, "lr"),
    ("momentum_negative", {"lr": 1e-2, "momentum": -0.5}, "momentum"),
    ("weight_decay_negative", {"weight_decay": -1e-3}, "weight_decay"),
    ("nesterov_without_momentum", {"nesterov": True}, "nesterov"),
    ("nesterov_with_dampening", {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov"),
    ("tensor_lr_two_elements", {"lr": torch.tensor([0.001, 0.001])}, "lr"),
]
HYPER_ERRORS = [
    pytest.param(kind, kwargs, ARG[arg], id=f"{kind}-{desc}")
    for kind in sorted(OURS)
    for desc, kwargs, arg in (SGD_ERRORS if kind == "sgd" else ADAM_ERRORS)
]


@pytest.mark.parametrize(("kind", "kwargs", "names_the_argument"), HYPER_ERRORS)
def test_bad_hyper_parameters_raise_the_value_error_torch_raises(kind, kwargs, names_the_argument):
    with pytest.raises(ValueError):
        THEIRS[kind]([_one()], **copy.deepcopy(kwargs))  # the case really is an error for torch
    with pytest.raises(ValueError, match=names_the_argument):
        OURS[kind]([_one()], ratio=1.0, **copy.deepcopy(kwargs))


def _mixed_names():
    return [("weight", _one()), _one()]


def _mixed_group_names():
    return [{"params": [_one()], "lr": 1e-2}, {"params": [("weight", _one())]}]


GENERIC_ERRORS = {  # get_error_inputs_for_all_optims: raised by torch.optim.Optimizer itself
    "params_is_a_tensor": (_one, TypeError, "iterable"),
    "duplicate_across_groups": (
        lambda: (lambda p: [{"params": p}, {"params": p}])(_one()),
        ValueError,
        "more than one parameter group",
    ),
    "names_on_some_params_only": (_mixed_names, ValueError, "names"),
    "names_on_some_groups_only": (_mixed_group_names, ValueError, "names"),
}


@pytest.mark.parametrize("case", sorted(GENERIC_ERRORS))
@pytest.mark.parametrize("kind", sorted(OURS))
def test_malformed_params_raise_what_torch_raises(kind, case):
    make_params, error, pattern = GENERIC_ERRORS[case]
    with pytest.raises(error, match=pattern):
        THEIRS[kind](make_params())
    with pytest.raises(error, match=pattern):
        OURS[kind](make_params(), ratio=1.0)


@pytest.mark.parametrize("kind", sorted(OURS))
def test_duplicate_parameters_in_a_group_warn_like_torch(kind):
    p = _one()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        THEIRS[kind]([p, p])
    with pytest.warns(UserWarning, match="duplicate parameters"):
        OURS[kind]([p, p], ratio=1.0)


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_amsgrad_is_rejected_with_not_implemented_error_naming_amsgrad(kind):
    params = [_one()]
    with pytest.raises(NotImplementedError, match="amsgrad"):
        OURS[kind](params, amsgrad=True, ratio=1.0)
    with pytest.raises(NotImplementedError, match="amsgrad"):
        OURS[kind](params, 1e-3, (0.9, 0.999), 1e-8, 1e-2, True, ratio=1.0)  # torch's positional slot
    with pytest.raises(NotImplementedError, match="amsgrad"):
        OURS[kind]([{"params": params, "amsgrad": True}], ratio=1.0)
    optimizer = OURS[kind](params, amsgrad=False, ratio=1.0)
    with pytest.raises(NotImplementedError, match="amsgrad"):
        optimizer.add_param_group({"params": [_one()], "amsgrad": True})


@pytest.mark.parametrize("kind", sorted(OURS))
def test_differentiable_is_rejected_with_not_implemented_error(kind):
    with pytest.raises(NotImplementedError):
        OURS[kind]([_one()], differentiable=True, ratio=1.0)
    with pytest.raises(NotImplementedError):
        OURS[kind]([{"params": [_one()], "differentiable": True}], ratio=1.0)


# ---- hooks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "name"), [("adamw", "default"), ("adam", "maximize"), ("sgd", "momentum")])
def test_step_pre_hook_can_rewrite_gradients_and_post_hook_sees_the_step_like_torch(kind, name, backend):
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    seen = []
    for m, optimizer in ((model, ours), (reference, theirs)):
        record = []

        def pre_hook(opt, args, kwargs):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad.mul_(0.5)

        def post_hook(opt, args, kwargs, m=m, record=record):
            record.append(m[0].weight.detach().clone())

        handles = [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
        _train(m, optimizer, _inputs(3))
        for handle in handles:
            handle.remove()
        _train(m, optimizer, _inputs(2, seed=9))  # removed: neither runs any more
        seen.append(record)
    assert len(seen[0]) == len(seen[1]) == 3
    _assert_params_close(seen[0], seen[1])
    _assert_params_close(model.parameters(), reference.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_global_and_local_step_hooks_fire_in_torch_order(kind, backend):
    orders = []
    for make in (lambda ps: _ours(kind, ps, backend), THEIRS[kind]):
        param = torch.nn.Parameter(torch.ones(2))
        param.grad = torch.ones(2)
        optimizer = make([param])
        calls = []

        def note(what, calls=calls):
            return lambda *_: calls.append(what)

        handles = [
            register_optimizer_step_pre_hook(note("global_pre")),
            register_optimizer_step_post_hook(note("global_post")),
            optimizer.register_step_pre_hook(note("pre")),
            optimizer.register_step_post_hook(note("post")),
        ]
        try:
            optimizer.step()
            optimizer.step()
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        orders.append(calls)
    assert orders[0] == orders[1] == ["global_pre", "pre", "post", "global_post"] * 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(OURS))
def test_state_dict_pre_and_post_hooks_run_like_torch(kind, backend):
    def pre_hook(opt):
        opt.state["extra"] = 1

    def post_hook(opt, state_dict):
        state_dict["ran_pre_hook"] = state_dict["state"].pop("extra", None) == 1
        return state_dict

    results = []
    for make in (lambda ps: _ours(kind, ps, backend), THEIRS[kind]):
        optimizer = make([torch.nn.Parameter(torch.rand(2, 3))])
        optimizer.register_state_dict_post_hook(post_hook)
        without_pre = optimizer.state_dict()["ran_pre_hook"]
        optimizer.register_state_dict_pre_hook(pre_hook)
        state_dict = optimizer.state_dict()
        results.append((without_pre, state_dict["ran_pre_hook"], "extra" in state_dict["state"]))
    assert results[0] == results[1] == (False, True, False)


STATE_KEY = {"adamw": "exp_avg_sq", "adam": "exp_avg_sq", "sgd": "momentum_buffer"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("kind", "name"), [("adamw", "default"), ("adam", "weight_decay"), ("sgd", "momentum")]
)
def test_load_state_dict_pre_hook_result_is_what_gets_loaded_like_torch(kind, name, backend):
    """A pre hook may return a new state dict: its lr and its state are the ones loaded; prepended
    hooks run first."""

    def halve_lr_and_scale_state(opt, state_dict):
        changed = copy.deepcopy(state_dict)
        changed["param_groups"][0]["lr"] *= 0.5
        for state in changed["state"].values():
            state[STATE_KEY[kind]] = state[STATE_KEY[kind]] * 4.0
        return changed

    def set_lr(opt, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    inputs = _inputs(8)
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    resumed = []
    for m, optimizer in ((model, ours), (reference, theirs)):
        _train(m, optimizer, inputs[:4])
        saved = copy.deepcopy(optimizer.state_dict())
        optimizer.register_load_state_dict_pre_hook(halve_lr_and_scale_state)
        optimizer.register_load_state_dict_pre_hook(set_lr, prepend=True)  # runs first, then halved
        optimizer.load_state_dict(saved)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
        _train(m, optimizer, inputs[4:])
        resumed.append(optimizer)
    _assert_params_close(model.parameters(), reference.parameters())
    _assert_state_like_torch(*resumed, list(model.parameters()), list(reference.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("kind", "name"), [("adamw", "default"), ("adam", "maximize"), ("sgd", "dampening")])
def test_load_state_dict_post_hook_sees_the_loaded_state_and_its_changes_stick_like_torch(
    kind, name, backend
):
    inputs = _inputs(8)
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, **_config(kind, name))
    theirs = THEIRS[kind](reference.parameters(), **_config(kind, name))
    resumed = []
    for m, optimizer in ((model, ours), (reference, theirs)):
        _train(m, optimizer, inputs[:4])
        saved = copy.deepcopy(optimizer.state_dict())
        seen = []

        def post_hook(opt, seen=seen):
            seen.append(opt.param_groups[0]["lr"])
            opt.param_groups[0]["lr"] = 0.02
            for state in opt.state.values():
                state[STATE_KEY[kind]] = state[STATE_KEY[kind]] * 0.25  # a new tensor, not in place

        optimizer.param_groups[0]["lr"] = 0.7  # overwritten by the load before the hook runs
        optimizer.register_load_state_dict_post_hook(post_hook)
        optimizer.load_state_dict(saved)
        assert seen == [saved["param_groups"][0]["lr"]]
        _train(m, optimizer, inputs[4:])
        resumed.append(optimizer)
    _assert_params_close(model.parameters(), reference.parameters())
    _assert_state_like_torch(*resumed, list(model.parameters()), list(reference.parameters()))


# ---- hyper-parameters changed mid-training -------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_adam_beta1_from_positive_to_zero_mid_training_continues_like_torch(kind, backend):
    model, reference = _model(), _model()
    ours = _ours(kind, model.parameters(), backend, lr=0.01)
    theirs = THEIRS[kind](reference.parameters(), lr=0.01)
    inputs = _inputs(8)
    for m, optimizer in ((model, ours), (reference, theirs)):
        _train(m, optimizer, inputs[:4])
        optimizer.param_groups[0]["betas"] = (0.0, 0.999)
        _train(m, optimizer, inputs[4:])
    _assert_params_close(model.parameters(), reference.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_adam_beta1_from_zero_to_positive_mid_training_does_not_raise(kind, backend):
    """torch keeps exp_avg = grad while beta1 = 0, we keep none, so only the switch itself is checked:
    it works, keeps a first moment from then on and moves every parameter to finite values."""
    model = _model()
    optimizer = _ours(kind, model.parameters(), backend, lr=0.01, betas=(0.0, 0.99))
    inputs = _inputs(8)
    _train(model, optimizer, inputs[:4])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0]["betas"] = (0.9, 0.99)
    _train(model, optimizer, inputs[4:])
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, b)
        assert optimizer.state[p]["exp_avg"].shape == p.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_from_zero_to_positive_mid_training_starts_the_buffer_like_torch(nesterov, backend):
    """torch starts momentum_buffer from the gradient of the first step with momentum (no dampening on
    that step), whenever that step comes."""
    dampening = 0.0 if nesterov else 0.3
    model, reference = _model(), _model()
    ours = _ours("sgd", model.parameters(), backend, lr=0.05, dampening=dampening)
    theirs = THEIRS["sgd"](reference.parameters(), lr=0.05, dampening=dampening)
    inputs = _inputs(8)
    for m, optimizer in ((model, ours), (reference, theirs)):
        _train(m, optimizer, inputs[:4])
        optimizer.param_groups[0].update(momentum=0.9, nesterov=nesterov)
        _train(m, optimizer, inputs[4:])
    _assert_params_close(model.parameters(), reference.parameters())
    _assert_state_like_torch(ours, theirs, list(model.parameters()), list(reference.parameters()))
