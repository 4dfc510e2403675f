import sys, time
sys.path.insert(0, "/tmp/q")
import qwen3rs
import os
m = qwen3rs.load("dummy:" + os.environ.get("PROBE_MODEL", "Qwen3-0.6B"), device="cuda", max_seq_len=1024, max_batch=1, progress=False)
kw = dict(raw=True, temperature=0.0, ignore_eos=True)
m.generate(list(range(100, 116)), max_new_tokens=4, **kw)
o = m.generate(list(range(200, 216)), max_new_tokens=6, **kw)
print("decode tok/s", o.timings["decode_tok_s"], flush=True)
