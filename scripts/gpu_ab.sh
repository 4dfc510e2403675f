#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_bundle_branches.sh here: install each build's wheel from
# .gpu/v/NAME into /tmp/qv/NAME; run benches/kernel_sweep.py over all of them, interleaved (SWEEP_MODELS,
# default Qwen3-30B-A3B; SWEEP_ROUNDS, default 3; SWEEP_EXTRA: more variants as NAME:SETTINGS,
# space-separated, e.g. "expert-gemm-128:QWEN3RS_CUDA_EXPERT_TILE=128" runs that build with that setting
# too); then each build's cuda_ops (all tests, or those matching any of the arguments), each under
# OPS_TIMEOUT seconds (default 150; a build's kernels compile cold on first use), for the builds named in
# OPS_BUILDS (space-separated; default every build but main; "none" for none). The sweep comes first so
# that its figures come back even when the op tests run out of time: a build that wins is merged only
# once its op tests pass. The sweep's base (ratio 1) is the build named main, else the first alphabetically.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qwen3rs-gpu-out}; mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} QWEN3RS_CACHE_DIR=/tmp/qwen3rs-cache PYTHONUNBUFFERED=1
names=()
for dir in $(ls -d .gpu/v/main/ 2>/dev/null) $(ls -d .gpu/v/*/ | grep -v '/main/$'); do
  name=$(basename "$dir")
  python3 -m pip install --no-deps -q --target "/tmp/qv/$name" "$dir"/qwen3rs-*.whl > "$OUT/pip_$name.log" 2>&1 \
    && names+=("$name") || echo "install $name failed: $(tail -1 "$OUT/pip_$name.log")"
done
[ ${#names[@]} -gt 0 ] || exit 1
variants=()
for name in "${names[@]}"; do variants+=("PYTHONPATH=/tmp/qv/$name"); done
for item in ${SWEEP_EXTRA:-}; do variants+=("PYTHONPATH=/tmp/qv/${item%%:*} ${item#*:}"); done
export PYTHONPATH=/tmp/qv/${names[0]}
python3 benches/kernel_sweep.py --models "${SWEEP_MODELS:-Qwen3-30B-A3B}" --rounds "${SWEEP_ROUNDS:-3}" "${variants[@]}" \
  > "$OUT/sweep.txt" 2>&1
tail -$(( ${#variants[@]} * 2 + 4 )) "$OUT/sweep.txt"
ops=${OPS_BUILDS:-$(printf '%s\n' "${names[@]}" | grep -vx main)}
[ "$ops" = none ] && exit 0
for name in $ops; do
  timeout "${OPS_TIMEOUT:-150}" ".gpu/v/$name/cuda_ops" --test-threads=1 "$@" > "$OUT/ops_$name.txt" 2>&1
  rc=$?
  echo "cuda_ops $name rc=$rc $(grep 'test result' "$OUT/ops_$name.txt")$([ $rc -eq 124 ] && echo ' (timed out)')"
  grep -E "panicked" -A2 "$OUT/ops_$name.txt" | head -6
done
