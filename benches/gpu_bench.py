"""GPU benchmark of qwen3rs against the peers, in one device call (issue 6).

    python3 benches/gpu_bench.py [PEERS_DIR] [--models Qwen3-0.6B,Qwen3-8B,...] [--budget SECONDS] [--hf]

For each model (dummy weights of the official shapes, bf16, batch 1, greedy): decode tok/s after a
16-token prompt (128+ tokens, after a warm-up run), prefill tok/s of a 2,048-token prompt, and for
Qwen3-8B decode at 8k and 32k context. Each model runs in its own subprocess (device memory is
freed when it exits; a crash or a timeout costs only that model). The roofline is the measured
device-to-device copy bandwidth (bytes read + written, torch, in this call) over the bytes one
decode token must read: every non-expert weight, the top-k experts of each MoE layer, the lm_head,
and at long context the K and V cache. Then the torch.compile peer (PEERS_DIR/torch_fast_qwen3.py)
on the same shapes within what is left of the budget (and, with --hf, the transformers peer).
Prints a table last; writes everything to $OUT/gpu_bench.json.

Environment: QWEN3RS_BENCH_MODELS (comma list) overrides the default models; QWEN3RS_CUDA_GRAPHS=0
measures the eager decode path. qwen3rs is imported from PYTHONPATH, else from /tmp/q (where
scripts/gpu_check.sh installs the wheel), else the newest target/wheels/*.whl is installed there.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp/qwen3rs-gpu-out")
T0 = time.time()
DEFAULT_MODELS = ["Qwen3-0.6B", "Qwen3-8B", "Qwen3-30B-A3B", "Qwen3-32B"]
LONG_CONTEXT = {"Qwen3-8B": [8192, 32768]}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def import_qwen3rs():
    if os.path.isdir("/usr/local/cuda/include"):
        os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # NVRTC's headers, as gpu_check.sh
    try:
        import qwen3rs  # noqa: F401
        return
    except ImportError:
        pass
    if not os.path.isdir("/tmp/q/qwen3rs"):
        wheels = sorted(glob.glob(os.path.join(ROOT, "target/wheels/qwen3rs-*.whl")), key=os.path.getmtime)
        if not wheels:
            sys.exit("no qwen3rs importable and no wheel in target/wheels (run scripts/gpu_bundle.sh)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", "/tmp/q", wheels[-1]], check=True)
    sys.path.insert(0, "/tmp/q")
    os.environ["PYTHONPATH"] = "/tmp/q" + os.pathsep + os.environ.get("PYTHONPATH", "")


def config_of(name):
    with open(os.path.join(ROOT, "python/qwen3rs/configs", name + ".json")) as f:
        return json.load(f)


def decode_bytes(c, context=0):
    """Bytes one batch-1 decode token reads (bf16): active weights, lm_head, and the KV cache."""
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    n_layers = c["num_hidden_layers"]
    experts = c.get("num_experts", 0) or 0
    per_layer_attn = h * q * 2 + h * kv * 2 + 2 * h + 2 * hd
    sparse_step = c.get("decoder_sparse_step", 1) or 1
    mlp_only = set(c.get("mlp_only_layers", []) or [])
    params = 0
    for i in range(n_layers):
        params += per_layer_attn
        if experts and i not in mlp_only and (i + 1) % sparse_step == 0:
            params += experts * h + c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"]
        else:
            params += 3 * h * c["intermediate_size"]
    params += h + c["vocab_size"] * h  # final norm, lm_head (tied or not, it is read once)
    kv_bytes = 2 * n_layers * kv * context * 2
    return params * 2 + kv_bytes


# ---- subprocess modes ----


def run_bandwidth():
    import torch
    n = 1 << 30  # 1 GiB of bf16... as 2^29 elements of 2 bytes
    a = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        s.record()
        for _ in range(10):
            b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / 10)
    times.sort()
    print(json.dumps({"copy_TBps": 2 * n / times[len(times) // 2] / 1e12}))


def run_model(name, contexts, deadline):
    import qwen3rs
    c = config_of(name)
    r = {"model": name}
    longest = max(contexts + [2048])
    t = time.time()
    m = qwen3rs.load(f"dummy:{name}", device="cuda", dtype="bfloat16", max_seq_len=longest + 256, max_batch=1, progress=False)
    r["load_s"] = time.time() - t
    kw = dict(raw=True, temperature=0.0, ignore_eos=True)
    prompt = [(i * 7919) % 100000 + 1 for i in range(16)]
    m.generate(prompt, max_new_tokens=16, **kw)  # warm-up: kernels load, the decode graph is captured
    runs = [m.generate(prompt, max_new_tokens=129, **kw).timings["decode_tok_s"] for _ in range(3)]
    r["decode_tok_s"] = sorted(runs)[1]
    r["decode_runs"] = runs
    log(name, "decode", r["decode_tok_s"])
    # Decode as a chat user gets it by default (Qwen3's thinking-mode sampling: every step the host's
    # sampler draws from each row's k best logits, so no step is launched ahead): one run.
    sampled = dict(raw=True, temperature=0.6, top_k=20, top_p=0.95, seed=1, ignore_eos=True)
    r["decode_sampled_tok_s"] = m.generate(prompt, max_new_tokens=129, **sampled).timings["decode_tok_s"]
    log(name, "decode sampled", r["decode_sampled_tok_s"])
    print("RESULT " + json.dumps(r), flush=True)  # partial results survive a later timeout
    long = [(i * 104729) % 150000 + 1 for i in range(2048)]
    m.generate(long, max_new_tokens=1, **kw)  # warm-up at prefill shapes
    runs = [m.generate(long, max_new_tokens=1, **kw).timings["prefill_tok_s"] for _ in range(3)]
    r["prefill_2048_tok_s"] = sorted(runs)[1]
    r["prefill_runs"] = runs
    log(name, "prefill", r["prefill_2048_tok_s"])
    print("RESULT " + json.dumps(r), flush=True)
    # Long contexts: prefill cost grows ~quadratically (attention) from the 2k figure; skip a
    # context that would not finish before the deadline.
    per_token_s, done_ctx = 1.0 / max(r["prefill_2048_tok_s"], 1.0), 2048
    for ctx in contexts:
        estimate = per_token_s * done_ctx * (ctx / done_ctx) ** 2 + 5
        if time.time() + estimate > deadline:
            r[f"decode_at_{ctx}_tok_s"] = None
            r[f"skipped_{ctx}"] = f"estimated {estimate:.0f} s of prefill, past the time budget"
            log(name, f"context {ctx} skipped ({estimate:.0f} s estimated)")
            continue
        ids = [(i * 104729) % 150000 + 1 for i in range(ctx)]
        o = m.generate(ids, max_new_tokens=65, **kw)
        r[f"decode_at_{ctx}_tok_s"] = o.timings["decode_tok_s"]
        r[f"prefill_{ctx}_s"] = o.timings["prefill_s"]
        per_token_s, done_ctx = o.timings["prefill_s"] / ctx, ctx
        log(name, f"context {ctx}", r[f"decode_at_{ctx}_tok_s"], f"(prefill {o.timings['prefill_s']:.1f} s)")
        print("RESULT " + json.dumps(r), flush=True)


def subprocess_json(args, timeout, env=None, prefix=None):
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=max(timeout, 5), env=env)
        out = p.stdout
        rc = p.returncode
        err = p.stderr[-2000:]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout) or ""
        rc, err = "timeout", ""
    lines = [ln for ln in out.splitlines() if (ln.startswith(prefix) if prefix else ln.strip().startswith("{"))]
    return out, err, rc, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("peers", nargs="?", default=None)
    ap.add_argument("--models", default=os.environ.get("QWEN3RS_BENCH_MODELS", ",".join(DEFAULT_MODELS)))
    ap.add_argument("--budget", type=float, default=float(os.environ.get("QWEN3RS_BENCH_BUDGET", 330)))
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--one", default=None)
    ap.add_argument("--deadline", type=float, default=0.0)
    ap.add_argument("--bandwidth", action="store_true")
    a = ap.parse_args()
    if a.bandwidth:
        return run_bandwidth()
    import_qwen3rs()
    if a.one:
        return run_model(a.one, LONG_CONTEXT.get(a.one, []), a.deadline or time.time() + 600)
    os.makedirs(OUT, exist_ok=True)
    models = [x for x in a.models.split(",") if x]
    res = {"graphs": os.environ.get("QWEN3RS_CUDA_GRAPHS", "1"), "models": {}, "peers": {}}
    out, err, rc, lines = subprocess_json([sys.executable, __file__, "--bandwidth"], 60)
    res["copy_TBps"] = json.loads(lines[-1])["copy_TBps"] if lines else 4.25
    log("copy bandwidth", res["copy_TBps"], "TB/s", "" if lines else f"(not measured: rc={rc} {err[-300:]}; using 4.25)")
    # Our models first, each with a share of the budget (long context and 32B need more).
    weight = {"Qwen3-0.6B": 1, "Qwen3-8B": 3, "Qwen3-30B-A3B": 2, "Qwen3-32B": 2}
    peer_share = 0.3 if a.peers else 0.0
    ours = a.budget * (1 - peer_share)
    total_w = sum(weight.get(m, 2) for m in models)
    for name in models:
        left = a.budget * (1 - peer_share) - (time.time() - T0)
        share = min(left, ours * weight.get(name, 2) / total_w + 20)
        if share < 20:
            log("budget: skip", name)
            res["models"][name] = {"skipped": "time budget"}
            continue
        deadline = time.time() + share - 5
        out, err, rc, lines = subprocess_json([sys.executable, __file__, "--one", name, "--deadline", str(deadline)], share, prefix="RESULT ")
        with open(os.path.join(OUT, f"bench_{name}.log"), "w") as f:
            f.write(out + "\n---- stderr ----\n" + err)
        r = json.loads(lines[-1][len("RESULT "):]) if lines else {"error": f"rc={rc}: {err[-400:]}"}
        if rc != 0:
            r["rc"] = rc  # e.g. "timeout": the figures above are what finished before it
        c = config_of(name)
        r["roofline_tok_s"] = res["copy_TBps"] * 1e12 / decode_bytes(c)
        if "decode_tok_s" in r:
            r["fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]
        for ctx in LONG_CONTEXT.get(name, []):
            r[f"roofline_at_{ctx}_tok_s"] = res["copy_TBps"] * 1e12 / decode_bytes(c, ctx)
        res["models"][name] = r
        log(name, {k: v for k, v in r.items() if not k.endswith("_runs")})
        json.dump(res, open(os.path.join(OUT, "gpu_bench.json"), "w"), indent=1)
    # Peers in what is left.
    if a.peers:
        cfg_dir = os.path.join(ROOT, "python/qwen3rs/configs")
        left = a.budget - (time.time() - T0)
        peer_models = [m for m in models if m != "Qwen3-32B" or left > 200]
        fast = os.path.join(a.peers, "torch_fast_qwen3.py")
        if os.path.isfile(fast) and left > 30:
            env = dict(os.environ, OUT=OUT)
            out, err, rc, lines = subprocess_json([sys.executable, fast, cfg_dir] + peer_models, left - 10, env=env)
            with open(os.path.join(OUT, "peer_torch_fast.log"), "w") as f:
                f.write(out + "\n---- stderr ----\n" + err)
            try:
                res["peers"]["torch_fast"] = json.loads(out[out.index("{\n"):])
            except ValueError:
                try:
                    res["peers"]["torch_fast"] = json.load(open(os.path.join(OUT, "torch_fast.json")))
                except (OSError, ValueError):
                    res["peers"]["torch_fast"] = {"error": f"rc={rc} {err[-300:]}"}
        hf = os.path.join(a.peers, "hf_transformers_qwen3.py")
        left = a.budget - (time.time() - T0)
        if a.hf and os.path.isfile(hf) and left > 60:
            out, err, rc, lines = subprocess_json([sys.executable, hf], left - 10, env=dict(os.environ, OUT=OUT))
            try:
                res["peers"]["hf"] = json.loads(out[out.index("{\n"):])
            except ValueError:
                res["peers"]["hf"] = {"error": f"rc={rc} {err[-300:]}"}
    json.dump(res, open(os.path.join(OUT, "gpu_bench.json"), "w"), indent=1)
    # The table, last.
    tf = res["peers"].get("torch_fast", {})
    print()
    print(f"copy bandwidth {res['copy_TBps']:.2f} TB/s; CUDA graphs {res['graphs']}; total {time.time() - T0:.0f} s")
    print(f"{'model':<15} {'roofline':>9} {'decode':>8} {'frac':>6} {'peer dec':>9} {'prefill2k':>10} {'peer pre':>9}  {'load':>6}  extra")
    for name, r in res["models"].items():
        p = tf.get(name, {}) if isinstance(tf, dict) else {}
        extra = (f"sampled {r['decode_sampled_tok_s']:.0f} " if r.get("decode_sampled_tok_s") else "") + " ".join(f"ctx{ctx // 1024}k {r[f'decode_at_{ctx}_tok_s']:.0f}/{r[f'roofline_at_{ctx}_tok_s']:.0f}"
                         for ctx in LONG_CONTEXT.get(name, []) if r.get(f"decode_at_{ctx}_tok_s"))
        if "error" in r or "skipped" in r:
            extra = (r.get("error") or r.get("skipped", ""))[-120:].replace("\n", " ")

        def f(v, fmt="{:.0f}"):
            return fmt.format(v) if isinstance(v, (int, float)) else "-"
        print(f"{name:<15} {f(r.get('roofline_tok_s')):>9} {f(r.get('decode_tok_s')):>8} {f(r.get('fraction'), '{:.2f}'):>6} "
              f"{f(p.get('compiled_decode_tok_s')):>9} {f(r.get('prefill_2048_tok_s')):>10} {f(p.get('prefill_2048_tok_s')):>9}  "
              f"{f(r.get('load_s'), '{:.1f}'):>5}s  {extra}")


if __name__ == "__main__":
    main()
