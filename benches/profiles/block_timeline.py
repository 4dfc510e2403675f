"""Block timeline of a decode step on the GPU (profiling; RESULTS.md session 19).

    python3 benches/profiles/block_timeline.py [--model Qwen3-30B-A3B] [--tokens 40] [--csv FILE]
    python3 benches/profiles/block_timeline.py --analyse FILE [--plane N]

Builds the kernels with BLOCK_TIMELINE (common.cuh `Timeline`: each block of an instrumented kernel
records its SM and %globaltimer at entry, at the end of its grid_dependency() wait and at its last
warp's exit; the build adds a barrier and a few atomics to every block, so compare it with itself),
decodes greedily on a dummy model, and gets the records through QWEN3RS_CUDA_TIMELINE (written when
the model's GPU is dropped). Then, for the last whole decode step (embed .. argmax_rows), per kernel of
a layer (the median over the layers, µs from the end of the kernel ahead's last block):

    start   its first / last block's entry (negative: the block was resident before the kernel ahead ended)
    wait    its first / last block's wait returning (the launch boundary's latency)
    end     its blocks' exits: first, 10th, 50th, 90th percentile, last
    early   how many of its blocks entered before the kernel ahead ended

then the median block's marks (common.cuh TL_MARK) after its own wait, each mark's spread over the
blocks (what a cluster barrier or the kernel behind waits out), and each kernel's µs a step. With
--plane N (the decode attention's blocks a split: its grid's x·y, e.g. 16 on Qwen3-30B-A3B, 8 on
Qwen3-0.6B), the decode attention's marks and exits by split (block // N; the last split holds the
step's own key), µs after the kernel ahead's last exit.

Kernels not instrumented (gather_rows, ...) show up only as gaps.
"""

import argparse
import csv
import gc
import os
import statistics
import sys


FIELDS = ("block", "grid", "smid", "t0", "wait", "end", "m0", "m1", "m2", "m3")


def record(model, tokens, path):
    defines = os.environ.get("QWEN3RS_CUDA_DEFINES", "")
    os.environ["QWEN3RS_CUDA_DEFINES"] = (defines + " BLOCK_TIMELINE=1").strip()
    os.environ["QWEN3RS_CUDA_TIMELINE"] = path
    if os.path.isdir("/usr/local/cuda/include"):
        os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    import qwen3rs

    m = qwen3rs.load(f"dummy:{model}", device="cuda", dtype="bfloat16", max_seq_len=1024, max_batch=1, progress=False)
    prompt = [(i * 7919) % 100000 + 1 for i in range(16)]
    kw = dict(raw=True, temperature=0.0, ignore_eos=True)
    m.generate(prompt, max_new_tokens=16, **kw)  # warm-up: kernels load, the decode graph is captured
    out = m.generate(prompt, max_new_tokens=tokens, **kw)
    print(f"{model}: {out.timings['decode_tok_s']:.1f} tok/s with the timeline build", flush=True)
    del m, out
    gc.collect()
    if not os.path.exists(path):
        sys.exit(f"{path} was not written (is the model still referenced?)")


def launches(rows):
    """The records in entry order, cut into launches: a run of one kernel, cut where a block repeats."""
    rows = sorted(rows, key=lambda r: r["t0"])
    out, seen = [], set()
    for r in rows:
        key = (r["module"], r["kernel"])
        if not out or out[-1]["key"] != key or r["block"] in seen:
            out.append({"key": key, "name": r["kernel"], "blocks": []})
            seen = set()
        seen.add(r["block"])
        out[-1]["blocks"].append(r)
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]


