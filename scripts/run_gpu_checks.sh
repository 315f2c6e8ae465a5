#!/usr/bin/env bash
# GPU checks and benchmarks in one go (run on a CUDA machine from the repository root):
#   bash scripts/run_gpu_checks.sh OUT_DIR
# 1. the GPU-marked tests (≈ 30 s), 2. the embedded teacher's quality bar with the default config,
# six prompts side by side (≈ 3 min), 3. the variance benchmark of the default estimator's (R, K)
# grid at an early and a late checkpoint (≈ 6 min). Results land in OUT_DIR; each step's exit status
# goes to its log, and a failing step does not stop the next.
set -uo pipefail
OUT=${1:?usage: run_gpu_checks.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"
timeout "${GPU_TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"
timeout "${QUALITY_TIMEOUT:-400}" python3 scripts/bench_world_quality.py --parallel 6 --workdir /tmp/carv3d_quality \
    --out "$OUT/quality_h200.json" > "$OUT/quality_log.txt" 2>&1
echo "quality exit $?" >> "$OUT/quality_log.txt"
timeout "${VARIANCE_TIMEOUT:-500}" python3 scripts/bench_variance.py --prompt "a red cube" --early 100 --late 600 \
    --draws "${VARIANCE_DRAWS:-128}" --pilot 32 --rk 2x1,1x16,2x8,2x16 --methods uniform,is+stratified,adaptive \
    --cameras both --workdir /tmp/carv3d_variance --out "$OUT/variance_h200.json" train.progress=false \
    > "$OUT/variance_log.txt" 2>&1
echo "variance exit $?" >> "$OUT/variance_log.txt"
