#!/usr/bin/env bash
# The checks that need a GPU, for the next machine that has one (about 5 minutes on one GPU):
#   1. the CUDA tests: fast path == plain path (fp32, bf16; both layouts), greedy SSD and DEE == AR,
#      sampling and early exits on the device (tests/test_devices.py, the "cuda" cases);
#   2. a short decoding benchmark: AR, SSD and DEE on the study's shape (fp32, bf16) and the
#      Llama 3.2 1B shape (bf16), each checked against AR (benchmarks/gpu_decode.py).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default gpu_check/); exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__ + "; nothing to check")
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)
PY
status=0
timeout 150 python -m pytest -p no:cacheprovider -rs tests/test_devices.py -k cuda 2>&1 | tee "$out/tests.txt" || status=1
timeout 150 python benchmarks/gpu_decode.py --device cuda --out "$out/gpu_decode.json" 2>&1 | tee "$out/gpu_decode.txt" \
    || status=1
echo "gpu_check: $([ "$status" = 0 ] && echo passed || echo FAILED); outputs in $out/"
exit "$status"
