#!/usr/bin/env bash
# Run on the GPU machine (through the device tool), after scripts/gpu_bundle.sh here:
#   installs the wheel from target/wheels into /tmp/q, runs the Rust op-by-op tests (.gpu/cuda_ops,
#   .gpu/cuda_compile, .gpu/cuda_tp), the GPU pytest suites (tests/test_cuda.py and
#   tests/test_conformance.py over cpu and cuda; tests/test_multi_gpu.py where two GPUs are usable),
#   times a cold and a warm (disk-cached kernels) process start, and prints a summary table last.
#   Full logs go to $OUT (the device tool brings them back).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qwen3rs-gpu-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export QWEN3RS_CACHE_DIR=/tmp/qwen3rs-cache
# NCCL for the tensor-parallel test binary: the image has it in PyTorch's pip packages.
NCCL_LIB=$(python3 -c "import glob, site, os; c = [p for d in site.getsitepackages() for p in glob.glob(os.path.join(d, 'nvidia/nccl/lib/libnccl.so*'))]; print(os.path.dirname(c[0]) if c else '')" 2>/dev/null)
[ -n "$NCCL_LIB" ] && export LD_LIBRARY_PATH="$NCCL_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
rm -rf "$QWEN3RS_CACHE_DIR" /tmp/q
declare -a SUMMARY

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
WHEEL=$(ls -t target/wheels/qwen3rs-*.whl | head -1)
python3 -m pip install --no-deps --quiet --target /tmp/q "$WHEEL" > "$OUT/pip.log" 2>&1
SUMMARY+=("install $(basename "$WHEEL")|rc=$?")
export PYTHONPATH=/tmp/q

python3 -c "import qwen3rs; print(qwen3rs.cuda_available(), qwen3rs.cuda_unavailable_reason())" > "$OUT/available.txt" 2>&1
SUMMARY+=("cuda_available (reason if not)|$(head -c 300 "$OUT/available.txt")")

# Cold start (NVRTC compiles every module used) vs warm start (cubins from the disk cache).
for run in cold warm; do
  python3 - > "$OUT/start_$run.txt" 2>&1 <<'PY'
import time
t0 = time.perf_counter()
import qwen3rs
m = qwen3rs.load("tests/fixtures/moe_top2_bf16", device="cuda", progress=False)
m.logits([1, 2, 3])
print(f"{time.perf_counter() - t0:.2f}")
PY
  SUMMARY+=("process start ($run kernel cache)|$(tail -1 "$OUT/start_$run.txt") s")
done

for bin in cuda_compile cuda_ops cuda_tp; do
  if [ -x ".gpu/$bin" ]; then
    ".gpu/$bin" --test-threads=1 --nocapture > "$OUT/$bin.log" 2>&1
    rc=$?
    SUMMARY+=("rust $bin|rc=$rc $(grep -E '^test result' "$OUT/$bin.log" | tail -1)")
  else
    SUMMARY+=("rust $bin|missing .gpu/$bin (run scripts/gpu_bundle.sh)")
  fi
done
grep -E "rel err|argmax|OOM|SKIP" "$OUT/cuda_ops.log" > "$OUT/cuda_ops_errors.txt" 2>/dev/null
SUMMARY+=("rust cuda_ops SKIP lines (0 = all ran)|$(grep -c SKIP "$OUT/cuda_ops.log" 2>/dev/null)")

# The kernel-compile tests need no GPU and CI runs them (~4 minutes of NVRTC on one core): left out here.
python3 -m pytest tests/test_cuda.py tests/test_conformance.py -q -rs -p no:cacheprovider -k "not kernels_compile" > "$OUT/pytest.log" 2>&1
rc=$?
SUMMARY+=("pytest test_cuda+test_conformance|rc=$rc $(tail -1 "$OUT/pytest.log")")

# Tensor parallelism over two GPUs against one (skipped, quickly, with fewer than two).
python3 -m pytest tests/test_multi_gpu.py -q -rs -s -p no:cacheprovider > "$OUT/pytest_multi_gpu.log" 2>&1
rc=$?
SUMMARY+=("pytest test_multi_gpu (2 GPUs)|rc=$rc $(tail -1 "$OUT/pytest_multi_gpu.log")")

# Speed smoke (not a benchmark; the next issue's baseline): greedy decode on dummy Qwen3-0.6B, bf16.
# Graphs on (default) and off (QWEN3RS_CUDA_GRAPHS=0, read at load); the full benchmark is benches/gpu_bench.py.
timeout 300 python3 - > "$OUT/speed.txt" 2>&1 <<'PY'
import os, time
import qwen3rs
rows = []
for graphs in ["1", "0"]:
    os.environ["QWEN3RS_CUDA_GRAPHS"] = graphs
    t0 = time.perf_counter()
    m = qwen3rs.load("dummy:Qwen3-0.6B", device="cuda", max_seq_len=2048, max_batch=1, progress=False)
    load = time.perf_counter() - t0
    m.generate(list(range(1, 65)), raw=True, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    o = m.generate(list(range(1, 513)), raw=True, max_new_tokens=128, temperature=0.0, ignore_eos=True)
    t = o.timings
    rows.append(f"graphs={graphs}: load {load:.1f} s, prefill 512 {t['prefill_s'] * 1e3:.1f} ms, decode {t['decode_tok_s']:.0f} tok/s")
    del m
print("; ".join(rows))
PY
SUMMARY+=("speed dummy:Qwen3-0.6B bf16 batch 1|$(tail -1 "$OUT/speed.txt")")

echo
echo "---- worst op errors (full list: cuda_ops_errors.txt) ----"
awk '{for (i = 1; i < NF; i++) if ($i == "err") print $(i + 1) "\t" $0}' "$OUT/cuda_ops_errors.txt" 2>/dev/null | sort -g -r | head -12 | cut -f2-
echo "---- failures ----"
grep -E "^(FAILED|ERROR)|panicked|assert" "$OUT/pytest.log" "$OUT/pytest_multi_gpu.log" "$OUT/cuda_ops.log" "$OUT/cuda_tp.log" 2>/dev/null | head -30
echo "---- summary ----"
printf '%s\n' "$(cat "$OUT/gpu.txt")"
for row in "${SUMMARY[@]}"; do
  printf '%-42s %s\n' "${row%%|*}" "${row#*|}"
done
