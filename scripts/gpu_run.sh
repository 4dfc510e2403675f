#!/usr/bin/env bash
# One device call: correctness (scripts/gpu_check.sh), then each step given as an argument (a shell
# command) while LIMIT seconds (default 585) last, printing the last TAIL lines (default 14) of each;
# at the end everything under $OUT goes into one logs.tgz (the device tool brings back only a few files).
#   e.g. bash scripts/gpu_run.sh "python3 benches/gpu_bench.py .peers --budget \$((STEP_LEFT - 15))"
# carry ["target/wheels", ".gpu", ".peers"] after scripts/gpu_bundle.sh here.
set -u
export PYTHONUNBUFFERED=1 CUDA_HOME=/usr/local/cuda
LIMIT=${LIMIT:-585}
left() { echo $((LIMIT - SECONDS)); }
nvidia-smi -L
timeout $(left) bash scripts/gpu_check.sh > $OUT/check.txt 2>&1; tail -18 $OUT/check.txt
for step in "$@"; do
  [ $(left) -lt 30 ] && { echo "skipped (time): $step"; continue; }
  echo "== $step"
  export STEP_LEFT=$(left)  # seconds this step may take (e.g. --budget \$((STEP_LEFT - 15)))
  timeout $STEP_LEFT bash -c "$step" 2>&1 | tail -${TAIL:-14}
done
cd $OUT && tar czf logs.tgz --remove-files $(ls | grep -v '^logs.tgz$') 2>/dev/null; ls $OUT
