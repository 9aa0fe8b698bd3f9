#!/usr/bin/env bash
# Does keeping freed memory (layerskip.device.keep_freed_memory) speed up CPU training?
# Interleaved pairs of short plain training runs with LAYERSKIP_KEEP_FREED_MEMORY=0 and =1;
# prints each run's mean step time (steps 11-40) and its wall, user and kernel time and
# minor page faults (GNU time). Needs $LAYERSKIP_DATA_DIR and GNU time at /usr/bin/time.
#
#   bash benchmarks/allocator.sh [pairs, default 5] [output dir, default runs/allocator]
set -eu
pairs=${1:-5}
out=${2:-runs/allocator}
mkdir -p "$out"
: > "$out/time.log"
for pair in $(seq "$pairs"); do
  for keep in 0 1; do
    name="keep$keep-$pair"
    rm -rf "$out/$name"
    LAYERSKIP_KEEP_FREED_MEMORY=$keep /usr/bin/time -a -o "$out/time.log" \
      -f "$name wall %e s, user %U s, kernel %S s, minor page faults %R" \
      layerskip train --out "$out/$name" --max_skip_prob 0 --early_exit_scale 0 --max_steps 40 \
      --val_tokens 4096 > /dev/null 2>&1
    python - "$out/$name/metrics.jsonl" "$name" <<'PY'
import json, statistics, sys
steps = [r["step_seconds"] for r in map(json.loads, open(sys.argv[1])) if r["type"] == "train"][10:]
print(f"{sys.argv[2]}: mean step {statistics.mean(steps):.4f} s over {len(steps)} steps")
PY
  done
done
cat "$out/time.log"
