"""Same-call A/B of kernel constants and switches, without rebuilding the wheel (issue 6 tuning).

    python3 benches/kernel_sweep.py --models Qwen3-0.6B,Qwen3-30B-A3B --rounds 2 \
        "" "GV_UNROLL=4" "MD_SLOTS=4" "QWEN3RS_CUDA_PDL=0"

Each variant is a space-separated list of NAME=VALUE: names starting with QWEN3RS_ are environment
switches (README, "GPU"), the others tunable kernel constants passed through QWEN3RS_CUDA_DEFINES
(src/backend/cuda/compile.rs `TUNABLE`); "" is the build as it is; PYTHONPATH=DIR runs another build
installed there (`pip install --no-deps --target DIR OTHER.whl`: two wheels A/B in one call). Every round runs every variant of
every model once, interleaved (variants next to each other on the same machine state; round r starts
at variant r, so that none always runs first), each in its
own process through `gpu_bench.py --one`. Prints per model and variant the best decode, sampled decode and prefill
tok/s over the rounds and the ratio to the first variant; writes $OUT/kernel_sweep.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("OUT", "/tmp/qwen3rs-gpu-out")


def env_of(variant):
    env = dict(os.environ)
    defines = []
    for item in variant.split():
        name, _, value = item.partition("=")
        if name.startswith("QWEN3RS_") or name == "PYTHONPATH":
            env[name] = value
        else:
            defines.append(item)
    env["QWEN3RS_CUDA_DEFINES"] = " ".join(defines)
    return env


def run_one(model, variant, seconds):
    cmd = [sys.executable, os.path.join(HERE, "gpu_bench.py"), "--one", model, "--deadline", str(time.time() + seconds - 5)]
    try:
        p = subprocess.run(cmd, env=env_of(variant), capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {"error": f"rc={p.returncode}: {p.stderr[-300:]}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--models", default="Qwen3-0.6B")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60, help="limit of one run")
    a = ap.parse_args()
    models = [m for m in a.models.split(",") if m]
    runs = {(m, v): [] for m in models for v in a.variants}
    for r in range(a.rounds):
        for m in models:
            # Each round starts at the next variant: the variant run first was the slower one on 32B in
            # both calls of RESULTS.md runs 19.2 / 19.3 (thermal or clock state), so no variant always goes first.
            k = r % len(a.variants)
            for v in a.variants[k:] + a.variants[:k]:
                res = run_one(m, v, a.seconds)
                runs[(m, v)].append(res)
                print(f"round {r} {m} [{v}]: decode {res.get('decode_tok_s', '-')} prefill {res.get('prefill_2048_tok_s', '-')}"
                      f"{' ' + res['error'][-200:] if 'error' in res else ''}", flush=True)
    os.makedirs(OUT, exist_ok=True)
    json.dump({f"{m} [{v}]": x for (m, v), x in runs.items()}, open(os.path.join(OUT, "kernel_sweep.json"), "w"), indent=1)

    def best(m, v, key):
        vals = [x[key] for x in runs[(m, v)] if isinstance(x.get(key), (int, float))]
        return max(vals) if vals else None

    keys = ["decode_tok_s", "decode_sampled_tok_s", "prefill_2048_tok_s"]
    print(f"\n{'model':<15} {'variant':<40} {'decode':>8} {'ratio':>6} {'sampled':>8} {'ratio':>6} {'prefill2k':>10} {'ratio':>6}")
    for m in models:
        base = [best(m, a.variants[0], key) for key in keys]
        for v in a.variants:
            cells = ""
            for key, b in zip(keys, base):
                x = best(m, v, key)
                width = 10 if key.startswith("prefill") else 8
                cells += f" {x or 0:>{width}.1f} {f'{x / b:.3f}' if x and b else '-':>6}"
            print(f"{m:<15} {(v or '(as built)')[:40]:<40}{cells}")


if __name__ == "__main__":
    main()
