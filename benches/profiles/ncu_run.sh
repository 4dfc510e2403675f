#!/usr/bin/env bash
# Per-kernel time and DRAM bytes of a decode step (ncu), on the GPU machine through the device tool:
#   carry ["target/wheels"], command "PROBE_MODEL=Qwen3-8B bash benches/profiles/ncu_run.sh" (default 0.6B).
# NCU_SKIP / NCU_COUNT (default 1400 / 600) choose the launches profiled: past load, prefill and warm-up.
# Eager decode (QWEN3RS_CUDA_GRAPHS=0) so ncu sees each kernel; the launches skipped are load + warm-up.
set -u
python3 -m pip install --no-deps -q --target /tmp/q target/wheels/*.whl
export PYTHONPATH=/tmp/q CUDA_HOME=/usr/local/cuda QWEN3RS_CUDA_GRAPHS=0
python3 benches/profiles/ncu_decode_probe.py
timeout ${NCU_TIMEOUT:-200} ncu --clock-control none --launch-skip ${NCU_SKIP:-1400} --launch-count ${NCU_COUNT:-600} --print-summary per-kernel \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum python3 benches/profiles/ncu_decode_probe.py > $OUT/ncu.txt 2>&1
echo "ncu rc=$?"
grep -E "^  [a-z_0-9]+\(|gpu__time_duration.sum|dram__bytes_read.sum" $OUT/ncu.txt | head -120 > $OUT/ncu_short.txt
python3 - <<'PY'
import re, os
txt = open(os.environ["OUT"] + "/ncu.txt").read()
# per-kernel summary blocks: name line, then metric lines with average values
blocks = re.split(r"\n  (?=[a-zA-Z_][\w]*\()", txt)
rows = []
for b in blocks[1:]:
    name = b.split("(")[0]
    inv = re.search(r"Invocations?\s*[:=]?\s*(\d+)|\((\d+)\)", b)
    t = re.search(r"gpu__time_duration.sum\s+\S+\s+([\d.,]+)\s+([\d.,]+)\s+([\d.,]+)", b)
    d = re.search(r"dram__bytes_read.sum\s+(\S+)\s+([\d.,]+)\s+([\d.,]+)\s+([\d.,]+)", b)
    rows.append((name, t.group(3) if t else "?", d.group(1) + " " + d.group(4) if d else "?"))
for r in rows[:40]:
    print(f"{r[0][:40]:40s} avg time {r[1]:>12s}  dram read avg {r[2]}")
PY
tail -5 $OUT/ncu.txt
