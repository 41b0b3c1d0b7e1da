"""Training the teacher DDPM and the evaluation classifier (a few CPU minutes on digits)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .diffusion import Schedule, ddim_sample
from .metrics import classify
from .models import Classifier
from .nets import EpsNet, digits_unet_config


def _lr_at(step: int, total: int, lr: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(n: int, batch: int, generator: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def train_teacher(
    data: Dataset,
    steps: int = 4000,
    batch: int = 128,
    lr: float = 2e-3,
    ema: float = 0.999,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[EpsNet, dict[str, Any]]:
    """A class-conditional epsilon-prediction DDPM (a diffusers ``UNet2DModel``, ``digits_unet_config``,
    on the ``DDPMScheduler`` defaults); returns the EMA network and a training record."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    schedule = Schedule()
    config = digits_unet_config(data.image_size, int(data.images.shape[1]), data.num_classes)
    net = EpsNet(UNet2DModel(**config), schedule)
    ema_net = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    batches = _batches(len(data.images), batch, g)
    start, recent = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        idx = next(batches)
        x0, c = data.images[idx], data.labels[idx]
        t = torch.randint(0, schedule.steps, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(net(schedule.q_sample(x0, t, eps), t, c), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))  # warm EMA: early weights are not averaged in
            for pe, p in zip(ema_net.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        recent = [*recent[-199:], float(loss.detach())]
        if progress is not None:
            progress(step, float(loss.detach()))
    record = dict(
        steps=steps,
        batch=batch,
        lr=lr,
        ema=ema,
        seed=seed,
        params=sum(p.numel() for p in net.parameters()),
        final_loss_mean_200=sum(recent) / len(recent),
        train_seconds=round(time.perf_counter() - start, 1),
        train_images=len(data.images),
    )
    return ema_net.eval(), record


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shifts of up to one pixel and light noise: robustness to imperfect generated samples."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if dy:
        x[:, :, 0 if dy > 0 else -1, :] = -1
    if dx:
        x[:, :, :, 0 if dx > 0 else -1] = -1
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_classifier(
    train: Dataset,
    test: Dataset,
    steps: int = 2000,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """The evaluation classifier; the record holds its held-out accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Classifier(
        image_size=train.image_size, channels=train.images.shape[1], num_classes=train.num_classes
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    batches = _batches(len(train.images), batch, g)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        idx = next(batches)
        loss = F.cross_entropy(net(_augment(train.images[idx].clone(), g)), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    net.eval()
    preds, _ = classify(net, test.images)
    record = dict(
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        params=sum(p.numel() for p in net.parameters()),
        test_accuracy=float((preds == test.labels).float().mean()),
        train_images=len(train.images),
        test_images=len(test.images),
        train_seconds=round(time.perf_counter() - start, 1),
    )
    return net, record


@torch.no_grad()
def teacher_samples(
    teacher: nn.Module, data: Dataset, per_class: int, steps: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` DDIM samples of every class from the teacher: (images, labels)."""
    return sample_classes(teacher, data.num_classes, tuple(data.images.shape[1:]), per_class, steps, seed)


@torch.no_grad()
def sample_classes(
    teacher: nn.Module, num_classes: int, shape: tuple[int, ...], per_class: int, steps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` DDIM samples of each of ``num_classes`` classes: (images, labels)."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    schedule = getattr(teacher, "schedule", None) or Schedule()
    images = ddim_sample(teacher, schedule, labels, shape, steps, g)
    return images, labels


def distill_generator(
    config: Any, progress: Callable[[int, dict[str, float]], None] | None = None
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Stage 1: SiD distillation of the teacher into a one-step generator over every class, without a
    forgetting term or a mask (``config.distill``, method ``sfd``, generator started from the teacher).
    Returns the finished ``Distiller`` (its EMA weights in ``eval_generator``), a training record and
    the run's result (``Distiller.finish``)."""
    from dataclasses import asdict

    from .trainer import Distiller, prepare

    if not config.distill or config.method != "sfd" or config.init != "teacher":
        raise ValueError("stage-1 distillation needs distill=True, method='sfd' and init='teacher'")
    ctx = prepare(config)
    d = Distiller(config, ctx)
    start = time.perf_counter()
    d.setup()
    d.train(progress)
    result = d.finish()
    m = result["metrics"]
    losses = result["history"]
    tail = max(1, len(losses["step"]) // 10)

    def quality(metrics: dict[str, Any]) -> dict[str, Any]:
        if metrics.get("frechet") is None:
            return {"note": ctx.metrics_note}
        per_class = metrics["per_class_accuracy"]
        return {
            "accuracy": sum(per_class.values()) / len(per_class),
            "per_class_accuracy": per_class,
            "frechet_overall": metrics["frechet"]["overall"],
            "frechet_per_class": metrics["frechet"]["per_class"],
        }

    record = {
        "stage": "1: SiD distillation of every class (no forgetting term, every weight updated)",
        "t_init": config.t_init,
        "teacher": m["model"],
        "steps": config.steps,
        "train_seconds": round(time.perf_counter() - start, 1),
        "samples_per_class": config.final_samples,
        "before": quality(m["initial"]),
        "after": quality(m),
        "loss_pseudo_last_10pct": sum(losses["loss_pseudo"][-tail:]) / tail,
        "loss_generator_last_10pct": sum(losses["loss_generator"][-tail:]) / tail,
        "config": asdict(config),
    }
    return d, record, result
