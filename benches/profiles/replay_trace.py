"""Where a decode step's time goes, GPU or host, per model (on the GPU machine):

    python3 benches/profiles/replay_trace.py Qwen3-0.6B Qwen3-30B-A3B

Each model decodes 300 greedy tokens twice: with every step's CUDA graph launched once (as always) and
twice (QWEN3RS_CUDA_REPLAYS=2: the repeat recomputes the same step, same inputs, cache slot and logits,
so it adds the graph's own GPU time and nothing of the host's; the tokens must come out the same).
graph = the difference a step; outside = the rest of a step (argmax, the token read, the host's turn,
the next launch). That assumes the repeat costs what the step does: for a MoE model it reads the same
experts again, warm in the TLBs (RESULTS.md run 20.6), so there the split is an upper bound on outside.
QWEN3RS_CUDA_TRACE=1 also prints the host's own time per replay every 100 steps (wait, dry pass,
launch; RESULTS.md run 14). Imports qwen3rs from /tmp/q (gpu_check.sh installs it there).
"""
import os
import sys

sys.path.insert(0, "/tmp/q")
os.environ["QWEN3RS_CUDA_TRACE"] = "1"
import qwen3rs  # noqa: E402

for name in sys.argv[1:]:
    us, tokens = {}, {}
    for replays in (1, 2):
        os.environ["QWEN3RS_CUDA_REPLAYS"] = str(replays)  # read at load
        m = qwen3rs.load("dummy:" + name, device="cuda", max_seq_len=1024, max_batch=1, progress=False)
        kw = dict(raw=True, temperature=0.0, ignore_eos=True)
        m.generate(list(range(100, 116)), max_new_tokens=8, **kw)  # kernels, graphs captured
        o = m.generate(list(range(200, 216)), max_new_tokens=301, **kw)
        us[replays], tokens[replays] = 1e6 / o.timings["decode_tok_s"], o.token_ids
        print(f"{name}, graph launched {replays}x a step: {us[replays]:.0f} us a step", flush=True)
        del m
    graph = us[2] - us[1]
    print(f"{name}: step {us[1]:.0f} us = graph {graph:.0f} us (GPU) + outside it {us[1] - graph:.0f} us; "
          f"same tokens with the repeat: {tokens[1] == tokens[2]}", flush=True)
