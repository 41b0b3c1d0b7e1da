"""The Salient optimizers behave like the torch.optim optimizers they replace, plus the mask."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch

import pecker_kernels as pk

CPU_BACKENDS = [name for name in ("eager", "cpu") if name in pk.available_backends("cpu")]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(model, optimizer, steps, seed=1, closure=False):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen).to(next(model.parameters()).device)

        def loss_fn(x=x):
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        if closure:
            optimizer.step(loss_fn)
        else:
            loss_fn()
            optimizer.step()


PAIRS = {
    "adamw": (
        lambda ps, **kw: pk.SalientAdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    ),
    "adam-beta1-0": (
        lambda ps, **kw: pk.SalientAdam(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=0.01, **kw),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99), weight_decay=0.01),
    ),
    "sgd-nesterov": (
        lambda ps, **kw: pk.SalientSGD(ps, 0.05, 0.9, 0.0, 1e-3, True, **kw),
        lambda ps: torch.optim.SGD(ps, 0.05, 0.9, 0.0, 1e-3, True),
    ),
    "sgd-dampening": (
        lambda ps, **kw: pk.SalientSGD(ps, lr=0.05, momentum=0.9, dampening=0.3, **kw),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3),
    ),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_ratio_one_reproduces_torch_optim_over_many_steps(name, backend):
    ours_of, torch_of = PAIRS[name]
    model, reference = _model(), _model()
    ours = ours_of(model.parameters(), ratio=1.0, backend=backend)
    theirs = torch_of(reference.parameters())
    _train(model, ours, 30)
    _train(reference, theirs, 30)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch_keys = set(theirs.state_dict()["state"][0]) - ({"exp_avg"} if name == "adam-beta1-0" else set())
    assert set(ours.state_dict()["state"][0]) >= torch_keys  # torch's keys, beta1 = 0 keeps no exp_avg


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_the_top_ratio_of_elements_move_and_the_rest_stay_frozen(backend):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = pk.SalientAdamW(model.parameters(), lr=1e-2, ratio=0.25, backend=backend)
    _train(model, optimizer, 1)
    moved = [(p != b) for p, b in zip(model.parameters(), before, strict=True)]
    masks = optimizer.masks()
    total = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in masks) == total // 4
    for m, mv in zip(masks, moved, strict=True):
        assert not bool((mv & ~m).any())  # nothing outside the mask moved
    grads = torch.cat([p.grad.reshape(-1).abs() for p in model.parameters()])
    chosen = torch.cat([m.reshape(-1) for m in masks])
    assert grads[chosen].min() >= grads[~chosen].max()


def test_per_tensor_scope_selects_the_ratio_inside_every_tensor():
    model = _model()
    optimizer = pk.SalientSGD(model.parameters(), lr=0.1, ratio=0.5, scope="per_tensor")
    _train(model, optimizer, 1)
    for m, p in zip(optimizer.masks(), model.parameters(), strict=True):
        assert int(m.sum()) == max(1, p.numel() // 2)


def test_refresh_every_k_reuses_the_stored_mask_between_refreshes():
    model = _model()
    optimizer = pk.SalientAdamW(model.parameters(), lr=1e-2, ratio=0.3, refresh_every=3)
    history = []
    for _ in range(7):
        _train(model, optimizer, 1, seed=len(history))
        history.append([m.clone() for m in optimizer.masks()])
    same = [
        all(torch.equal(a, b) for a, b in zip(history[i], history[i - 1], strict=True)) for i in range(1, 7)
    ]
    # Reselected at steps 1, 4, 7: steps 2, 3, 5, 6 keep the previous mask.
    assert same == [True, True, False, True, True, False]


def test_refresh_every_zero_keeps_a_set_mask_for_good():
    model = _model()
    params = list(model.parameters())
    optimizer = pk.SalientAdam(params, lr=1e-2, refresh_every=0)
    mine = [torch.rand(p.shape) < 0.1 for p in params]
    optimizer.set_masks(mine)
    before = [p.detach().clone() for p in params]
    _train(model, optimizer, 4)
    for m, p, b in zip(mine, params, before, strict=True):
        assert torch.equal(p[~m], b[~m])
    assert all(torch.equal(a, b) for a, b in zip(optimizer.masks(), mine, strict=True))


def test_set_masks_takes_a_salun_style_dict_with_named_parameters():
    model = _model()
    optimizer = pk.SalientAdamW(model.parameters(), refresh_every=0)
    salun = {name: (torch.rand(p.shape) < 0.5).to(torch.int64) for name, p in model.named_parameters()}
    optimizer.set_masks(salun, model.named_parameters())
    for m, (name, _) in zip(optimizer.masks(), model.named_parameters(), strict=True):
        assert torch.equal(m, salun[name].bool())
    with pytest.raises(ValueError, match="needs named_parameters"):
        optimizer.set_masks(salun)
    with pytest.raises(ValueError, match="got 1 masks for 4 parameters"):
        optimizer.set_masks([torch.ones(3)])
    with pytest.raises(ValueError, match="has shape"):
        optimizer.set_masks([torch.ones(3)] * 4)


def test_compute_mask_from_given_gradients_matches_topk_mask():
    model = _model()
    params = list(model.parameters())
    optimizer = pk.SalientAdamW(params, ratio=0.2, refresh_every=0)
    grads = [torch.randn(p.shape) for p in params]
    optimizer.compute_mask(grads)
    expected = pk.topk_mask(grads, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(optimizer.masks(), expected, strict=True))


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_round_trip_mid_training_continues_bit_identically(state_dtype):
    options = dict(lr=1e-2, ratio=0.4, refresh_every=2, ema=0.9, state_dtype=state_dtype)
    model = _model()
    optimizer = pk.SalientAdamW(model.parameters(), **options)
    _train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    _train(model, optimizer, 4, seed=7)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = _model(seed=5)
    restored.load_state_dict(saved["model"])
    again = pk.SalientAdamW(restored.parameters(), **options)
    again.load_state_dict(saved["optim"])
    for p in restored.parameters():  # moments keep their dtype, the EMA stays fp32
        state = again.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == (state_dtype or torch.float32)
        assert state["ema"].dtype == torch.float32
    _train(restored, again, 4, seed=7)
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], again.state[q][key])
    for a, b in zip(optimizer.ema_parameters(), again.ema_parameters(), strict=True):
        assert torch.equal(a, b)


def test_half_precision_parameters_keep_fp32_state_through_load_state_dict():
    model = _model().to(torch.bfloat16)
    optimizer = pk.SalientAdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    again = pk.SalientAdamW(model.parameters(), lr=1e-2)
    again.load_state_dict(state)
    for p in model.parameters():
        assert again.state[p]["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(again.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])


def test_param_groups_with_their_own_hyper_parameters_and_add_param_group():
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = pk.SalientAdamW([{"params": first, "lr": 1e-2}], lr=1e-3, ratio=1.0)
    optimizer.add_param_group({"params": second, "lr": 0.0})
    before = [p.detach().clone() for p in second]
    _train(model, optimizer, 2)
    assert all(torch.equal(p, b) for p, b in zip(second, before, strict=True))  # lr 0 group does not move
    assert optimizer.param_groups[1]["ratio"] == 1.0
    with pytest.raises(ValueError, match="ratio must be in"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "ratio": 2.0})


def test_global_scope_spans_groups_and_needs_them_to_agree():
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = pk.SalientAdamW([{"params": first, "lr": 1e-2}, {"params": second, "lr": 1e-3}], ratio=0.1)
    _train(model, optimizer, 1)
    total = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in optimizer.masks()) == total // 10
    bad = pk.SalientAdamW([{"params": first, "ratio": 0.2}, {"params": second, "ratio": 0.3}])
    with pytest.raises(ValueError, match="must agree on 'ratio'"):
        _train(model, bad, 1)


def test_lr_scheduler_and_closure_work_as_with_torch():
    model = _model()
    optimizer = pk.SalientSGD(model.parameters(), lr=0.1, ratio=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _train(model, optimizer, 1, closure=True)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_parameters_without_gradients_are_skipped():
    model = _model()
    frozen = model[2].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    optimizer = pk.SalientAdamW(model.parameters(), ratio=1.0)
    _train(model, optimizer, 2)
    assert torch.equal(frozen, before) and frozen not in optimizer.state


def test_bad_arguments_are_rejected_clearly():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="ratio must be in"):
        pk.SalientAdamW(params, ratio=0)
    with pytest.raises(ValueError, match="unknown score"):
        pk.SalientAdamW(params, score="fisher")
    with pytest.raises(ValueError, match="unknown scope"):
        pk.SalientAdamW(params, scope="layer")
    with pytest.raises(ValueError, match="unknown backend"):
        pk.SalientAdamW(params, backend="metal")
    with pytest.raises(ValueError, match="not available for tensors on cpu"):
        pk.SalientAdamW(params, backend="cuda")
    with pytest.raises(ValueError, match="refresh_every"):
        pk.SalientAdamW(params, refresh_every=-1)
    with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
        pk.SalientAdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        pk.SalientSGD(params, lr=-1.0)


def test_sparse_gradients_are_rejected_and_nothing_changes():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    before = embedding.weight.detach().clone()
    optimizer = pk.SalientAdamW(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        optimizer.step()
    assert torch.equal(embedding.weight, before)


def test_a_training_step_under_torch_compile_gives_the_eager_result():
    eager_model, compiled_model = _model(), _model()
    eager_opt = pk.SalientAdamW(eager_model.parameters(), lr=1e-2, ratio=0.5)
    compiled_opt = pk.SalientAdamW(compiled_model.parameters(), lr=1e-2, ratio=0.5)

    def train_step(model, optimizer, x):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()

    compiled_step = torch.compile(train_step)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(8, 12, generator=gen)
        train_step(eager_model, eager_opt, x)
        compiled_step(compiled_model, compiled_opt, x)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


_AMP_PAIRS = {
    "adamw": (pk.SalientAdamW, torch.optim.AdamW, {"lr": 1e-2}),
    "adam_beta1_0": (pk.SalientAdam, torch.optim.Adam, {"lr": 1e-2, "betas": (0.0, 0.999)}),
    "sgd_momentum": (pk.SalientSGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
}


def _scaled_steps(model, optimizer, steps, overflow=(), seed=4):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 12, generator=gen)).pow(2).mean()
        if step in overflow:  # inf gradients: the scaler must skip this step and back off
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return scaler


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(_AMP_PAIRS))
def test_grad_scaler_skips_overflowing_steps_on_the_device_like_torch(backend, kind):
    """The scaler hands over grad_scale / found_inf: unscaling happens in the fused pass and a step
    with inf gradients is skipped without a host sync, bias corrections and SGD's buffer start
    counting only applied steps; the trajectory is torch's."""
    ours_cls, theirs_cls, options = _AMP_PAIRS[kind]
    ours_model, reference = _model(), _model()
    ours = ours_cls(ours_model.parameters(), **options, ratio=1.0, backend=backend)
    theirs = theirs_cls(reference.parameters(), **options)
    for model, optimizer in ((ours_model, ours), (reference, theirs)):
        scale = _scaled_steps(model, optimizer, 5, overflow=(0, 3)).get_scale()
    assert scale == 1024.0 / 4  # backed off twice, never grew
    for p, q in zip(ours_model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state = ours.state[next(ours_model.parameters())]
    assert float(state["step"]) == 3 and state["selection_step"] == 5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_skipped_amp_step_leaves_parameters_state_masks_and_ema_untouched(backend):
    model = _model()
    optimizer = pk.SalientAdamW(model.parameters(), ratio=0.3, refresh_every=2, ema=0.9, backend=backend)
    _scaled_steps(model, optimizer, 2)
    before = copy.deepcopy(optimizer.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]
    _scaled_steps(model, optimizer, 1, overflow=(0,), seed=9)  # step 3: a refresh step, overflowing
    after = optimizer.state_dict()
    for p, q in zip(model.parameters(), params_before, strict=True):
        assert torch.equal(p, q)
    for index, saved in before["state"].items():
        for key, value in saved.items():
            if key == "selection_step":
                assert after["state"][index][key] == value + 1
            else:
                assert torch.equal(after["state"][index][key], value), key


def test_grad_scaler_unscales_and_steps_like_torch_adamw():
    ours_model, reference = _model(), _model()
    ours = pk.SalientAdamW(ours_model.parameters(), lr=1e-2, ratio=1.0)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference, theirs)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(8, 12, generator=gen)).pow(2).mean()).backward()
            scaler.step(optimizer)
            scaler.update()
    for p, q in zip(ours_model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---- GPU only: CUDA graphs and moving state between devices ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_captured_cuda_graph_of_the_step_replays_like_eager_steps(backend):
    """The step keeps its counter and bias corrections on the device, so a captured graph replays
    steps that match eager ones (refresh_every=1: every replay reselects)."""
    model, reference = _model().cuda(), _model().cuda()
    options = dict(lr=1e-2, ratio=0.5, ema=0.9, backend=backend)
    graphed = pk.SalientAdamW(model.parameters(), **options)
    eager_steps = pk.SalientAdamW(reference.parameters(), **options)
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [
        [torch.randn(p.shape, generator=gen, device="cuda") for p in model.parameters()] for _ in range(6)
    ]
    static = [torch.zeros_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), static, strict=True):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step: allocates state and caches the kernels' tables
        torch._foreach_copy_(static, grads[0])
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step_grads in grads[1:]:
        torch._foreach_copy_(static, step_grads)
        graph.replay()
    for step_grads in grads:
        for p, g in zip(reference.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        eager_steps.step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for m, n in zip(graphed.masks(), eager_steps.masks(), strict=True):
        assert torch.equal(m, n)
    assert float(graphed.state[next(model.parameters())]["step"]) == 6


@pytest.mark.gpu
def test_state_saved_on_cpu_loads_onto_cuda_parameters_and_continues():
    model = _model()
    optimizer = pk.SalientAdamW(model.parameters(), lr=1e-2, ratio=0.5, ema=0.9)
    _train(model, optimizer, 2)
    moved = copy.deepcopy(model).cuda()
    on_gpu = pk.SalientAdamW(moved.parameters(), lr=1e-2, ratio=0.5, ema=0.9)
    on_gpu.load_state_dict(optimizer.state_dict())
    for state in on_gpu.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.is_cuda, key
        assert state["step"].dtype == torch.float32 and state["mask"].dtype == torch.int32
    _train(model, optimizer, 1, seed=5)
    _train(moved, on_gpu, 1, seed=5)
    for p, q in zip(moved.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=1e-6)


# ---- state_dtype: bf16 moments, fp32 math and EMA ---------------------------------------------

_STATE_DTYPE_CASES = {
    "adamw": (lambda ps, **kw: pk.SalientAdamW(ps, lr=1e-2, **kw), ("exp_avg", "exp_avg_sq")),
    "adam-beta1-0": (lambda ps, **kw: pk.SalientAdam(ps, lr=1e-2, betas=(0.0, 0.99), **kw), ("exp_avg_sq",)),
    "sgd-momentum": (lambda ps, **kw: pk.SalientSGD(ps, lr=0.05, momentum=0.9, **kw), ("momentum_buffer",)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(_STATE_DTYPE_CASES))
def test_bf16_state_dtype_keeps_bf16_moments_and_an_fp32_ema_and_trains_like_fp32_state(name, backend):
    make, moments = _STATE_DTYPE_CASES[name]
    model, reference = _model(), _model()
    ours = make(model.parameters(), ratio=0.5, ema=0.99, state_dtype=torch.bfloat16, backend=backend)
    fp32 = make(reference.parameters(), ratio=0.5, ema=0.99, backend=backend)
    _train(model, ours, 5)
    _train(reference, fp32, 5)
    for p in model.parameters():
        state = ours.state[p]
        assert {k for k, v in state.items() if torch.is_tensor(v) and v.dtype == torch.bfloat16} == set(
            moments
        )
        assert state["ema"].dtype == torch.float32 and state["step"].dtype == torch.float32
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)  # bf16 moments: close, not equal
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))


