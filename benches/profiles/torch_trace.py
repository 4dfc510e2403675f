"""Where a step's GPU time goes, as it really runs (CUDA graphs, PDL, warm L2, clocks free): PyTorch's
profiler (CUPTI) records every kernel in the process, ours included, also those replayed from a graph.
On the GPU machine (PyTorch is there for the peers), after scripts/gpu_bundle.sh here:
    python3 benches/profiles/torch_trace.py Qwen3-0.6B decode
    python3 benches/profiles/torch_trace.py Qwen3-30B-A3B prefill
Prints per kernel: launches, total and average µs, share of the kernel time; then the phase's wall time,
the union of kernel time (busy) and the gaps where no kernel ran (idle), per step, and the longest gaps."""
import os
import sys
import time

sys.path.insert(0, os.environ.get("QWEN3RS_WHEEL_DIR", "/tmp/q"))  # another installed build: QWEN3RS_WHEEL_DIR
import qwen3rs  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

model_name = sys.argv[1] if len(sys.argv) > 1 else "Qwen3-0.6B"
phase = sys.argv[2] if len(sys.argv) > 2 else "decode"
n_prompt = int(os.environ.get("TRACE_PROMPT", "2048" if phase == "prefill" else "16"))
n_new = int(os.environ.get("TRACE_NEW", "1" if phase == "prefill" else "64"))
top = int(os.environ.get("TRACE_TOP", "16"))

m = qwen3rs.load("dummy:" + model_name, device="cuda", max_seq_len=n_prompt + n_new + 64, max_batch=1, progress=False)
kw = dict(raw=True, temperature=0.0, ignore_eos=True)
prompt = [100 + i % 1000 for i in range(n_prompt)]
for _ in range(2):  # kernels compiled, graphs captured, scratch grown
    m.generate(prompt, max_new_tokens=n_new, **kw)
torch.cuda.synchronize()

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    out = m.generate(prompt, max_new_tokens=n_new, **kw)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e6

kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
if phase == "decode":
    # Decode steps only: every step launches the same kernels, so the period of the name sequence
    # is a step. Searched from the end, past a tail that is not a whole step (a step launched ahead
    # and left unused, the last step's argmax); keep n_new - 4 steps (the first ones may still differ).
    kernels.sort(key=lambda e: e.time_range.start)
    names = [e.name for e in kernels]

    def periodic(k, o):
        end = len(names) - o
        return end >= 3 * k and names[end - k:end] == names[end - 2 * k:end - k] == names[end - 3 * k:end - 2 * k]
    period, tail = next(((k, o) for o in range(0, 64) for k in range(1, (len(names) - o) // 3 + 1) if periodic(k, o)), (len(names), 0))
    steps = max(1, min(n_new - 4, (len(names) - tail) // period))
    kernels = kernels[len(names) - tail - steps * period:len(names) - tail]
else:
    steps = 1
kernels.sort(key=lambda e: e.time_range.start)
spans = [(e.time_range.start, e.time_range.end) for e in kernels]
busy, cur_s, cur_e = 0.0, None, None
for s, e in spans:
    if cur_e is None or s > cur_e:
        busy += (cur_e - cur_s) if cur_e is not None else 0.0
        cur_s, cur_e = s, e
    else:
        cur_e = max(cur_e, e)
busy += (cur_e - cur_s) if cur_e is not None else 0.0
span = spans[-1][1] - spans[0][0] if spans else 0.0

by = {}
for e in kernels:
    d = e.time_range.end - e.time_range.start
    n, t = by.get(e.name, (0, 0.0))
    by[e.name] = (n + 1, t + d)
total = sum(t for _, t in by.values()) or 1.0
print(f"{model_name} {phase}: prompt {n_prompt}, new {n_new}; timings {out.timings}")
print(f"{'kernel':46} {'calls/step':>10} {'avg us':>8} {'us/step':>9} {'share':>6}")
for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
    print(f"{name[:46]:46} {n / steps:10.1f} {t / n:8.2f} {t / steps:9.1f} {t / total:6.1%}")
print(f"per step: kernels {total / steps:.1f} us (sum), busy {busy / steps:.1f} us (union), "
      f"span {span / steps:.1f} us, idle {(span - busy) / steps:.1f} us; {len(kernels) / steps:.0f} launches; "
      f"wall of the generate {wall:.0f} us")
# Where the GPU waits: the longest stretches with no kernel running, and the kernels around them.
gaps, end, last = [], None, None
for e in kernels:
    if end is not None and e.time_range.start > end:
        gaps.append((e.time_range.start - end, last.name, e.name))
    if end is None or e.time_range.end > end:
        end, last = e.time_range.end, e
gaps.sort(reverse=True)
print(f"idle stretches: {len(gaps)}, sum {sum(g[0] for g in gaps) / steps:.1f} us a step; longest:")
for g, a, b in gaps[:6]:
    print(f"  {g:8.1f} us after {a[:40]} before {b[:40]}")
if phase == "decode" and steps > 2:
    # The gaps every step has: position i of the step's launch sequence, the median over the steps of
    # the idle time just before it (none while something before it still runs). Sums to the idle a
    # step has on its own, without the few long stretches (a decode graph captured again when the
    # launch shape changes with the context, and the eager step before it).
    per_step = len(kernels) // steps
    med = []
    for i in range(per_step):
        g = []
        for s in range(steps):
            j = s * per_step + i
            if j == 0:
                continue
            end = max(e.time_range.end for e in kernels[max(0, j - 8):j])
            g.append(max(0.0, kernels[j].time_range.start - end))
        g.sort()
        med.append((g[len(g) // 2] if g else 0.0, i))
    print(f"median gaps a step: sum {sum(m for m, _ in med):.1f} us; largest (position: before / after):")
    for m, i in sorted(med, reverse=True)[:int(os.environ.get("TRACE_GAPS", "12"))]:
        print(f"  {m:6.2f} us at {i:4d}: after {kernels[i - 1].name[:34] if i else '-'} before {kernels[i].name[:34]}")
