"""Text-conditioned diffusers pipelines for concept forgetting: a local ``StableDiffusionPipeline`` folder
(``model_index.json``, ``unet/`` a ``UNet2DConditionModel`` with cross-attention, ``text_encoder/`` a
``CLIPTextModel``, ``tokenizer/`` a ``CLIPTokenizer``, ``scheduler/``, and ``vae/`` an ``AutoencoderKL``, or
no VAE: a pixel-space pipeline) read without any hub access; the frozen prompt encoder; the UNet's noise
prediction with classifier-free guidance; a CLIP vocabulary written from a word list (tests and the
digits demonstration build their tokenizers from it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from .diffusion import Schedule
from .nets import _has_weights, _read_json, load_schedule

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def is_text_pipeline(path: Path | str) -> bool:
    """Whether ``path`` is a pipeline folder whose model index names a text encoder."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        entry = json.loads(index.read_text()).get("text_encoder")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


@dataclass
class PipelineInfo:
    """What a text-conditioned pipeline folder holds, checked without loading weights."""

    path: Path
    latent_channels: int
    latent_size: int
    cross_attention_dim: int
    has_vae: bool
    image_channels: int
    image_size: int
    scaling_factor: float

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def class_name(self) -> str:
        return "UNet2DConditionModel"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "class": self.class_name,
            "latent_shape": list(self.latent_shape),
            "vae": self.has_vae,
            "image_shape": [self.image_channels, self.image_size, self.image_size],
            "scaling_factor": self.scaling_factor,
        }


