#!/usr/bin/env bash
# Build here (no GPU needed) what scripts/gpu_check.sh runs on the GPU machine:
#   target/wheels/qwen3rs-*.whl  (abi3, with the cuda feature, as shipped)
#   .gpu/cuda_ops, .gpu/cuda_compile  (the Rust op-by-op test binaries, release)
# Then, through the device tool: command "bash scripts/gpu_check.sh", carry ["target/wheels", ".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
MATURIN=${MATURIN:-$(command -v maturin || echo .venv/bin/maturin)}
rm -f target/wheels/qwen3rs-*.whl
"$MATURIN" build --release --out target/wheels
mkdir -p .gpu
rm -f .gpu/cuda_ops .gpu/cuda_compile .gpu/cuda_tp
cargo test --release --features cuda --test cuda_ops --test cuda_compile --test cuda_tp --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("cuda_ops", "cuda_compile", "cuda_tp"):
        shutil.copy(m["executable"], ".gpu/" + m["target"]["name"])
        print("copied", m["executable"], "->", ".gpu/" + m["target"]["name"])
'
for bin in cuda_ops cuda_compile cuda_tp; do
  [ -x ".gpu/$bin" ] || { echo "test binary $bin did not build: cargo test --release --features cuda --test $bin --no-run" >&2; exit 1; }
done
ls -la target/wheels .gpu
du -shc target/wheels .gpu | tail -1
