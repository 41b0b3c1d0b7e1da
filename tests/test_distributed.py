"""One global selection across ranks: real multi-process runs on the gloo backend (CPU).

Every rank builds the same full tensors from a seed, keeps its shard, and checks its part of the result
against the eager oracle run on the whole, in the global order the package documents: rank order,
then local order.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pecker_kernels as pk
from pecker_kernels.distributed import exit_process

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def _worker(rank: int, world: int, folder: str, checks: list[tuple]) -> None:
    """Run every check on this rank; a failing check leaves its traceback in ``folder``."""
    faulthandler.enable()  # an abort prints this rank's Python stack into the test's output
    torch.set_num_threads(1)
    # A rank that fails mid-collective must not hang the others for gloo's default 30 minutes.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        for name, fn, *args in checks:
            try:
                fn(*args)
            except Exception:
                Path(folder, f"{name}.rank{rank}.txt").write_text(traceback.format_exc())
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_process(0)  # a plain return can abort in gloo's teardown (see exit_process)


class Ranks:
    """One gloo session of ``world`` fresh processes running many checks: processes are expensive
    to start (each imports torch), checks are cheap."""

    def __init__(self, world: int, checks: list[tuple]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_worker, args=(world, folder, checks), nprocs=world)
            self.failures = {f.name: f.read_text() for f in Path(folder).glob("*.txt")}

    def check(self, name: str) -> None:
        failed = {k: v for k, v in self.failures.items() if k.startswith(f"{name}.")}
        assert not failed, "\n".join(f"{k}:\n{v}" for k, v in sorted(failed.items()))


def _scores_with_ties(n: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    if kind == "ties":  # few distinct values: the threshold is almost always tied across ranks
        return torch.randint(-3, 4, (n,), generator=gen).float()
    values = torch.randn(n, generator=gen)
    if kind == "specials" and n >= 4:
        values[torch.randperm(n, generator=gen)[:4]] = torch.tensor([0.0, float("nan"), float("inf"), -0.0])
    return values


def _cut(n: int, parts: int, gen: torch.Generator, empty: int | None) -> list[int]:
    """Uneven cut points of ``n`` into ``parts`` pieces; piece ``empty`` (if given) holds nothing."""
    points = sorted(torch.randint(0, n + 1, (parts - 1,), generator=gen).tolist())
    bounds = [0, *points, n]
    if empty == parts - 1:
        bounds[empty] = n
    elif empty is not None:
        bounds[empty + 1] = bounds[empty]
    return bounds


# ---- sharded selection equals the single-process selection ---------------------------------------


def _check_sharded_selection() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in range(16):
        gen = torch.Generator().manual_seed(case)
        kind = ("plain", "ties", "specials")[case % 3]
        score = ("grad", "grad_weight")[(case // 3) % 2]
        ratio = (0.05, 0.3, 0.5, 1.0)[case % 4]
        dtype = torch.bfloat16 if case % 5 == 0 else torch.float32
        backend = ("eager", "cpu")[case % 2]
        empty_rank = 1 if case % 4 == 0 else None
        n = int(torch.randint(1, 400, (1,), generator=gen))
        full = _scores_with_ties(n, gen, kind).to(dtype)
        weight = torch.randn(n, generator=gen).to(dtype)
        bounds = _cut(n, world, gen, empty_rank)
        mine = slice(bounds[rank], bounds[rank + 1])

        # Global scope: the flat vector in rank order, each rank's piece split into up to 3 tensors.
        piece, piece_w = full[mine], weight[mine]
        split = sorted(torch.randint(0, piece.numel() + 1, (2,), generator=gen).tolist())
        grads = list(piece.tensor_split(split))
        weights = list(piece_w.tensor_split(split))
        if case % 8 == 0 and rank == empty_rank:
            grads, weights = [], []  # a rank holding no tensors at all
        w = weights if score == "grad_weight" else None
        got = pk.topk_mask(grads, ratio, score, "global", weights=w, backend=backend, process_group="world")
        expected = pk.topk_mask(
            [full], ratio, score, "global", weights=[weight] if w is not None else None, backend="eager"
        )[0]
        got_flat = torch.cat(got) if got else torch.zeros(0, dtype=torch.bool)
        assert torch.equal(got_flat, expected[mine]), f"case {case}: global masks differ on rank {rank}"
        total = torch.tensor([int(got_flat.sum())])
        dist.all_reduce(total)
        assert int(total) == int(expected.sum()), f"case {case}: {int(total)} selected, want {expected.sum()}"

        # Per-tensor scope: tensors sharded on dim 0 (as FSDP2 does); each rank holds its rows.
        shapes = [(int(torch.randint(0, 9, (1,), generator=gen)), 5) for _ in range(3)]
        fulls = [_scores_with_ties(r * c, gen, kind).view(r, c).to(dtype) for r, c in shapes]
        fweights = [torch.randn(r, c, generator=gen).to(dtype) for r, c in shapes]
        rows = [_cut(r, world, gen, empty_rank) for r, _ in shapes]
        shards = [f[b[rank] : b[rank + 1]] for f, b in zip(fulls, rows, strict=True)]
        wshards = [f[b[rank] : b[rank + 1]] for f, b in zip(fweights, rows, strict=True)]
        w = wshards if score == "grad_weight" else None
        got = pk.topk_mask(
            shards, ratio, score, "per_tensor", weights=w, backend=backend, process_group="world"
        )
        expected = pk.topk_mask(
            fulls, ratio, score, "per_tensor", weights=fweights if w is not None else None, backend="eager"
        )
        for g, e, b in zip(got, expected, rows, strict=True):
            assert torch.equal(g, e[b[rank] : b[rank + 1]]), f"case {case}: per-tensor masks differ"


def _check_sharded_bracket_selection() -> None:
    """Global selections large enough for the sampled bracket (the CPU backend's one-read path): the
    same masks as one process, the threshold found inside the bracket or on one of its ends, and never
    by falling back to the radix select on these inputs."""
    from pecker_kernels import distributed

    rank, world = dist.get_rank(), dist.get_world_size()
    answered = []
    bracket = distributed._bracket_select

    def recorded(*args):
        chosen = bracket(*args)
        answered.append(chosen is not None)
        return chosen

    distributed._bracket_select = recorded
    try:
        for case in range(10):
            gen = torch.Generator().manual_seed(100 + case)
            kind = ("plain", "plain", "ties", "specials", "plateau")[case % 5]
            ratio = (0.5, 0.01, 0.3, 0.9, 1.0)[case % 5]
            score = ("grad", "grad_weight")[case % 2]
            dtype = torch.bfloat16 if case == 6 else torch.float32
            n = int(
                torch.randint(
                    distributed.BRACKET_MIN_SCORES, 3 * distributed.BRACKET_MIN_SCORES, (1,), generator=gen
                )
            )
            if kind == "plateau":  # the top 60 % tie at 4.0: the threshold is the bracket's upper end
                full = torch.where(torch.rand(n, generator=gen) < 0.6, 4.0, torch.rand(n, generator=gen))
                score, ratio = "grad", 0.3
            else:
                full = _scores_with_ties(n, gen, kind)
            full = full.to(dtype)
            weight = torch.randn(n, generator=gen).to(dtype)
            bounds = _cut(n, world, gen, 1 if case == 4 else None)
            mine = slice(bounds[rank], bounds[rank + 1])
            piece, piece_w = full[mine], weight[mine]
            split = sorted(torch.randint(0, piece.numel() + 1, (2,), generator=gen).tolist())
            grads, weights = list(piece.tensor_split(split)), list(piece_w.tensor_split(split))
            w = weights if score == "grad_weight" else None
            got = pk.topk_mask(grads, ratio, score, "global", weights=w, backend="cpu", process_group="world")
            expected = pk.topk_mask(
                [full], ratio, score, "global", weights=[weight] if w is not None else None, backend="eager"
            )[0]
            got_flat = torch.cat(got)
            assert torch.equal(got_flat, expected[mine]), f"case {case} ({kind}, ratio {ratio}): masks differ"
    finally:
        distributed._bracket_select = bracket
    assert all(answered), f"the bracket fell back to the radix select (cases in order): {answered}"


# ---- the optimizer over ZeRO-style shards and over FSDP2 ------------------------------------------


def _check_zero_style_optimizer() -> None:
    """Each rank owns uneven flat slices of every parameter; one process owning all the slices (rank
    order) is the reference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(7)
    sizes = [37, 5, 120]
    cuts = [_cut(n, world, gen, empty=1 if n == 5 else None) for n in sizes]
    start = [torch.randn(n, generator=gen) for n in sizes]
    every = [
        [p[c[r] : c[r + 1]].clone().requires_grad_() for p, c in zip(start, cuts, strict=True)]
        for r in range(world)
    ]
    mine = every[rank]
    reference = [p for shards in every for p in shards]  # rank order, then local order
    opt = pk.SalientAdamW(mine, lr=0.1, ratio=0.3, ema=0.9, process_group="world")
    ref = pk.SalientAdamW(reference, lr=0.1, ratio=0.3, ema=0.9, backend="eager")
    for _ in range(3):
        grads = [torch.randint(-4, 5, (n,), generator=gen).float() for n in sizes]  # ties across ranks
        for r in range(world):
            for p, g, c in zip(every[r], grads, cuts, strict=True):
                p.grad = g[c[r] : c[r + 1]].clone()
        opt.step()
        ref.step()
    mine_after = [every[rank][i] for i in range(len(sizes))]
    ref_after = reference[rank * len(sizes) : (rank + 1) * len(sizes)]
    for a, b in zip(opt.masks(), ref.masks()[rank * len(sizes) : (rank + 1) * len(sizes)], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(mine_after, ref_after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2))  # 2 rows: one rank gets none of 3


def _check_fsdp2_training(scope: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model, reference = _mlp(), _mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = pk.SalientAdamW(model.parameters(), lr=1e-2, ratio=0.3, scope=scope)
    ref = pk.SalientAdamW(reference.parameters(), lr=1e-2, ratio=0.3, scope=scope, backend="eager")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 6, generator=gen)  # the same batch on every rank: FSDP's mean gradient is it
        for net, optimizer in ((model, opt), (reference, ref)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for p, q, mask, ref_mask in zip(
        model.parameters(), reference.parameters(), opt.masks(), ref.masks(), strict=True
    ):
        assert torch.equal(mask.full_tensor(), ref_mask)
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6)


def _check_fsdp2_saliency_sums() -> None:
    """SaliencyAccumulator over FSDP2's DTensors: one process's sums and mask, clipped by the norm over
    every rank's shards; a NaN in one rank's shard leaves the batch out on every rank."""
    from torch.distributed.fsdp import fully_shard

    from pecker_kernels.distributed import is_dtensor, local

    model, reference = _mlp(), _mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    acc = pk.SaliencyAccumulator(model.parameters(), clip_norm=0.5)
    ref = pk.SaliencyAccumulator(reference.parameters(), clip_norm=0.5)
    gen = torch.Generator().manual_seed(2)
    for batch in range(3):
        x = torch.randn(16, 6, generator=gen)  # the same batch on every rank: FSDP's mean gradient is it
        for net in (model, reference):
            net.zero_grad()
            net(x).square().mean().backward()
        if batch == 1:
            reference[0].weight.grad[0, 0] = float("nan")
            if dist.get_rank() == 0:  # rank 0 holds row 0 of the first weight; the others see no NaN
                local(model[0].weight.grad)[0, 0] = float("nan")
        acc.accumulate()
        ref.accumulate()
    assert acc.skipped_batches == ref.skipped_batches == 1
    sums = acc.gradients()
    assert all(is_dtensor(s) for s in sums)
    for s, r in zip(sums, ref.gradients(), strict=True):
        torch.testing.assert_close(s.full_tensor(), r, rtol=1e-6, atol=1e-7)
    opt = pk.SalientAdamW(model.parameters(), ratio=0.3)
    want = pk.SalientAdamW(reference.parameters(), ratio=0.3, backend="eager")
    opt.compute_mask(sums)
    want.compute_mask(ref.gradients())
    for mask, ref_mask in zip(opt.masks(), want.masks(), strict=True):
        assert torch.equal(mask.full_tensor(), ref_mask)


def _check_ddp_masks_agree() -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_mlp())
    opt = pk.SalientAdamW(model.parameters(), lr=1e-2, ratio=0.3)
    gen = torch.Generator().manual_seed(10 + dist.get_rank())  # different data on every rank
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 6, generator=gen)).square().mean().backward()
        opt.step()
    for tensor in [*opt.masks(), *model.parameters()]:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.detach().contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered)
    assert any(bool(m.any()) for m in opt.masks())


