"""Adversarial pass over the public API of pecker_kernels: hostile-but-ordinary inputs, one case each.

Every case builds its inputs, calls the API and judges the outcome against what is correct: a clear
error (ValueError, TypeError, NotImplementedError, or a RuntimeError raised by our own code, whose
message names the offending argument) or the right result (torch.optim on the same inputs, or a
recomputation in plain torch). Each outcome is one of

    ok       the right result, or a clear error where one is wanted
    crash    the child process died from a signal or aborted, or hung past the case's timeout
    silent   no exception, but a wrong result (or bad input accepted without a word)
    unclear  an exception, but not a clear one (KeyError, IndexError, an assertion, a message that
             does not name the argument), or any exception where the call should simply work
    dirty    it raised, but parameters, optimizer state or param_groups changed anyway, or a later
             valid step() fails

Where torch.optim accepts a call (its own arguments at their defaults, foreach=..., its state dicts),
the call must work and match torch; a non-default torch option may instead raise a clear error.

Cases run in child processes (``--case``), a few per child; when a child crashes, its crashing case is
rerun alone and the rest of its group one per child, so a crash loses only its own case.

    .venv/bin/python -m tests.adversarial                   # every case, 2 workers, table + one line each
    .venv/bin/python -m tests.adversarial --json out.json   # also write the results as JSON
    .venv/bin/python -m tests.adversarial --only load_      # cases whose name contains "load_"
    .venv/bin/python -m tests.adversarial --case NAME ...   # run cases in this process (what children do)
    ADVERSARIAL_SELF_CHECK=1 .venv/bin/python -m tests.adversarial --only self_check   # check the runner

Not a pytest module: it defines no tests and pytest does not collect it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import pecker_kernels as pk

ROOT = Path(__file__).resolve().parents[1]
OK, CRASH, SILENT, UNCLEAR, DIRTY = "ok", "crash", "silent", "unclear", "dirty"
KINDS = (OK, CRASH, SILENT, UNCLEAR, DIRTY)
MARK = "@@adversarial "  # prefix of the result lines a child prints

Verdict = tuple[str, str]


# ---- registry ----------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    fn: Callable[[], Verdict]
    category: str
    timeout: float
    solo: bool  # slow: its own child process


CASES: dict[str, Case] = {}
_section = ["misc"]


def section(name: str) -> None:
    _section[0] = name


def case(name: str | None = None, *, timeout: float = 60.0, solo: bool = False):
    def register(fn: Callable[[], Verdict]) -> Callable[[], Verdict]:
        key = name or fn.__name__.strip("_")
        if key in CASES:
            raise RuntimeError(f"duplicate case {key}")
        CASES[key] = Case(key, fn, _section[0], timeout, solo)
        return fn

    return register


# ---- judging -----------------------------------------------------------------------------------------


def short(text: object, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raised_by_us(e: BaseException) -> bool:
    """A `raise` statement in pecker_kernels' Python code (not a C++ check or a torch internal)."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    return "pecker_kernels" in last.filename and (last.line or "").lstrip().startswith("raise")


def clarity(e: BaseException, names: tuple[str, ...]) -> Verdict:
    """OK for a clear error (right type, message names one of ``names``), else UNCLEAR."""
    text = f"{type(e).__name__}: {short(e)}"
    if isinstance(e, (LookupError, AttributeError, ArithmeticError, AssertionError)):
        return UNCLEAR, text
    if not isinstance(e, (ValueError, TypeError, RuntimeError)):  # NotImplementedError is a RuntimeError
        return UNCLEAR, text
    if type(e) is RuntimeError and not _raised_by_us(e):
        return UNCLEAR, text + " (not our own message)"
    message = str(e).lower()
    if names and not any(n.lower() in message for n in names):
        return UNCLEAR, text + f" (names none of {', '.join(names)})"
    return OK, "clear error: " + text


def judge(
    call: Callable[[], object],
    *,
    expect: str = "either",
    names: tuple[str, ...] = (),
    check: Callable[[object], str | None] | None = None,
    snap: tuple = (),
    later: Callable[[], object] | None = None,
    then: Callable[[object], Verdict] | None = None,
    accepted: str = "accepted without an error",
) -> Verdict:
    """Run ``call`` (the call under test) and classify its outcome.

    expect: "error" (only a clear error is right), "work" (it must succeed) or "either".
    names: words of which a clear error message contains at least one (case-insensitive).
    check(result): the oracle once the call succeeded: None when right, else what is wrong.
    then(result): instead of check, the verdict of what follows an accepted call (e.g. the next step).
    snap: optimizers, modules, tensors (or lists of them) that a raising call must leave unchanged.
    later: a valid action that must still work after the call raised.
    accepted: what a silent outcome says when an error was wanted and none came.
    """
    before = snapshot(snap) if snap else None
    try:
        result = call()
    except Exception as e:  # the outcome under test
        verdict = clarity(e, names)
        if expect == "work":
            verdict = (UNCLEAR, "raised where it should work: " + verdict[1].removeprefix("clear error: "))
        if before is not None:
            changed = diff(before, snapshot(snap))
            if changed:
                return DIRTY, f"{verdict[1]}; yet {changed} changed"
        if later is not None:
            try:
                later()
            except Exception as e2:
                return DIRTY, f"{verdict[1]}; a later valid step fails: {type(e2).__name__}: {short(e2, 80)}"
        return verdict
    if then is not None:
        return then(result)
    if check is None:
        return SILENT, accepted
    try:
        problem = check(result)
    except Exception as e:
        return UNCLEAR, f"accepted, then checking it raised {type(e).__name__}: {short(e)}"
    if problem:
        return SILENT, problem
    return OK, "right result"


def with_warning(run: Callable[[], object]) -> tuple[object, list[str]]:
    """``run()`` and the messages of the warnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run()
    return out, [short(w.message, 100) for w in caught]


# ---- snapshots ---------------------------------------------------------------------------------------


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    try:
        return copy.deepcopy(value)
    except Exception:
        return repr(value)


def snapshot(objs) -> list:
    out = []
    for obj in objs:
        if isinstance(obj, torch.optim.Optimizer):
            try:
                sd = _clone(obj.state_dict())
            except Exception as e:
                sd = f"state_dict() raised {type(e).__name__}"
            params = [p.detach().clone() for g in obj.param_groups for p in g["params"]]
            groups = [(len(g["params"]), tuple(sorted(g))) for g in obj.param_groups]
            out.append({"state_dict": sd, "params": params, "param_groups": groups, "state": len(obj.state)})
        elif isinstance(obj, nn.Module):
            out.append({"module": _clone(obj.state_dict())})
        elif isinstance(obj, (list, tuple)):
            out.append(snapshot(obj))
        else:
            out.append(_clone(obj))
    return out


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.device.type == "meta":
        return True
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def diff(a, b, path: str = "") -> str | None:
    """Where two snapshots differ (a short path), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not _same_tensor(a, b):
            return path or "a tensor"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path} keys"
        for k in a:
            d = diff(a[k], b[k], f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} length"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    try:
        same = a == b
        if isinstance(same, bool) and same:
            return None
        if not isinstance(same, bool) and all(same):
            return None
    except Exception:
        pass
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return path or "a value"


# ---- inputs and oracles ------------------------------------------------------------------------------

OURS = {"adamw": pk.SalientAdamW, "adam": pk.SalientAdam, "sgd": pk.SalientSGD}
THEIRS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
HP = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.1},
    "adam": {"lr": 1e-2, "weight_decay": 0.1},
    "sgd": {"lr": 1e-1, "momentum": 0.9, "weight_decay": 0.1},
}
N_LR = ("lr", "learning rate")
N_SHAPE = ("shape", "size", "numel", "element", "word")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def loss_of(model: nn.Module, seed: int, features: int = 6) -> torch.Tensor:
    g = gen(100 + seed)
    x = torch.randn(16, features, generator=g)
    return model(x).pow(2).mean()


