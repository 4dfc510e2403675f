"""CPU prefill and decode speed on random-weight real-shape models (pytest-benchmark).

    pytest benches/bench_cpu_model.py --benchmark-only
Environment: QWEN3RS_BENCH_MODELS (default "Qwen3-0.6B"), QWEN3RS_BENCH_DTYPE (default "bfloat16"),
QWEN3RS_BENCH_QUANT ("none" or "int8"), QWEN3RS_BENCH_PREFILL (prompt length, default 512),
QWEN3RS_NUM_THREADS. Each benchmark reports tokens/s (and, for decode, GB/s of weights) in extra_info;
benches/cpu_side_by_side.py runs the same figures next to llama.cpp. Figures go to benches/RESULTS.md."""

import os

import pytest

import qwen3rs
from qwen3rs import _native

MODELS = os.environ.get("QWEN3RS_BENCH_MODELS", "Qwen3-0.6B").split(",")
DTYPE = os.environ.get("QWEN3RS_BENCH_DTYPE", "bfloat16")
QUANT = os.environ.get("QWEN3RS_BENCH_QUANT", "none")
PREFILL_LEN, DECODE_TOKENS = int(os.environ.get("QWEN3RS_BENCH_PREFILL", "512")), 64


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    m = qwen3rs.load(f"dummy:{request.param}", device="cpu", dtype=DTYPE, max_seq_len=4096, progress=False,
                     quantize=None if QUANT == "none" else QUANT)
    return m


def prompt(n):
    return [(i * 7919) % 150000 + 10 for i in range(n)]


def decode_weight_bytes(cfg):
    """Bytes of weights one decode step reads (every matrix once; lm_head = embed when tied)."""
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    mats = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]
    per_elem, per_row = (1, 4) if QUANT == "int8" else ({"float32": 4}.get(DTYPE, 2), 0)
    layer = sum(r * c * per_elem + r * per_row for r, c in mats)
    return cfg["num_hidden_layers"] * layer + cfg["vocab_size"] * (h * per_elem + per_row)


def test_prefill(benchmark, model):
    # Prefill as generation does it: logits of the last row only.
    ids = prompt(PREFILL_LEN)
    out = benchmark.pedantic(lambda: model.generate(ids, raw=True, max_new_tokens=1, ignore_eos=True, temperature=0.0), rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = PREFILL_LEN / benchmark.stats.stats.median
    benchmark.extra_info["isa"], benchmark.extra_info["threads"] = _native.cpu_info()
    assert out.usage["prompt_tokens"] == PREFILL_LEN


def test_decode(benchmark, model):
    ids = prompt(16)

    def run():
        return model.generate(ids, raw=True, max_new_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)

    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    tok_s = out.timings["decode_tok_s"]
    benchmark.extra_info["tokens_per_s"] = tok_s
    benchmark.extra_info["weight_gb_s"] = decode_weight_bytes(model.config) * tok_s / 1e9
    benchmark.extra_info["isa"], benchmark.extra_info["threads"] = _native.cpu_info()
