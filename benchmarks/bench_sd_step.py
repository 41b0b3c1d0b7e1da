"""One concept-forgetting iteration at Stable Diffusion 1.5 scale, split by phase, with the generator's masked
update done four ways.

    python -m benchmarks.bench_sd_step --device cuda                       # SD-1.5's UNet, 859.5M params
    python -m benchmarks.bench_sd_step --device cpu --width 0.1 --latent 16 --out benchmarks/results/cpu

The networks are ``UNet2DConditionModel``s of SD-1.5's configuration (four levels of 320/640/1280/1280
channels, cross-attention on 77 x 768 text states, 64x64x4 latents at full size), random weights (timing
needs no trained ones); ``--width`` scales every level's channels (norm groups and heads kept), ``--latent``
the latent side. The loop is ``pecker_kernels.unlearn.concept.ConceptDistiller``'s (teacher guided at 4.5,
pseudo-score at 4.5, init timestep 625, Adam betas (0, 0.999), eps 1e-6), the text states random (the
frozen text encoder runs once per prompt, not per step). Phases per step:

* pseudo-score forward + backward (G's latents without gradient, the pseudo-score's guided denoising loss);
* pseudo-score update (clip by value, Adam);
* teacher + fake forward (inside the generator loss: both guided, two batched UNet calls);
* generator forward + backward (G's forward and the whole backward of the SiD loss);
* mask handling (reselection, or SalUn's ``mask[n].to(device)`` and ``grad *= mask``);
* generator update (clip, masked Adam, EMA).

Arms: ``SalientAdam`` with a one-shot mask; ``SalientAdam`` reselecting every step; SalUn's eager pattern
(an int64 mask dict held on the host and copied to the device each step, ``p.grad *= mask``, torch's
Adam, a foreach EMA); torch's Adam with no mask. Each arm runs in its own process (its peak memory is its
own); the mask's own memory is reported as int64, bool and the packed bits SalientAdam stores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ARMS = ("salient-one-shot", "salient-reselect", "salun-eager", "adam-no-mask")
LABELS = {
    "salient-one-shot": "SalientAdam, one-shot mask",
    "salient-reselect": "SalientAdam, reselect every step",
    "salun-eager": "SalUn eager: int64 mask dict, grad *= mask, torch Adam",
    "adam-no-mask": "torch Adam, no mask",
}
PHASES = (
    "pseudo_forward_backward",
    "pseudo_update",
    "teacher_fake_forward",
    "generator_forward_backward",
    "mask",
    "generator_update",
)


def sd15_unet_config(width: float = 1.0, latent: int = 64) -> dict[str, Any]:
    """SD-1.5's UNet (``runwayml/stable-diffusion-v1-5/unet/config.json``'s values), channels scaled by
    ``width`` (rounded to multiples of 32, the norm groups)."""
    channels = tuple(max(32, round(c * width / 32) * 32) for c in (320, 640, 1280, 1280))
    return dict(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        act_fn="silu",
    )


class RandomPrompts:
    """Stands in for the frozen text encoder: fixed random 77 x 768 states per prompt."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cache = device, {}
        self.tokenizer = None

    def __call__(self, prompts):
        for p in prompts:
            if p not in self.cache:
                g = torch.Generator().manual_seed(len(self.cache))
                self.cache[p] = torch.randn((77, 768), generator=g)
        return torch.stack([self.cache[p] for p in prompts]).to(self.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace, arm: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pecker_kernels.unlearn.concept import ConceptConfig, ConceptDistiller
    from pecker_kernels.unlearn.diffusion import Schedule
    from pecker_kernels.unlearn.text import PipelineInfo, TextEpsNet, TextPipeline

    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:  # initialised where it runs: an 860M-parameter init on the host takes many seconds
        unet = UNet2DConditionModel(**sd15_unet_config(args.width, args.latent))
    schedule = Schedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    teacher = TextEpsNet(unet, schedule).requires_grad_(False)
    info = PipelineInfo(Path("random"), 4, args.latent, 768, False, 4, args.latent, 1.0)
    pipe = TextPipeline(info, teacher, schedule, RandomPrompts(device), None)
    config = ConceptConfig(
        model="random",
        forget_prompts=["brad pitt"],
        anchor_prompt="a middle aged man",
        batch=args.batch,
        forget_batch=args.forget_batch,
        method="sfd" if arm in ("salun-eager", "adam-no-mask") else "pecker",
        ratio=args.ratio,
        refresh_every=1 if arm == "salient-reselect" else 0,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
        samples=1,
    )
    config.validate()
    d = ConceptDistiller(config, pipe)
    return d, device


def eager_update(d, device: torch.device, masks: dict[str, Tensor] | None):
    """clip_grad_value_, ``p.grad *= mask[n].to(device)`` (SalUn), torch's Adam, a foreach EMA."""
    named = list(d.generator.net.named_parameters())
    params = [p for _, p in named]
    fused = device.type == "cpu"  # the CPU's fastest torch Adam; on CUDA its default (foreach)
    adam = torch.optim.Adam(
        params, lr=d.cfg.lr_generator, betas=(0.0, 0.999), eps=d.cfg.adam_eps, fused=fused
    )
    ema = [p.detach().clone() for p in params]

    @torch.no_grad()
    def mask_step() -> None:
        if masks is not None:
            for n, p in named:
                p.grad *= masks[n].to(device)

    @torch.no_grad()
    def update() -> None:
        nn.utils.clip_grad_value_(params, d.cfg.clip_value)
        adam.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - d.cfg.ema)

    return mask_step, update