def rand_params(*shapes, seed: int = 1, dtype=torch.float32) -> list[nn.Parameter]:
    g = gen(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def rand_grads(params, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = gen(1000 + seed)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


def put(params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def stepper(opt: torch.optim.Optimizer, params, seed: int = 77) -> Callable[[], None]:
    """A valid step: fresh gradients on ``params``, then ``opt.step()``."""

    def run() -> None:
        put(params, rand_grads(params, seed))
        opt.step()

    return run


def values(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def differ(xs, ys, rtol: float = 1e-5, atol: float = 1e-6) -> str | None:
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        x, y = x.detach().float(), y.detach().float()
        if x.shape != y.shape:
            return f"tensor {i}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            worst = float((x - y).abs().nan_to_num(1e30).max())
            return f"tensor {i} differs from the oracle by up to {worst:.3g}"
    return None


def moved(before, after) -> list[torch.Tensor]:
    out = []
    for b, a in zip(before, after, strict=True):
        a = a.detach()
        same = (a == b) | (a.isnan() & b.isnan())
        out.append(~same)
    return out


def count(masks) -> int:
    return int(sum(int(m.sum()) for m in masks))


def oracle_masks(grads, ratio: float, weights=None, per_tensor: bool = False) -> list[torch.Tensor]:
    """Exact top-k masks: k = max(1, floor(ratio * N)) finite scores |g| (or |g * w|), ties to the lower
    flat index (tensors in list order, each row-major), non-finite scores never selected."""
    scores = []
    for i, g in enumerate(grads):
        s = g.detach().float()
        if weights is not None:
            s = s * weights[i].detach().float()
        scores.append(s.abs().reshape(-1))
    segments = [[i] for i in range(len(scores))] if per_tensor else [list(range(len(scores)))]
    flat_masks = [None] * len(scores)
    for seg in segments:
        flat = torch.cat([scores[i] for i in seg]) if seg else torch.zeros(0)
        n = flat.numel()
        finite = torch.isfinite(flat)
        k = min(max(1, math.floor(ratio * n)), int(finite.sum()))
        key = torch.where(finite, flat, torch.full_like(flat, -math.inf))
        order = torch.sort(key, descending=True, stable=True).indices
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[order[:k]] = True
        offset = 0
        for i in seg:
            flat_masks[i] = chosen[offset : offset + scores[i].numel()]
            offset += scores[i].numel()
    return [m.view(g.shape) for m, g in zip(flat_masks, grads, strict=True)]


def masks_differ(got, want) -> str | None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a = a.detach().cpu().bool().reshape(b.shape) if a.numel() == b.numel() else a
        if a.shape != b.shape or not torch.equal(a, b):
            return f"mask {i}: {int(a.sum())} selected, {int((a != b).sum())} elements differ from the oracle"
    if len(got) != len(want):
        return f"{len(got)} masks for {len(want)} tensors"
    return None


def torch_steps(kind: str, datas, grad_steps, hp=None, **extra) -> list[torch.Tensor]:
    """torch.optim's result of stepping copies of ``datas`` with each list of gradients in turn."""
    ps = [nn.Parameter(d.detach().clone()) for d in datas]
    opt = THEIRS[kind](ps, **(HP[kind] if hp is None else hp), **extra)
    for grads in grad_steps:
        put(ps, grads)
        opt.step()
    return [p.detach() for p in ps]


def masked_oracle(kind, datas, grads, ratio, hp=None, per_tensor=False, weights=None) -> list[torch.Tensor]:
    """One fresh step that moves only the oracle's top-k elements (torch's values there)."""
    full = torch_steps(kind, datas, [grads], hp)
    masks = oracle_masks(grads, ratio, weights=weights, per_tensor=per_tensor)
    return [torch.where(m, f, d.detach()) for m, f, d in zip(masks, full, datas, strict=True)]


def versus_torch(
    kind: str,
    make: Callable[[], tuple[list, Callable[[int], None]]],
    *,
    hp=None,
    ours_kw=None,
    theirs_kw=None,
    theirs_hp=None,
    steps: int = 3,
    expect: str = "work",
    names: tuple[str, ...] = (),
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> Verdict:
    """Our optimizer at ratio 1 against torch's, on two identical builds of ``make`` (which returns what
    the optimizer takes, and a function that sets the gradients of step ``s``)."""
    hp = HP[kind] if hp is None else hp
    torch.manual_seed(0)
    ours_spec, ours_grads = make()
    torch.manual_seed(0)
    their_spec, their_grads = make()
    ours_params, their_params = tensors_of(ours_spec), tensors_of(their_spec)
    theirs = THEIRS[kind](their_spec, **(hp if theirs_hp is None else theirs_hp), **(theirs_kw or {}))
    for s in range(steps):
        their_grads(s)
        theirs.step()

    def call():
        opt = OURS[kind](ours_spec, **hp, ratio=1.0, **(ours_kw or {}))
        for s in range(steps):
            ours_grads(s)
            opt.step()

    return judge(
        call, expect=expect, names=names, check=lambda _: differ(ours_params, their_params, rtol, atol)
    )


def tensors_of(spec) -> list[torch.Tensor]:
    """The parameters of what an optimizer takes: tensors, (name, tensor) pairs or param-group dicts."""
    out = []
    for item in spec:
        if isinstance(item, dict):
            out += tensors_of(item["params"])
        elif isinstance(item, tuple):
            out.append(item[1])
        else:
            out.append(item)
    return out


def flat_make(*shapes):
    """``make`` for versus_torch: random parameters and random gradients per step."""

    def make():
        params = rand_params(*shapes)
        return params, lambda s: put(params, rand_grads(params, s))

    return make


def model_make(build: Callable[[], nn.Module], features: int = 6):
    def make():
        model = build()
        params = list(model.parameters())

        def grads(s):
            model.zero_grad()
            loss_of(model, s, features).backward()

        return params, grads

    return make


def judge_step(
    opt, *, expect="error", names=(), check=None, accepted="accepted, and the next step ran"
) -> Verdict:
    """The next opt.step() (gradients already set) as the call under test."""
    return judge(opt.step, expect=expect, names=names, snap=(opt,), check=check, accepted=accepted)


# =====================================================================================================
# 1. Kernel boundaries: compute_mask, gradients and parameters of odd layouts, loaded state, set_masks,
#    and the functional ops.
# =====================================================================================================
section("boundary")


def _decay_groups(model: nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.01},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def _accumulated(model: nn.Module, batches: int = 2, features: int = 6) -> pk.SaliencyAccumulator:
    acc = pk.SaliencyAccumulator(model.parameters())
    for b in range(batches):
        model.zero_grad()
        loss_of(model, b, features).backward()
        acc.accumulate()
    return acc


def _masks_by_param(opt) -> dict[int, torch.Tensor]:
    params = [p for g in opt.param_groups for p in g["params"]]
    return {id(p): m for p, m in zip(params, opt.masks(), strict=True)}


def _check_model_masks(opt, model, grads, ratio):
    """Masks in force must be the oracle's for each parameter with its own gradient (model order)."""
    params = list(model.parameters())
    want = oracle_masks(grads, ratio)
    got = _masks_by_param(opt)
    return masks_differ([got[id(p)] for p in params], want)


@case()
def compute_mask_decay_and_no_decay_groups():
    model = mlp()
    opt = pk.SalientAdamW(_decay_groups(model), lr=1e-2, ratio=0.25, refresh_every=0)
    grads = _accumulated(model).gradients()
    return judge(
        lambda: opt.compute_mask(grads),
        expect="work",
        check=lambda _: _check_model_masks(opt, model, grads, 0.25),
    )


@case()
def compute_mask_equal_shaped_layers_in_other_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    first, second = model[0], model[2]
    groups = [{"params": [second.weight, second.bias]}, {"params": [first.weight, first.bias]}]
    opt = pk.SalientAdamW(groups, lr=1e-2, ratio=0.25, refresh_every=0)
    grads = _accumulated(model, features=8).gradients()
    return judge(
        lambda: opt.compute_mask(grads),
        expect="work",
        check=lambda _: _check_model_masks(opt, model, grads, 0.25),
    )


@case()
def compute_mask_grads_in_group_order_baseline():
    model = mlp()
    opt = pk.SalientAdamW(_decay_groups(model), lr=1e-2, ratio=0.25, refresh_every=0)
    acc = _accumulated(model)
    by_id = {id(p): g for p, g in zip(model.parameters(), acc.gradients(), strict=True)}
    grads = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
    return judge(
        lambda: opt.compute_mask(grads),
        expect="work",
        check=lambda _: _check_model_masks(opt, model, acc.gradients(), 0.25),
    )


@case()
def compute_mask_dict_of_param_to_grad():
    model = mlp()
    opt = pk.SalientAdamW(model.parameters(), lr=1e-2, ratio=0.25, refresh_every=0)
    grads = _accumulated(model).gradients()
    mapping = dict(zip(model.parameters(), grads, strict=True))
    return judge(
        lambda: opt.compute_mask(mapping),
        names=("dict", "mapping", "grad", "list"),
        snap=(opt,),
        check=lambda _: _check_model_masks(opt, model, grads, 0.25),
    )


def _two_param_opt(ratio=0.5, **kw):
    params = rand_params((4, 4), (8,))
    return params, pk.SalientAdamW(params, lr=1e-2, ratio=ratio, **kw)


def _compute_mask_bad(grads_of: Callable[[list], list], names, expect="error", check_cast=False):
    params, opt = _two_param_opt(refresh_every=0)
    grads = grads_of(params)

    def check(_):
        want = oracle_masks([g.float() for g in grads], 0.5)
        return masks_differ(opt.masks(), want)

    return judge(
        lambda: opt.compute_mask(grads),
        expect=expect,
        names=names,
        snap=(opt,),
        later=stepper(opt, params),
        check=check if check_cast else None,
    )


_BAD_GRAD_LISTS = {
    "compute_mask_gradient_larger_than_param": (lambda ps: [torch.randn(5, 4), torch.randn(8)], N_SHAPE),
    "compute_mask_gradient_smaller_than_param": (lambda ps: [torch.randn(3, 4), torch.randn(8)], N_SHAPE),
    "compute_mask_gradient_with_extra_elements_last": (
        lambda ps: [torch.randn(4, 4), torch.randn(9)],
        N_SHAPE,
    ),
    "compute_mask_too_few_gradients": (lambda ps: [torch.randn(4, 4)], ("gradient", "grads")),
    "compute_mask_too_many_gradients": (
        lambda ps: [torch.randn(4, 4), torch.randn(8), torch.randn(3)],
        ("gradient", "grads"),
    ),
    "compute_mask_meta_gradients": (
        lambda ps: [torch.randn(4, 4, device="meta"), torch.randn(8, device="meta")],
        ("device", "meta"),
    ),
    "compute_mask_a_non_tensor_gradient": (lambda ps: [[0.0] * 16, torch.randn(8)], ("grad", "tensor")),
}
for _name, (_fn, _names) in _BAD_GRAD_LISTS.items():
    case(_name)(lambda fn=_fn, names=_names: _compute_mask_bad(fn, names))

_ODD_GRAD_LISTS = {
    "compute_mask_int64_gradients": lambda ps: [torch.randint(-50, 50, (4, 4)), torch.randint(-50, 50, (8,))],
    "compute_mask_float64_gradients": lambda ps: [
        torch.randn(4, 4, dtype=torch.float64),
        torch.randn(8).double(),
    ],
    "compute_mask_float16_gradients": lambda ps: [torch.randn(4, 4).half(), torch.randn(8).half()],
    "compute_mask_flat_gradient_for_a_matrix": lambda ps: [torch.randn(16), torch.randn(8)],
    "compute_mask_transposed_gradient": lambda ps: [torch.randn(4, 4).t(), torch.randn(8)],
    "compute_mask_stride0_gradient": lambda ps: [torch.randn(1, 4).expand(4, 4), torch.randn(8)],
}
for _name, _fn in _ODD_GRAD_LISTS.items():
    case(_name)(
        lambda fn=_fn: _compute_mask_bad(
            fn, ("dtype", "grad", "shape", "contiguous"), "either", check_cast=True
        )
    )


@case()
def compute_mask_none_for_a_param_without_gradient():
    _, opt = _two_param_opt(refresh_every=0)
    grads = [torch.randn(4, 4), None]
    want = oracle_masks([grads[0], torch.zeros(8)], 0.5)
    return judge(
        lambda: opt.compute_mask(grads),
        names=("grad", "none"),
        snap=(opt,),
        check=lambda _: masks_differ(opt.masks(), want),
    )


@case()
def compute_mask_gradients_that_require_grad():
    _, opt = _two_param_opt(refresh_every=0)
    x = torch.randn(4, 4, requires_grad=True)
    grads = [x * 2, torch.randn(8, requires_grad=True)]
    want = oracle_masks(grads, 0.5)
    return judge(
        lambda: opt.compute_mask(grads), expect="work", check=lambda _: masks_differ(opt.masks(), want)
    )


@case()
def compute_mask_without_any_gradient():
    """Every .grad is None: the default ranks all-zero gradients, which picks the first k elements."""
    _, opt = _two_param_opt(refresh_every=0)

    def check(result):
        _, caught = result
        return None if caught else "selected a mask from all-zero gradients without a warning"

    return judge(
        lambda: with_warning(opt.compute_mask),
        names=("grad",),
        snap=(opt,),
        check=check,
    )


@case()
def compute_mask_per_tensor_scope():
    params = rand_params((5, 7), (13,), (3, 3))
    opt = pk.SalientAdamW(params, ratio=0.3, scope="per_tensor", refresh_every=0)
    grads = rand_grads(params, 3)
    want = oracle_masks(grads, 0.3, per_tensor=True)
    return judge(
        lambda: opt.compute_mask(grads), expect="work", check=lambda _: masks_differ(opt.masks(), want)
    )


@case()
def compute_mask_grad_weight_score():
    params = rand_params((5, 7), (13,))
    opt = pk.SalientAdamW(params, ratio=0.3, score="grad_weight", refresh_every=0)
    grads = rand_grads(params, 3)
    want = oracle_masks(grads, 0.3, weights=params)
    return judge(
        lambda: opt.compute_mask(grads), expect="work", check=lambda _: masks_differ(opt.masks(), want)
    )


@case()
def compute_mask_then_step_keeps_that_mask():
    params = rand_params((6, 6), (10,))
    opt = pk.SalientAdamW(params, ratio=0.25, refresh_every=0)
    grads = rand_grads(params, 4)
    want = oracle_masks(grads, 0.25)
    opt.compute_mask(grads)
    before = values(params)

    def call():
        put(params, rand_grads(params, 5))
        opt.step()

    return judge(call, expect="work", check=lambda _: masks_differ(moved(before, params), want))


def _stride0(n: int, ratio: float) -> Verdict:
    def make():
        b = nn.Parameter(torch.randn(n, generator=gen(2)))

        def grads(s):
            (b.grad,) = torch.autograd.grad(b.sum() * (s + 1), [b])

        return [b], grads

    params, set_grads = make()
    set_grads(0)
    if params[0].grad.stride() != (0,):
        return UNCLEAR, f"harness: expected a stride-0 gradient, got stride {params[0].grad.stride()}"
    if ratio == 1.0:
        return versus_torch("adamw", make, steps=2)
    b = params[0]
    before = values([b])
    want = masked_oracle("adamw", before, [torch.ones(n)], ratio)
    opt = pk.SalientAdamW([b], **HP["adamw"], ratio=ratio)
    return judge(opt.step, expect="work", check=lambda _: differ([b], want))


case("stride0_gradient_small_vs_torch")(lambda: _stride0(1000, 1.0))
case("stride0_gradient_small_ratio_half")(lambda: _stride0(1000, 0.5))
case("stride0_gradient_2e7_vs_torch", timeout=180)(lambda: _stride0(20_000_000, 1.0))
case("stride0_gradient_2e7_ratio_half", timeout=180)(lambda: _stride0(20_000_000, 0.5))


@case()
def transposed_gradient_of_a_square_param_vs_torch():
    def make():
        params = rand_params((16, 16), (16,))

        def grads(s):
            g = rand_grads(params, s)
            params[0].grad = g[0].t()  # non-contiguous: the transpose of a contiguous tensor
            params[1].grad = g[1]

        return params, grads

    return versus_torch("adamw", make)


@case()
def transposed_gradient_ratio_quarter():
    params = rand_params((16, 16))
    g = rand_grads(params, 0)[0]
    params[0].grad = g.t()
    before = values(params)
    want = masked_oracle("adamw", before, [g.t().contiguous()], 0.25)
    opt = pk.SalientAdamW(params, **HP["adamw"], ratio=0.25)
    return judge(opt.step, expect="work", check=lambda _: differ(params, want))


@case()
def gradient_with_storage_offset_vs_torch():
    def make():
        params = rand_params((5, 6), (7,))

        def grads(s):
            big = torch.randn(200, generator=gen(s))
            params[0].grad = big[13:43].view(5, 6)
            params[1].grad = big[101:108]

        return params, grads

    return versus_torch("adamw", make)


def _conv(channels_last: bool):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def make():
        model = build()
        params = list(model.parameters())

        def grads(s):
            model.zero_grad()
            x = torch.randn(2, 3, 8, 8, generator=gen(s)).to(memory_format=torch.channels_last)
            model(x).pow(2).mean().backward()

        return params, grads

    return make


@case()
def channels_last_conv_vs_torch():
    make = _conv(True)
    params, _ = make()
    if params[0].is_contiguous():
        return UNCLEAR, "harness: the channels_last conv weight is contiguous"
    return versus_torch("adamw", make)


@case()
def channels_last_conv_sgd_vs_torch():
    return versus_torch("sgd", _conv(True))


@case()
def channels_last_conv_ratio_half():
    make = _conv(True)
    params, grads = make()
    grads(0)
    before = values(params)
    g = [p.grad.detach().clone() for p in params]
    want = masked_oracle("adamw", before, g, 0.5)
    opt = pk.SalientAdamW(params, **HP["adamw"], ratio=0.5)
    return judge(opt.step, expect="work", check=lambda _: differ(params, want))


@case()
def transposed_parameter_vs_torch():
    def make():
        base = torch.randn(6, 4, generator=gen(3))
        params = [nn.Parameter(base.t()), nn.Parameter(torch.randn(5, generator=gen(4)))]
        return params, lambda s: put(params, rand_grads(params, s))

    return versus_torch("adamw", make, expect="either", names=("contiguous",))


@case()
def parameter_with_storage_offset_vs_torch():
    def make():
        base = torch.randn(100, generator=gen(3))
        params = [nn.Parameter(base[10:40].view(5, 6)), nn.Parameter(base[50:57])]
        return params, lambda s: put(params, rand_grads(params, s))

    return versus_torch("adamw", make)


@case()
def parameters_sharing_one_storage_vs_torch():
    def make():
        flat = torch.randn(64, generator=gen(3))
        params = [nn.Parameter(flat[:40].view(5, 8)), nn.Parameter(flat[40:])]
        return params, lambda s: put(params, rand_grads(params, s))

    return versus_torch("adam", make)


@case()
def scalar_and_empty_parameters_vs_torch():
    return versus_torch("adamw", flat_make((), (0,), (3, 0), (9,)))


@case()
def only_empty_parameters_step():
    params = rand_params((0,), (2, 0))
    opt = pk.SalientAdamW(params, ratio=0.5)
    put(params, [torch.zeros(0), torch.zeros(2, 0)])
    return judge(opt.step, expect="work", check=lambda _: None)


@case()
def many_tiny_parameters_vs_torch():
    return versus_torch("adamw", flat_make(*[(1 + i % 5,) for i in range(300)]), steps=2)


@case()
def odd_sizes_across_mask_words_ratio_half():
    params = rand_params((31,), (33,), (1,), (65,), (4097,))
    grads = rand_grads(params, 0)
    put(params, grads)
    before = values(params)
    want = masked_oracle("adamw", before, grads, 0.5)
    opt = pk.SalientAdamW(params, **HP["adamw"], ratio=0.5)
    return judge(opt.step, expect="work", check=lambda _: differ(params, want))


@case()
def duplicate_parameter_in_one_group():
    """torch warns (a future error); stepping must then stay sane: finite, and no crash."""
    (p,) = rand_params((5,))

    def call():
        opt, caught = with_warning(lambda: pk.SalientAdamW([p, p], ratio=0.5))
        p.grad = torch.randn(5, generator=gen(1))
        opt.step()
        return caught

    def check(caught):
        if not caught:
            return "a duplicated parameter was accepted without a warning"
        return None if bool(torch.isfinite(p).all()) else "the parameter became non-finite"

    return judge(call, names=("duplicate", "more than one", "twice"), check=check)


# ---- loaded state of the wrong size or dtype ----


def _trained(shape, steps=1, kind="adamw", **kw):
    params = rand_params(shape)
    opt = OURS[kind](params, **HP[kind], **kw)
    for s in range(steps):
        put(params, rand_grads(params, s))
        opt.step()
    return params, opt


def _load_then_step(dst_params, dst_opt, sd, names=(*N_SHAPE, "exp_avg", "mask", "state")) -> Verdict:
    """Loading must raise clearly (changing nothing), or the next step must."""

    def then(_):
        put(dst_params, rand_grads(dst_params, 9))
        return judge_step(dst_opt, names=names)

    return judge(
        lambda: dst_opt.load_state_dict(sd), expect="either", names=names, snap=(dst_opt,), then=then
    )


@case()
def load_state_of_linear4_into_linear64():
    small = nn.Linear(4, 4)
    src = pk.SalientAdamW(small.parameters(), ratio=0.5)
    small(torch.randn(2, 4)).sum().backward()
    src.step()
    big = nn.Linear(64, 64)
    dst = pk.SalientAdamW(big.parameters(), ratio=0.5)
    return _load_then_step(list(big.parameters()), dst, src.state_dict())


@case()
def load_state_of_linear4_into_linear64_refresh0():
    small = nn.Linear(4, 4)
    src = pk.SalientAdamW(small.parameters(), ratio=0.5, refresh_every=0)
    small(torch.randn(2, 4)).sum().backward()
    src.step()
    big = nn.Linear(64, 64)
    dst = pk.SalientAdamW(big.parameters(), ratio=0.5, refresh_every=0)
    return _load_then_step(list(big.parameters()), dst, src.state_dict())


def _doctored(shape, key, value_of, kind="adamw", **kw) -> Verdict:
    params, opt = _trained(shape, kind=kind, **kw)
    sd = opt.state_dict()
    sd["state"][0][key] = value_of(sd["state"][0][key])
    return _load_then_step(params, opt, sd)


case("load_16_element_exp_avg_sq_for_65536_param")(
    lambda: _doctored((65536,), "exp_avg_sq", lambda v: torch.zeros(16))
)
case("load_16_element_exp_avg_for_65536_param")(
    lambda: _doctored((65536,), "exp_avg", lambda v: torch.zeros(16))
)
case("load_short_momentum_buffer_sgd")(
    lambda: _doctored((4096,), "momentum_buffer", lambda v: torch.zeros(7), kind="sgd")
)
case("load_one_word_mask_for_4096_param_refresh0")(
    lambda: _doctored((4096,), "mask", lambda v: torch.zeros(1, dtype=torch.int32), refresh_every=0)
)
case("load_one_word_mask_for_4096_param_refresh1")(
    lambda: _doctored((4096,), "mask", lambda v: torch.zeros(1, dtype=torch.int32))
)
case("load_2d_mask")(lambda: _doctored((4096,), "mask", lambda v: v.view(8, 16), refresh_every=0))


def _doctored_dtype(key, dtype, kind="adamw", refresh_every=0) -> Verdict:
    """A state tensor loaded in another dtype: a clear error, or the same continuation as without."""
    params, opt = _trained((300,), steps=2, kind=kind, ratio=0.5, refresh_every=refresh_every)
    sd = copy.deepcopy(opt.state_dict())
    ref_params = values(params)
    ref = OURS[kind](
        [nn.Parameter(v.clone()) for v in ref_params], **HP[kind], ratio=0.5, refresh_every=refresh_every
    )
    original = sd["state"][0][key]
    ref_sd = copy.deepcopy(sd)
    if key != "mask":  # the right continuation reads the values as they were stored in ``dtype``
        ref_sd["state"][0][key] = original.to(dtype).to(original.dtype)
    ref.load_state_dict(ref_sd)
    sd["state"][0][key] = original.to(dtype)
    grads = rand_grads(params, 5)
    put(ref.param_groups[0]["params"], grads)
    ref.step()
    want = values(ref.param_groups[0]["params"])

    def then(_):
        put(params, grads)
        return judge_step(opt, expect="either", names=(key, "dtype"), check=lambda _: differ(params, want))

    return judge(lambda: opt.load_state_dict(sd), names=(key, "dtype"), snap=(opt,), then=then)


case("load_int64_mask")(lambda: _doctored_dtype("mask", torch.int64))
case("load_float32_mask")(lambda: _doctored_dtype("mask", torch.float32))
case("load_int64_exp_avg")(lambda: _doctored_dtype("exp_avg", torch.int64))
case("load_int64_exp_avg_sq")(lambda: _doctored_dtype("exp_avg_sq", torch.int64))
case("load_int32_momentum_buffer_sgd")(lambda: _doctored_dtype("momentum_buffer", torch.int32, kind="sgd"))
case("load_float64_exp_avg_sq")(lambda: _doctored_dtype("exp_avg_sq", torch.float64))
case("load_bfloat16_exp_avg")(lambda: _doctored_dtype("exp_avg", torch.bfloat16))
case("load_float64_step")(lambda: _doctored_dtype("step", torch.float64))


@case()
def load_python_int_step_continues():
    """Older checkpoints stored ``step`` as a Python number (torch's own Adam converts it on load)."""
    params, opt = _trained((50,), steps=3, ratio=1.0)
    sd = copy.deepcopy(opt.state_dict())
    want_opt = copy.deepcopy(opt)
    want_params = want_opt.param_groups[0]["params"]
    sd["state"][0]["step"] = int(sd["state"][0]["step"])
    opt.load_state_dict(sd)

    def call():
        for s in range(3):
            put(params, rand_grads(params, 10 + s))
            opt.step()
            put(want_params, rand_grads(params, 10 + s))
            want_opt.step()

    return judge(call, check=lambda _: differ(params, want_params), names=("step",))


@case()
def load_sgd_state_into_adamw():
    _, sgd = _trained((20,), kind="sgd")
    dst_params = rand_params((20,))
    dst = pk.SalientAdamW(dst_params, ratio=0.5)
    return _load_then_step(
        dst_params, dst, sgd.state_dict(), names=("beta", "state", "group", "exp_avg", "sgd")
    )


@case()
def load_state_with_other_group_count():
    _, opt = _trained((20,))
    two = rand_params((20,), (3,))
    dst = pk.SalientAdamW([{"params": [two[0]]}, {"params": [two[1]]}], ratio=0.5)
    return judge(lambda: dst.load_state_dict(opt.state_dict()), expect="error", names=("group",), snap=(dst,))


# ---- set_masks ----


def _set_masks(masks_of, names=("mask",), expect="error", check_selected=False):
    params = rand_params((4, 8), (6,))
    opt = pk.SalientAdamW(params, ratio=0.25, refresh_every=0)
    masks = masks_of(params)

    def check(_):
        want = [(m != 0).reshape(p.shape) for m, p in zip(masks, params, strict=True)]
        return masks_differ(opt.masks(), want)

    return judge(
        lambda: opt.set_masks(masks),
        expect=expect,
        names=names,
        snap=(opt,),
        later=stepper(opt, params),
        check=check if check_selected else None,
    )


def _bits(p, seed=0):
    return torch.rand(p.shape, generator=gen(seed)) < 0.3


case("set_masks_wrong_shape")(
    lambda: _set_masks(lambda ps: [torch.ones(5, 8, dtype=torch.bool), _bits(ps[1])])
)
case("set_masks_too_few")(lambda: _set_masks(lambda ps: [_bits(ps[0])]))
case("set_masks_value_2")(lambda: _set_masks(lambda ps: [_bits(ps[0]).long() * 2, _bits(ps[1]).long()]))
case("set_masks_value_half")(
    lambda: _set_masks(lambda ps: [_bits(ps[0]).float() * 0.5, _bits(ps[1]).float()])
)
case("set_masks_value_nan")(
    lambda: _set_masks(lambda ps: [torch.where(_bits(ps[0]), float("nan"), 0.0), _bits(ps[1]).float()])
)
case("set_masks_value_minus_1")(lambda: _set_masks(lambda ps: [-_bits(ps[0]).long(), _bits(ps[1]).long()]))
case("set_masks_python_lists")(lambda: _set_masks(lambda ps: [_bits(ps[0]).tolist(), _bits(ps[1]).tolist()]))
case("set_masks_meta_device")(
    lambda: _set_masks(
        lambda ps: [
            torch.ones(4, 8, dtype=torch.bool, device="meta"),
            torch.ones(6, dtype=torch.bool, device="meta"),
        ],
        names=("mask", "device", "meta"),
    )
)
case("set_masks_second_mask_bad_changes_nothing")(
    lambda: _set_masks(lambda ps: [_bits(ps[0]), torch.ones(7, dtype=torch.bool)])
)
case("set_masks_flat_mask_for_a_matrix")(
    lambda: _set_masks(
        lambda ps: [_bits(ps[0]).reshape(-1), _bits(ps[1])], expect="either", check_selected=True
    )
)
case("set_masks_float_01_masks")(
    lambda: _set_masks(
        lambda ps: [_bits(ps[0]).float(), _bits(ps[1]).float()], expect="work", check_selected=True
    )
)
case("set_masks_int64_01_masks")(
    lambda: _set_masks(
        lambda ps: [_bits(ps[0]).long(), _bits(ps[1]).long()], expect="work", check_selected=True
    )
)


@case()
def set_masks_salun_dict_with_extra_names():
    model = mlp()
    opt = pk.SalientAdam(model[0].parameters(), ratio=0.5, refresh_every=0)
    masks = {n: _bits(p, i).long() for i, (n, p) in enumerate(model.named_parameters())}
    want = [masks["0.weight"].bool(), masks["0.bias"].bool()]
    return judge(
        lambda: opt.set_masks(masks, model.named_parameters()),
        expect="work",
        check=lambda _: masks_differ(opt.masks(), want),
    )


@case()
def set_masks_dict_missing_a_name():
    model = mlp()
    opt = pk.SalientAdam(model.parameters(), ratio=0.5, refresh_every=0)
    masks = {n: _bits(p).long() for n, p in model.named_parameters() if n != "2.bias"}
    return judge(
        lambda: opt.set_masks(masks, model.named_parameters()), expect="error", names=("mask",), snap=(opt,)
    )


@case()
def set_masks_dict_without_named_parameters():
    model = mlp()
    opt = pk.SalientAdam(model.parameters(), ratio=0.5, refresh_every=0)
    masks = {n: _bits(p).long() for n, p in model.named_parameters()}
    return judge(lambda: opt.set_masks(masks), expect="error", names=("named_parameters",), snap=(opt,))


@case()
def set_masks_dict_with_another_models_names():
    model, other = mlp(), mlp(1)
    opt = pk.SalientAdam(model.parameters(), ratio=0.5, refresh_every=0)
    masks = {n: _bits(p).long() for n, p in other.named_parameters()}
    return judge(
        lambda: opt.set_masks(masks, other.named_parameters()), expect="error", names=("mask",), snap=(opt,)
    )


@case()
def set_masks_then_step_refresh0_moves_exactly_the_mask():
    params = rand_params((4, 8), (6,))
    opt = pk.SalientAdamW(params, ratio=0.25, refresh_every=0)
    masks = [_bits(p, i) for i, p in enumerate(params)]
    opt.set_masks(masks)
    before = values(params)
    return judge(
        stepper(opt, params), expect="work", check=lambda _: masks_differ(moved(before, params), masks)
    )


# ---- the functional ops ----


def _fn_inputs(kind="adamw", shapes=((5, 6), (7,)), beta1=0.9):
    params = [p.detach() for p in rand_params(*shapes)]
    grads = rand_grads(params, 0)
    if kind == "sgd":
        config = pk.StepConfig.sgd(lr=0.1, momentum=0.9, weight_decay=0.1, momentum_init=True)
        state = {"exp_avg": [torch.zeros_like(p) for p in params]}
    else:
        config = pk.StepConfig.adam(kind, lr=1e-2, step=1, betas=(beta1, 0.999), weight_decay=0.1)
        state = {"exp_avg_sq": [torch.zeros_like(p) for p in params]}
        if beta1 > 0:
            state["exp_avg"] = [torch.zeros_like(p) for p in params]
    return params, grads, config, state


def _masked_update(mutate, names, expect="error", check=None, ratio=0.5, kind="adamw"):
    """masked_update on inputs changed in place by ``mutate(params, grads, config, state, kwargs)``,
    which may also return a new StepConfig, or a function that builds one (inside the judged call)."""
    params, grads, config, state = _fn_inputs(kind)
    kwargs = {"ratio": ratio, **state}
    out = mutate(params, grads, config, state, kwargs)
    if isinstance(out, pk.StepConfig):
        config = out
    make_config = out if callable(out) and not isinstance(out, torch.Tensor) else (lambda: config)
    kwargs.update(state)
    clean = values(params)

    def checker(_):
        if check is None:
            return None
        return check(clean, params, grads, kwargs)

    return judge(
        lambda: pk.masked_update(params, grads, make_config(), **kwargs),
        expect=expect,
        names=names,
        snap=(params, list(state.values())),
        check=checker if expect != "error" else None,
    )


def _right_update(clean, params, grads, kwargs):
    grads = [g.contiguous() for g in grads]
    want = masked_oracle(
        "adamw", clean, grads, kwargs.get("ratio") or 0.5, hp={"lr": 1e-2, "weight_decay": 0.1}
    )
    return differ(params, want)


_MASKED_UPDATE_ERRORS = {
    "masked_update_grad_shape_mismatch": (
        lambda p, g, c, s, k: g.__setitem__(0, torch.randn(6, 5)),
        ("grads",),
    ),
    "masked_update_fewer_grads": (lambda p, g, c, s, k: g.pop(), ("grads",)),
    "masked_update_grad_dtype_float64": (
        lambda p, g, c, s, k: g.__setitem__(1, g[1].double()),
        ("grads", "dtype"),
    ),
    "masked_update_exp_avg_sq_shape": (
        lambda p, g, c, s, k: s["exp_avg_sq"].__setitem__(0, torch.zeros(16)),
        ("exp_avg_sq",),
    ),
    "masked_update_exp_avg_sq_float64": (
        lambda p, g, c, s, k: s["exp_avg_sq"].__setitem__(0, s["exp_avg_sq"][0].double()),
        ("exp_avg_sq", "dtype"),
    ),
    "masked_update_exp_avg_sq_int64": (
        lambda p, g, c, s, k: s["exp_avg_sq"].__setitem__(0, s["exp_avg_sq"][0].long()),
        ("exp_avg_sq", "dtype"),
    ),
    "masked_update_exp_avg_sq_transposed": (
        lambda p, g, c, s, k: s["exp_avg_sq"].__setitem__(0, torch.zeros(6, 5).t()),
        ("exp_avg_sq", "contiguous"),
    ),
    "masked_update_missing_exp_avg": (
        lambda p, g, c, s, k: s.pop("exp_avg") and k.pop("exp_avg"),
        ("exp_avg",),
    ),
    "masked_update_moment_dtypes_differ": (
        lambda p, g, c, s, k: s["exp_avg"].__setitem__(0, s["exp_avg"][0].bfloat16()),
        ("exp_avg", "dtype"),
    ),
    "masked_update_masks_in_wrong_words": (
        lambda p, g, c, s, k: k.update(ratio=None, masks_in=[torch.zeros(3, dtype=torch.int32)] * 2),
        ("masks_in",),
    ),
    "masked_update_masks_in_int64": (
        lambda p, g, c, s, k: k.update(ratio=None, masks_in=[torch.zeros(1, dtype=torch.int64)] * 2),
        ("masks_in",),
    ),
    "masked_update_masks_out_too_short": (
        lambda p, g, c, s, k: k.update(masks_out=[torch.zeros(0, dtype=torch.int32)] * 2),
        ("masks_out",),
    ),
    "masked_update_ratio_and_masks_in": (
        lambda p, g, c, s, k: k.update(masks_in=[torch.zeros(1, dtype=torch.int32)] * 2),
        ("ratio", "masks_in"),
    ),
    "masked_update_neither_ratio_nor_masks": (
        lambda p, g, c, s, k: k.update(ratio=None),
        ("ratio", "masks_in"),
    ),
    "masked_update_ratio_zero": (lambda p, g, c, s, k: k.update(ratio=0.0), ("ratio",)),
    "masked_update_ratio_above_one": (lambda p, g, c, s, k: k.update(ratio=1.5), ("ratio",)),
    "masked_update_ratio_nan": (lambda p, g, c, s, k: k.update(ratio=float("nan")), ("ratio",)),
    "masked_update_ratio_string": (lambda p, g, c, s, k: k.update(ratio="0.5"), ("ratio",)),
    "masked_update_unknown_score": (lambda p, g, c, s, k: k.update(score="abs"), ("score",)),
    "masked_update_unknown_scope": (lambda p, g, c, s, k: k.update(scope="layer"), ("scope",)),
    "masked_update_unknown_backend": (lambda p, g, c, s, k: k.update(backend="numpy"), ("backend",)),
    "masked_update_cuda_backend_on_cpu": (
        lambda p, g, c, s, k: k.update(backend="cuda"),
        ("backend", "cuda"),
    ),
    "masked_update_lr_nan": (
        lambda p, g, c, s, k: lambda: pk.StepConfig.adam("adamw", lr=float("nan"), step=1, weight_decay=0.1),
        N_LR,
    ),
    "masked_update_beta1_one": (
        lambda p, g, c, s, k: lambda: pk.StepConfig.adam("adamw", lr=1e-2, step=2, betas=(1.0, 0.999)),
        ("beta",),
    ),
    "masked_update_unknown_kind": (
        lambda p, g, c, s, k: lambda: pk.StepConfig(kind="lion", lr=1e-2),
        ("kind", "lion"),
    ),
    "masked_update_scalars_of_4": (lambda p, g, c, s, k: replace(c, scalars=torch.ones(4)), ("scalars",)),
    "masked_update_scalars_float64": (
        lambda p, g, c, s, k: replace(c, scalars=torch.ones(5, dtype=torch.float64)),
        ("scalars",),
    ),
    "masked_update_mixed_devices": (
        lambda p, g, c, s, k: p.__setitem__(1, torch.zeros(7, device="meta")),
        ("device", "meta"),
    ),
    "masked_update_empty_lists": (
        lambda p, g, c, s, k: [p.clear(), g.clear(), s["exp_avg"].clear(), s["exp_avg_sq"].clear()],
        ("params", "empty"),
    ),
}
for _name, (_fn, _names) in _MASKED_UPDATE_ERRORS.items():
    case(_name)(lambda fn=_fn, names=_names: _masked_update(fn, names))


@case()
def masked_update_single_tensor_not_list():
    params, grads, config, state = _fn_inputs()
    return judge(
        lambda: pk.masked_update(
            params[0],
            grads[0],
            config,
            exp_avg=state["exp_avg"][0],
            exp_avg_sq=state["exp_avg_sq"][0],
            ratio=0.5,
        ),
        expect="error",
        names=("params", "list"),
        snap=(params,),
    )


_MASKED_UPDATE_ODD = {
    "masked_update_transposed_grad": lambda p, g, c, s, k: g.__setitem__(0, g[0].t().contiguous().t()),
    "masked_update_stride0_grad": lambda p, g, c, s, k: g.__setitem__(1, torch.ones(1).expand(7)),
    "masked_update_transposed_param": lambda p, g, c, s, k: p.__setitem__(0, p[0].t().contiguous().t()),
    "masked_update_grads_with_nan_and_inf": lambda p, g, c, s, k: [
        g[0].view(-1).__setitem__(slice(0, 3), float("nan")),
        g[1].__setitem__(2, float("inf")),
    ],
    "masked_update_all_nan_grads": lambda p, g, c, s, k: [x.fill_(float("nan")) for x in g],
}
for _name, _fn in _MASKED_UPDATE_ODD.items():
    case(_name)(
        lambda fn=_fn: _masked_update(
            fn, ("contiguous", "stride", "grads", "params"), "either", check=_right_update
        )
    )


@case()
def masked_update_nan_grads_never_selected():
    def check(clean, params, grads, kwargs):
        return _right_update(clean, params, grads, kwargs)

    def mutate(p, g, c, s, k):
        g[0].view(-1)[::2] = float("nan")

    return _masked_update(mutate, (), "work", check=check)


@case()
def masked_update_masks_in_with_bits_past_the_end():
    params, grads, config, state = _fn_inputs(shapes=((40,),))
    bits = torch.rand(40, generator=gen(1)) < 0.5
    words = torch.zeros(2, dtype=torch.int32)
    for i in range(64):
        if i >= 40 or bits[i]:
            words[i // 32] |= (1 << (i % 32)) if i % 32 < 31 else -(2**31)
    clean = values(params)
    full = torch_steps("adamw", clean, [grads], {"lr": 1e-2, "weight_decay": 0.1})
    want = [torch.where(bits, full[0], clean[0])]
    return judge(
        lambda: pk.masked_update(params, grads, config, masks_in=[words], **state),
        names=("masks_in", "bit"),
        snap=(params,),
        check=lambda _: differ(params, want),
    )


def _masked_right(kind, ratio, scope="global", score="grad"):
    params, grads, config, state = _fn_inputs(kind, shapes=((9, 11), (40,), (3,)))
    clean = values(params)
    hp = (
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}
        if kind == "sgd"
        else {"lr": 1e-2, "weight_decay": 0.1}
    )
    weights = clean if score == "grad_weight" else None
    want = masked_oracle(kind, clean, grads, ratio, hp=hp, per_tensor=scope == "per_tensor", weights=weights)
    out = [torch.zeros(math.ceil(p.numel() / 32), dtype=torch.int32) for p in params]

    def check(_):
        return differ(params, want) or masks_differ(
            [moved(clean, params)[i] for i in range(len(params))],
            oracle_masks(grads, ratio, weights=weights, per_tensor=scope == "per_tensor"),
        )

    return judge(
        lambda: pk.masked_update(
            params, grads, config, ratio=ratio, scope=scope, score=score, masks_out=out, **state
        ),
        expect="work",
        check=check,
    )


for _kind in ("adamw", "adam", "sgd"):
    case(f"masked_update_{_kind}_global_ratio_0.3")(lambda k=_kind: _masked_right(k, 0.3))
    case(f"masked_update_{_kind}_per_tensor_ratio_0.3")(lambda k=_kind: _masked_right(k, 0.3, "per_tensor"))
case("masked_update_grad_weight_score")(lambda: _masked_right("adamw", 0.2, score="grad_weight"))


# select / topk_mask


def _topk(tensors_of, names=("grads", "tensors"), expect="error", check=None, **kw):
    tensors = tensors_of()

    def checker(result):
        return check(tensors, result) if check else None

    return judge(
        lambda: pk.topk_mask(tensors, **kw), expect=expect, names=names, check=checker if check else None
    )


def _right_topk(ratio, per_tensor=False):
    def check(tensors, result):
        return masks_differ(
            result, oracle_masks([t.contiguous() for t in tensors], ratio, per_tensor=per_tensor)
        )

    return check


_TOPK_ERRORS = {
    "topk_mask_int_tensors": (lambda: [torch.randint(0, 9, (10,))], ("dtype",)),
    "topk_mask_ratio_zero": (lambda: [torch.randn(10)], ("ratio",), {"ratio": 0.0}),
    "topk_mask_ratio_bool": (lambda: [torch.randn(10)], ("ratio",), {"ratio": True}),
    "topk_mask_mixed_devices": (lambda: [torch.randn(10), torch.randn(3, device="meta")], ("device", "meta")),
    "topk_mask_grad_weight_without_weights": (
        lambda: [torch.randn(10)],
        ("weight",),
        {"score": "grad_weight"},
    ),
    "topk_mask_grad_weight_mismatched_weights": (
        lambda: [torch.randn(10), torch.randn(4)],
        ("weight",),
        {"score": "grad_weight", "weights": [torch.randn(10), torch.randn(5)]},
    ),
    "topk_mask_grad_weight_too_few_weights": (
        lambda: [torch.randn(10), torch.randn(4)],
        ("weight",),
        {"score": "grad_weight", "weights": [torch.randn(10)]},
    ),
    "topk_mask_unknown_scope": (lambda: [torch.randn(10)], ("scope",), {"scope": "row"}),
}
for _name, _spec in _TOPK_ERRORS.items():
    _kw = {"ratio": 0.5, **(_spec[2] if len(_spec) > 2 else {})}
    case(_name)(lambda spec=_spec, kw=_kw: _topk(spec[0], spec[1], **kw))


@case()
def topk_mask_a_bare_tensor():
    t = torch.randn(10)
    return judge(
        lambda: pk.topk_mask(t, 0.5),
        names=("tensors", "grads", "list"),
        check=lambda r: (
            masks_differ(r, oracle_masks([t], 0.5))
            if isinstance(r, list) and len(r) == 1
            else "returned a mask per row"
        ),
    )


_TOPK_ODD = {
    "topk_mask_transposed": lambda: [torch.randn(7, 9).t(), torch.randn(5)],
    "topk_mask_stride0": lambda: [torch.randn(1, 8).expand(6, 8), torch.randn(5)],
    "topk_mask_sliced_with_step": lambda: [torch.randn(40)[::3], torch.randn(5)],
}
for _name, _fn in _TOPK_ODD.items():
    case(_name)(
        lambda fn=_fn: _topk(fn, ("contiguous", "stride"), expect="either", check=_right_topk(0.4), ratio=0.4)
    )

_TOPK_RIGHT = {
    "topk_mask_all_ties_lower_index_first": (lambda: [torch.ones(10), torch.ones(7)], 0.5, False),
    "topk_mask_tiny_ratio_selects_one": (lambda: [torch.randn(100), torch.randn(30)], 1e-9, False),
    "topk_mask_nan_and_inf_never_selected": (
        lambda: [torch.tensor([float("nan"), 1.0, float("inf"), -2.0, float("-inf"), 0.5])],
        0.9,
        False,
    ),
    "topk_mask_all_nan": (lambda: [torch.full((9,), float("nan"))], 0.5, False),
    "topk_mask_scalar_tensor": (lambda: [torch.tensor(3.0), torch.randn(4)], 0.5, False),
    "topk_mask_empty_tensor_alone": (lambda: [torch.zeros(0)], 0.5, False),
    "topk_mask_empty_and_nonempty": (lambda: [torch.zeros(0), torch.randn(9)], 0.5, False),
    "topk_mask_per_tensor": (lambda: [torch.randn(33), torch.randn(7), torch.randn(2)], 0.3, True),
    "topk_mask_bf16": (lambda: [torch.randn(50).bfloat16(), torch.randn(20).bfloat16()], 0.3, False),
    "topk_mask_huge_and_tiny_values": (
        lambda: [torch.tensor([1e38, 1e-45, -1e38, 3e-39, 0.0, -0.0])],
        0.5,
        False,
    ),
}
for _name, (_fn, _ratio, _per) in _TOPK_RIGHT.items():
    case(_name)(
        lambda fn=_fn, ratio=_ratio, per=_per: _topk(
            fn,
            expect="work",
            check=_right_topk(ratio, per),
            ratio=ratio,
            scope="per_tensor" if per else "global",
        )
    )


@case()
def topk_mask_params_where_only_some_have_grad():
    params = rand_params((20,), (10,))
    params[0].grad = torch.randn(20, generator=gen(5))

    def check(result):
        ranked_as_zero = oracle_masks([params[0].grad, torch.zeros(10)], 0.5)
        ranked_alone = [*oracle_masks([params[0].grad], 0.5), torch.zeros(10, dtype=torch.bool)]
        if masks_differ(result, ranked_as_zero) and masks_differ(result, ranked_alone):
            weights = oracle_masks([p.detach() for p in params], 0.5)
            if not masks_differ(result, weights):
                return "ranked the weights themselves, not the gradients"
            return "masks match no ranking of the gradients"
        return None

    return judge(lambda: pk.topk_mask(params, 0.5), names=("grad",), check=check)


@case()
def topk_mask_params_all_with_grad_rank_grads():
    params = rand_params((20,), (10,))
    put(params, rand_grads(params, 3))
    return judge(
        lambda: pk.topk_mask(params, 0.5),
        expect="work",
        check=lambda r: masks_differ(r, oracle_masks([p.grad for p in params], 0.5)),
    )


@case()
def topk_mask_eager_and_cpu_agree():
    ts = [torch.randn(1000, generator=gen(1)), torch.round(torch.randn(333, generator=gen(2)) * 2) / 2]

    def call():
        return pk.topk_mask(ts, 0.37, backend="eager"), pk.topk_mask(ts, 0.37, backend="cpu")

    return judge(
        call,
        expect="work",
        check=lambda r: masks_differ(r[1], r[0]) or masks_differ(r[0], oracle_masks(ts, 0.37)),
    )


@case()
def select_threshold_is_the_kth_largest():
    ts = [torch.randn(100, generator=gen(1)), torch.randn(50, generator=gen(2))]
    k = math.floor(0.2 * 150)
    want = torch.cat(ts).abs().sort(descending=True).values[k - 1]

    def check(sel):
        got = float(sel.threshold.reshape(-1)[0])
        return None if got == float(want) else f"threshold {got} != {float(want)}"

    return judge(lambda: pk.select(ts, 0.2), expect="work", check=check)


@case()
def select_a_generator_of_grads():
    return judge(
        lambda: pk.select((torch.randn(5) for _ in range(2)), 0.5),
        names=("grads", "list"),
        check=lambda s: None,
    )


@case()
def select_weights_of_other_shape():
    return judge(
        lambda: pk.select([torch.randn(8)], 0.5, score="grad_weight", weights=[torch.randn(9)]),
        expect="error",
        names=("weights",),
    )


# SaliencyAccumulator


@case()
def accumulator_one_nan_element_with_clip_norm():
    params = rand_params((10,), (5,))
    acc = pk.SaliencyAccumulator(params, clip_norm=1.0)
    acc.accumulate(rand_grads(params, 0))
    bad = rand_grads(params, 1)
    bad[0][3] = float("nan")

    def check(_):
        sums = acc.gradients()
        finite = sum(int(torch.isfinite(s).sum()) for s in sums)
        return None if finite >= 14 else f"{15 - finite} of 15 sums are NaN after one NaN element"

    return judge(lambda: acc.accumulate(bad), names=("nan", "finite", "grad"), check=check)


@case()
def accumulator_one_nan_element_without_clip():
    params = rand_params((10,), (5,))
    acc = pk.SaliencyAccumulator(params)
    bad = rand_grads(params, 1)
    bad[1][0] = float("nan")

    def check(_):
        finite = sum(int(torch.isfinite(s).sum()) for s in acc.gradients())
        return None if finite >= 14 else f"{15 - finite} of 15 sums are NaN after one NaN element"

    return judge(lambda: acc.accumulate(bad), names=("nan", "finite", "grad"), check=check)


@case()
def accumulator_one_inf_element_with_clip_norm():
    params = rand_params((10,), (5,))
    acc = pk.SaliencyAccumulator(params, clip_norm=1.0)
    acc.accumulate(rand_grads(params, 0))
    bad = rand_grads(params, 1)
    bad[0][3] = float("inf")

    def check(_):
        sums = acc.gradients()
        finite = sum(int(torch.isfinite(s).sum()) for s in sums)
        return None if finite >= 14 else f"{15 - finite} of 15 sums are non-finite after one inf element"

    return judge(lambda: acc.accumulate(bad), names=("inf", "finite", "grad"), check=check)


def _acc_bad(grads_of, names=("shape", "grad", "size")):
    params = rand_params((4, 5), (6,))
    acc = pk.SaliencyAccumulator(params)
    acc.accumulate(rand_grads(params, 0))
    grads = grads_of(params)
    return judge(
        lambda: acc.accumulate(grads), expect="error", names=names, snap=(acc.gradients(), [acc.batches])
    )


case("accumulator_broadcastable_smaller_gradient")(
    lambda: _acc_bad(lambda ps: [torch.ones(1), torch.ones(6)])
)
case("accumulator_row_gradient_broadcasts")(lambda: _acc_bad(lambda ps: [torch.ones(5), torch.ones(6)]))
case("accumulator_larger_gradient")(lambda: _acc_bad(lambda ps: [torch.ones(8, 5), torch.ones(6)]))
case("accumulator_flat_gradient_same_numel")(lambda: _acc_bad(lambda ps: [torch.ones(20), torch.ones(6)]))
case("accumulator_too_few_gradients")(lambda: _acc_bad(lambda ps: [torch.ones(4, 5)], ("gradient", "grads")))
case("accumulator_meta_gradients")(
    lambda: _acc_bad(
        lambda ps: [torch.ones(4, 5, device="meta"), torch.ones(6, device="meta")], ("device", "meta")
    )
)
case("accumulator_a_bad_second_gradient_changes_nothing")(
    lambda: _acc_bad(lambda ps: [torch.ones(4, 5), torch.ones(7)])
)

for _value in (0.0, -1.0, float("nan"), "1.0"):
    case(f"accumulator_clip_norm_{_value}")(
        lambda v=_value: judge(
            lambda: pk.SaliencyAccumulator(rand_params((3,)), clip_norm=v),
            expect="error",
            names=("clip_norm",),
        )
    )


@case()
def accumulator_sums_with_clip_norm_match_recomputation():
    params = rand_params((6, 3), (4,))
    acc = pk.SaliencyAccumulator(params, clip_norm=0.5)
    batches = [rand_grads(params, s, scale=3.0) for s in range(3)]
    batches[1][1] = None  # a parameter without a gradient in one batch
    want = [torch.zeros(p.shape) for p in params]
    for grads in batches:
        present = [g for g in grads if g is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))
        for w, g in zip(want, grads, strict=True):
            if g is not None:
                w += g * scale

    def call():
        for grads in batches:
            acc.accumulate(grads)

    return judge(call, expect="work", check=lambda _: differ(acc.gradients(), want))


@case()
def accumulator_int_and_transposed_gradients():
    params = rand_params((4, 4), (3,))
    acc = pk.SaliencyAccumulator(params)
    g0 = torch.randn(4, 4, generator=gen(3))
    grads = [g0.t(), torch.tensor([1, -2, 3])]
    return judge(
        lambda: acc.accumulate(grads),
        names=("dtype", "grad"),
        check=lambda _: differ(acc.gradients(), [g0.t(), torch.tensor([1.0, -2.0, 3.0])]),
    )


@case()
def accumulator_no_parameters():
    return judge(lambda: pk.SaliencyAccumulator([]), expect="error", names=("parameter",))


# =====================================================================================================
# 2. A failing step writes nothing.
# =====================================================================================================
section("failing-step")


def _two_groups(kind="adamw", second=None, first=None, **kw):
    model = mlp()
    groups = _decay_groups(model)
    groups[0].update(first or {})
    groups[1].update(second or {})
    opt = OURS[kind](groups, **{k: v for k, v in HP[kind].items() if k != "weight_decay"}, **kw)
    params = list(model.parameters())
    stepper(opt, params, seed=1)()  # one good step: there is state to protect
    return model, params, opt


def _runtime(kind, key, bad, names, group=1, first=None, second=None, **kw):
    """Set ``param_groups[group][key] = bad`` after a good step; the next step must raise clearly and
    write nothing, and restoring the value must make steps work again."""
    _, params, opt = _two_groups(kind, second=second, first=first, **kw)
    good = opt.param_groups[group][key]
    opt.param_groups[group][key] = bad
    put(params, rand_grads(params, 2))

    def later():
        opt.param_groups[group][key] = good
        stepper(opt, params, seed=3)()

    return judge(opt.step, expect="error", names=names, snap=(opt,), later=later)


_RUNTIME = [
    ("betas", (1.0, 0.999), ("beta",)),
    ("betas", (0.9, 1.0), ("beta",)),
    ("betas", (float("nan"), 0.999), ("beta",)),
    ("lr", float("nan"), N_LR),
    ("lr", -1e-3, N_LR),
    ("eps", float("nan"), ("eps",)),
    ("eps", -1.0, ("eps",)),
    ("weight_decay", -0.1, ("weight_decay", "weight decay")),
    ("weight_decay", float("nan"), ("weight_decay", "weight decay")),
    ("clip_value", -1.0, ("clip_value",)),
    ("ema", 2.0, ("ema",)),
    ("state_dtype", torch.float16, ("state_dtype",)),
]
for _key, _bad, _names in _RUNTIME:
    _label = f"{_key}_{_bad}".replace(" ", "").replace("(", "").replace(")", "").replace(",", "_")
    for _kind in ("adamw", "adam"):
        case(f"runtime_{_kind}_group1_{_label}")(
            lambda kind=_kind, key=_key, bad=_bad, names=_names: _runtime(kind, key, bad, names)
        )
    case(f"runtime_adamw_per_tensor_group1_{_label}")(
        lambda key=_key, bad=_bad, names=_names: _runtime(
            "adamw", key, bad, names, second={"scope": "per_tensor"}
        )
    )

for _key, _bad, _names in [
    ("lr", float("nan"), N_LR),
    ("momentum", float("nan"), ("momentum",)),
    ("momentum", -0.5, ("momentum",)),
    ("dampening", float("nan"), ("dampening",)),
    ("nesterov", True, ("nesterov",)),
    ("weight_decay", float("nan"), ("weight_decay", "weight decay")),
]:
    case(f"runtime_sgd_group1_{_key}_{_bad}")(
        lambda key=_key, bad=_bad, names=_names: _runtime(
            "sgd", key, bad, names, second={"dampening": 0.5} if key == "nesterov" else None
        )
    )

# Scope-wide options, changed in every group at once (groups sharing a scope must agree).
for _key, _bad, _names in [
    ("ratio", 2.0, ("ratio",)),
    ("ratio", 0.0, ("ratio",)),
    ("ratio", float("nan"), ("ratio",)),
    ("score", "bogus", ("score",)),
    ("scope", "bogus", ("scope",)),
    ("refresh_every", -1, ("refresh_every",)),
    ("refresh_every", 1.5, ("refresh_every",)),
    ("backend", "bogus", ("backend",)),
]:

    def _all_groups(key=_key, bad=_bad, names=_names):
        _, params, opt = _two_groups("adamw")
        goods = [g[key] for g in opt.param_groups]
        for g in opt.param_groups:
            g[key] = bad
        put(params, rand_grads(params, 2))

        def later():
            for g, v in zip(opt.param_groups, goods, strict=True):
                g[key] = v
            stepper(opt, params, seed=3)()

        return judge(opt.step, expect="error", names=names, snap=(opt,), later=later)

    case(f"runtime_all_groups_{_key}_{_bad}")(_all_groups)


@case()
def runtime_global_then_per_tensor_group_with_transposed_param():
    _, params, opt = _two_groups("adamw", second={"scope": "per_tensor"})
    torch.manual_seed(0)
    square = nn.Parameter(torch.randn(5, 5))
    opt.add_param_group({"params": [square], "scope": "per_tensor"})
    stepper(opt, [*params, square])()
    square.data = square.data.t()  # same shape, no longer contiguous
    put([*params, square], rand_grads([*params, square], 2))
    return judge(opt.step, names=("contiguous",), snap=(opt,), check=lambda _: None)


@case()
def runtime_global_then_per_tensor_group_with_sparse_grad():
    model = mlp()
    emb = nn.Embedding(10, 4, sparse=True)
    opt = pk.SalientAdamW(
        [{"params": list(model.parameters())}, {"params": list(emb.parameters()), "scope": "per_tensor"}]
    )
    loss_of(model, 0).backward()
    emb(torch.tensor([1, 2])).sum().backward()
    return judge(opt.step, expect="error", names=("sparse",), snap=(opt,))


@case()
def runtime_global_groups_disagree_on_ratio():
    _, params, opt = _two_groups("adamw")
    opt.param_groups[1]["ratio"] = 0.25
    put(params, rand_grads(params, 2))
    return judge(opt.step, expect="error", names=("ratio",), snap=(opt,))


@case()
def closure_that_raises_changes_nothing():
    model, _, opt = _two_groups("adamw")

    def closure():
        loss_of(model, 5).backward()
        raise ValueError("closure failed on purpose")

    return judge(lambda: opt.step(closure), expect="error", names=("closure",), snap=(opt,))


# rejected add_param_group


def _rejected_group(extra, names, kind="adamw", shape=(7,), param=None):
    _, params, opt = _two_groups(kind)
    new = param if param is not None else nn.Parameter(torch.randn(shape))

    def later():
        stepper(opt, params, seed=3)()

    p = new(params) if callable(new) else new
    return judge(
        lambda: opt.add_param_group({"params": [p], **extra}),
        expect="error",
        names=names,
        snap=(opt,),
        later=later,
    )


_REJECTED = {
    "ratio_2": ({"ratio": 2.0}, ("ratio",)),
    "ratio_nan": ({"ratio": float("nan")}, ("ratio",)),
    "score_bogus": ({"score": "bogus"}, ("score",)),
    "scope_bogus": ({"scope": "bogus"}, ("scope",)),
    "refresh_every_minus_1": ({"refresh_every": -1}, ("refresh_every",)),
    "lr_negative": ({"lr": -1.0}, N_LR),
    "lr_nan": ({"lr": float("nan")}, N_LR),
    "betas_1": ({"betas": (1.0, 0.999)}, ("beta",)),
    "eps_nan": ({"eps": float("nan")}, ("eps",)),
    "backend_bogus": ({"backend": "bogus"}, ("backend",)),
    "state_dtype_fp16": ({"state_dtype": torch.float16}, ("state_dtype",)),
    "ema_5": ({"ema": 5.0}, ("ema",)),
    "clip_value_0": ({"clip_value": 0.0}, ("clip_value",)),
}
for _name, (_extra, _names) in _REJECTED.items():
    case(f"add_param_group_{_name}")(lambda extra=_extra, names=_names: _rejected_group(extra, names))

case("add_param_group_float64_param")(
    lambda: _rejected_group({}, ("float64", "dtype", "float32"), param=nn.Parameter(torch.randn(4).double()))
)
case("add_param_group_duplicate_param")(
    lambda: _rejected_group({}, ("more than one", "duplicate", "already"), param=lambda ps: ps[0])
)
case("add_param_group_cuda_backend_on_cpu")(lambda: _rejected_group({"backend": "cuda"}, ("backend", "cuda")))


@case()
def add_param_group_global_group_disagreeing_on_ratio():
    """Either add_param_group rejects it, or the next step does, writing nothing."""
    _, params, opt = _two_groups("adamw")
    new = nn.Parameter(torch.randn(7))

    def then(_):
        put([*params, new], rand_grads([*params, new], 4))
        return judge_step(opt, names=("ratio",))

    return judge(
        lambda: opt.add_param_group({"params": [new], "ratio": 0.1}), names=("ratio",), snap=(opt,), then=then
    )


# load_state_dict with bad saved groups


def _bad_saved_group(key, bad, names, kind="adamw"):
    _, params, opt = _two_groups(kind)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][1][key] = bad
    return judge(
        lambda: opt.load_state_dict(sd), expect="error", names=names, snap=(opt,), later=stepper(opt, params)
    )


for _key, _bad, _names in [
    ("ratio", 2.0, ("ratio",)),
    ("score", "bogus", ("score",)),
    ("scope", "bogus", ("scope",)),
    ("betas", (1.0, 0.999), ("beta",)),
    ("lr", -1.0, N_LR),
    ("lr", float("nan"), N_LR),
    ("refresh_every", -1, ("refresh_every",)),
    ("state_dtype", torch.float16, ("state_dtype",)),
    ("backend", "bogus", ("backend",)),
    ("ema", 5.0, ("ema",)),
]:
    case(f"load_saved_group_{_key}_{_bad}".replace(" ", ""))(
        lambda key=_key, bad=_bad, names=_names: _bad_saved_group(key, bad, names)
    )


@case()
def load_saved_groups_missing_our_options():
    """A saved group without ratio/score/scope (written before those options, or by hand)."""
    _, params, opt = _two_groups("adamw")
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for key in ("ratio", "score", "scope", "refresh_every"):
            g.pop(key)

    def then(_):
        put(params, rand_grads(params, 5))
        return judge_step(opt, expect="work", check=lambda _: None)

    return judge(lambda: opt.load_state_dict(sd), names=("ratio", "score", "scope"), snap=(opt,), then=then)


# =====================================================================================================
# 3. Drop-in with torch.optim.
# =====================================================================================================
section("drop-in")

_MATH_KWARGS = {"amsgrad", "maximize", "decoupled_weight_decay"}
_TORCH_KWARGS = {
    "adamw": {
        "amsgrad": (False, True),
        "maximize": (False, True),
        "foreach": (None, False, True),
        "capturable": (False, True),
        "differentiable": (False, True),
        "fused": (None, False, True),
    },
    "sgd": {
        "maximize": (False, True),
        "foreach": (None, False, True),
        "differentiable": (False, True),
        "fused": (None, False, True),
    },
}
_TORCH_KWARGS["adam"] = {**_TORCH_KWARGS["adamw"], "decoupled_weight_decay": (False, True)}
_TORCH_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False}
_TORCH_DEFAULTS |= {"differentiable": False, "fused": None, "decoupled_weight_decay": False}


def _torch_kwarg(kind, key, value):
    default = _TORCH_DEFAULTS[key] is value or key == "foreach"
    theirs = {key: value} if key in _MATH_KWARGS else {}
    return versus_torch(
        kind,
        flat_make((5, 4), (6,)),
        ours_kw={key: value},
        theirs_kw=theirs,
        expect="work" if default else "either",
        names=(key,),
    )


for _kind, _options in _TORCH_KWARGS.items():
    for _key, _values in _options.items():
        for _value in _values:
            case(f"torch_kwarg_{_kind}_{_key}_{_value}")(
                lambda kind=_kind, key=_key, value=_value: _torch_kwarg(kind, key, value)
            )


def _positional(kind, args, theirs_args=None, expect="work", names=()):
    torch.manual_seed(0)
    ours_params = rand_params((5, 4), (6,))
    their_params = rand_params((5, 4), (6,))
    theirs = THEIRS[kind](their_params, *(theirs_args or args))
    for s in range(3):
        put(their_params, rand_grads(their_params, s))
        theirs.step()

    def call():
        opt = OURS[kind](ours_params, *args, ratio=1.0)
        for s in range(3):
            put(ours_params, rand_grads(ours_params, s))
            opt.step()

    return judge(call, expect=expect, names=names, check=lambda _: differ(ours_params, their_params))


case("positional_adamw_amsgrad_false")(lambda: _positional("adamw", (1e-2, (0.9, 0.99), 1e-8, 0.1, False)))
case("positional_adam_amsgrad_false")(lambda: _positional("adam", (1e-2, (0.9, 0.99), 1e-8, 0.1, False)))
case("positional_adamw_amsgrad_true")(
    lambda: _positional("adamw", (1e-2, (0.9, 0.99), 1e-8, 0.1, True), expect="either", names=("amsgrad",))
)
case("positional_adamw_four_args")(lambda: _positional("adamw", (1e-2, (0.8, 0.9), 1e-6, 0.2)))
case("positional_sgd_all_five")(lambda: _positional("sgd", (0.05, 0.9, 0.0, 0.1, True)))
case("positional_sgd_dampening")(lambda: _positional("sgd", (0.05, 0.9, 0.3, 0.1, False)))
case("betas_as_a_list")(lambda: versus_torch("adamw", flat_make((7,)), hp={"lr": 1e-2, "betas": [0.8, 0.99]}))
case("lr_as_a_tensor")(
    lambda: versus_torch(
        "adamw",
        flat_make((7,)),
        hp={"lr": torch.tensor(1e-2)},
        theirs_hp={"lr": 1e-2},
        expect="either",
        names=N_LR,
    )
)


def _group_option(kind, key, value, expect="either"):
    def make():
        params = rand_params((5, 4), (6,))
        return [{"params": params, key: value}], lambda s: put(params, rand_grads(params, s))

    torch.manual_seed(0)
    ours_groups, ours_grads = make()
    torch.manual_seed(0)
    their_groups, their_grads = make()
    opt_t = THEIRS[kind](their_groups, **HP[kind])  # torch honours these options per group
    for s in range(3):
        their_grads(s)
        opt_t.step()

    def call():
        opt = OURS[kind](ours_groups, **HP[kind], ratio=1.0)
        for s in range(3):
            ours_grads(s)
            opt.step()

    ours_params, their_params = ours_groups[0]["params"], their_groups[0]["params"]
    return judge(call, expect=expect, names=(key,), check=lambda _: differ(ours_params, their_params))


case("group_option_maximize_true")(lambda: _group_option("adamw", "maximize", True))
case("group_option_maximize_true_sgd")(lambda: _group_option("sgd", "maximize", True))
case("group_option_amsgrad_true")(lambda: _group_option("adam", "amsgrad", True))
case("group_option_decoupled_weight_decay")(lambda: _group_option("adam", "decoupled_weight_decay", True))
case("group_option_foreach_false")(lambda: _group_option("adamw", "foreach", False, expect="work"))
case("group_option_betas_list")(lambda: _group_option("adamw", "betas", [0.5, 0.9], expect="work"))


def _construct(kind, kwargs, names):
    params = rand_params((5,))
    return judge(lambda: OURS[kind](params, **kwargs), expect="error", names=names)


_CONSTRUCT = {
    "adamw": [
        ({"lr": float("nan")}, N_LR),
        ({"lr": -1.0}, N_LR),
        ({"lr": "0.1"}, N_LR),
        ({"lr": None}, N_LR),
        ({"eps": float("nan")}, ("eps",)),
        ({"eps": -1e-8}, ("eps",)),
        ({"weight_decay": float("nan")}, ("weight_decay", "weight decay")),
        ({"weight_decay": -1.0}, ("weight_decay", "weight decay")),
        ({"betas": (1.0, 0.999)}, ("beta",)),
        ({"betas": (0.9, 1.0)}, ("beta",)),
        ({"betas": (float("nan"), 0.999)}, ("beta",)),
        ({"betas": (0.9, float("nan"))}, ("beta",)),
        ({"betas": (0.9, 0.99, 0.9)}, ("beta",)),
        ({"betas": 0.9}, ("beta",)),
    ],
    "sgd": [
        ({"lr": float("nan")}, N_LR),
        ({"lr": "0.1"}, N_LR),
        ({"momentum": float("nan")}, ("momentum",)),
        ({"momentum": -0.1}, ("momentum",)),
        ({"dampening": float("nan")}, ("dampening",)),
        ({"weight_decay": float("nan")}, ("weight_decay", "weight decay")),
        ({"nesterov": True}, ("nesterov",)),
    ],
    "saliency": [
        ({"ratio": 0.0}, ("ratio",)),
        ({"ratio": 1.5}, ("ratio",)),
        ({"ratio": float("nan")}, ("ratio",)),
        ({"ratio": "0.5"}, ("ratio",)),
        ({"score": "abs"}, ("score",)),
        ({"scope": "layer"}, ("scope",)),
        ({"refresh_every": -1}, ("refresh_every",)),
        ({"refresh_every": 2.0}, ("refresh_every",)),
        ({"refresh_every": True}, ("refresh_every",)),
        ({"clip_value": float("nan")}, ("clip_value",)),
        ({"clip_value": 0.0}, ("clip_value",)),
        ({"ema": 1.5}, ("ema",)),
        ({"ema": float("nan")}, ("ema",)),
        ({"state_dtype": torch.float16}, ("state_dtype",)),
        ({"state_dtype": "bf16"}, ("state_dtype",)),
        ({"backend": "numpy"}, ("backend",)),
        ({"backend": "cuda"}, ("backend", "cuda")),
    ],
}
for _group, _specs in _CONSTRUCT.items():
    for _kwargs, _names in _specs:
        _k, _v = next(iter(_kwargs.items()))
        _kind = "adamw" if _group == "saliency" else _group
        case(f"construct_{_group}_{_k}_{_v}".replace(" ", ""))(
            lambda kind=_kind, kwargs=_kwargs, names=_names: _construct(kind, kwargs, names)
        )
case("construct_adam_lr_nan")(lambda: _construct("adam", {"lr": float("nan")}, N_LR))
case("construct_float64_params")(
    lambda: judge(
        lambda: pk.SalientAdamW([nn.Parameter(torch.randn(3).double())]),
        expect="error",
        names=("dtype", "float64", "float32"),
    )
)
case("construct_empty_params")(
    lambda: judge(lambda: pk.SalientAdamW([]), expect="error", names=("param", "empty"))
)
case("construct_a_bare_tensor")(
    lambda: judge(
        lambda: pk.SalientAdamW(nn.Parameter(torch.randn(3))), expect="error", names=("param", "iterable")
    )
)


def model_grads(model):
    def grads(s):
        model.zero_grad()
        loss_of(model, s).backward()

    return grads


def _named_make():
    model = mlp()
    return list(model.named_parameters()), model_grads(model)


def _lr_groups_make():
    model = mlp()
    groups = [{"params": list(model[0].parameters()), "lr": 0.05}, {"params": list(model[2].parameters())}]
    return groups, model_grads(model)


case("construct_named_parameters_vs_torch")(lambda: versus_torch("adamw", _named_make))


for _kind in ("adamw", "adam", "sgd"):
    case(f"ratio_one_mlp_{_kind}_vs_torch")(lambda k=_kind: versus_torch(k, model_make(mlp), steps=6))
case("ratio_one_two_groups_own_lr_vs_torch")(lambda: versus_torch("adamw", _lr_groups_make))
case("ratio_one_sgd_nesterov_dampening0_vs_torch")(
    lambda: versus_torch("sgd", model_make(mlp), hp={"lr": 0.05, "momentum": 0.9, "nesterov": True})
)
case("ratio_one_sgd_dampening_vs_torch")(
    lambda: versus_torch("sgd", model_make(mlp), hp={"lr": 0.05, "momentum": 0.9, "dampening": 0.5})
)
case("ratio_one_adam_beta1_zero_vs_torch")(
    lambda: versus_torch("adam", model_make(mlp), hp={"lr": 1e-2, "betas": (0.0, 0.999)})
)


@case("ratio_one_clip_value_vs_torch_on_clamped_grads")
def _clip_value_case():
    params = rand_params((6, 5))
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(twin, **HP["adamw"])

    def call():
        opt = pk.SalientAdamW(params, **HP["adamw"], ratio=1.0, clip_value=0.3)
        for s in range(3):
            grads = rand_grads(params, s)
            put(params, grads)
            opt.step()
            put(twin, [g.clamp(-0.3, 0.3) for g in grads])
            theirs.step()

    return judge(call, expect="work", check=lambda _: differ(params, twin))


def _continue(opt_factory, steps_before=2, steps_after=3, kind="adamw", transform=None):
    """Train, transform the optimizer (deepcopy, pickle, ...), and continue both: identical results."""
    params = rand_params((9, 4), (5,))
    opt = opt_factory(params)
    for s in range(steps_before):
        put(params, rand_grads(params, s))
        opt.step()
    reference = copy.deepcopy(opt)
    ref_params = [p for g in reference.param_groups for p in g["params"]]

    def call():
        new = transform(opt)
        new_params = [p for g in new.param_groups for p in g["params"]]
        for s in range(steps_after):
            put(new_params, rand_grads(params, 10 + s))
            new.step()
        return new_params

    for s in range(steps_after):
        put(ref_params, rand_grads(params, 10 + s))
        reference.step()
    return judge(call, expect="work", check=lambda new_params: differ(new_params, ref_params, 0, 0))


case("deepcopy_then_step")(
    lambda: _continue(lambda ps: pk.SalientAdamW(ps, ratio=0.5), transform=copy.deepcopy)
)
case("pickle_round_trip_then_step")(
    lambda: _continue(
        lambda ps: pk.SalientAdamW(ps, ratio=0.5), transform=lambda o: pickle.loads(pickle.dumps(o))
    )
)
case("pickle_round_trip_sgd_refresh0")(
    lambda: _continue(
        lambda ps: pk.SalientSGD(ps, lr=0.1, momentum=0.9, ratio=0.3, refresh_every=0),
        transform=lambda o: pickle.loads(pickle.dumps(o)),
    )
)


def _save_load(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    params = [nn.Parameter(p.detach().clone()) for g in opt.param_groups for p in g["params"]]
    new = type(opt)(params, ratio=0.5)
    new.load_state_dict(torch.load(buffer, weights_only=True))
    return new


case("torch_save_weights_only_then_step")(
    lambda: _continue(lambda ps: pk.SalientAdamW(ps, ratio=0.5, ema=0.9), transform=_save_load)
)


def _from_torch(kind, hp):
    """A state dict saved by torch's own optimizer, loaded into ours at ratio 1: continues like torch."""
    params = rand_params((9, 4), (5,))
    theirs = THEIRS[kind](params, **hp)
    for s in range(3):
        put(params, rand_grads(params, s))
        theirs.step()
    ours_params = [nn.Parameter(p.detach().clone()) for p in params]
    ours = OURS[kind](ours_params, **hp, ratio=1.0)
    saved = copy.deepcopy(theirs.state_dict())

    def call():
        ours.load_state_dict(saved)
        for s in range(3):
            put(ours_params, rand_grads(params, 10 + s))
            ours.step()

    for s in range(3):
        put(params, rand_grads(params, 10 + s))
        theirs.step()
    return judge(call, expect="work", check=lambda _: differ(ours_params, params))


case("load_torch_adamw_state_dict_continues_like_torch")(lambda: _from_torch("adamw", HP["adamw"]))
case("load_torch_adam_state_dict_continues_like_torch")(lambda: _from_torch("adam", HP["adam"]))
case("load_torch_sgd_state_dict_continues_like_torch")(lambda: _from_torch("sgd", HP["sgd"]))


@case()
def torch_adamw_loads_our_state_dict():
    params = rand_params((9, 4), (5,))
    ours = pk.SalientAdamW(params, **HP["adamw"], ratio=1.0)
    for s in range(3):
        put(params, rand_grads(params, s))
        ours.step()
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(twin, **HP["adamw"])
    saved = copy.deepcopy(ours.state_dict())

    def call():
        theirs.load_state_dict(saved)
        for s in range(3):
            put(twin, rand_grads(params, 10 + s))
            theirs.step()

    for s in range(3):
        put(params, rand_grads(params, 10 + s))
        ours.step()
    return judge(call, expect="work", check=lambda _: differ(twin, params))


def _switch(kind, hp_before, key, value):
    """Change a hyper-parameter mid-training (as schedules do): continue like torch does."""

    def run(opt_cls, params, **kw):
        opt = opt_cls(params, **hp_before, **kw)
        for s in range(5):
            if s == 2:
                opt.param_groups[0][key] = value
            put(params, rand_grads(params, s))
            opt.step()

    torch.manual_seed(0)
    ours_params = rand_params((9, 4), (5,))
    their_params = [nn.Parameter(p.detach().clone()) for p in ours_params]
    run(THEIRS[kind], their_params)
    return judge(
        lambda: run(OURS[kind], ours_params, ratio=1.0),
        names=(key, "beta", "momentum", "exp_avg"),
        check=lambda _: differ(ours_params, their_params),
    )


case("switch_beta1_on_mid_training")(
    lambda: _switch("adamw", {"lr": 1e-2, "betas": (0.0, 0.999)}, "betas", (0.9, 0.999))
)
case("switch_beta1_off_mid_training")(lambda: _switch("adamw", {"lr": 1e-2}, "betas", (0.0, 0.999)))
case("switch_sgd_momentum_on_mid_training")(lambda: _switch("sgd", {"lr": 0.1}, "momentum", 0.9))
case("switch_sgd_momentum_off_mid_training")(
    lambda: _switch("sgd", {"lr": 0.1, "momentum": 0.9}, "momentum", 0.0)
)
case("switch_weight_decay_mid_training")(lambda: _switch("adamw", {"lr": 1e-2}, "weight_decay", 0.5))


def _scheduled(scheduler_of, kind="adamw", hp=None):
    hp = hp or {"lr": 1e-2}

    def run(opt_cls, params, **kw):
        opt = opt_cls(params, **hp, **kw)
        sched = scheduler_of(opt)
        for s in range(6):
            put(params, rand_grads(params, s))
            opt.step()
            sched.step()

    torch.manual_seed(0)
    ours_params = rand_params((9, 4), (5,))
    their_params = [nn.Parameter(p.detach().clone()) for p in ours_params]
    run(THEIRS[kind], their_params)
    return judge(
        lambda: run(OURS[kind], ours_params, ratio=1.0),
        expect="work",
        check=lambda _: differ(ours_params, their_params),
    )


case("lr_scheduler_step_lr_vs_torch")(
    lambda: _scheduled(lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5))
)
case("lr_scheduler_one_cycle_cycles_betas_vs_torch")(
    lambda: _scheduled(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10))
)
case("lr_scheduler_one_cycle_sgd_momentum_vs_torch")(
    lambda: _scheduled(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=10),
        kind="sgd",
        hp={"lr": 0.1, "momentum": 0.9},
    )
)