def by_split(step, plane):
    """The decode attention's blocks grouped by split (block // plane): per split, the median over the
    step's launches of the median block's marks m0..m3 and exit, µs after the kernel ahead's last exit."""
    per = {}
    for prev, cur in zip(step, step[1:]):
        if not cur["name"].startswith("attention_decode"):
            continue
        ref = max(b["end"] for b in prev["blocks"])
        groups = {}
        for b in cur["blocks"]:
            groups.setdefault(b["block"] // plane, []).append(b)
        for s, bs in groups.items():
            cells = []
            for f in ("m0", "m1", "m2", "m3", "end"):
                xs = [(b[f] - ref) / 1e3 for b in bs if b[f]]
                cells.append(statistics.median(xs) if xs else None)
            per.setdefault(s, []).append(cells)
    return {s: [statistics.median([c[i] for c in v if c[i] is not None]) if any(c[i] is not None for c in v) else None
                for i in range(5)] for s, v in sorted(per.items())}


def analyse(path, plane=None):
    with open(path) as f:
        rows = [dict(r, **{k: int(r[k]) for k in FIELDS}) for r in csv.DictReader(f)]
    ls = launches(rows)
    starts = [i for i, l in enumerate(ls) if l["name"] == "embed"]
    ends = [i for i, l in enumerate(ls) if l["name"] == "argmax_rows"]
    steps = [(s, min(e for e in ends if e > s)) for s in starts if any(e > s for e in ends)]
    if not steps:
        sys.exit("no whole decode step (embed .. argmax_rows) in the records")
    s0, s1 = steps[-2] if len(steps) > 1 else steps[-1]
    step = ls[s0 : s1 + 1]
    t_begin = min(b["t0"] for b in step[0]["blocks"])
    t_end = max(b["end"] for b in step[-1]["blocks"])
    print(f"decode step: {len(step)} instrumented launches, {(t_end - t_begin) / 1e3:.1f} µs from embed's entry to argmax's exit")
    stats = {}
    order = []
    for prev, cur in zip(step, step[1:]):
        ref = max(b["end"] for b in prev["blocks"])
        bs = cur["blocks"]
        us = lambda t: (t - ref) / 1e3  # noqa: E731
        waits = [b["wait"] for b in bs if b["wait"]]
        ends_ = [b["end"] for b in bs]
        key = (prev["name"], cur["name"])
        if key not in stats:
            order.append(key)
            stats[key] = []
        stats[key].append(
            {
                "blocks": len(bs),
                "sms": len({b["smid"] for b in bs}),
                "early": sum(b["t0"] < ref for b in bs),
                "start": (us(min(b["t0"] for b in bs)), us(max(b["t0"] for b in bs))),
                "wait": (us(min(waits)), us(max(waits))) if waits else (float("nan"),) * 2,
                "end": tuple(us(pct(ends_, p)) for p in (0, 0.1, 0.5, 0.9, 1)),
                # each mark across the blocks that set it, µs after the kernel ahead's last exit
                "spread": {
                    f: tuple(us(pct([b[f] for b in bs if b[f]], p)) for p in (0, 0.1, 0.5, 0.9, 1))
                    for f in ("m0", "m1", "m2", "m3")
                    if any(b[f] for b in bs)
                },
                # a block's marks and end, µs after its own wait (median over the blocks; None: unmarked)
                "after_wait": tuple(
                    statistics.median([(b[f] - b["wait"]) / 1e3 for b in bs if b[f] and b["wait"]]) if any(b[f] for b in bs) else None
                    for f in ("m0", "m1", "m2", "m3", "end")
                ),
            }
        )
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\n{'kernel (after)':58} {'n':>3} {'blk':>4} {'SMs':>3} {'early':>5} {'start first/last':>16} {'wait first/last':>16} {'end first/p10/p50/p90/last µs':>32}")
    for key in order:
        v = stats[key]
        f = lambda name, i: med([x[name][i] for x in v])  # noqa: E731
        start = f"{f('start', 0):7.2f}/{f('start', 1):<7.2f}"
        wait = f"{f('wait', 0):7.2f}/{f('wait', 1):<7.2f}"
        end = "/".join(f"{f('end', i):.2f}" for i in range(5))
        name = f"{key[1]} (after {key[0]})"
        blocks, sms, early = (med([x[n] for x in v]) for n in ("blocks", "sms", "early"))
        print(f"{name:58} {len(v):3d} {blocks:4.0f} {sms:3.0f} {early:5.0f} {start:>16} {wait:>16} {end:>32}")
    print("\nµs after a block's own wait (median block, median launch): marks m0 (stage_input's end; the attention: q normed),")
    print("m1 (gate/up: routed; the attention: keys done; the plain and q/k/v products: thread 0's row summed; the router: its")
    print("logit summed; down: thread 0's first round of rows summed), m2 (the attention: warps merged; down: its last round),")
    print("m3 (the attention: past the cluster barrier; down: past the pass's barrier), end")
    for key in order:
        v = stats[key]
        cells = []
        for i in range(5):
            xs = [x["after_wait"][i] for x in v if x["after_wait"][i] is not None]
            cells.append(f"{med(xs):6.2f}" if xs else "     -")
        print(f"  {key[1]:34} {' '.join(cells)}")
    print("\nEach mark across the blocks (first/p10/p50/p90/last block, median launch), µs after the kernel ahead's last exit")
    print("(a spread here that a barrier or the next kernel waits out):")
    for key in order:
        v = stats[key]
        for f in ("m0", "m1", "m2", "m3"):
            xs = [x["spread"][f] for x in v if f in x["spread"]]
            if xs:
                print(f"  {key[1]:34} {f} " + "/".join(f"{med([x[i] for x in xs]):.2f}" for i in range(5)))
    per_kernel = {}
    for key in order:
        per_kernel[key] = med([x["end"][4] for x in stats[key]]) * len(stats[key])
    print("\nµs a step from the kernel ahead's last exit to this kernel's last exit (sum over the step's launches):")
    for key in sorted(per_kernel, key=per_kernel.get, reverse=True):
        print(f"  {key[1]:34} after {key[0]:34} {per_kernel[key]:8.1f}")
    if plane:
        print(f"\nThe decode attention by split (blocks // {plane}), median block, µs after the kernel ahead's last exit:")
        print(f"  {'split':>5} {'m0':>6} {'m1':>6} {'m2':>6} {'m3':>6} {'end':>6}")
        for s, cells in by_split(step, plane).items():
            print(f"  {s:5d} " + " ".join(f"{c:6.2f}" if c is not None else "     -" for c in cells))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen3-30B-A3B")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "/tmp"), "block_timeline.csv"))
    ap.add_argument("--analyse", help="only analyse this CSV")
    ap.add_argument("--plane", type=int, help="the decode attention's blocks a split (its grid's x*y): print it by split")
    a = ap.parse_args()
    if a.analyse:
        return analyse(a.analyse, a.plane)
    record(a.model, a.tokens, a.csv)
    analyse(a.csv, a.plane)


if __name__ == "__main__":
    main()