# ---- bad input -----------------------------------------------------------------------------------


def _check_bad_input() -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank = dist.get_rank()
    params = [torch.zeros(4, requires_grad=True)]
    with pytest.raises(ValueError, match="differ across the ranks"):
        pk.SalientAdamW(params, ratio=0.5 if rank == 0 else 0.25, process_group="world")
    with pytest.raises(ValueError, match="differ across the ranks"):
        groups = [{"params": [torch.zeros(2, requires_grad=True)]} for _ in range(rank + 1)]
        pk.SalientAdamW(groups, process_group="world")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    reversed_mesh = DeviceMesh("cpu", list(reversed(range(world))))
    a = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
    b = nn.Parameter(distribute_tensor(torch.zeros(4, 3), reversed_mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="different device meshes"):
        pk.SalientAdamW([a, b])
    with pytest.raises(ValueError, match="mixes DTensor and plain"):
        pk.SalientAdamW([a, torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="differs from the device mesh"):
        pk.SalientAdamW([b], process_group="world")
    with pytest.raises(ValueError, match="ProcessGroup or 'world'"):
        pk.topk_mask([torch.ones(3)], 0.5, process_group="everyone")


@pytest.fixture(scope="module")
def three_ranks() -> Ranks:
    return Ranks(
        3,
        [
            ("selection", _check_sharded_selection),
            ("bracket_selection", _check_sharded_bracket_selection),
            ("zero", _check_zero_style_optimizer),
            ("fsdp2_per_tensor", _check_fsdp2_training, "per_tensor"),
            ("fsdp2_global", _check_fsdp2_training, "global"),
            ("ddp", _check_ddp_masks_agree),
            ("fsdp2_saliency", _check_fsdp2_saliency_sums),
            ("bad_input", _check_bad_input),
        ],
    )


def test_sharded_selection_equals_single_process_selection(three_ranks):
    three_ranks.check("selection")


def test_large_sharded_selection_by_the_sampled_bracket_equals_one_process(three_ranks):
    three_ranks.check("bracket_selection")


def test_zero_style_sharded_optimizer_matches_one_process(three_ranks):
    three_ranks.check("zero")


def test_fsdp2_per_tensor_training_matches_one_process(three_ranks):
    three_ranks.check("fsdp2_per_tensor")


def test_fsdp2_global_training_matches_one_process(three_ranks):
    three_ranks.check("fsdp2_global")


def test_bad_distributed_input_raises_on_every_rank(three_ranks):
    three_ranks.check("bad_input")


def test_saliency_sums_of_fsdp2_shards_equal_one_process_and_skip_a_nan_on_every_rank(three_ranks):
    three_ranks.check("fsdp2_saliency")


def test_ddp_ranks_select_identical_masks_without_communication(three_ranks):
    three_ranks.check("ddp")


def test_process_group_without_init_raises():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        pk.SalientAdamW([torch.zeros(3, requires_grad=True)], process_group="world")
    with pytest.raises(RuntimeError, match="not initialised"):
        pk.topk_mask([torch.ones(3)], 0.5, process_group="world")


def test_exit_process_tears_the_group_down_flushes_and_leaves_with_the_code(tmp_path):
    script = f"""
import torch.distributed as dist
from pecker_kernels.distributed import exit_process
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
dist.all_reduce(__import__("torch").ones(3))
print("written before the exit")
exit_process(3)
print("never reached")
"""
    # stdout is a pipe here, so block-buffered: the line survives only if exit_process flushes it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["written before the exit"]
