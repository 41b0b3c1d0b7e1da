"""The packaged networks and the classifier checkpoints: where they live, saving (atomically) and
loading them with checks that they fit the data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import atomic
from .models import build

PACKAGED = Path(__file__).parent / "checkpoints"
FOLDERS = ("teacher", "generator")  # kinds stored as diffusers folders


def default_path(dataset: str, kind: str) -> Path:
    """Where the shipped checkpoint of ``kind`` lives: the teacher and the distilled one-step generator
    are diffusers model folders (``<dataset>_teacher/``, ``<dataset>_generator/``), the classifier a
    ``.pt`` file."""
    stem = f"{dataset.replace('-', '_')}_{kind}"
    return PACKAGED / (stem if kind in FOLDERS else f"{stem}.pt")


def is_packaged(path: Path | str) -> bool:
    """Whether ``path`` is (inside) the package's own checkpoint folder."""
    try:
        Path(path).resolve().relative_to(PACKAGED.resolve())
    except ValueError:
        return False
    return True


def save(path: Path | str, model: nn.Module, kind: str, dataset: str, record: dict[str, Any]) -> None:
    """Write ``{kind, dataset, model config, state_dict, record}`` (fp32) atomically."""
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    blob = {"kind": kind, "dataset": dataset, "config": model.config, "state_dict": state, "record": record}
    atomic.write_file(Path(path), lambda tmp: torch.save(blob, tmp))


_ARCH = {"classifier": "classifier"}


def read_config(path: Path | str, kind: str) -> dict[str, Any]:
    """The checkpoint's ``{kind, dataset, config, ...}`` blob; ValueError when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        hint = "train one with: python -m pecker_kernels train-" + kind
        raise ValueError(f"no {kind} checkpoint at {path}; {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{path} is not a pecker_kernels {kind} checkpoint (no config/state_dict)")
    if blob.get("kind") != kind:
        raise ValueError(f"{path} holds a {blob.get('kind')!r} checkpoint, expected a {kind!r} one")
    return blob


def load(path: Path | str, kind: str, dataset: str, image_size: int, num_classes: int) -> nn.Module:
    """The ``kind`` network stored at ``path``; ValueError when it is missing or does not fit the data."""
    path = Path(path)
    blob = read_config(path, kind)
    config = blob["config"]
    if blob.get("dataset") != dataset or config.get("image_size") != image_size:
        raise ValueError(
            f"{path} was trained on {blob.get('dataset')!r} at {config.get('image_size')}px; "
            f"this run uses {dataset!r} at {image_size}px"
        )
    if config.get("num_classes") != num_classes:
        raise ValueError(f"{path} has {config.get('num_classes')} classes; the data set has {num_classes}")
    model = build(_ARCH[kind], config)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the {kind} model: {e}") from e
    return model.eval()


def record(path: Path | str) -> dict[str, Any]:
    """The training record stored inside a checkpoint."""
    return torch.load(Path(path), map_location="cpu", weights_only=True).get("record", {})
