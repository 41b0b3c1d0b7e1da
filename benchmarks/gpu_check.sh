#!/usr/bin/env bash
# Everything that needs a GPU, in one command (at most 9 minutes on an H100/H200; the device tool allows 10):
#   benchmarks/gpu_check.sh OUT_DIR
# Builds the CUDA module in place with the machine's own torch (no network needed), runs the GPU tests
# and the kernel benchmark, and writes logs plus gpu_check.json (one status per step) to OUT_DIR.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# Hopper SASS only: half the nvcc time of the default (which adds sm_90 and PTX).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PECKER_BUILD_DIR=build/gpu-check PECKER_CUDA_ARCHS=${PECKER_CUDA_ARCHS:-90a-real}

status() { printf '  "%s": %s,\n' "$1" "$2" >>"$out/steps.part"; }
: >"$out/steps.part"

# Packages the image lacks (diffusers: pytest collects tests/unlearn, which imports it; nvtx: named ranges),
# carried as wheels made by benchmarks/gpu_wheels.sh (name ".whl" in the device call's carry).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$out/wheels.log" 2>&1
  status wheels $?
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
"$py" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >"$out/versions.txt" 2>&1

timeout 180 "$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1
status build $?

timeout 150 "$py" -m pytest -q -m gpu tests -p no:cacheprovider >"$out/gpu_tests.log" 2>&1
status gpu_tests $?

# fp32 and bf16 flat tensors of 1e6-1e9 parameters, ratios 0.1/0.9 at 1e8, the two model layouts. At 1e9
# only the fused rows run (ours, torch's fused AdamW, the bandwidth reference: about 60 GB together, since
# contenders share parameters and gradients); a contender that runs out of memory is skipped. Results are
# written after every configuration (smallest first), so a timeout keeps what ran.
timeout 210 "$py" -m benchmarks.bench_step --device cuda --sizes 1e6 1e7 1e8 1e9 --reps 20 --out "$out" \
  >"$out/bench.log" 2>&1
status bench $?

# --- Concept-forgetting step at SD-1.5's full size (benchmarks/bench_sd_step.py) -------------------------
# Three UNet2DConditionModels of 859.5M parameters (fp16 autocast, 64x64 latents, batch 4 + 4, CFG 4.5), four
# generator-update arms, each in its own process; needs diffusers (the carried .whl). It does not fit the
# 9 minutes beside the steps above, so it runs only when asked (PECKER_SD_BENCH=1) and then needs a call of
# up to 150 s more; sd_step/sd_step.json is written after every arm, so a timeout keeps what ran.
if [ "${PECKER_SD_BENCH:-0}" = 1 ]; then
  timeout 150 "$py" -m benchmarks.bench_sd_step --device cuda --steps 3 --out "$out/sd_step" >"$out/sd_step.log" 2>&1
  status sd_step $?
fi
# --- end of the concept-forgetting step -------------------------------------------------------------------

{ echo "{"; cat "$out/steps.part"; printf '  "versions": "%s"\n}\n' "$(tr -d '\n' <"$out/versions.txt")"; } \
  >"$out/gpu_check.json"
rm -f "$out/steps.part"
cat "$out/gpu_check.json"
tail -n 40 "$out/bench.log"
