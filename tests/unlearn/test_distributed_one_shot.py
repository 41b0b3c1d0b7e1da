"""Class forgetting under torchrun with pecker's default one-shot mask: the forget batches' gradients are
summed on each rank's FSDP2 shards, clipped by their norm over every rank, and one global selection
picks the mask; the run's other options and outputs are those of test_cli's distributed run."""

import json
import math

from diffusers import UNet2DModel

from .test_diffusers_models import FAST, generator_weights
from .torchrun import torchrun


def test_one_shot_mask_over_two_ranks_moves_exactly_one_global_fraction(rgb_model, tmp_path):
    out = tmp_path / "two-ranks"
    argv = ["unlearn", "--model", str(rgb_model), *FAST, "--mask-batches", "2"]
    proc = torchrun(2, [*argv, "--distributed", "--ratio", "0.3", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["config"]["refresh_every"] == 0
    n = metrics["generator_parameters"]
    assert round(metrics["updated_fraction"] * n) == math.floor(0.3 * n)
    assert metrics["setup_seconds"] > 0  # the one-shot pass ran before training
    teacher = UNet2DModel.from_pretrained(rgb_model).state_dict()  # --model DIR: G starts from it
    moved = sum(int((w != teacher[k]).sum()) for k, w in generator_weights(out).items())
    assert 0 < moved <= math.floor(0.3 * n)  # both ranks stepped the same weights: one mask
