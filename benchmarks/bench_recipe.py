"""End-to-end: the recipe's training step with the generator's masked update done different ways.

    python -m benchmarks.bench_recipe --out benchmarks/results/cpu      # part of make bench
    python -m benchmarks.bench_recipe --base 32                         # a wider UNet, random weights

One step of the unlearning loop in ``pecker_kernels/unlearn/trainer.py`` (digits, forget 3, batch 64 + 16,
the recipe's clip by value 1.0, EMA 0.95, Adam betas (0, 0.999), ratio 0.5): the pseudo-score's forward,
backward and update, then the generator's forward, backward and update. Only the generator's update
differs between the arms:

* our ``SalientAdam`` with the one-shot mask (what ``--method pecker`` runs), or reselecting every step;
* the eager SalUn pattern: the same one-shot mask as int64 tensors, ``clip_grad_value_``,
  ``p.grad *= mask``, torch's Adam, a foreach EMA; or the mask rebuilt every step from a ``kthvalue``
  threshold of ``|grad|``;
* torch's Adam with no mask at all (the floor).

torch's Adam is the fused one: the strongest eager baseline (its default on the CPU is the slower
single-tensor loop). Arms run in interleaved rounds; each phase is reported as a per-step median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from pecker_kernels import SalientAdam
from pecker_kernels.backends.base import budget
from pecker_kernels.unlearn import Distiller, UnlearnConfig, prepare
from pecker_kernels.unlearn.nets import EpsNet

from .contenders import kthvalue_masks

PHASES = ("forward_backward", "pseudo_update", "generator_update")
Update = Callable[[], None]


def salient_adam(d: Distiller, refresh_every: int) -> Update:
    """The trainer's own generator optimizer; refresh_every=0 keeps its one-shot mask."""
    if refresh_every == 0:
        d.one_shot_mask()
        return d.opt_g.step
    cfg = d.cfg
    opt = SalientAdam(
        d.gen_params,
        lr=cfg.lr_generator,
        betas=(0.0, 0.999),
        eps=1e-8,
        ratio=cfg.ratio,
        refresh_every=refresh_every,
        clip_value=cfg.clip_value,
        ema=cfg.ema,
    )
    return opt.step


def eager_update(d: Distiller, masks: Callable[[list[Tensor]], list[Tensor]] | None) -> Update:
    """clip_grad_value_, ``p.grad *= mask`` (when ``masks`` gives one), torch's fused Adam, EMA."""
    cfg, params = d.cfg, d.gen_params
    adam = torch.optim.Adam(params, lr=cfg.lr_generator, betas=(0.0, 0.999), eps=1e-8, fused=True)
    ema = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update() -> None:
        nn.utils.clip_grad_value_(params, cfg.clip_value)
        grads = [p.grad for p in params]
        if masks is not None:
            for g, mask in zip(grads, masks(grads), strict=True):
                g.mul_(mask)
        adam.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - cfg.ema)

    return update


def salun_one_shot(d: Distiller) -> Update:
    """SalUn's stored int64 masks: the very selection our one-shot arm uses (same saliency, same k)."""
    d.one_shot_mask()
    stored = [m.to(torch.int64) for m in d.opt_g.masks()]
    return eager_update(d, lambda grads: stored)


def kthvalue_every_step(d: Distiller) -> Update:
    k = budget(d.cfg.ratio, sum(p.numel() for p in d.gen_params))
    return eager_update(d, lambda grads: kthvalue_masks(grads, k))


ARMS: dict[str, Callable[[Distiller], Update]] = {
    "SalientAdam, one-shot mask": lambda d: salient_adam(d, refresh_every=0),
    "SalientAdam, reselect every step": lambda d: salient_adam(d, refresh_every=1),
    "eager SalUn: one-shot int64 mask, grad *= mask, Adam": salun_one_shot,
    "eager kthvalue mask every step, grad *= mask, Adam": kthvalue_every_step,
    "torch Adam, no mask (floor)": lambda d: eager_update(d, masks=None),
}