def step(d, device: torch.device, mask_step, update) -> dict[str, float]:
    """``ConceptDistiller.train_step`` (keep the two in step), timed by phase; seconds."""
    times: dict[str, float] = {}
    sync(device)
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        sync(device)
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - t
        t = now

    states, teacher_states, weights = d._batch()
    loss_p = d.pseudo_loss(states, weights)
    d.opt_p.zero_grad(set_to_none=True)
    d.scaler_p.scale(loss_p).backward()
    lap("pseudo_forward_backward")
    d.scaler_p.unscale_(d.opt_p)
    nn.utils.clip_grad_value_(d.pseudo.parameters(), d.cfg.clip_value)
    d.scaler_p.step(d.opt_p)
    d.scaler_p.update()
    lap("pseudo_update")
    d.pseudo.requires_grad_(False)
    # The generator loss, its three UNet calls timed apart (as ConceptDistiller.generator_loss).
    from pecker_kernels.unlearn.losses import sid_loss, weighted_mean
    from pecker_kernels.unlearn.text import guided_eps

    with d._autocast():
        x0 = d.generator(d._randn(len(states)), states).float()
    lap("generator_forward_backward")
    ts, eps = d._times(len(states)), d._randn(len(states))
    xt = d.schedule.q_sample(x0, ts, eps)
    with d._autocast():
        e_t = guided_eps(d.teacher, xt, ts, teacher_states, d.uncond, d.cfg.cfg)
        e_p = guided_eps(d.pseudo, xt, ts, states, d.uncond, d.cfg.cfg_fake)
    lap("teacher_fake_forward")
    f_t = d.schedule.x0_from_eps(xt, ts, e_t.float())
    f_p = d.schedule.x0_from_eps(xt, ts, e_p.float())
    loss_g = weighted_mean(sid_loss(x0, f_t, f_p, d.cfg.alpha), weights)
    d.opt_g.zero_grad(set_to_none=True)
    for p in d.gen_params:
        p.grad = None
    d.scaler_g.scale(loss_g).backward()
    d.pseudo.requires_grad_(True)
    lap("generator_forward_backward")
    if d.scaler_g.is_enabled():
        d.scaler_g.unscale_(d.opt_g)
    mask_step()
    lap("mask")
    update()
    lap("generator_update")
    return times


