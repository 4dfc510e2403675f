#!/usr/bin/env bash
# Per-kernel time and DRAM bytes of a decode step (ncu), on the GPU machine through the device tool:
#   carry ["target/wheels"], command "PROBE_MODEL=Qwen3-8B bash benches/profiles/ncu_run.sh" (default 0.6B).
# NCU_SKIP / NCU_COUNT (default 1400 / 600) choose the launches profiled: past load, prefill and warm-up.
# Eager decode (QWEN3RS_CUDA_GRAPHS=0) so ncu sees each kernel; the launches skipped are load + warm-up.
set -u
python3 -m pip install --no-deps -q --target /tmp/q target/wheels/*.whl
export PYTHONPATH=/tmp/q CUDA_HOME=/usr/local/cuda QWEN3RS_CUDA_GRAPHS=0
python3 benches/profiles/ncu_probe.py
timeout ${NCU_TIMEOUT:-200} ncu --clock-control none --launch-skip ${NCU_SKIP:-1400} --launch-count ${NCU_COUNT:-600} --print-summary per-kernel \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum python3 benches/profiles/ncu_probe.py > $OUT/ncu.txt 2>&1
echo "ncu rc=$?"
python3 - <<'PY'
import os, re
# ncu --print-summary per-kernel: "  name (grid)x(block), Device 0, CC 9.0, Invocations N" then metric
# lines "metric unit min max avg". Rows: total time over the profiled launches, per kernel and shape.
txt = open(os.environ["OUT"] + "/ncu.txt").read()
rows = []
for m in re.finditer(r"^  (\w+) (\(.*?\)x\(.*?\)), .*?Invocations (\d+)\n(.*?)(?=^  \w+ \(|\Z)", txt, re.S | re.M):
    name, shape, n, body = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    t = re.search(r"gpu__time_duration.sum\s+(\S+)\s+[\d.,]+\s+[\d.,]+\s+([\d.,]+)", body)
    d = re.search(r"dram__bytes_read.sum\s+(\S+)\s+[\d.,]+\s+[\d.,]+\s+([\d.,]+)", body)
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3}
    avg = float(t.group(2).replace(",", "")) * scale.get(t.group(1), 1.0) if t else 0.0
    rows.append((avg * n, name, shape, n, avg, f"{d.group(2)} {d.group(1)}" if d else "?"))
total = sum(r[0] for r in rows)
print(f"{'kernel':28} {'grid x block':28} {'calls':>5} {'avg us':>8} {'total us':>9} {'share':>6}  dram read avg")
for r in sorted(rows, reverse=True)[:30]:
    print(f"{r[1][:28]:28} {r[2][:28]:28} {r[3]:5d} {r[4]:8.2f} {r[0]:9.1f} {r[0] / total:6.1%}  {r[5]}")
print(f"total {total:.0f} us over {sum(r[3] for r in rows)} launches")
PY
tail -5 $OUT/ncu.txt
