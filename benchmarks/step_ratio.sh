#!/usr/bin/env bash
# The step-time ratio of LayerSkip training to plain training, measured the way a noisy
# machine allows: interleaved pairs of short runs (the demo's LayerSkip recipe, then plain),
# each run's mean step time over steps 11-40 (compilation excluded), and the ratio per pair.
# Needs $LAYERSKIP_DATA_DIR.
#
#   bash benchmarks/step_ratio.sh [pairs, default 3] [output dir, default runs/step_ratio]
set -eu
pairs=${1:-3}
out=${2:-runs/step_ratio}
mkdir -p "$out"
: > "$out/pairs.log"
mean_step() {
  python - "$1/metrics.jsonl" <<'PY'
import json, statistics, sys
steps = [r["step_seconds"] for r in map(json.loads, open(sys.argv[1])) if r["type"] == "train"][10:]
print(f"{statistics.mean(steps):.4f}")
PY
}
for pair in $(seq "$pairs"); do
  rm -rf "$out/layerskip-$pair" "$out/plain-$pair"
  layerskip train --out "$out/layerskip-$pair" --max_steps 40 --val_tokens 4096 --max_skip_prob 0.2 \
    --early_exit_scale 1.0 --early_exit_curriculum rotational --early_exit_tokens 0.25 > /dev/null 2>&1
  layerskip train --out "$out/plain-$pair" --max_steps 40 --val_tokens 4096 --max_skip_prob 0 \
    --early_exit_scale 0 > /dev/null 2>&1
  ls=$(mean_step "$out/layerskip-$pair"); plain=$(mean_step "$out/plain-$pair")
  python -c "print(f'pair $pair: LayerSkip {$ls:.3f} s/step, plain {$plain:.3f} s/step, ratio {$ls / $plain:.3f}')" \
    | tee -a "$out/pairs.log"
done
python - "$out/pairs.log" <<'PY'
import statistics, sys
ratios = [float(line.split()[-1]) for line in open(sys.argv[1])]
print(f"median ratio over {len(ratios)} pairs: {statistics.median(ratios):.3f}")
PY