def inspect_pipeline(path: Path | str) -> PipelineInfo:
    """Check a text-conditioned pipeline folder; ValueError naming what is missing or unsupported."""
    path = Path(path)
    if not is_text_pipeline(path):
        raise ValueError(
            f"{path} is not a text-conditioned pipeline folder (model_index.json with a text_encoder)"
        )
    for part in ("unet", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise ValueError(f"pipeline folder {path} has no {part}/")
    unet = _read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").is_file() else {}
    if unet.get("_class_name") != "UNet2DConditionModel":
        raise ValueError(f"{path}/unet is not a UNet2DConditionModel (got {unet.get('_class_name')!r})")
    for part in ("unet", "text_encoder"):
        if not _has_weights(path / part):
            raise ValueError(f"{path / part} holds no weights (*.safetensors or *.bin)")
    blocks = [
        *unet.get("down_block_types", []),
        *unet.get("up_block_types", []),
        str(unet.get("mid_block_type")),
    ]
    if not any("CrossAttn" in b for b in blocks):
        raise ValueError(f"{path}/unet has no cross-attention blocks: it does not read the prompt")
    extra = {
        k: unet.get(k) for k in ("addition_embed_type", "class_embed_type", "num_class_embeds") if unet.get(k)
    }
    if extra:
        raise ValueError(f"{path}/unet needs more conditioning than the prompt ({extra}): not supported")
    size = unet.get("sample_size")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{path}/unet: only square latents are supported, sample_size={size}")
        size = size[0]
    channels = unet.get("in_channels")
    if not isinstance(size, int) or not isinstance(channels, int):
        raise ValueError(f"{path}/unet/config.json needs integer sample_size and in_channels")
    text = _read_json(path / "text_encoder" / "config.json")
    dim = unet.get("cross_attention_dim")
    if text.get("hidden_size") != dim:
        raise ValueError(
            f"{path}: the text encoder's hidden_size {text.get('hidden_size')} is not the UNet's "
            f"cross_attention_dim {dim}"
        )
    index = _read_json(path / "model_index.json")
    vae_entry = index.get("vae")
    has_vae = isinstance(vae_entry, list) and vae_entry[0] is not None
    image_channels, image_size, scaling = channels, size, 1.0
    if has_vae:
        if not (path / "vae" / "config.json").is_file() or not _has_weights(path / "vae"):
            raise ValueError(f"pipeline folder {path} names a VAE but has no vae/ config and weights")
        vae = _read_json(path / "vae" / "config.json")
        if vae.get("latent_channels") != channels:
            raise ValueError(
                f"{path}: the VAE's latent_channels {vae.get('latent_channels')} is not the UNet's "
                f"in_channels {channels}"
            )
        image_channels = vae.get("out_channels", 3)
        image_size = size * 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        scaling = float(vae.get("scaling_factor", 0.18215))
    return PipelineInfo(path, channels, size, int(dim), has_vae, image_channels, image_size, scaling)


class TextEpsNet(nn.Module):
    """eps(x_t, t, text states) of a ``UNet2DConditionModel``, whatever it predicts."""

    def __init__(self, unet: nn.Module, schedule: Schedule) -> None:
        super().__init__()
        self.unet, self.schedule = unet, schedule

    def forward(self, x: Tensor, t: Tensor, states: Tensor) -> Tensor:
        out = self.unet(x, t, encoder_hidden_states=states.to(x.dtype)).sample
        return self.schedule.eps_from_output(x, t, out[:, : x.shape[1]].float())


def guided_eps(net: nn.Module, x: Tensor, t: Tensor, states: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, eps_u + scale (eps_c - eps_u), in one batched call (scale 1: eps_c)."""
    if scale == 1.0:
        return net(x, t, states)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond.expand_as(states), states]))
    e_u, e_c = both.chunk(2)
    return e_u + scale * (e_c - e_u)


class PromptEncoder:
    """The pipeline's frozen tokenizer and text encoder: prompts to encoder hidden states (cached)."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str] | tuple[str, ...]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = next(self.text_encoder.parameters()).device
            states = self.text_encoder(ids.to(device))[0].float()
            self._cache.update(zip(missing, states, strict=True))
        return torch.stack([self._cache[p] for p in prompts])


@dataclass
class TextPipeline:
    """The loaded parts: the frozen teacher, prompt encoder and VAE (None in pixel space), the schedule."""

    info: PipelineInfo
    teacher: TextEpsNet
    schedule: Schedule
    prompts: PromptEncoder
    vae: nn.Module | None

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from latents (the identity without a VAE)."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents / self.info.scaling_factor).to(vae_dtype)).sample
        return images.float().clamp(-1, 1)


def load_unet(folder: Path) -> UNet2DConditionModel:
    try:
        return UNet2DConditionModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{folder} could not be loaded: {e}") from e


def load_prompt_encoder(path: Path) -> PromptEncoder:
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the tokenizer or text encoder could not be loaded: {e}") from e
    return PromptEncoder(tokenizer, text_encoder.float())


def load_vae(path: Path) -> nn.Module:
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}/vae could not be loaded: {e}") from e
    return vae.float().eval().requires_grad_(False)


def load_pipeline(path: Path | str, with_vae: bool = True) -> TextPipeline:
    """The frozen parts of a text-conditioned pipeline folder (inspected first)."""
    info = inspect_pipeline(path)
    path = info.path
    schedule = load_schedule(_ScheduleWhere(path))
    teacher = TextEpsNet(load_unet(path / "unet").float().eval(), schedule).requires_grad_(False)
    vae = load_vae(path) if info.has_vae and with_vae else None
    return TextPipeline(info, teacher, schedule, load_prompt_encoder(path), vae)


@dataclass
class _ScheduleWhere:
    """Where ``nets.load_schedule`` looks: the pipeline's ``scheduler/``."""

    path: Path

    @property
    def unet_folder(self) -> Path:
        return self.path / "unet"


def read_prompts(path: Path | str, what: str) -> list[str]:
    """One prompt a line (blank lines and lines starting with # skipped); ValueError when none."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read: {e}") from e
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"{what} {path} holds no prompts")
    return prompts


def write_clip_vocab(folder: Path | str, words: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` of a small CLIP byte-pair vocabulary: every lower-case letter and
    digit (so any such word tokenizes), plus each of ``words`` as one token (merged left to right)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {}
    for token in (*chars, *(c + "</w>" for c in chars)):
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2 or not all(c in chars for c in word):
            continue
        parts = [*word[:-1], word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            pair = f"{left} {right}"
            if pair not in merges:
                merges.append(pair)
            left += right
            vocab.setdefault(left, len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return vocab_path, merges_path


def clip_tokenizer(folder: Path | str, words: list[str] | tuple[str, ...] = (), max_length: int = 16):
    """A ``CLIPTokenizer`` of ``write_clip_vocab(folder, words)`` (no hub)."""
    from transformers import CLIPTokenizer

    vocab, merges = write_clip_vocab(folder, words)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length, pad_token=EOS)
