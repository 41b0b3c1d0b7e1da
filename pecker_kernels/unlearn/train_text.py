"""A small text-conditioned DDPM on the digits with captions, saved as a pixel-space
``StableDiffusionPipeline`` folder (no VAE): the concept-forgetting demonstration's teacher.

Captions: each image gets one of ``TRAIN_TEMPLATES`` filled with its digit's name ("a photo of the digit
three"); ``HELDOUT_TEMPLATES`` are never seen in training (the paraphrases an unlearned model is also
asked). The CLIP text encoder (2 layers, 32 wide) and the ``UNet2DConditionModel`` (cross-attention at
8x8 and 4x4) are trained together; one caption in ten is dropped to "" (classifier-free guidance)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .diffusion import Schedule, ddim_sample
from .text import PromptEncoder, TextEpsNet, clip_tokenizer, guided_eps
from .train import _batches, _lr_at

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {}",
    "an image of a {}",
    "{}",
)
HELDOUT_TEMPLATES = ("a picture of the number {}", "a drawing of a {}", "digit {} written by hand")


def prompt(template: str, digit: int) -> str:
    return template.format(NAMES[digit])


def vocabulary() -> list[str]:
    words = {w for t in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES) for w in t.split() if w != "{}"}
    return sorted(words | set(NAMES))


def text_unet_config(image_size: int = 8, channels: int = 1, text_dim: int = 32) -> dict[str, Any]:
    return dict(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_text_model(folder: Path, text_dim: int = 32):
    """(tokenizer, fresh CLIP text encoder) with the demonstration's vocabulary written to ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(folder, vocabulary(), max_length=12)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config)


def _encode(tokenizer: Any, text_encoder: nn.Module, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


def train_text_teacher(
    data: Dataset,
    work: Path,
    steps: int = 3000,
    batch: int = 128,
    lr: float = 2e-3,
    ema: float = 0.999,
    drop: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Any, nn.Module, TextEpsNet, dict[str, Any]]:
    """(tokenizer, EMA text encoder, EMA network, record); the tokenizer's files are written to ``work``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tokenizer, text_encoder = build_text_model(work)
    schedule = Schedule()
    unet = UNet2DConditionModel(**text_unet_config(data.image_size, int(data.images.shape[1])))
    net = TextEpsNet(unet, schedule)
    ema_net, ema_text = (
        copy.deepcopy(net).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    params = [*net.parameters(), *text_encoder.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    batches = _batches(len(data.images), batch, g)
    captions = [[prompt(t, d) for t in TRAIN_TEMPLATES] for d in range(data.num_classes)]
    start, recent = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        idx = next(batches)
        x0, c = data.images[idx], data.labels[idx]
        pick = torch.randint(0, len(TRAIN_TEMPLATES), (batch,), generator=g)
        keep = torch.rand(batch, generator=g) >= drop
        prompts = [captions[int(d)][int(k)] if kept else "" for d, k, kept in zip(c, pick, keep, strict=True)]
        t = torch.randint(0, schedule.steps, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        states = _encode(tokenizer, text_encoder, prompts)
        loss = F.mse_loss(net(schedule.q_sample(x0, t, eps), t, states), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for target, source in ((ema_net, net), (ema_text, text_encoder)):
                for pe, p in zip(target.parameters(), source.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)
        recent = [*recent[-199:], float(loss.detach())]
        if progress is not None:
            progress(step, float(loss.detach()))
    record = dict(
        steps=steps,
        batch=batch,
        lr=lr,
        ema=ema,
        caption_drop=drop,
        seed=seed,
        unet_params=sum(p.numel() for p in net.parameters()),
        text_encoder_params=sum(p.numel() for p in text_encoder.parameters()),
        final_loss_mean_200=sum(recent) / len(recent),
        train_seconds=round(time.perf_counter() - start, 1),
        train_images=len(data.images),
        train_templates=list(TRAIN_TEMPLATES),
        heldout_templates=list(HELDOUT_TEMPLATES),
    )
    return tokenizer, ema_text.eval(), ema_net.eval(), record


@torch.no_grad()
def guided_ddim(
    net: nn.Module,
    prompts: PromptEncoder,
    texts: list[str],
    shape: tuple[int, ...],
    cfg: float,
    steps: int,
    seed: int,
) -> torch.Tensor:
    """DDIM samples of ``texts`` (one each) with classifier-free guidance ``cfg``."""
    states, uncond = prompts(texts), prompts([""])
    schedule = net.schedule

    def eps(x, t, s):
        return guided_eps(net, x, t, s, uncond, cfg)

    return ddim_sample(eps, schedule, states, shape, steps, torch.Generator().manual_seed(seed))


def save_text_pipeline(folder: Path, tokenizer: Any, text_encoder: nn.Module, net: TextEpsNet) -> None:
    """A pixel-space ``StableDiffusionPipeline`` folder (model_index.json names no VAE)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=net.unet,
        scheduler=net.schedule.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
