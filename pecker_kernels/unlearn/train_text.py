"""A small text-conditioned DDPM on the digits with captions, saved as a pixel-space
``StableDiffusionPipeline`` folder (no VAE): the concept-forgetting demonstration's teacher.

Captions: each image gets one of ``TRAIN_TEMPLATES`` filled with its digit's name ("a photo of the digit
three"); ``HELDOUT_TEMPLATES`` are never seen in training (the paraphrases an unlearned model is also
asked). The CLIP text encoder (2 layers, 32 wide) and the ``UNet2DConditionModel`` are trained together;
one caption in ten is dropped to "" (classifier-free guidance).

The UNet reads the prompt only through cross-attention, so every block cross-attends (both levels down and
up, and the middle block) with heads 16 wide, and its attention layers attend to the prompt only
(``only_cross_attention``: an 8x8 digit needs no self-attention). Caption following takes enough training:
the model first learns the digits without their captions, and its noise prediction starts to depend on
the prompt after some 40-50k training images (300-400 steps of 128). An 800-step, batch-32 run stops
before that: its prediction moved by 0.7-1 % between a caption and the empty prompt and its samples were
labelled as their caption's digit at chance. At 1,000 steps of 128 this layout and the earlier one (one
cross-attending block per direction, eight heads of width 2) both follow the training captions; on the
held-out templates this one reaches 97 %, the earlier one 81 %. ``conditioning_report`` measures how much
the prompt moves the prediction, and ``caption_following`` how often guided samples are labelled as their
caption's digit by a classifier, per prompt, for the training and the held-out templates apart; both go
into the training record."""

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
from .diffusion import OneStepGenerator, Schedule, ddim_sample
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
TEMPLATE_GROUPS = {"train_templates": TRAIN_TEMPLATES, "heldout_templates": HELDOUT_TEMPLATES}


def prompt(template: str, digit: int) -> str:
    return template.format(NAMES[digit])


def vocabulary() -> list[str]:
    words = {w for t in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES) for w in t.split() if w != "{}"}
    return sorted(words | set(NAMES))


