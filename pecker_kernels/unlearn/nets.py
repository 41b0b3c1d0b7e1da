"""The recipe's diffusion networks are diffusers UNets: ``UNet2DModel`` with ``num_class_embeds`` (time
and class embeddings summed) or ``UNet2DConditionModel`` with ``num_class_embeds`` (and, as in SFD,
``class_embeddings_concat=True``). ``EpsNet`` puts either behind one call, eps(x_t, t, c); ``load_model``
reads a local diffusers folder: a model folder (``config.json`` + weights) or a pipeline folder
(``model_index.json``, ``unet/``, ``scheduler/``). Nothing is ever fetched from a hub."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from .diffusion import Schedule

UNET_CLASSES: dict[str, type] = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


def digits_unet_config(image_size: int = 8, channels: int = 1, num_classes: int = 10) -> dict[str, Any]:
    """The small ``UNet2DModel`` of the packaged teacher (84k parameters at 8x8): two levels (16 and 24
    channels), one ResNet block per level on the way down, two on the way up, no attention and no middle
    block; time and class embeddings (64-d) summed."""
    return dict(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 24),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        mid_block_type=None,
        add_attention=False,
        num_class_embeds=num_classes,
    )


class EpsNet(nn.Module):
    """eps(x_t, t, c) of a class-conditional diffusers UNet, whatever it predicts (``schedule``'s
    prediction type: epsilon, sample or v); extra output channels (a learned variance) are dropped."""

    def __init__(self, unet: nn.Module, schedule: Schedule) -> None:
        super().__init__()
        self.unet, self.schedule = unet, schedule
        self._concat_cond = isinstance(unet, UNet2DConditionModel)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        if self._concat_cond:
            out = self.unet(x, t, None, class_labels=c).sample
        else:
            out = self.unet(x, t, class_labels=c).sample
        return self.schedule.eps_from_output(x, t, out[:, : x.shape[1]])


@dataclass
class ModelInfo:
    """What a loaded diffusers model is: its class, image shape and class labels."""

    path: Path
    unet_folder: Path
    class_name: str
    channels: int
    image_size: int
    num_class_embeds: int
    num_classes: int  # classes to sample: num_class_embeds, less the null class if there is one
    null_class: int | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "class": self.class_name,
            "shape": list(self.shape),
            "num_class_embeds": self.num_class_embeds,
            "num_classes": self.num_classes,
            "null_class": self.null_class,
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def inspect_model(path: Path | str, null_class: bool = False) -> ModelInfo:
    """Check that ``path`` is a local diffusers folder of a class-conditional UNet this recipe can
    distil, without loading its weights; ValueError naming what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"--model {path} is not a folder; expected a diffusers model folder (config.json + weights) "
            "or a pipeline folder (model_index.json, unet/, scheduler/)"
        )
    if (path / "model_index.json").is_file():
        unet_folder = path / "unet"
        if not (unet_folder / "config.json").is_file():
            raise ValueError(f"pipeline folder {path} has no unet/config.json")
    elif (path / "config.json").is_file():
        unet_folder = path
    else:
        raise ValueError(
            f"{path} holds neither config.json (a model folder) nor model_index.json (a pipeline)"
        )
    config = _read_json(unet_folder / "config.json")
    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise ValueError(
            f"{unet_folder / 'config.json'} describes a {name!r}; supported: {', '.join(UNET_CLASSES)}"
        )
    if not _has_weights(unet_folder):
        raise ValueError(f"{unet_folder} holds no weights (*.safetensors or *.bin)")
    embeds = config.get("num_class_embeds")
    if config.get("class_embed_type") is not None or not isinstance(embeds, int) or embeds < 2:
        raise ValueError(
            f"{unet_folder} is not class-conditional by label: it needs num_class_embeds >= 2 and no "
            f"class_embed_type (got num_class_embeds={embeds!r}, class_embed_type="
            f"{config.get('class_embed_type')!r})"
        )
    if name == "UNet2DConditionModel":
        blocks = [*config.get("down_block_types", []), *config.get("up_block_types", [])]
        blocks.append(str(config.get("mid_block_type")))
        if any("CrossAttn" in b for b in blocks):
            raise ValueError(
                f"{unet_folder} has cross-attention blocks (it needs encoder states, e.g. text); the recipe "
                "conditions on class labels only"
            )
        extra = {k: config.get(k) for k in ("addition_embed_type", "encoder_hid_dim") if config.get(k)}
        if extra:
            raise ValueError(f"{unet_folder} needs more conditioning than class labels ({extra})")
        channels, size = config.get("in_channels"), config.get("sample_size")
    else:
        channels, size = config.get("in_channels"), config.get("sample_size")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{unet_folder}: only square images are supported, sample_size={size}")
        size = size[0]
    if not isinstance(size, int) or not isinstance(channels, int):
        raise ValueError(f"{unet_folder}/config.json needs integer sample_size and in_channels")
    out_channels = config.get("out_channels", channels)
    if out_channels not in (channels, 2 * channels):
        raise ValueError(f"{unet_folder}: out_channels {out_channels} is neither in_channels nor twice it")
    classes = embeds - 1 if null_class else embeds
    return ModelInfo(
        path, unet_folder, name, channels, size, embeds, classes, embeds - 1 if null_class else None
    )


def load_schedule(info: ModelInfo) -> Schedule:
    """The pipeline's ``scheduler/`` (or a ``scheduler_config.json`` beside the model), else the
    ``DDPMScheduler`` defaults: linear betas 1e-4 to 0.02 over T = 1000, epsilon prediction."""
    for folder in (info.path / "scheduler", info.unet_folder):
        if (folder / "scheduler_config.json").is_file():
            config = _read_json(folder / "scheduler_config.json")
            config.pop("_class_name", None)
            config.pop("_diffusers_version", None)
            try:
                return Schedule(DDPMScheduler.from_config(config))
            except (TypeError, NotImplementedError) as e:
                raise ValueError(f"{folder / 'scheduler_config.json'} is not a DDPM schedule: {e}") from e
    return Schedule()


def load_model(path: Path | str, null_class: bool = False) -> tuple[EpsNet, Schedule, ModelInfo]:
    """The frozen, eval-mode network of a local diffusers folder, its schedule and what it is."""
    info = inspect_model(path, null_class)
    schedule = load_schedule(info)
    try:
        unet = UNET_CLASSES[info.class_name].from_pretrained(
            info.unet_folder, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{info.unet_folder} could not be loaded: {e}") from e
    return EpsNet(unet.float().eval(), schedule).requires_grad_(False), schedule, info


def save_unet(net: EpsNet, folder: Path) -> None:
    """``save_pretrained`` of the wrapped UNet (config.json + safetensors) into ``folder``."""
    net.unet.save_pretrained(folder, safe_serialization=True)
