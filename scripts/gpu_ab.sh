#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_bundle_branches.sh here: for each build in .gpu/v/NAME, install
# its wheel into /tmp/qv/NAME and run its cuda_ops (all tests, or those matching any of the arguments); then
# benches/kernel_sweep.py over the builds that passed, interleaved (SWEEP_MODELS, default
# Qwen3-30B-A3B; SWEEP_ROUNDS, default 3; SWEEP_EXTRA: more variants as NAME:SETTINGS, space-separated,
# e.g. "expert-gemm-128:QWEN3RS_CUDA_EXPERT_TILE=128" runs that build with that setting too). The
# sweep's base (ratio 1) is the build named main, else the first alphabetically.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qwen3rs-gpu-out}; mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} QWEN3RS_CACHE_DIR=/tmp/qwen3rs-cache PYTHONUNBUFFERED=1
variants=()
for dir in $(ls -d .gpu/v/main/ 2>/dev/null) $(ls -d .gpu/v/*/ | grep -v '/main/$'); do
  name=$(basename "$dir")
  python3 -m pip install --no-deps -q --target "/tmp/qv/$name" "$dir"/qwen3rs-*.whl > "$OUT/pip_$name.log" 2>&1
  "$dir/cuda_ops" --test-threads=1 "$@" > "$OUT/ops_$name.txt" 2>&1
  rc=$?
  echo "cuda_ops $name rc=$rc $(grep 'test result' "$OUT/ops_$name.txt")"
  grep -E "panicked" -A2 "$OUT/ops_$name.txt" | head -6
  [ $rc -eq 0 ] && variants+=("PYTHONPATH=/tmp/qv/$name")
done
[ ${#variants[@]} -gt 0 ] || exit 1
extra=()
for item in ${SWEEP_EXTRA:-}; do extra+=("PYTHONPATH=/tmp/qv/${item%%:*} ${item#*:}"); done
export PYTHONPATH=${variants[0]#PYTHONPATH=}
python3 benches/kernel_sweep.py --models "${SWEEP_MODELS:-Qwen3-30B-A3B}" --rounds "${SWEEP_ROUNDS:-3}" "${variants[@]}" "${extra[@]}" 2>&1 | tail -$(( ${#variants[@]} * 2 + 4 ))
