"""Parameter layouts a benchmark steps: one flat tensor, or the list of shapes of a real model.

A model layout is only its parameter shapes, in ``model.parameters()`` order: an optimizer step never
sees anything else of the model, and shapes can be generated without building (or downloading) it.
"""

from __future__ import annotations

import math

import torch

Shapes = list[tuple[int, ...]]


def flat(numel: int) -> Shapes:
    return [(numel,)]


def split(numel: int, tensors: int) -> Shapes:
    """``numel`` elements as ``tensors`` flat tensors of (nearly) equal size: the same bytes as one flat
    tensor, so what a row gains or loses against it is the cost of the number of tensors."""
    size, extra = divmod(numel, tensors)
    return [(size + (i < extra),) for i in range(tensors)]


def recipe_unet() -> Shapes:
    """The recipe's UNet (the packaged digits teacher's diffusers ``UNet2DModel``:
    ``pecker_kernels.unlearn.nets.digits_unet_config``), built on the meta device so no memory is
    touched."""
    from diffusers import UNet2DModel

    from pecker_kernels.unlearn.nets import digits_unet_config

    with torch.device("meta"):
        net = UNet2DModel(**digits_unet_config())
    return [tuple(p.shape) for p in net.parameters()]


def ddpm_cifar10(
    ch: int = 128,
    ch_mult: tuple[int, ...] = (1, 2, 2, 2),
    num_res_blocks: int = 2,
    attn_resolutions: tuple[int, ...] = (16,),
    resolution: int = 32,
    image_channels: int = 3,
) -> Shapes:
    """The CIFAR-10 UNet of Ho et al. 2020 (DDPM), in PyTorch's shapes: 35,746,307 parameters over
    328 tensors, the 35.7M the paper reports.

    Time embedding MLP (ch -> 4ch -> 4ch); per level ``num_res_blocks`` residual blocks (GroupNorm,
    3x3 conv, time projection, GroupNorm, 3x3 conv, a 1x1 shortcut when channels change), self-attention
    after each block at ``attn_resolutions``, a strided 3x3 conv between levels; a middle of block,
    attention, block; the mirrored up path with one more block per level over the concatenated skips,
    nearest upsampling + 3x3 conv; GroupNorm and a 3x3 conv out. Dropout has no parameters.
    """
    shapes: Shapes = []
    emb = 4 * ch

    def conv(cin: int, cout: int, kernel: int) -> None:
        shapes.extend([(cout, cin, kernel, kernel), (cout,)])

    def linear(cin: int, cout: int) -> None:
        shapes.extend([(cout, cin), (cout,)])

    def norm(c: int) -> None:
        shapes.extend([(c,), (c,)])

    def res_block(cin: int, cout: int) -> None:
        norm(cin)
        conv(cin, cout, 3)
        linear(emb, cout)
        norm(cout)
        conv(cout, cout, 3)
        if cin != cout:
            conv(cin, cout, 1)

    def attention(c: int) -> None:
        norm(c)
        for _ in ("q", "k", "v", "proj_out"):
            conv(c, c, 1)

    linear(ch, emb)
    linear(emb, emb)
    conv(image_channels, ch, 3)
    c, size, skips = ch, resolution, [ch]
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            res_block(c, ch * mult)
            c = ch * mult
            if size in attn_resolutions:
                attention(c)
            skips.append(c)
        if level != len(ch_mult) - 1:
            conv(c, c, 3)
            size //= 2
            skips.append(c)
    res_block(c, c)
    attention(c)
    res_block(c, c)
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            res_block(c + skips.pop(), ch * mult)
            c = ch * mult
            if size in attn_resolutions:
                attention(c)
        if level != 0:
            conv(c, c, 3)
            size *= 2
    norm(c)
    conv(c, image_channels, 3)
    return shapes


MODELS = {"unet": recipe_unet, "ddpm-cifar10": ddpm_cifar10}


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)