def train_step(d: Distiller, update_generator: Update) -> dict[str, float]:
    """One iteration of ``Distiller.run`` (keep the two in step), timed by phase; returns seconds."""
    cfg = d.cfg
    t0 = time.perf_counter()
    labels, teacher_labels, _, weights = d._labels()
    loss_p = d.pseudo_loss(labels, weights)
    d.opt_p.zero_grad(set_to_none=True)
    loss_p.backward()
    t1 = time.perf_counter()
    nn.utils.clip_grad_value_(d.pseudo.parameters(), cfg.clip_value)
    d.opt_p.step()
    t2 = time.perf_counter()
    d.pseudo.requires_grad_(False)
    loss_g = d.generator_loss(labels, teacher_labels, weights)
    for p in d.gen_params:
        p.grad = None
    loss_g.backward()
    d.pseudo.requires_grad_(True)
    t3 = time.perf_counter()
    update_generator()
    t4 = time.perf_counter()
    return {"forward_backward": (t1 - t0) + (t3 - t2), "pseudo_update": t2 - t1, "generator_update": t4 - t3}


def run(config: UnlearnConfig, base: int | None, steps: int, rounds: int = 3) -> list[dict]:
    """Every arm is built first, then all run ``steps`` timed steps in interleaved rounds."""
    ctx = prepare(config)
    if base is not None:  # timing only: a wider network (levels of base and 1.5 base channels), random
        from diffusers import UNet2DModel

        wide = {**ctx.teacher.unet.config, "block_out_channels": (base, base * 3 // 2)}
        ctx.teacher = EpsNet(UNet2DModel.from_config(wide), ctx.schedule).requires_grad_(False)
    distillers = {name: Distiller(config, ctx) for name in ARMS}
    updates = {name: make(distillers[name]) for name, make in ARMS.items()}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in ARMS}
    for round_index in range(rounds):
        for name in ARMS:
            if round_index == 0:
                for _ in range(2):  # warm-up
                    train_step(distillers[name], updates[name])
            for _ in range(max(1, steps // rounds)):
                samples[name].append(train_step(distillers[name], updates[name]))
    params = sum(p.numel() for p in distillers[next(iter(ARMS))].gen_params)
    return [summarize(name, samples[name], params) for name in ARMS]


def summarize(name: str, steps: list[dict[str, float]], params: int) -> dict:
    row: dict = {"arm": name, "generator_parameters": params, "steps": len(steps)}
    for phase in (*PHASES, "total"):
        values = [sum(s.values()) if phase == "total" else s[phase] for s in steps]
        row[f"{phase}_ms"] = 1e3 * statistics.median(values)
    row["generator_update_percent"] = 100.0 * row["generator_update_ms"] / row["total_ms"]
    return row


def table(rows: list[dict]) -> str:
    floor = next(r["generator_update_ms"] for r in rows if "no mask" in r["arm"])
    lines = [
        "| generator update | forward + backward ms | pseudo-score update ms | generator update ms "
        "| % of step | x no-mask update | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['forward_backward_ms']:.1f} | {r['pseudo_update_ms']:.2f} | "
            f"{r['generator_update_ms']:.2f} | {r['generator_update_percent']:.1f} | "
            f"{r['generator_update_ms'] / floor:.2f} | {r['total_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="timed steps per arm")
    parser.add_argument(
        "--base",
        type=int,
        help="UNet base width, a multiple of 16 (default: the packaged teacher's, 16)",
    )
    parser.add_argument("--out", type=Path, help="folder for recipe.json and recipe.md")
    args = parser.parse_args(argv)
    config = UnlearnConfig(method="pecker", ratio=0.5, refresh_every=0)
    rows = run(config, args.base, args.steps)
    title = (
        f"### Recipe training step, {config.dataset}, generator of {rows[0]['generator_parameters']:,} "
        f"parameters, {torch.get_num_threads()} threads (per-step medians)"
    )
    text = f"{title}\n\n{table(rows)}"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.base is None else f"_base{args.base}"
        payload = {"config": {"steps": args.steps, "base": args.base, "threads": torch.get_num_threads()}}
        (args.out / f"recipe{suffix}.json").write_text(json.dumps({**payload, "results": rows}, indent=2))
        (args.out / f"recipe{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
