"""Tensor-parallel benchmark (issue 8): one model split over N GPUs of one host, dummy weights, bf16, batch 1.

    python3 benches/multi_gpu_bench.py [--model Qwen3-32B] [--tp 2] [--timeout 540]
    python3 benches/multi_gpu_bench.py --model Qwen3-235B-A22B --tp 4,8
    python3 benches/multi_gpu_bench.py --model Qwen3-32B --tp 1,2      # scaling against one GPU
    python3 benches/multi_gpu_bench.py --model Qwen3-30B-A3B,Qwen3-235B-A22B --tp 2,4,8 --ep

--ep runs every MoE model at every tp >= 2 twice: experts split by columns (the default: each GPU
holds 1/tp of every expert's intermediate columns) and whole experts per GPU (expert_parallel=True:
each GPU holds 1/tp of the experts). Its roofline assumes the top-k experts spread evenly (k/tp
per GPU per token: the same bytes as the column split); a step waits for the GPU that got the most,
so whole experts land below it by their routing imbalance.

For each (model, tp): load time (each rank draws its own shards of the dummy weights on its GPU),
decode tok/s (greedy, 128 new tokens after a 16-token prompt, after a warm-up run; median of 3),
prefill tok/s of a 2,048-token prompt (after a warm-up; median of 3), and the roofline: the bytes one
decode token reads per GPU (its shards of every non-expert weight, of the top-k experts of each MoE
layer and of the lm_head, the replicated router and norms, and its KV heads at that context) over
the device-to-device copy bandwidth of each GPU measured in this run (torch, bytes read + written,
as benches/gpu_bench.py; the slowest GPU counts). The roofline leaves out the all-reduces (two per
layer), which at batch 1 are latency (~10-20 µs each over NVLink), not bandwidth: the gap between
decode and roofline is mostly theirs. Without torch the roofline column is left empty, with a note.

Each (model, tp) runs in its own subprocess (device memory is freed when it exits; a crash or a
timeout costs only that row). Reuses gpu_bench.py's import, config, bytes and bandwidth helpers.
Prints a markdown table last; writes everything to $OUT/multi_gpu_bench.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402  (helpers: import_qwen3rs, config_of, decode_bytes, the --bandwidth probe)

OUT = gpu_bench.OUT
PROMPT = [(i * 7919) % 100000 + 1 for i in range(16)]
LONG = [(i * 104729) % 150000 + 1 for i in range(2048)]
NEW_TOKENS = 129  # 128 decode steps after the token the prefill chooses


log = gpu_bench.log


def rank_config(c, tp):
    """The config one rank's shards have (as src/backend/tp.rs splits): heads, intermediate columns
    (dense and every expert's) and vocabulary divided by tp; KV heads divided, or one per rank,
    replicated, where ranks outnumber them; router, norms and hidden size whole."""
    r = dict(c)
    r["num_attention_heads"] = c["num_attention_heads"] // tp
    r["num_key_value_heads"] = max(c["num_key_value_heads"] // tp, 1)
    r["intermediate_size"] = c["intermediate_size"] // tp
    if c.get("num_experts"):
        r["moe_intermediate_size"] = c["moe_intermediate_size"] // tp
    r["vocab_size"] = c["vocab_size"] // tp
    return r


def decode_bytes_per_gpu(c, tp, context):
    """Bytes one batch-1 decode token reads on each GPU (gpu_bench.decode_bytes of a rank's shards)."""
    return gpu_bench.decode_bytes(rank_config(c, tp), context)


def copy_bandwidth(gpus, timeout=120):
    """Copy bandwidth (TB/s, read + written) of each GPU, probed at once in one subprocess per GPU;
    None for a GPU whose probe failed (no torch, say), with the reason."""
    procs = []
    for g in range(gpus):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(g))
        procs.append(subprocess.Popen([sys.executable, gpu_bench.__file__, "--bandwidth"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = "", "timeout"
        lines = [ln for ln in stdout.splitlines() if ln.strip().startswith("{")]
        out.append((json.loads(lines[-1])["copy_TBps"], None) if lines else (None, (stderr.strip().splitlines() or ["no output"])[-1][-200:]))
    return out


def label(tp, ep):
    return f"tp={tp}" + (" ep" if ep else "")


def run_one(model, tp, ep):
    """In the subprocess: load, decode, prefill; prints RESULT lines as figures come in."""
    gpu_bench.import_qwen3rs()
    import qwen3rs

    r = {"model": model, "tp": tp, "ep": ep}
    t = time.time()
    m = qwen3rs.load(f"dummy:{model}", device="cuda", dtype="bfloat16", max_seq_len=len(LONG) + 256, max_batch=1,
                     tensor_parallel=tp, expert_parallel=ep, progress=False)
    r["load_s"] = time.time() - t
    r["device"] = m.device
    log(model, label(tp, ep), f"loaded in {r['load_s']:.1f} s on {m.device}")
    print("RESULT " + json.dumps(r), flush=True)
    kw = dict(raw=True, temperature=0.0, ignore_eos=True)
    m.generate(PROMPT, max_new_tokens=16, **kw)  # warm-up: kernels load, the decode graph is captured
    runs = [m.generate(PROMPT, max_new_tokens=NEW_TOKENS, **kw).timings["decode_tok_s"] for _ in range(3)]
    r["decode_tok_s"], r["decode_runs"] = statistics.median(runs), runs
    log(model, label(tp, ep), "decode", runs)
    print("RESULT " + json.dumps(r), flush=True)
    m.generate(LONG, max_new_tokens=1, **kw)  # warm-up at prefill shapes
    runs = [m.generate(LONG, max_new_tokens=1, **kw).timings["prefill_tok_s"] for _ in range(3)]
    r["prefill_2048_tok_s"], r["prefill_runs"] = statistics.median(runs), runs
    log(model, label(tp, ep), "prefill", runs)
    print("RESULT " + json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen3-32B", help="bundled config name(s), comma-separated")
    ap.add_argument("--tp", default="2", help="tensor-parallel size(s), comma-separated (1 = one GPU)")
    ap.add_argument("--ep", action="store_true",
                    help="MoE models at tp >= 2 also with whole experts per GPU (expert_parallel=True), next to the column split")
    ap.add_argument("--timeout", type=float, default=540, help="seconds per (model, tp) subprocess")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "TP", "EP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return run_one(a.one[0], int(a.one[1]), a.one[2] == "1")
    models = [x for x in a.model.split(",") if x]
    sizes = [int(x) for x in a.tp.split(",") if x]
    os.makedirs(OUT, exist_ok=True)
    gpu_bench.import_qwen3rs()
    import qwen3rs

    gpus = qwen3rs.cuda_device_count()
    res = {"gpus": gpus, "graphs": os.environ.get("QWEN3RS_CUDA_GRAPHS", "1"), "rows": []}
    log(f"{gpus} CUDA GPU(s) usable" + ("" if gpus else f": {qwen3rs.cuda_unavailable_reason()}"))
    probes = copy_bandwidth(min(max(sizes), gpus))
    res["copy_TBps"] = [bw for bw, _ in probes]
    bad = [f"cuda:{g}: {why}" for g, (bw, why) in enumerate(probes) if bw is None]
    res["roofline_note"] = f"no copy bandwidth (roofline left out): {'; '.join(bad)}" if bad else None
    log("copy bandwidth per GPU (TB/s):", res["copy_TBps"], res["roofline_note"] or "")
    for model in models:
        c = gpu_bench.config_of(model)
        for tp, ep in [(tp, ep) for tp in sizes for ep in ([False, True] if a.ep and tp >= 2 and c.get("num_experts") else [False])]:
            if tp > gpus:
                res["rows"].append({"model": model, "tp": tp, "ep": ep, "error": f"needs {tp} GPU(s), {gpus} usable"})
                continue
            cmd = [sys.executable, __file__, "--one", model, str(tp), str(int(ep))]
            out, err, rc, lines = gpu_bench.subprocess_json(cmd, a.timeout, prefix="RESULT ")
            with open(os.path.join(OUT, f"multi_gpu_{model}_tp{tp}{'_ep' if ep else ''}.log"), "w") as f:
                f.write(out + "\n---- stderr ----\n" + err)
            r = json.loads(lines[-1][len("RESULT "):]) if lines else {"model": model, "tp": tp, "ep": ep, "error": f"rc={rc}: {err[-400:]}"}
            if rc != 0:
                r["rc"] = rc
                r.setdefault("error", f"rc={rc}: {err[-400:]}")
            ctx = len(PROMPT) + NEW_TOKENS // 2  # the mean context of the measured decode steps
            r["bytes_per_gpu"] = decode_bytes_per_gpu(c, tp, ctx)
            bws = res["copy_TBps"][:tp]
            if bws and all(bw is not None for bw in bws):
                r["roofline_tok_s"] = min(bws) * 1e12 / r["bytes_per_gpu"]
                if "decode_tok_s" in r:
                    r["fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]
            res["rows"].append(r)
            log(model, label(tp, ep), {k: v for k, v in r.items() if not k.endswith("_runs")})
            json.dump(res, open(os.path.join(OUT, "multi_gpu_bench.json"), "w"), indent=1)
    json.dump(res, open(os.path.join(OUT, "multi_gpu_bench.json"), "w"), indent=1)

    def f(v, fmt="{:.0f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    bw = [x for x in res["copy_TBps"] if x is not None]
    print()
    print(f"dummy weights, bf16, batch 1; copy bandwidth per GPU {', '.join(f'{x:.2f}' for x in bw) or '-'} TB/s; "
          f"CUDA graphs {res['graphs']}; total {time.time() - gpu_bench.T0:.0f} s")
    if res["roofline_note"]:
        print(res["roofline_note"])
    print()
    print("| model | tp | experts | load s | decode tok/s | roofline tok/s | of roofline | prefill 2k tok/s | GB read per GPU per token | note |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in res["rows"]:
        note = (r.get("error") or "")[-120:].replace("\n", " ").replace("|", "/")
        experts = "-" if r["tp"] < 2 or not gpu_bench.config_of(r["model"]).get("num_experts") else ("whole" if r.get("ep") else "columns")
        print(f"| {r['model']} | {r['tp']} | {experts} | {f(r.get('load_s'), '{:.1f}')} | {f(r.get('decode_tok_s'), '{:.1f}')} | "
              f"{f(r.get('roofline_tok_s'))} | {f(r.get('fraction'), '{:.2f}')} | {f(r.get('prefill_2048_tok_s'))} | "
              f"{f(r.get('bytes_per_gpu', 0) / 1e9, '{:.2f}') if r.get('bytes_per_gpu') else '-'} | {note} |")


if __name__ == "__main__":
    main()