def mask_bytes(n: int) -> dict[str, int]:
    return {"int64": 8 * n, "bool": n, "packed_bits": 4 * ((n + 31) // 32)}


def run_arm(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    d, device = build(args, arm)
    n = sum(p.numel() for p in d.gen_params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stored = None
    if arm in ("salient-one-shot", "salient-reselect"):
        if (
            arm == "salient-one-shot"
        ):  # the one-shot mask from one forget batch (its cost: set-up, not per step)
            d.cfg.mask_batches = 1
            d.one_shot_mask()

        def mask_step() -> None:
            if arm == "salient-reselect":
                d.opt_g.compute_mask()

        def update() -> None:
            d.scaler_g.step(d.opt_g)
            d.scaler_g.update()

        state_mask = None
    else:
        masks = None
        if arm == "salun-eager":
            g = torch.Generator().manual_seed(0)
            scores = [torch.rand(p.shape, generator=g) for p in d.gen_params]
            k = int(args.ratio * n)
            threshold = torch.cat([s.flatten() for s in scores]).kthvalue(n - k).values
            names = [name for name, _ in d.generator.net.named_parameters()]
            # SalUn: {name: int64 mask} kept on the host, moved to the device at every step.
            masks = {name: (s > threshold).to(torch.int64) for name, s in zip(names, scores, strict=True)}
            stored = sum(m.numel() * m.element_size() for m in masks.values())
        mask_step, update = eager_update(d, device, masks)
    samples = []
    for i in range(args.warmup + args.steps):
        times = step(d, device, mask_step, update)
        if i >= args.warmup:
            samples.append(times)
    if arm.startswith("salient"):
        state_mask = sum(
            d.opt_g.state[p]["mask"].numel() * 4 for p in d.gen_params if "mask" in d.opt_g.state[p]
        )
        stored = state_mask
    row: dict[str, Any] = {"arm": arm, "label": LABELS[arm], "generator_parameters": n, "steps": len(samples)}
    for phase in PHASES:
        row[f"{phase}_ms"] = 1e3 * statistics.median(s.get(phase, 0.0) for s in samples)
    row["total_ms"] = 1e3 * statistics.median(sum(s.values()) for s in samples)
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["peak_memory_kind"] = "process peak RSS"
    row["mask_stored_bytes"] = stored
    row["mask_bytes"] = mask_bytes(n)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| arm | "
        + " | ".join(f"{p.replace('_', ' ')} ms" for p in PHASES)
        + " | step ms | mask + update % | peak GiB | mask stored MiB |"
    )
    lines = [head, "|---|" + "---:|" * (len(PHASES) + 4)]
    for r in rows:
        mask_share = 100 * (r["mask_ms"] + r["generator_update_ms"]) / r["total_ms"]
        stored = "-" if r["mask_stored_bytes"] is None else f"{r['mask_stored_bytes'] / 2**20:.1f}"
        cells = [r["label"], *(f"{r[f'{p}_ms']:.1f}" for p in PHASES), f"{r['total_ms']:.1f}"]
        cells += [f"{mask_share:.1f}", f"{r['peak_memory_bytes'] / 2**30:.2f}", stored]
        lines.append("| " + " | ".join(cells) + " |")
    share = [
        "",
        "Share of the step, per phase (%):",
        "",
        "| arm | " + " | ".join(PHASES) + " |",
        "|---|" + "---:|" * len(PHASES),
    ]
    for r in rows:
        share.append(
            "| "
            + r["label"]
            + " | "
            + " | ".join(f"{100 * r[f'{p}_ms'] / r['total_ms']:.1f}" for p in PHASES)
            + " |"
        )
    return "\n".join(lines + share)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--width", type=float, default=1.0, help="channel scale of SD-1.5's UNet (1: full size)"
    )
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: 512x512 images)")
    parser.add_argument("--batch", type=int, default=4, help="retain-prompt samples per step")
    parser.add_argument("--forget-batch", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # one arm, in this process
    parser.add_argument("--out", type=Path, default=None, help="folder for sd_step.json and sd_step.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arm is not None:
        print(json.dumps(run_arm(args, args.arm)))
        return
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    drop = {"--arms", "--out"}
    kept, skip = [], False
    for a in passthrough:
        if skip and not a.startswith("--"):
            continue
        skip = a in drop
        if not skip:
            kept.append(a)
    for arm in args.arms:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_sd_step", *kept, "--arm", arm],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"{arm} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{arm}: {rows[-1]['total_ms']:.1f} ms/step", flush=True)
        if args.out:  # after every arm: a timeout keeps what ran
            write(args, rows, None)
    if not rows:
        raise SystemExit("no arm ran")
    r0 = rows[0]
    masks = r0["mask_bytes"]
    title = (
        f"### Concept-forgetting step, SD-1.5 UNet x{args.width:g} width "
        f"({r0['generator_parameters']:,} parameters per UNet), {args.latent}x{args.latent} latents, "
        f"batch {args.batch} + {args.forget_batch}, {args.precision}, {args.device}, "
        f"{torch.get_num_threads()} threads (per-step medians of {args.steps})"
    )
    note = (
        f"The mask alone: int64 {masks['int64'] / 2**20:.1f} MiB, bool {masks['bool'] / 2**20:.1f} MiB, "
        f"packed bits {masks['packed_bits'] / 2**20:.1f} MiB. 'mask + update %' = mask handling + "
        "generator update as a share of the step (the fused SalientAdam step applies the mask inside "
        "the update). Peak memory: "
        f"{r0['peak_memory_kind']} of the arm's own process."
    )
    text = f"{title}\n\n{table(rows)}\n\n{note}\n"
    print(text)
    if args.out:
        write(args, rows, text)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], text: str | None) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "arm"}
    config["threads"] = torch.get_num_threads()
    config["torch"] = torch.__version__
    (args.out / "sd_step.json").write_text(json.dumps({"config": config, "results": rows}, indent=2) + "\n")
    if text is not None:
        (args.out / "sd_step.md").write_text(text)


if __name__ == "__main__":
    main()