def test_state_dtype_is_per_param_group_and_a_changed_one_converts_the_moments():
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = pk.SalientAdamW([{"params": first, "state_dtype": torch.bfloat16}, {"params": second}])
    _train(model, optimizer, 1)
    assert all(optimizer.state[p]["exp_avg"].dtype == torch.bfloat16 for p in first)
    assert all(optimizer.state[p]["exp_avg_sq"].dtype == torch.float32 for p in second)
    optimizer.param_groups[0]["state_dtype"] = None
    _train(model, optimizer, 1)
    assert all(optimizer.state[p]["exp_avg"].dtype == torch.float32 for p in first)


def test_state_dtype_float32_is_todays_fp32_state_bit_for_bit():
    runs = []
    for state_dtype in (None, torch.float32):
        model = _model()
        optimizer = pk.SalientAdamW(model.parameters(), lr=1e-2, ratio=0.3, ema=0.9, state_dtype=state_dtype)
        _train(model, optimizer, 4)
        runs.append((list(model.parameters()), optimizer.state_dict()["state"]))
    (params_a, state_a), (params_b, state_b) = runs
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b, strict=True))
    for index, saved in state_a.items():
        for key, value in saved.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[index][key])), key


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.float64, "bfloat16"])
def test_state_dtype_other_than_fp32_or_bf16_is_rejected(state_dtype):
    params = list(_model().parameters())
    for make in (pk.SalientAdamW, pk.SalientAdam, pk.SalientSGD):
        with pytest.raises(ValueError, match=r"state_dtype must be None, torch\.float32 or torch\.bfloat16"):
            make(params, state_dtype=state_dtype)
    optimizer = pk.SalientSGD(params[:2])
    with pytest.raises(ValueError, match="state_dtype must be"):
        optimizer.add_param_group({"params": params[2:], "state_dtype": state_dtype})


def test_importing_the_package_leaves_dynamo_unimported_until_a_step():
    # As `import torch.optim`: dynamo (about a second to import) loads only when a step first runs.
    code = (
        "import sys, torch, pecker_kernels as pk\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.ones(4)\n"
        "pk.SalientAdamW([p], ratio=1.0).step()\n"
        "assert 'torch._dynamo' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
