"""Host time of CUDA-graph replays (QWEN3RS_CUDA_TRACE=1; RESULTS.md run 14) and decode speed, per model.

    python3 benches/profiles/replay_trace.py Qwen3-0.6B Qwen3-8B Qwen3-30B-A3B   # on the GPU machine
"""
import os, sys, time
sys.path.insert(0, "/tmp/q")
os.environ["QWEN3RS_CUDA_TRACE"] = "1"
import qwen3rs
for name in sys.argv[1:]:
    m = qwen3rs.load("dummy:" + name, device="cuda", max_seq_len=1024, max_batch=1, progress=False)
    kw = dict(raw=True, temperature=0.0, ignore_eos=True)
    m.generate(list(range(100, 116)), max_new_tokens=8, **kw)
    t0 = time.perf_counter()
    o = m.generate(list(range(200, 216)), max_new_tokens=301, **kw)
    wall = time.perf_counter() - t0
    print(f"{name}: decode {o.timings['decode_tok_s']:.1f} tok/s = {1e6 / o.timings['decode_tok_s']:.0f} us/step (wall {wall:.2f} s)", flush=True)
    del m