@case()
def add_param_group_mid_training_vs_torch():
    def run(opt_cls, params, extra, **kw):
        opt = opt_cls(params, **HP["adamw"], **kw)
        for s in range(4):
            if s == 2:
                opt.add_param_group({"params": extra, "lr": 0.05})
            ps = params + (extra if s >= 2 else [])
            put(ps, rand_grads(ps, s))
            opt.step()

    torch.manual_seed(0)
    a, b = rand_params((6, 3)), rand_params((4,), seed=5)
    a2, b2 = [nn.Parameter(p.detach().clone()) for p in a], [nn.Parameter(p.detach().clone()) for p in b]
    run(torch.optim.AdamW, a2, b2)
    return judge(
        lambda: run(pk.SalientAdamW, a, b, ratio=1.0), expect="work", check=lambda _: differ(a + b, a2 + b2)
    )


@case()
def step_hooks_are_called():
    params = rand_params((5,))
    opt = pk.SalientAdamW(params, ratio=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    put(params, rand_grads(params, 0))
    return judge(
        opt.step, expect="work", check=lambda _: None if calls == ["pre", "post"] else f"hooks ran: {calls}"
    )


@case()
def closure_returns_the_loss_and_steps():
    model = mlp()
    opt = pk.SalientAdamW(model.parameters(), ratio=1.0)
    twin = mlp()
    theirs = torch.optim.AdamW(twin.parameters())

    def closure_of(m, o):
        def closure():
            o.zero_grad()
            loss = loss_of(m, 0)
            loss.backward()
            return loss

        return closure

    want = theirs.step(closure_of(twin, theirs))

    def check(loss):
        if loss is None or float(loss) != float(want):
            return f"step(closure) returned {loss}, torch {want}"
        return differ(list(model.parameters()), list(twin.parameters()))

    return judge(lambda: opt.step(closure_of(model, opt)), expect="work", check=check)


@case()
def grad_scaler_steps_like_torch_with_an_overflow():
    def run(opt, model, overflow_at):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for s in range(4):
            opt.zero_grad()
            loss = loss_of(model, s)
            if s == overflow_at:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    twin = mlp()
    run(torch.optim.AdamW(twin.parameters(), **HP["adamw"]), twin, 1)
    model = mlp()
    return judge(
        lambda: run(pk.SalientAdamW(model.parameters(), **HP["adamw"], ratio=1.0), model, 1),
        expect="work",
        check=lambda _: differ(list(model.parameters()), list(twin.parameters())),
    )


@case()
def ema_parameters_match_recomputation():
    params = rand_params((7, 3))
    opt = pk.SalientAdamW(params, ratio=0.5, ema=0.8)
    ema = [p.detach().clone() for p in params]

    def call():
        for s in range(4):
            put(params, rand_grads(params, s))
            opt.step()
            for e, p in zip(ema, params, strict=True):
                e += 0.2 * (p.detach() - e)

    return judge(call, expect="work", check=lambda _: differ(opt.ema_parameters(), ema))


# =====================================================================================================
# 4. Masks are never silently empty or replaced.
# =====================================================================================================
section("masks")


def _scaler_first_step_skipped(refresh_every, ratio=0.3):
    model = mlp()
    opt = pk.SalientAdamW(model.parameters(), **HP["adamw"], ratio=ratio, refresh_every=refresh_every)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def one(s, overflow):
        opt.zero_grad()
        loss = loss_of(model, s)
        if overflow:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def call():
        one(0, True)  # an fp16-style overflow: skipped
        before = values(params)
        one(1, False)
        return count(moved(before, params))

    k = max(1, math.floor(ratio * n))
    return judge(
        call, expect="work", check=lambda got: None if got == k else f"the good step moved {got} of {k}"
    )


case("grad_scaler_skipped_first_step_refresh0")(lambda: _scaler_first_step_skipped(0))
case("grad_scaler_skipped_first_step_refresh3")(lambda: _scaler_first_step_skipped(3))
case("grad_scaler_skipped_first_step_refresh1")(lambda: _scaler_first_step_skipped(1))


def _nan_first_step(scope="global", kind="adamw"):
    params = rand_params((8, 8), (16,))
    opt = OURS[kind](params, **HP[kind], ratio=0.25, refresh_every=0, scope=scope)
    k = 16 + 4 if scope == "per_tensor" else math.floor(0.25 * 80)

    def first():
        put(params, [torch.full(p.shape, float("nan")) for p in params])
        return with_warning(opt.step)

    def then(result):
        _, caught = result
        before = values(params)
        put(params, rand_grads(params, 3))
        opt.step()
        got = count(moved(before, params))
        if got == k or caught:
            return OK, f"later step moved {got} of {k}" + (f"; warned: {caught[0]}" if caught else "")
        return SILENT, f"all-NaN first step froze the mask: a later good step moved {got} of {k}"

    return judge(first, names=("nan", "finite", "grad"), snap=(opt,), then=then)


case("all_nan_first_step_refresh0")(lambda: _nan_first_step())
case("all_nan_first_step_refresh0_per_tensor")(lambda: _nan_first_step("per_tensor"))
case("all_nan_first_step_refresh0_sgd")(lambda: _nan_first_step(kind="sgd"))


def _user_mask_then_step(install):
    params = rand_params((8, 8), (16,))
    opt = pk.SalientAdamW(params, **HP["adamw"], ratio=0.25)  # refresh_every=1, the default
    grads = rand_grads(params, 3)
    # the user's mask: the k lowest-|g| elements, so that a fresh selection would differ everywhere
    low = oracle_masks([1.0 / (g.abs() + 1e-12) for g in grads], 0.25)
    install(opt, params, low)
    put(params, grads)
    before = values(params)

    def check(result):
        _, caught = result
        if caught:
            return None
        if not masks_differ(moved(before, params), low):
            return None
        return "the user's mask was replaced by a fresh selection without a warning"

    return judge(lambda: with_warning(opt.step), names=("mask", "refresh"), check=check)


case("set_masks_then_step_with_default_refresh")(
    lambda: _user_mask_then_step(lambda o, ps, m: o.set_masks(m))
)
case("compute_mask_then_step_with_default_refresh")(
    lambda: _user_mask_then_step(lambda o, ps, m: o.compute_mask([mm.float() for mm in m]))
)


def _late_param(two_groups):
    a, b = rand_params((64,), (32,))
    groups = [{"params": [a]}, {"params": [b]}] if two_groups else [a, b]
    opt = pk.SalientAdamW(groups, **HP["adamw"], ratio=0.25, refresh_every=0)
    a.grad = torch.randn(64, generator=gen(1))
    opt.step()
    first = opt.masks()[0].clone()

    def call():
        a.grad = torch.randn(64, generator=gen(2))
        b.grad = torch.randn(32, generator=gen(3))
        opt.step()

    return judge(
        call,
        expect="work",
        check=lambda _: (
            None
            if torch.equal(opt.masks()[0], first)
            else f"{int((opt.masks()[0] != first).sum())} elements of the first parameter's mask changed"
        ),
    )


case("late_first_gradient_does_not_reselect_others")(lambda: _late_param(False))
case("late_first_gradient_other_group_does_not_reselect")(lambda: _late_param(True))


@case()
def refresh_every_k_reselects_on_schedule():
    params = rand_params((10, 10))
    opt = pk.SalientAdamW(params, **HP["adamw"], ratio=0.2, refresh_every=3)
    grads_by_step = [rand_grads(params, s) for s in range(5)]

    def call():
        got = []
        for grads in grads_by_step:
            put(params, grads)
            opt.step()
            got.append(opt.masks()[0].clone())
        return got

    def check(got):
        for s, mask in enumerate(got):
            source = grads_by_step[(s // 3) * 3]
            problem = masks_differ([mask], oracle_masks(source, 0.2))
            if problem:
                return f"step {s + 1}: {problem}"
        return None

    return judge(call, expect="work", check=check)


@case()
def only_top_ratio_moves_and_the_rest_stays_frozen():
    model = mlp()
    params = list(model.parameters())
    opt = pk.SalientAdamW(params, **HP["adamw"], ratio=0.3)
    loss_of(model, 0).backward()
    grads = [p.grad.clone() for p in params]
    before = values(params)
    want = masked_oracle("adamw", before, grads, 0.3)
    return judge(opt.step, expect="work", check=lambda _: differ(params, want))


@case()
def skipped_scaler_step_keeps_a_set_mask():
    model = mlp()
    params = list(model.parameters())
    opt = pk.SalientAdamW(params, **HP["adamw"], ratio=0.3, refresh_every=0)
    masks = [_bits(p, i) for i, p in enumerate(params)]
    opt.set_masks(masks)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def call():
        opt.zero_grad()
        scaler.scale(loss_of(model, 0) * float("inf")).backward()
        scaler.step(opt)
        scaler.update()

    return judge(call, expect="work", check=lambda _: masks_differ(opt.masks(), masks))


@case()
def compute_mask_from_accumulator_of_a_bf16_model():
    """The accumulator sums in fp32; compute_mask must take those sums for bf16 parameters."""
    model = mlp().to(torch.bfloat16)
    acc = pk.SaliencyAccumulator(model.parameters())
    for b in range(2):
        model.zero_grad()
        model(torch.randn(16, 6, generator=gen(b)).bfloat16()).float().pow(2).mean().backward()
        acc.accumulate()
    opt = pk.SalientAdamW(model.parameters(), ratio=0.25, refresh_every=0)
    grads = acc.gradients()
    check = lambda _: _check_model_masks(opt, model, grads, 0.25)  # noqa: E731
    return judge(lambda: opt.compute_mask(grads), expect="work", check=check)


@case()
def bf16_params_ratio_half_move_k_elements():
    params = rand_params((33, 7), (9,), dtype=torch.bfloat16)
    opt = pk.SalientAdamW(params, lr=1e-1, ratio=0.5)
    put(params, rand_grads(params, 0))
    before = values(params)
    want = oracle_masks([p.grad for p in params], 0.5)
    return judge(opt.step, expect="work", check=lambda _: masks_differ(moved(before, params), want))


@case()
def masks_before_any_step_are_all_false():
    params = rand_params((4, 4), (3,))
    opt = pk.SalientAdamW(params, ratio=0.5)
    want = [torch.zeros(4, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    return judge(opt.masks, expect="work", check=lambda got: masks_differ(got, want))


@case()
def step_without_gradients_changes_nothing():
    params = rand_params((4, 4), (3,))
    opt = pk.SalientAdamW(params, ratio=0.5)
    before = snapshot((opt,))
    return judge(opt.step, expect="work", check=lambda _: diff(before, snapshot((opt,))))


@case()
def ratio_given_as_int_1_vs_torch():
    params = rand_params((5, 3))
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(twin, **HP["adamw"])
    grads = rand_grads(params, 0)
    put(twin, grads)
    theirs.step()

    def call():
        opt = pk.SalientAdamW(params, **HP["adamw"], ratio=1)
        put(params, grads)
        opt.step()

    return judge(call, expect="work", check=lambda _: differ(params, twin))


@case()
def per_tensor_one_element_tensor_still_moves():
    params = rand_params((50,), (1,))
    opt = pk.SalientAdamW(params, ratio=0.1, scope="per_tensor")
    put(params, rand_grads(params, 0))
    before = values(params)
    return judge(
        opt.step,
        expect="work",
        check=lambda _: None if bool(moved(before, params)[1].all()) else "the 1-element tensor did not move",
    )


# =====================================================================================================
# 5. The command line.
# =====================================================================================================
section("cli")

_QUICK = [
    "--steps", "1", "--eval-every", "1", "--eval-samples", "2", "--final-samples", "2",
    "--mask-batches", "1", "--teacher-ddim-steps", "1", "--batch", "4", "--forget-batch", "2",
    "--no-progress",
]  # fmt: skip


def _cli(args: list[str], names: tuple[str, ...], unwritable: bool = False) -> Verdict:
    """``python -m pecker_kernels unlearn`` with a bad option: it must stop at once, naming the option."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if unwritable:  # a folder below a plain file cannot be created
            Path(tmp, "file").write_text("not a folder")
            out = Path(tmp) / "file" / "run"
        argv = [sys.executable, "-m", "pecker_kernels", "unlearn", *_QUICK, *args, "--out", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=150, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return CRASH, "the command hung past 150 s"
        seconds = time.perf_counter() - start
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode < 0:
        return CRASH, f"killed by {signal.Signals(-proc.returncode).name}: {short(last)}"
    if proc.returncode == 0:
        return SILENT, f"exited 0 after {seconds:.0f} s: it ran with the bad option"
    if "Traceback" in proc.stderr:
        return UNCLEAR, f"traceback after {seconds:.0f} s: {short(last)}"
    if not any(n in proc.stderr.lower() for n in names):
        return UNCLEAR, f"the message names no {names[0]}: {short(last)}"
    return OK, f"clear error after {seconds:.0f} s: {short(last)}"


case("cli_steps_0", timeout=200, solo=True)(lambda: _cli(["--steps", "0"], ("steps",)))
case("cli_ratio_2", timeout=200, solo=True)(lambda: _cli(["--ratio", "2"], ("ratio",)))
case("cli_lr_nan", timeout=200, solo=True)(lambda: _cli(["--lr", "nan"], ("--lr", "lr ", "learning rate")))
case("cli_forget_11", timeout=200, solo=True)(lambda: _cli(["--forget", "11"], ("forget",)))
case("cli_unwritable_out", timeout=200, solo=True)(lambda: _cli([], ("--out", "out"), unwritable=True))


# Synthetic cases that check the runner itself (a crash, a hang, a wrong result, with ordinary cases in
# the same group): ADVERSARIAL_SELF_CHECK=1 python -m tests.adversarial --only self_check
if os.environ.get("ADVERSARIAL_SELF_CHECK") == "1":
    section("self-check")
    case("self_check_ok_before")(lambda: judge(lambda: 1, expect="work", check=lambda r: None))
    case("self_check_abort")(lambda: os.abort())
    case("self_check_segfault")(lambda: __import__("ctypes").string_at(0))
    case("self_check_ok_after")(lambda: judge(lambda: 1, expect="work", check=lambda r: None))
    case("self_check_hang", timeout=3)(lambda: time.sleep(60))
    case("self_check_silent")(lambda: judge(lambda: 1, expect="error", names=("x",)))
    case("self_check_unclear")(lambda: judge(lambda: {}["k"], expect="error", names=("k",)))
    case("self_check_dirty")(
        lambda: (lambda t: judge(lambda: (t.add_(1), 1 / 0), expect="error", names=("x",), snap=(t,)))(
            torch.zeros(3)
        )
    )


# =====================================================================================================
# Running: children run cases and print one result line each; the parent schedules and reports.
# =====================================================================================================


def run_here(names: list[str]) -> None:
    """Child mode: run the named cases in this process, one result line each (flushed)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in names:
        print(MARK + json.dumps({"start": name}), flush=True)
        start = time.perf_counter()
        torch.manual_seed(0)
        try:
            cls, detail = CASES[name].fn()
        except Exception as e:  # raised outside judge(): in the case's set-up, reported as it is
            ours = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
            where = f" (tests/adversarial.py:{ours[-1].lineno})" if ours else ""
            cls, detail = UNCLEAR, f"raised in set-up{where}: {type(e).__name__}: {short(e)}"
        record = {
            "name": name,
            "cls": cls,
            "detail": detail,
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(MARK + json.dumps(record), flush=True)


def _child(names: list[str]) -> tuple[dict[str, dict], str | None]:
    """Run ``names`` in one child; returns the results and the name of a case that crashed or hung."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.adversarial", "--case", *names],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        lines: queue.Queue = queue.Queue()

        def read():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        results: dict[str, dict] = {}
        current, deadline, hung = None, time.monotonic() + 120, False
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                hung = True
                proc.kill()
                break
            if line is None:
                break
            if not line.startswith(MARK):
                continue
            msg = json.loads(line[len(MARK) :])
            if "start" in msg:
                current = msg["start"]
                deadline = time.monotonic() + CASES[current].timeout
            else:
                results[msg["name"]] = msg
                current, deadline = None, time.monotonic() + 60
        proc.wait()
        err.seek(0)
        tail = [s for s in err.read().splitlines() if s.strip()][-3:]
    crashed = None
    if hung or proc.returncode != 0:
        crashed = current or next((n for n in names if n not in results), None)
        if crashed is not None:
            if hung:
                why = f"hung past {CASES[crashed].timeout:.0f} s"
            elif proc.returncode < 0:
                why = f"killed by {signal.Signals(-proc.returncode).name}"
            else:
                why = f"child exited {proc.returncode}"
            detail = why + (": " + short(" | ".join(tail), 200) if tail else "")
            results[crashed] = {"name": crashed, "cls": CRASH, "detail": detail, "seconds": None}
    return results, crashed


def run_all(names: list[str], workers: int, group_size: int = 14) -> dict[str, dict]:
    slow = [n for n in names if CASES[n].solo]
    rest = [n for n in names if not CASES[n].solo]
    jobs: queue.Queue = queue.Queue()
    for n in slow:  # slow ones first, so they overlap with the rest
        jobs.put([n])
    for i in range(0, len(rest), group_size):
        jobs.put(rest[i : i + group_size])
    results: dict[str, dict] = {}
    lock = threading.Lock()
    outstanding = [jobs.qsize()]

    def worker():
        while True:
            with lock:
                if outstanding[0] == 0:
                    return
            try:
                group = jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            got, crashed = _child(group)
            with lock:
                results.update(got)
                if crashed is not None and len(group) > 1:
                    # rerun the crashing case alone (to confirm) and the rest of the group one by one
                    retry = [n for n in group if n == crashed or n not in got]
                    for n in retry:
                        results.pop(n, None)
                        jobs.put([n])
                    outstanding[0] += len(retry)
                done = len(results)
                outstanding[0] -= 1
            print(f"  [{done}/{len(names)}] {', '.join(group)[:100]}", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in names:
        results.setdefault(n, {"name": n, "cls": CRASH, "detail": "no result came back", "seconds": None})
    return results


def report(names: list[str], results: dict[str, dict], seconds: float, workers: int) -> dict:
    rows = [{"category": CASES[n].category, **results[n]} for n in names]
    totals = {k: sum(r["cls"] == k for r in rows) for k in KINDS}
    width = max(len(n) for n in names)
    for r in rows:
        print(f"{r['cls']:<8} {r['name']:<{width}}  {r['detail']}")
    print()
    print(f"adversarial pass: {len(rows)} cases in {seconds:.0f} s ({workers} workers)")
    header = f"{'':<13}{'cases':>6}" + "".join(f"{k:>9}" for k in KINDS)
    print(header)
    for category in dict.fromkeys(CASES[n].category for n in names):
        part = [r for r in rows if r["category"] == category]
        print(
            f"{category:<13}{len(part):>6}" + "".join(f"{sum(r['cls'] == k for r in part):>9}" for k in KINDS)
        )
    print(f"{'total':<13}{len(rows):>6}" + "".join(f"{totals[k]:>9}" for k in KINDS))
    return {"seconds": round(seconds, 1), "counts": {"cases": len(rows), **totals}, "cases": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.adversarial", description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", metavar="NAME", help="run these cases in this process")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every case is ok")
    args = parser.parse_args(argv)
    if args.case:
        unknown = [n for n in args.case if n not in CASES]
        if unknown:
            parser.error(f"unknown case(s): {', '.join(unknown)}")
        run_here(args.case)
        return 0
    names = [n for n in CASES if args.only is None or args.only in n]
    if args.list:
        print("\n".join(f"{CASES[n].category:<13} {n}" for n in names))
        return 0
    if not names:
        parser.error(f"no case matches {args.only!r}")
    start = time.perf_counter()
    results = run_all(names, args.workers)
    summary = report(names, results, time.perf_counter() - start, args.workers)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 1 if args.strict and summary["counts"]["ok"] != len(names) else 0


if __name__ == "__main__":
    raise SystemExit(main())
