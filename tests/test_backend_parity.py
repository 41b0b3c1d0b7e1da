"""Every fast backend against the eager oracle: identical selections, updates within rounding."""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch

from pecker_kernels.backends import available, eager, load
from pecker_kernels.backends.base import Selection, StepConfig, TensorGroup, budget, empty_masks

from .cases import MANY_SMALL, ODD_SIZES, gradients, parameters

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
TARGETS = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(
        ("triton", "cpu"),
        id="triton-interpreter",
        marks=pytest.mark.skipif(
            not TRITON_ON_CPU, reason="Triton runs on CPU tensors only when interpreted"
        ),
    ),
    pytest.param(("triton", "cuda"), id="triton-gpu", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
]


def _large(backend, sizes):
    """Segment sizes of the "large" cases: as given for the compiled backends, where the CPU's sampled
    bracket needs them; a quarter for Triton's interpreter, which runs every program in Python and
    still sees several programs (CHUNK elements each) a segment."""
    return (
        sizes if backend is not load("triton") or not TRITON_ON_CPU else tuple(max(n // 4, 1) for n in sizes)
    )


@pytest.fixture(params=TARGETS)
def target(request):
    name, device = request.param
    if not available(name, torch.device(device)):
        pytest.fail(f"backend {name!r} should be available on {device} in this environment")
    return load(name), device


def _to(tensors, device):
    # copy=True: on the CPU the backend's tensors must not share storage with the oracle's.
    return None if tensors is None else [t.to(device, copy=True) for t in tensors]


def _segments(sizes, scope):
    return [0] * len(sizes) if scope == "global" else list(range(len(sizes)))


def _ks(sizes, segments, ratio):
    totals = [0] * (max(segments) + 1)
    for n, s in zip(sizes, segments, strict=True):
        totals[s] += n
    return [budget(ratio, n) for n in totals]


def _masks_of(backend, grads, weights, score, segments, selection):
    masks = empty_masks(grads)
    backend.write_masks(grads, weights, score, segments, selection, masks)
    return [m.cpu() for m in masks]


def _assert_same_selection(got: Selection, want: Selection):
    torch.testing.assert_close(got.threshold.cpu(), want.threshold, rtol=0, atol=0)
    assert torch.equal(got.take.cpu(), want.take)
    assert torch.equal(got.ties.cpu(), want.ties)


@pytest.mark.parametrize("score", ["grad", "grad_weight"])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", [0.01, 0.5, 1.0])
def test_selection_matches_eager_with_ties_zeros_and_nonfinite(target, score, scope, dtype, ratio):
    backend, device = target
    grads = gradients(ODD_SIZES, dtype, seed=zlib.crc32(repr((score, scope, ratio)).encode()) % 1000)
    weights = parameters(ODD_SIZES, dtype) if score == "grad_weight" else None
    segments = _segments(ODD_SIZES, scope)
    ks = _ks(ODD_SIZES, segments, ratio)

    want = eager.select(grads, weights, score, segments, ks)
    got = backend.select(_to(grads, device), _to(weights, device), score, segments, ks)
    _assert_same_selection(got, want)
    want_masks = _masks_of(eager, grads, weights, score, segments, want)
    got_masks = _masks_of(backend, _to(grads, device), _to(weights, device), score, segments, got)
    for g, w in zip(got_masks, want_masks, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("ratio", [0.003, 0.5, 0.97])
@pytest.mark.parametrize("zeros", [0.05, 0.8])
def test_selection_of_large_segments_matches_eager(target, ratio, zeros):
    """Segments large enough for the CPU's sampled bracket (and its radix fallback) to run."""
    backend, device = target
    sizes = _large(backend, (70_001, 50_000))
    grads = gradients(sizes, seed=int(ratio * 1000))
    gen = torch.Generator().manual_seed(2)
    grads = [torch.where(torch.rand(g.shape, generator=gen) < zeros, torch.zeros_like(g), g) for g in grads]
    ks = _ks(sizes, [0, 0], ratio)
    want = eager.select(grads, None, "grad", [0, 0], ks)
    got = backend.select(_to(grads, device), None, "grad", [0, 0], ks)
    _assert_same_selection(got, want)
    for g, w in zip(
        _masks_of(backend, _to(grads, device), None, "grad", [0, 0], got),
        _masks_of(eager, grads, None, "grad", [0, 0], want),
        strict=True,
    ):
        assert torch.equal(g, w)


@pytest.mark.parametrize("score", ["grad", "grad_weight"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selection_of_large_low_precision_segments_matches_eager(target, dtype, score):
    """The sampled bracket on half-precision scores, where every value is shared by many elements
    (also those at the bracket's ends), with NaN and infinities among them."""
    backend, device = target
    sizes = _large(backend, (70_001, 50_000))
    grads = gradients(sizes, dtype, seed=11)
    weights = parameters(sizes, dtype) if score == "grad_weight" else None
    for ratio in (0.01, 0.5):
        ks = _ks(sizes, [0, 0], ratio)
        want = eager.select(grads, weights, score, [0, 0], ks)
        got = backend.select(_to(grads, device), _to(weights, device), score, [0, 0], ks)
        _assert_same_selection(got, want)


@pytest.mark.parametrize("spread", [2**-20, 2**-8, 1.0])
def test_selection_in_narrow_value_bands_matches_eager(target, spread):
    """Scores packed into a narrow band with many ties: the CPU's in-memory select narrows by
    histograms over the band, level after level, and must still land on the exact k-th score."""
    backend, device = target
    gen = torch.Generator().manual_seed(5)
    sizes = (6_000, 5_000, 40_001)  # past the small in-memory cut-off per segment, and a bracketed one
    grads = [1.0 + torch.randint(0, 3000, (n,), generator=gen).float() * spread for n in sizes]
    for scope in ("global", "per_tensor"):
        segments = _segments(sizes, scope)
        for ratio in (0.01, 0.5):
            ks = _ks(sizes, segments, ratio)
            want = eager.select(grads, None, "grad", segments, ks)
            got = backend.select(_to(grads, device), None, "grad", segments, ks)
            _assert_same_selection(got, want)


def test_selection_of_many_small_tensors_matches_eager(target):
    backend, device = target
    grads = gradients(MANY_SMALL, seed=3)
    for scope in ("global", "per_tensor"):
        segments = _segments(MANY_SMALL, scope)
        ks = _ks(MANY_SMALL, segments, 0.3)
        want = eager.select(grads, None, "grad", segments, ks)
        got = backend.select(_to(grads, device), None, "grad", segments, ks)
        _assert_same_selection(got, want)
        for g, w in zip(
            _masks_of(backend, _to(grads, device), None, "grad", segments, got),
            _masks_of(eager, grads, None, "grad", segments, want),
            strict=True,
        ):
            assert torch.equal(g, w)


def test_budget_beyond_the_finite_scores_selects_every_finite_one(target):
    backend, device = target
    g = torch.tensor([float("nan"), 2.0, float("inf"), 0.0, 2.0, float("-inf"), 1.0])
    want = eager.select([g], None, "grad", [0], [6])
    got = backend.select([g.to(device)], None, "grad", [0], [6])
    _assert_same_selection(got, want)
    (mask,) = _masks_of(backend, [g.to(device)], None, "grad", [0], got)
    assert torch.equal(eager.unpack(mask, 7), torch.tensor([False, True, False, True, True, False, True]))


def test_all_nonfinite_or_empty_segments_select_nothing(target):
    backend, device = target
    grads = [torch.full((40,), float("nan")), torch.empty(0), torch.tensor([3.0, 1.0])]
    got = backend.select(_to(grads, device), None, "grad", [0, 1, 2], [1, 1, 1])
    assert got.threshold.cpu().tolist() == [float("inf"), float("inf"), 3.0]
    assert got.take.cpu().tolist() == [0, 0, 1]
    masks = _masks_of(backend, _to(grads, device), None, "grad", [0, 1, 2], got)
    assert [int(eager.unpack(m, g.numel()).sum()) for m, g in zip(masks, grads, strict=True)] == [0, 0, 1]


def test_ties_at_the_threshold_go_to_the_lowest_flat_index(target):
    backend, device = target
    grads = [torch.full((5000,), 0.25), torch.full((3001,), 0.25)]
    got = backend.select(_to(grads, device), None, "grad", [0, 0], [6000])
    masks = _masks_of(backend, _to(grads, device), None, "grad", [0, 0], got)
    first, second = (eager.unpack(m, g.numel()) for m, g in zip(masks, grads, strict=True))
    assert bool(first.all()) and int(second.sum()) == 1000 and bool(second[:1000].all())


def _quantized(sizes, levels, seed):
    """Gradients on a grid of ``levels`` values a sign: every score is shared by many elements, so a
    budget's threshold is tied wherever it falls."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(-levels, levels + 1, (n,), generator=gen).float() / levels for n in sizes]


@pytest.mark.parametrize("levels", [40, 3000])
@pytest.mark.parametrize("ratio", [0.02, 0.5, 0.9])
def test_tied_thresholds_of_large_segments_are_ranked_like_eager(target, levels, ratio):
    """A tied threshold in segments large enough for the CPU's sampled bracket: the ties taken are the
    first ``take`` in flat order, whether ranked by a pass over the scores or from the select's cut."""
    backend, device = target
    sizes = _large(backend, (70_001, 33, 120_000))
    grads = _quantized(sizes, levels, seed=levels + int(ratio * 100))
    segments = [0, 0, 0]
    ks = _ks(sizes, segments, ratio)
    want = eager.select(grads, None, "grad", segments, ks)
    assert 0 < int(want.take) < int(want.ties), "the case must tie the threshold"
    got = backend.select(_to(grads, device), None, "grad", segments, ks)
    _assert_same_selection(got, want)
    if got.cut is not None and int(got.cut) >= 0:  # the hint, where given, points past the take-th tie
        flat = torch.cat(grads).abs()
        at = int(got.cut)
        assert flat[at - 1] == want.threshold and int((flat[:at] == want.threshold).sum()) == int(want.take)
    want_masks = _masks_of(eager, grads, None, "grad", segments, want)
    for g, w in zip(
        _masks_of(backend, _to(grads, device), None, "grad", segments, got), want_masks, strict=True
    ):
        assert torch.equal(g, w)
    config = UPDATE_CONFIGS["adamw"]
    group = _group(config, sizes, torch.float32, seed=4)
    group.grads = _to(grads, "cpu")
    reference = _group_to(group, "cpu")
    eager.update(reference, config, "grad", segments, selection=want)
    moved = _group_to(group, device)
    got_masks = empty_masks(moved.params)
    backend.update(moved, config, "grad", segments, selection=got, masks_out=got_masks)
    _assert_groups_close(moved, reference, torch.float32)
    for g, w in zip(got_masks, want_masks, strict=True):
        assert torch.equal(g.cpu(), w)


def test_the_sampled_bracket_hints_where_a_tied_threshold_is_cut():
    """The hint that spares the update a pass over every score is given where the bracket holds the
    threshold: a tied fp32 threshold among many distinct scores. Enough scores that both threads
    count the kept ones, and the masks it plans match the oracle's."""
    from pecker_kernels.backends import cpu

    sizes = (70_001, 700_000)
    grads = _quantized(sizes, 20_000, seed=1)
    ks = _ks(sizes, [0, 0], 0.5)
    got = cpu.select(grads, None, "grad", [0, 0], ks)
    want = eager.select(grads, None, "grad", [0, 0], ks)
    _assert_same_selection(got, want)
    assert 0 < int(got.take) < int(got.ties)
    assert got.cut is not None and int(got.cut) > 0
    for g, w in zip(
        _masks_of(cpu, grads, None, "grad", [0, 0], got),
        _masks_of(eager, grads, None, "grad", [0, 0], want),
        strict=True,
    ):
        assert torch.equal(g, w)


@pytest.mark.parametrize("cut", [-1, 0, 10**12])
def test_a_cut_outside_the_segment_stays_inside_it(cut):
    """A Selection whose cut hint disagrees with the tensors (built by hand, or for other tensors) is
    clamped to them: -1 ranks the ties by a pass, 0 takes none, past the end takes every one."""
    from pecker_kernels.backends import cpu

    sizes = (70_001, 50_000)
    grads = _quantized(sizes, 40, seed=2)
    ks = _ks(sizes, [0, 0], 0.5)
    chosen = cpu.select(grads, None, "grad", [0, 0], ks)
    hinted = dataclasses.replace(chosen, cut=torch.tensor([cut], dtype=torch.int64))
    masks = _masks_of(cpu, grads, None, "grad", [0, 0], hinted)
    selected = sum(int(eager.unpack(m, g.numel()).sum()) for m, g in zip(masks, grads, strict=True))
    above = int(sum((g.abs() > chosen.threshold).sum() for g in grads))
    expected = {-1: above + int(chosen.take), 0: above, 10**12: above + int(chosen.ties)}[cut]
    assert selected == expected


def test_a_cut_of_the_wrong_shape_is_refused():
    from pecker_kernels.backends import cpu

    grads = _quantized((70_001,), 40, seed=3)
    chosen = cpu.select(grads, None, "grad", [0], [100])
    hinted = dataclasses.replace(chosen, cut=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"Selection\.cut"):
        cpu.write_masks(grads, None, "grad", [0], hinted, empty_masks(grads))


UPDATE_CONFIGS = {
    "adamw": StepConfig.adam("adamw", lr=1e-2, step=3, weight_decay=0.1),
    "adamw-beta1-0-clip-ema": StepConfig.adam(
        "adamw", lr=1e-2, step=7, betas=(0.0, 0.999), clip_value=0.5, ema_decay=0.9
    ),
    "adam-l2": StepConfig.adam("adam", lr=3e-3, step=1, betas=(0.8, 0.99), weight_decay=0.05),
    "sgd-plain": StepConfig.sgd(lr=0.1, weight_decay=0.01),
    "sgd-momentum-init": StepConfig.sgd(lr=0.1, momentum=0.9, momentum_init=True),
    "sgd-nesterov-dampening": StepConfig.sgd(lr=0.05, momentum=0.9, dampening=0.1, nesterov=True),
    "adamw-maximize-clip": StepConfig.adam("adamw", lr=1e-2, step=2, clip_value=0.3, maximize=True),
    "sgd-momentum-maximize": StepConfig.sgd(lr=0.1, momentum=0.9, weight_decay=0.01, maximize=True),
}


def _group(config: StepConfig, sizes, dtype, seed, state_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = parameters(sizes, dtype, seed=seed)
    grads = gradients(sizes, dtype, seed=seed + 1)
    adam = config.kind != "sgd"
    has_m = (adam and config.beta1 > 0) or (not adam and config.momentum > 0)
    state = lambda: [torch.rand(n, generator=gen).to(state_dtype) for n in sizes]  # noqa: E731
    return TensorGroup(
        params=params,
        grads=grads,
        exp_avg=state() if has_m else None,
        exp_avg_sq=state() if adam else None,
        ema=[p.float() + 0.1 for p in params] if config.ema_decay is not None else None,
    )


def _group_to(group: TensorGroup, device) -> TensorGroup:
    return TensorGroup(**{f.name: _to(getattr(group, f.name), device) for f in dataclasses.fields(group)})


def _assert_groups_close(got: TensorGroup, want: TensorGroup, dtype):
    for field in dataclasses.fields(want):
        for g, w in zip(getattr(got, field.name) or [], getattr(want, field.name) or [], strict=True):
            if g.dtype == torch.float32:
                torch.testing.assert_close(g.cpu(), w, rtol=2e-6, atol=1e-6, equal_nan=True)
            else:  # one unit in the last place of a half-precision store
                torch.testing.assert_close(g.cpu(), w, rtol=1e-2, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("config_name", list(UPDATE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score", ["grad", "grad_weight"])
def test_update_matches_eager_and_freezes_unselected(target, config_name, dtype, score):
    backend, device = target
    config = UPDATE_CONFIGS[config_name]
    sizes = ODD_SIZES
    want = _group(config, sizes, dtype, seed=11)
    got = _group_to(want, device)
    before = _group_to(want, "cpu")
    segments = [0] * len(sizes)
    ks = _ks(sizes, segments, 0.4)
    weights = want.params if score == "grad_weight" else None
    selection = eager.select(want.grads, weights, score, segments, ks)
    want_masks, got_masks = empty_masks(want.params), empty_masks(got.params)

    eager.update(want, config, score, segments, selection=selection, masks_out=want_masks)
    got_selection = backend.select(
        got.grads, got.params if score == "grad_weight" else None, score, segments, ks
    )
    backend.update(got, config, score, segments, selection=got_selection, masks_out=got_masks)

    _assert_groups_close(got, want, dtype)
    for g, w in zip(got_masks, want_masks, strict=True):
        assert torch.equal(g.cpu(), w)
    # Unselected parameters are bit-identical to before the step.
    for p, p0, m, n in zip(got.params, before.params, want_masks, sizes, strict=True):
        frozen = ~eager.unpack(m, n)
        assert torch.equal(p.cpu().reshape(-1)[frozen], p0.reshape(-1)[frozen])


@pytest.mark.parametrize("config_name", ["adamw", "sgd-momentum-init"])
def test_update_from_a_stored_mask_matches_eager(target, config_name):
    backend, device = target
    config = UPDATE_CONFIGS[config_name]
    sizes = (*ODD_SIZES, *MANY_SMALL[:40])
    want = _group(config, sizes, torch.float32, seed=5)
    got = _group_to(want, device)
    segments = list(range(len(sizes)))
    selection = eager.select(want.grads, None, "grad", segments, _ks(sizes, segments, 0.2))
    masks = empty_masks(want.params)
    eager.write_masks(want.grads, None, "grad", segments, selection, masks)

    eager.update(want, config, "grad", segments, masks_in=masks)
    backend.update(got, config, "grad", segments, masks_in=_to(masks, device))
    _assert_groups_close(got, want, torch.float32)


def test_update_of_two_dimensional_tensors_matches_eager(target):
    backend, device = target
    config = UPDATE_CONFIGS["adamw"]
    want = _group(config, (300, 4096), torch.float32, seed=9)
    for field in dataclasses.fields(want):
        tensors = getattr(want, field.name)
        if tensors is not None:
            setattr(want, field.name, [t.reshape(-1, 4) for t in tensors])
    got = _group_to(want, device)
    selection = eager.select(want.grads, None, "grad", [0, 0], [1000])
    eager.update(want, config, "grad", [0, 0], selection=selection)
    backend.update(
        got, config, "grad", [0, 0], selection=backend.select(got.grads, None, "grad", [0, 0], [1000])
    )
    _assert_groups_close(got, want, torch.float32)


# ---- device step scalars (StepConfig.scalars): GradScaler unscaling, found_inf, CUDA graphs ---------

MASK_PATTERN = 0x5A5A5A5A  # what masks_out holds before a step that must not write it
STATE_FIELDS = ("params", "exp_avg", "exp_avg_sq", "ema")  # what a step writes (grads are inputs)


def _step(impl, group, config, score, segments, *, ks=None, masks_in=None, masks_out=None):
    """One update with ``impl``: selecting now by ``impl.select`` (``ks``) or from ``masks_in``."""
    if masks_in is not None:
        impl.update(group, config, score, segments, masks_in=masks_in, masks_out=masks_out)
        return
    weights = group.params if score == "grad_weight" else None
    selection = impl.select(group.grads, weights, score, segments, ks)
    impl.update(group, config, score, segments, selection=selection, masks_out=masks_out)


def _stepped(impl, device, start: TensorGroup, config, score="grad", *, masks_in=None, scalars=None):
    """A copy of ``start`` on ``device`` after one step, and its masks_out (pre-filled with the pattern).
    ``scalars``: keyword arguments of ``config.with_device_scalars``, to step with device scalars."""
    group = _group_to(start, device)
    segments = [0] * len(group.params)
    masks_out = [torch.full_like(m, MASK_PATTERN) for m in empty_masks(group.params)]
    if scalars is not None:
        config = config.with_device_scalars(device, **scalars)
    ks = None if masks_in is not None else _ks([p.numel() for p in group.params], segments, 0.4)
    _step(impl, group, config, score, segments, ks=ks, masks_in=_to(masks_in, device), masks_out=masks_out)
    return group, masks_out


def _assert_groups_equal(got: TensorGroup, want: TensorGroup, fields=STATE_FIELDS):
    for name in fields:
        for g, w in zip(getattr(got, name) or [], getattr(want, name) or [], strict=True):
            torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0, equal_nan=True, msg=name)


def _assert_masks_equal(got, want):
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w.cpu())


def _impls(target):
    """The eager oracle (on the CPU) and the backend under test (on its device)."""
    backend, device = target
    return ((eager, "cpu"), (backend, device))


@pytest.mark.parametrize("config_name", list(UPDATE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_scalars_holding_the_host_values_give_the_same_step_bit_for_bit(target, config_name, dtype):
    config = UPDATE_CONFIGS[config_name]
    start = _group(config, ODD_SIZES, dtype, seed=21)
    results = []
    for impl, device in _impls(target):
        plain, plain_masks = _stepped(impl, device, start, config)
        scaled, scaled_masks = _stepped(impl, device, start, config, scalars={})
        _assert_groups_equal(scaled, plain)
        _assert_masks_equal(scaled_masks, plain_masks)
        results.append((scaled, scaled_masks))
    (want, want_masks), (got, got_masks) = results
    _assert_groups_close(got, want, dtype)
    _assert_masks_equal(got_masks, want_masks)


@pytest.mark.parametrize("config_name", list(UPDATE_CONFIGS))
@pytest.mark.parametrize("score", ["grad", "grad_weight"])
def test_scaled_gradients_with_inv_grad_scale_step_like_unscaled_ones(target, config_name, score):
    """Unscaling comes first (clip, weight decay and moments see the true gradient), while the
    selection scores the stored, scaled gradient: with a power-of-two scale it picks the same elements."""
    config = UPDATE_CONFIGS[config_name]
    start = _group(config, ODD_SIZES, torch.float32, seed=23)
    scaled_start = dataclasses.replace(start, grads=[g * 1024 for g in start.grads])
    for impl, device in _impls(target):
        want, want_masks = _stepped(impl, device, start, config, score)
        unscale = {"inv_grad_scale": 1 / 1024}
        got, got_masks = _stepped(impl, device, scaled_start, config, score, scalars=unscale)
        _assert_groups_equal(got, want)
        _assert_masks_equal(got_masks, want_masks)


@pytest.mark.parametrize("config_name", list(UPDATE_CONFIGS))
@pytest.mark.parametrize("path", ["selection", "masks_in"])
def test_found_inf_skips_the_step_and_writes_nothing(target, config_name, path):
    config = UPDATE_CONFIGS[config_name]
    start = _group(config, ODD_SIZES, torch.bfloat16, seed=25)
    masks_in = None
    if path == "masks_in":
        segments = [0] * len(ODD_SIZES)
        selection = eager.select(start.grads, None, "grad", segments, _ks(ODD_SIZES, segments, 0.4))
        masks_in = empty_masks(start.params)
        eager.write_masks(start.grads, None, "grad", segments, selection, masks_in)
    pattern = [torch.full_like(m, MASK_PATTERN) for m in empty_masks(start.params)]
    for impl, device in _impls(target):
        got, got_masks = _stepped(impl, device, start, config, masks_in=masks_in, scalars={"found_inf": True})
        _assert_groups_equal(got, start, fields=[f.name for f in dataclasses.fields(start)])
        _assert_masks_equal(got_masks, pattern)


@pytest.mark.parametrize("config_name", ["sgd-momentum-init", "sgd-nesterov-dampening"])
@pytest.mark.parametrize("momentum_init", [True, False])
def test_sgd_momentum_init_comes_from_the_device_scalars(target, config_name, momentum_init):
    host = dataclasses.replace(UPDATE_CONFIGS[config_name], momentum_init=momentum_init)
    start = _group(host, ODD_SIZES, torch.float32, seed=27)
    for impl, device in _impls(target):
        want, want_masks = _stepped(impl, device, start, host)
        # The scalars carry momentum_init; the host field says the opposite and must be ignored.
        device_config = dataclasses.replace(host.with_device_scalars(device), momentum_init=not momentum_init)
        got, got_masks = _stepped(impl, device, start, device_config)
        _assert_groups_equal(got, want)
        _assert_masks_equal(got_masks, want_masks)


# ---- bf16 moments (the optimizers' state_dtype=torch.bfloat16) ------------------------------------


def _bf16_spacing(x):
    """The distance from |x| (as bf16) to the next bf16 value up: one unit in the last place."""
    a = x.abs().to(torch.bfloat16)
    return (a.view(torch.int16) + 1).view(torch.bfloat16).float() - a.float()


def _assert_bf16_within(got, want, ulps: int, msg: str):
    got, want = got.cpu().float(), want.float()
    ok = (got == want) | (got.isnan() & want.isnan()) | ((got - want).abs() <= ulps * _bf16_spacing(want))
    assert bool(ok.all()), f"{msg}: {int((~ok).sum())} of {ok.numel()} elements over {ulps} bf16 ulp apart"


@pytest.mark.parametrize(
    "config_name",
    ["adamw", "adamw-beta1-0-clip-ema", "adam-l2", "sgd-momentum-init", "sgd-nesterov-dampening"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["selection", "masks_in"])
def test_bf16_moments_match_eager_and_unselected_ones_keep_their_bits(target, config_name, dtype, path):
    config = UPDATE_CONFIGS[config_name]
    start = _group(config, ODD_SIZES, dtype, seed=31, state_dtype=torch.bfloat16)
    masks_in = None
    if path == "masks_in":
        segments = [0] * len(ODD_SIZES)
        selection = eager.select(start.grads, None, "grad", segments, _ks(ODD_SIZES, segments, 0.4))
        masks_in = _masks_of(eager, start.grads, None, "grad", segments, selection)
    (want, want_masks), (got, got_masks) = (
        _stepped(impl, device, start, config, masks_in=masks_in) for impl, device in _impls(target)
    )
    _assert_masks_equal(got_masks, want_masks)
    # Parameters and EMA: fp32 math from the same loaded moments, so as close as with fp32 moments.
    without_moments = [dataclasses.replace(x, exp_avg=None, exp_avg_sq=None) for x in (got, want)]
    _assert_groups_close(*without_moments, dtype)
    # CPU kernels round each moment like the oracle, bit for bit (no FMA contraction; Triton's
    # interpreter stores through an explicit round-to-nearest-even). GPU compilers contract
    # a * b + c into FMAs, which can move an fp32 moment by an ulp across a bf16 rounding boundary.
    ulps = 0 if target[1] == "cpu" else 1
    for name in ("exp_avg", "exp_avg_sq"):
        for i, (g, w, before) in enumerate(
            zip(getattr(got, name) or [], getattr(want, name) or [], getattr(start, name) or [], strict=True)
        ):
            assert g.dtype == w.dtype == torch.bfloat16
            _assert_bf16_within(g, w, ulps, f"{name}[{i}]")
            frozen = ~eager.unpack(want_masks[i], g.numel())
            assert torch.equal(g.cpu()[frozen].view(torch.int16), before[frozen].view(torch.int16))
            assert torch.equal(w[frozen].view(torch.int16), before[frozen].view(torch.int16))
