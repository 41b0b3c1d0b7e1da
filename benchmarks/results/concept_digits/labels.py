"""What the packaged digits classifier calls each evaluation prompt's one-step samples, before (the
pipeline's UNet as the one-step generator at the run's t_init: where a concept run starts) and after a
finished concept run (its generator, drawn by ``pecker_kernels.unlearn.concept.sample``).

    python benchmarks/results/concept_digits/labels.py RUN [-n 50] [--out labels.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pecker_kernels.unlearn import checkpoints, runs
from pecker_kernels.unlearn.concept import sample
from pecker_kernels.unlearn.diffusion import OneStepGenerator
from pecker_kernels.unlearn.metrics import classify
from pecker_kernels.unlearn.text import load_pipeline

HERE = Path(__file__).parent


def histogram(preds: torch.Tensor) -> dict[str, float]:
    counts = torch.bincount(preds, minlength=10).float() / len(preds)
    return {str(c): round(float(v), 3) for c, v in enumerate(counts) if v > 0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=Path, default=HERE / "eval_prompts.json")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    record = runs.read_run(args.run)
    t_init = record["generator"]["t_init"]
    pipe = load_pipeline(record["generator"]["pipeline"])
    start = OneStepGenerator(pipe.teacher, pipe.schedule, t_init)
    clf = checkpoints.load(checkpoints.default_path("digits", "classifier"), "classifier", "digits", 8, 10)
    shape = tuple(record["generator"]["latent_shape"])
    result: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for group, prompts in json.loads(args.prompts.read_text()).items():
            result[group] = {}
            for text, label in prompts.items():
                z = torch.randn((args.n, *shape), generator=torch.Generator().manual_seed(args.seed))
                with torch.no_grad():
                    before = start(z, pipe.prompts([text]).expand(args.n, -1, -1)).clamp(-1, 1)
                after = sample(args.run, text, args.n, args.seed, Path(tmp) / "grid.png")
                result[group][text] = {
                    "class": label,
                    "before": histogram(classify(clf, before)[0]),
                    "after": histogram(classify(clf, after)[0]),
                }
    text = json.dumps({"run": str(args.run), "samples_per_prompt": args.n, "labels": result}, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
