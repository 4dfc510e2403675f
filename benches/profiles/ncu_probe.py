"""What ncu_run.sh profiles: a dummy model (PROBE_MODEL, default Qwen3-0.6B) on cuda, a warm-up generate,
then one generate of PROBE_PROMPT prompt tokens (default 16) and PROBE_NEW new tokens (default 6).
Decode steps by default; PROBE_PROMPT=2048 PROBE_NEW=1 puts a 2k prefill in the profiled launches."""
import os
import sys

sys.path.insert(0, "/tmp/q")
import qwen3rs  # noqa: E402

n_prompt = int(os.environ.get("PROBE_PROMPT", "16"))
n_new = int(os.environ.get("PROBE_NEW", "6"))
m = qwen3rs.load("dummy:" + os.environ.get("PROBE_MODEL", "Qwen3-0.6B"), device="cuda", max_seq_len=max(1024, n_prompt + 64),
                 max_batch=1, progress=False)
kw = dict(raw=True, temperature=0.0, ignore_eos=True)
m.generate([100 + i % 1000 for i in range(n_prompt)], max_new_tokens=min(n_new, 4), **kw)
o = m.generate([200 + i % 1000 for i in range(n_prompt)], max_new_tokens=n_new, **kw)
print("prefill tok/s", o.timings.get("prefill_tok_s"), "decode tok/s", o.timings["decode_tok_s"], flush=True)
