"""Tokenizer throughput, side by side in one run: qwen3rs vs HF `tokenizers` vs `tiktoken`
(an Encoding built from Qwen's ranks and pattern) on the conformance corpus, single-thread, plus
`encode_batch` scaling. Figures go in benches/RESULTS.md ("## Tokenizer").

    PYTHONPATH=python .venv/bin/pytest benches/bench_tokenizer.py --benchmark-only -s
"""

import json
import os
from pathlib import Path

import pytest

import qwen3rs

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_JSON = ROOT / "python" / "qwen3rs" / "tokenizer" / "tokenizer.json"
CASES = [json.loads(line) for line in (ROOT / "tests/fixtures/tokenizer/encode.jsonl").read_text("utf-8").splitlines()]
TEXTS = [c["text"] for c in CASES]
NBYTES = sum(len(t.encode()) for t in TEXTS)
# Batch scaling: enough work per call that thread start-up doesn't dominate.
BATCH = TEXTS * 16
BATCH_BYTES = NBYTES * 16
RESULTS = {}


def build_tiktoken():
    """tiktoken Encoding from Qwen's vocab: byte-level token strings → bytes, ranks = ids."""
    data = json.loads(TOKENIZER_JSON.read_text("utf-8"))
    byte_of = {}
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = 0
    for b in range(256):
        if b in printable:
            byte_of[chr(b)] = b
        else:
            byte_of[chr(256 + extra)] = b
            extra += 1
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in data["model"]["vocab"].items()}
    special = {t["content"]: t["id"] for t in data["added_tokens"]}
    pattern = data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    return tiktoken.Encoding("qwen3", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


OURS = qwen3rs.Tokenizer.from_file(TOKENIZER_JSON)
HF = tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))
TIK = build_tiktoken()

ENCODERS = {
    "qwen3rs": lambda t: OURS.encode(t),
    "hf_tokenizers": lambda t: HF.encode(t, add_special_tokens=False).ids,
    "tiktoken": lambda t: TIK.encode(t, allowed_special="all"),
}


def record(benchmark, key, nbytes):
    mbps = nbytes / benchmark.stats.stats.median / 1e6
    benchmark.extra_info["MB/s"] = round(mbps, 2)
    RESULTS[key] = mbps


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encode_single_thread(benchmark, name):
    encode = ENCODERS[name]
    exact = sum(encode(c["text"]) == c["ids"] for c in CASES)
    benchmark.extra_info["exact_lines"] = f"{exact}/{len(CASES)}"
    benchmark(lambda: [encode(t) for t in TEXTS])
    record(benchmark, f"single/{name}", NBYTES)
    print(f"\n{name}: {RESULTS[f'single/{name}']:.1f} MB/s single-thread, exact on {exact}/{len(CASES)} lines")


@pytest.mark.parametrize("mode", ["qwen3rs_loop", "qwen3rs_batch", "hf_batch"])
def test_encode_batch_scaling(benchmark, mode):
    if mode == "qwen3rs_loop":
        benchmark(lambda: [OURS.encode(t) for t in BATCH])
    elif mode == "qwen3rs_batch":
        assert OURS.encode_batch(TEXTS) == [c["ids"] for c in CASES]
        benchmark(lambda: OURS.encode_batch(BATCH))
    else:
        benchmark(lambda: HF.encode_batch(BATCH, add_special_tokens=False))
    record(benchmark, f"batch/{mode}", BATCH_BYTES)
    print(f"\n{mode}: {RESULTS[f'batch/{mode}']:.1f} MB/s on {os.cpu_count()} cores")


def test_zz_summary(benchmark):
    """Ratios of the figures above (runs last: pytest keeps file order). The benchmark fixture is
    only there so that --benchmark-only runs this too."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if "single/qwen3rs" not in RESULTS:
        pytest.skip("benchmarks did not run")
    ours = RESULTS["single/qwen3rs"]
    print(f"\ncorpus: {len(TEXTS)} texts, {NBYTES} bytes")
    for other in ("hf_tokenizers", "tiktoken"):
        if f"single/{other}" in RESULTS:
            print(f"qwen3rs / {other}: {ours / RESULTS[f'single/{other}']:.1f}x")
    if "batch/qwen3rs_loop" in RESULTS and "batch/qwen3rs_batch" in RESULTS:
        print(f"encode_batch / loop: {RESULTS['batch/qwen3rs_batch'] / RESULTS['batch/qwen3rs_loop']:.2f}x")