def text_unet_config(
    image_size: int = 8,
    channels: int = 1,
    text_dim: int = 32,
    width: tuple[int, int] = (16, 32),
    head_width: int = 16,
) -> dict[str, Any]:
    """The demonstration's ``UNet2DConditionModel``: two levels of ``width`` channels, every block
    cross-attending to the prompt (``only_cross_attention``), heads ``head_width`` wide. (diffusers reads
    ``attention_head_dim`` as the number of heads per block.)"""
    if any(w % head_width for w in width):
        raise ValueError(f"the widths {width} must be multiples of head_width {head_width}")
    return dict(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=text_dim,
        attention_head_dim=tuple(w // head_width for w in width),
        only_cross_attention=True,
        norm_num_groups=8,
    )


def build_text_model(folder: Path, text_dim: int = 32, layers: int = 2):
    """(tokenizer, fresh CLIP text encoder) with the demonstration's vocabulary written to ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(folder, vocabulary(), max_length=12)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config)


def _ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _encode(tokenizer: Any, text_encoder: nn.Module, prompts: list[str]) -> torch.Tensor:
    return text_encoder(_ids(tokenizer, prompts))[0]


def token_report(tokenizer: Any, words: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Whether each word of the captions is one token of its own: a CLIP tokenizer maps what its vocabulary
    lacks to the unknown token, which here is also the end and padding token (so it would be silent)."""
    words = list(vocabulary() if words is None else words)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    ids = {}
    for word in words:
        inner = [int(i) for i in tokenizer(word).input_ids[1:-1]]
        ids[word] = inner
    split = sorted(w for w, i in ids.items() if len(i) != 1)
    unknown = sorted(w for w, i in ids.items() if any(t in special for t in i) or not i)
    single = {w: i[0] for w, i in ids.items() if len(i) == 1}
    names = [single.get(n) for n in NAMES if n in ids]
    return {
        "words": len(words),
        "unknown_words": unknown,
        "words_split_into_several_tokens": split,
        "digit_names_distinct_tokens": None not in names and len(set(names)) == len(names),
    }


@torch.no_grad()
def conditioning_report(
    tokenizer: Any, text_encoder: nn.Module, net: nn.Module, num_classes: int = 10, seed: int = 0
) -> dict[str, Any]:
    """How much the prompt moves what the UNet reads and predicts, for "a photo of the digit {d}":
    the text states' mean distance between digits relative to their norm, and at a few time steps the
    noise prediction's change from the empty prompt and its spread across the digits, both relative to its
    norm (the same noisy images for every prompt)."""
    texts = [prompt(TRAIN_TEMPLATES[0], d) for d in range(num_classes)]
    states = _encode(tokenizer, text_encoder, texts).float()
    empty = _encode(tokenizer, text_encoder, [""]).float()
    flat = states.flatten(1)
    between = torch.cdist(flat, flat).sum() / (num_classes * (num_classes - 1))
    g = torch.Generator().manual_seed(seed)
    shape = (net.unet.config.in_channels, net.unet.config.sample_size, net.unet.config.sample_size)
    x = torch.randn((1, *shape), generator=g).expand(num_classes, *shape)
    norm = lambda a: a.flatten(1).norm(dim=1)  # noqa: E731
    eps = {}
    for t in (100, 500, 900):
        tt = torch.full((num_classes,), t, dtype=torch.long)
        e_c = net(x, tt, states)
        e_u = net(x, tt, empty.expand_as(states))
        scale = norm(e_u).mean()
        eps[str(t)] = {
            "cond_minus_uncond": float(norm(e_c - e_u).mean() / scale),
            "spread_across_digits": float(norm(e_c - e_c.mean(0, keepdim=True)).mean() / scale),
        }
    return {
        "text_states_between_digits": float(between / flat.norm(dim=1).mean()),
        "text_states_digit_vs_empty": float(norm(states - empty).mean() / flat.norm(dim=1).mean()),
        "eps_relative_change": eps,
    }


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
    unet_config: dict[str, Any] | None = None,
    text_dim: int = 32,
    classifier: nn.Module | str | None = "packaged",
    eval_samples: int = 20,
    eval_cfg: float = 3.0,
    eval_ddim_steps: int = 25,
    probe_every: int | None = None,
) -> tuple[Any, nn.Module, TextEpsNet, dict[str, Any]]:
    """(tokenizer, EMA text encoder, EMA network, record); the tokenizer's files are written to ``work``.

    The record holds the tokenizer check, the conditioning probe every ``probe_every`` steps (default: ten
    times a run) and at the end, and, with a classifier (``"packaged"``: the data set's packaged one when
    there is one), the caption following of the EMA networks: ``eval_samples`` guided DDIM samples per
    prompt (``eval_cfg``, ``eval_ddim_steps``) and as many one-step samples (the teacher at t 440, no
    guidance: what a concept run's generator starts from)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tokenizer, text_encoder = build_text_model(work, text_dim)
    schedule = Schedule()
    channels = int(data.images.shape[1])
    config = unet_config or text_unet_config(data.image_size, channels, text_dim)
    unet = UNet2DConditionModel(**config)
    net = TextEpsNet(unet, schedule)
    ema_net, ema_text = (
        copy.deepcopy(net).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    text_params = list(text_encoder.parameters())
    params = [*net.parameters(), *text_params]
    opt = torch.optim.Adam(params, lr=lr)
    batches = _batches(len(data.images), batch, g)
    captions = [[prompt(t, d) for t in TRAIN_TEMPLATES] for d in range(data.num_classes)]
    probe_every = probe_every or max(1, steps // 10)
    probes: list[dict[str, Any]] = []
    start, recent, probe_seconds = time.perf_counter(), [], 0.0
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
        probe = (step + 1) % probe_every == 0 or step == 0
        if probe:
            text_grad = float(torch.stack([p.grad.norm() for p in text_params if p.grad is not None]).norm())
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for target, source in ((ema_net, net), (ema_text, text_encoder)):
                for pe, p in zip(target.parameters(), source.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)
        recent = [*recent[-199:], float(loss.detach())]
        if probe:
            t0 = time.perf_counter()
            report = conditioning_report(tokenizer, ema_text, ema_net, data.num_classes, seed)
            probes.append(
                {
                    "step": step + 1,
                    "loss_mean_recent": sum(recent) / len(recent),
                    "text_encoder_grad_norm": text_grad,
                    "eps_cond_minus_uncond_t500": report["eps_relative_change"]["500"]["cond_minus_uncond"],
                    "text_states_between_digits": report["text_states_between_digits"],
                }
            )
            probe_seconds += time.perf_counter() - t0
        if progress is not None:
            progress(step, float(loss.detach()))
    train_seconds = time.perf_counter() - start - probe_seconds
    ema_net.eval()
    ema_text.eval()
    record = dict(
        steps=steps,
        batch=batch,
        lr=lr,
        ema=ema,
        caption_drop=drop,
        seed=seed,
        unet_config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        unet_params=sum(p.numel() for p in net.parameters()),
        text_encoder_params=sum(p.numel() for p in text_encoder.parameters()),
        final_loss_mean_200=sum(recent) / len(recent),
        train_seconds=round(train_seconds, 1),
        train_images=len(data.images),
        train_templates=list(TRAIN_TEMPLATES),
        heldout_templates=list(HELDOUT_TEMPLATES),
        tokens=token_report(tokenizer),
        conditioning_probes=probes,
        conditioning=conditioning_report(tokenizer, ema_text, ema_net, data.num_classes, seed),
    )
    if isinstance(classifier, str):
        classifier = _packaged_classifier(data) if classifier == "packaged" else None
    if classifier is not None and eval_samples > 0:
        t0 = time.perf_counter()
        encoder = PromptEncoder(tokenizer, copy.deepcopy(ema_text))
        shape = tuple(data.images.shape[1:])
        record["caption_following"] = {
            f"ddim{eval_ddim_steps}_cfg{eval_cfg:g}": caption_following(
                ema_net, encoder, classifier, shape, data.num_classes, eval_samples, eval_cfg,
                eval_ddim_steps, seed + 1,
            ),
            "one_step_t440": caption_following(
                ema_net, encoder, classifier, shape, data.num_classes, eval_samples, 1.0, 0, seed + 1
            ),
            "samples_per_prompt": eval_samples,
            "seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
    return tokenizer, ema_text, ema_net, record


def _packaged_classifier(data: Dataset) -> nn.Module | None:
    from . import checkpoints

    path = checkpoints.default_path(data.name, "classifier")
    if not path.is_file():
        return None
    return checkpoints.load(path, "classifier", data.name, data.image_size, data.num_classes)


@torch.no_grad()
def caption_following(
    net: nn.Module,
    prompts: PromptEncoder,
    classifier: nn.Module,
    shape: tuple[int, ...],
    num_classes: int = 10,
    per_prompt: int = 20,
    cfg: float = 3.0,
    ddim_steps: int = 25,
    seed: int = 1,
    t_init: int = 440,
) -> dict[str, Any]:
    """Per template group (training, held-out): the fraction of each prompt's samples that ``classifier``
    labels as the prompt's digit, per prompt, per digit and overall. ``ddim_steps`` > 0: guided DDIM
    samples (``cfg``); 0: one-step samples, the network at ``t_init`` on pure noise (no guidance)."""
    from .metrics import classify

    result: dict[str, Any] = {}
    for group, templates in TEMPLATE_GROUPS.items():
        texts = [prompt(t, d) for d in range(num_classes) for t in templates]
        repeated = [text for text in texts for _ in range(per_prompt)]
        if ddim_steps > 0:
            images = guided_ddim(net, prompts, repeated, shape, cfg, ddim_steps, seed)
        else:
            z = torch.randn((len(repeated), *shape), generator=torch.Generator().manual_seed(seed))
            images = OneStepGenerator(net, net.schedule, t_init)(z, prompts(repeated)).clamp(-1, 1)
        preds, _ = classify(classifier, images)
        labels = torch.tensor([d for d in range(num_classes) for _ in templates for _ in range(per_prompt)])
        hits = (preds == labels).float().view(len(texts), per_prompt).mean(1)
        per_prompt_acc = {text: float(h) for text, h in zip(texts, hits, strict=True)}
        per_digit = hits.view(num_classes, len(templates)).mean(1)
        result[group] = {
            "mean": float(hits.mean()),
            "per_digit": {NAMES[d]: float(a) for d, a in enumerate(per_digit)},
            "per_prompt": per_prompt_acc,
        }
    return result


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
