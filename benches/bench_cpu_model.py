"""CPU prefill and decode speed on random-weight real-shape models (pytest-benchmark).

    pytest benches/bench_cpu_model.py --benchmark-only
Environment: QWEN3RS_BENCH_MODELS (default "Qwen3-0.6B"), QWEN3RS_BENCH_DTYPE (default "bfloat16").
Each benchmark reports tokens/s in extra_info; figures go to benches/RESULTS.md."""

import os

import pytest

import qwen3rs

MODELS = os.environ.get("QWEN3RS_BENCH_MODELS", "Qwen3-0.6B").split(",")
DTYPE = os.environ.get("QWEN3RS_BENCH_DTYPE", "bfloat16")
PREFILL_LEN, DECODE_TOKENS = 128, 32


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return qwen3rs.load(f"dummy:{request.param}", device="cpu", dtype=DTYPE, max_seq_len=4096, progress=False)


def prompt(n):
    return [(i * 7919) % 150000 + 10 for i in range(n)]


def test_prefill(benchmark, model):
    # Prefill as generation does it: logits of the last row only.
    ids = prompt(PREFILL_LEN)
    out = benchmark.pedantic(lambda: model.generate(ids, raw=True, max_new_tokens=1, ignore_eos=True), rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = PREFILL_LEN / benchmark.stats.stats.median
    assert out.usage["prompt_tokens"] == PREFILL_LEN


def test_decode(benchmark, model):
    ids = prompt(16)

    def run():
        return model.generate(ids, raw=True, max_new_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)

    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = out.timings["decode_tok_s"]
