#!/bin/bash
# The default run (`ddpo-train`, the cpu preset) three times: eager, then with model.compile=default and an empty
# inductor cache (cold), then again with the cache the cold run filled (warm). Run it on a quiet machine; it takes
# about 40 minutes on 2 cores. Then `python tools/compile_summary.py OUT` writes nbs/cpu_results/compile-default-run.json.
#   tools/compile_default_run.sh OUT    (OUT: a new folder for the runs, the cache and the wall times)
set -euo pipefail
out=${1:?give a folder for the runs}
mkdir -p "$out"; rm -rf "$out/inductor-cache"; : > "$out/wall.txt"
export HF_HUB_OFFLINE=1
for run in eager cold warm; do
  extra=(); [ "$run" != eager ] && extra=(model.compile=default)
  t0=$(date +%s.%N)
  TORCHINDUCTOR_CACHE_DIR="$out/inductor-cache" ddpo-train run.dir="$out/$run" run.overwrite=true run.progress=false \
    "${extra[@]}" > "$out/$run.log" 2>&1
  echo "$run $(python -c "print($(date +%s.%N) - $t0)")" >> "$out/wall.txt"
done
