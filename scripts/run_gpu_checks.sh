#!/usr/bin/env bash
# GPU checks and benchmarks in one go (run on a CUDA machine from the repository root):
#   bash scripts/run_gpu_checks.sh OUT_DIR
# 1. the GPU-marked tests, 2. the variance benchmark at an early and a late checkpoint,
# 3. short quality runs on world prompts with `carv3d evaluate`. Results land in OUT_DIR.
set -uo pipefail
OUT=${1:?usage: run_gpu_checks.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"
timeout "${GPU_TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"
timeout "${VARIANCE_TIMEOUT:-260}" python3 scripts/bench_variance.py --prompt "a red cube" --early 100 --late 600 \
    --draws 32 --workdir /tmp/carv3d_variance --out "$OUT/variance_h200.json" train.progress=false > "$OUT/variance_log.txt" 2>&1
echo "variance exit $?" >> "$OUT/variance_log.txt"
for prompt in "a red cube" "a blue house"; do
  name=$(echo "$prompt" | tr ' ' '_')
  timeout "${QUALITY_TIMEOUT:-90}" python3 -m carv3d.cli train --prompt "$prompt" train.steps="${QUALITY_STEPS:-1000}" \
      train.turntable_frames=0 train.progress=false train.output_dir=/tmp/carv3d_quality train.run_name="$name" \
      >> "$OUT/quality_log.txt" 2>&1
  python3 -m carv3d.cli evaluate "/tmp/carv3d_quality/$name" --out "$OUT/eval_$name.json" >> "$OUT/quality_log.txt" 2>&1
  cp "/tmp/carv3d_quality/$name/validation/"step_*"${QUALITY_STEPS:-1000}".png "$OUT/val_$name.png" 2>/dev/null
done
python3 - "$OUT" <<'PY' > "$OUT/quality_summary.json"
import json, sys, glob, os
rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "eval_*.json"))):
    e = json.load(open(path))
    rows[os.path.basename(path)] = {k: e.get(k) for k in ("silhouette_iou", "masked_colour_error", "psnr", "chamfer",
                                                         "best_match", "best_match_is_prompted", "front_matches_front")}
print(json.dumps(rows, indent=2, default=str))
PY
