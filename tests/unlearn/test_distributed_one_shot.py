"""Class forgetting under torchrun with pecker's default one-shot mask: the forget batches' gradients are
summed on each rank's FSDP2 shards, clipped by their norm over every rank, and one global selection
picks the mask; the run's other options and outputs are those of test_cli's distributed run."""

import json
import math
import os
import subprocess
import sys

from diffusers import UNet2DModel

from .test_diffusers_models import FAST, generator_weights


def test_one_shot_mask_over_two_ranks_moves_exactly_one_global_fraction(rgb_model, tmp_path):
    out = tmp_path / "two-ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pecker_kernels", "unlearn", "--model", str(rgb_model), *FAST, "--mask-batches", "2"]
    cmd += ["--distributed", "--ratio", "0.3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["config"]["refresh_every"] == 0
    n = metrics["generator_parameters"]
    assert round(metrics["updated_fraction"] * n) == math.floor(0.3 * n)
    assert metrics["setup_seconds"] > 0  # the one-shot pass ran before training
    teacher = UNet2DModel.from_pretrained(rgb_model).state_dict()  # --model DIR: G starts from it
    moved = sum(int((w != teacher[k]).sum()) for k, w in generator_weights(out).items())
    assert 0 < moved <= math.floor(0.3 * n)  # both ranks stepped the same weights: one mask
