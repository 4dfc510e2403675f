"""Tensor parallelism on real GPUs (issue 8): `tensor_parallel=2` (cuda:0 + cuda:1, NCCL all-reduce)
against one GPU (cuda:0). Skipped unless qwen3rs sees at least two usable CUDA GPUs
(`qwen3rs.cuda_device_count()`); tests/test_tensor_parallel.py checks the same sharding on CPU ranks
everywhere, and tests/cuda_tp.rs at the Rust level.

(a) Every conformance checkpoint (tests/fixtures), f32 and bf16, every reference prompt: the sharded
    model's logits meet test_conformance.py's bars against the transformers reference (row error
    ≤ 1e-3 f32, ≤ 3e-2 bf16, with its MoE near-tie exemption in bf16), are within 1e-4 (f32) / 3e-2
    (bf16) of the one-GPU logits, and its greedy tokens equal the one-GPU model's and the reference's
    (bf16 MoE: up to the first near-tie row, as in test_conformance.py).

(b) Dummy Qwen3-8B and Qwen3-30B-A3B (the bundled official configs: real widths and, by default, all
    layers; max_seq_len 512, batch 1): the prompt's logits and 16 greedy tokens. Each rank draws its
    own shards on its GPU (`Backend::dummy_window`), so this also checks the per-shard dummy weights
    against the whole tensors one GPU draws. QWEN3RS_MULTI_GPU_LAYERS=N loads a config with only N
    layers of the same widths instead (quicker; as good for equality, since every layer is sharded
    alike; it says so in the test id).
    - f32: row error ≤ 1e-4 against one GPU and the 16 greedy tokens identical (the two differ only
      in summation order, ~1e-6). 30B-A3B: median row ≤ 1e-4 and every row ≤ 5e-2, since even a
      1e-6 difference flips a router near-tie somewhere among 16 rows × 48 layers a few times in
      a hundred runs, and that row then moves by ~1e-2 (a sharding bug moves every row by O(1)).
    - bf16 (medians over the prompt's rows, as test_tensor_parallel.py's bf16 check): the sharded
      logits within max(3e-2, 2 e) of the one-GPU bf16 logits and within max(3e-2, 1.5 e) of the
      one-GPU f32 logits, where e is how far one GPU's bf16 logits are from its f32 ones. Partial
      sums rounded to bf16 before the all-reduce differ from one bf16 product by rounding only, so
      the sharded model is another bf16 rounding of the same f32 result: as far from it as one GPU's
      bf16 is (measured on the CPU stand-in, same sharding and rounding points: 1.05–1.08 e), and
      ~√2 e from one GPU's bf16 (1.1–1.3 e). The bar grows with e because e grows with depth (dummy
      0.6B, 28 layers: e = 1.6e-2; 8B with 8 layers: 1.2e-2).
      MoE models take 2.5 e for both: on the H200 pair the 8-layer dummy 30B-A3B (e = 2.1e-2) had its
      sharded bf16 logits 1.73 e (experts by columns) / 0.58 e (whole experts) from one GPU's bf16 and
      2.05 e / 1.80 e from its f32, while the sharded f32 logits equalled one GPU's to 1.7e-6 with the
      same greedy tokens: rounding, not sharding. (All 48 layers, e = 5.0e-2: 1.14 e / 1.00 e and
      1.23 e / 1.09 e; dense 8B, all 36 layers, e = 1.9e-2: 1.28 e and 1.04 e.) Each rank's MoE
      partial is rounded to bf16 before the all-reduce and the bf16 sum rounds again, two roundings
      one GPU does not make; the next layer's router sees them, and with 128 near-uniform random
      experts a near-tied 8th choice flips in some rows, moving such a row by ~1e-1. (The CPU
      stand-in's 3-layer 30B-A3B had not shown it.) A wrong shard moves every row by O(1), ~50 e.
      bf16 greedy tokens are *not* compared: random weights give logits of spread ~1 whose bf16
      values tie exactly or within one bf16 step (2^-6 at 2–4) at many steps, and a 30B-A3B routes
      128 experts whose 8th/9th router probabilities nearly tie somewhere in 48 layers. Measured on
      the CPU stand-in: dummy 0.6B bf16 tp=2 vs 1 diverged at token 10 (top-2 gap 0.03 σ there), a
      3-layer 30B-A3B at token 1, while f32 agreed on all 16 tokens in every case.

(a) and (b) run every MoE model twice: experts split by columns, and whole experts per GPU
(expert_parallel=True, test ids ending in -ep: 64 of Qwen3-30B-A3B's 128 experts on each GPU). The
bars are the same: each GPU's MoE output is again a partial sum, rounded once before the all-reduce.

Memory: one H200 holds the one-GPU f32 30B-A3B (122 GB) alone; each model's reference is computed
and kept as numpy arrays, and the model freed, before the next one loads.

QWEN3RS_MULTI_GPU_DEVICE=cpu runs the same tests on CPU ranks (a dry run of the test logic on a
machine without GPUs; with QWEN3RS_MULTI_GPU_LAYERS=2 it fits in ~10 GB of host memory).
"""

import gc
import json
import os

import numpy as np
import pytest

import qwen3rs
from conftest import CASES, FIXTURES
from test_conformance import BF16_BAR, F32_BAR, first_near_tie, reference, row_errors

DEVICE = os.environ.get("QWEN3RS_MULTI_GPU_DEVICE", "cuda")
GPUS = qwen3rs.cuda_device_count()
TWO_GPUS = pytest.mark.skipif(DEVICE != "cpu" and GPUS < 2, reason=f"needs 2 CUDA GPUs, qwen3rs sees {GPUS}"
                              + ("" if qwen3rs.cuda_available() else f" ({qwen3rs.cuda_unavailable_reason()})"))


def test_cuda_device_count_is_an_int_and_never_raises():
    n = qwen3rs.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    assert (n > 0) == qwen3rs.cuda_available()


# ---- (a) conformance checkpoints ----


# Every case with experts split by columns; the MoE cases also with whole experts per GPU (ep).
SPLITS = [(case, False) for case in CASES] + [(case, True) for case in CASES if "moe" in case]


def split_id(case_ep):
    return f"{case_ep[0]}{'-ep' if case_ep[1] else ''}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case,ep", SPLITS, ids=[split_id(x) for x in SPLITS])
@pytest.mark.gpu
@TWO_GPUS
def test_sharded_conformance(case, ep, dtype):
    one = qwen3rs.load(FIXTURES / case, device=DEVICE, dtype=dtype, progress=False)
    two = qwen3rs.load(FIXTURES / case, device=DEVICE, dtype=dtype, tensor_parallel=2, expert_parallel=ep, progress=False)
    assert two.device == ("cuda:0,cuda:1" if DEVICE == "cuda" else "cpu,cpu"), two.device
    bar = F32_BAR if dtype == "float32" else BF16_BAR
    kw = dict(raw=True, temperature=0.0, ignore_eos=True)
    for i, r in enumerate(reference(case)):
        prompt, greedy = r["prompt"].tolist(), r["greedy"].tolist()
        ref_logits, out = one.logits(prompt), two.logits(prompt)
        # bf16 MoE: rows from the first near-tie of the router on are exempt (test_conformance.py).
        tie = first_near_tie(case, i) if dtype == "bfloat16" else None
        rows = len(prompt) if tie is None else min(tie, len(prompt))
        vs_ref = row_errors(out, r["prefill_logits"])[:rows]
        assert vs_ref.size == 0 or vs_ref.max() <= bar, f"{case} prompt {i}: {vs_ref.max():.2e} vs the reference (row {vs_ref.argmax()})"
        vs_one = row_errors(out, ref_logits)[:rows]
        one_bar = 1e-4 if dtype == "float32" else BF16_BAR
        assert vs_one.size == 0 or vs_one.max() <= one_bar, f"{case} prompt {i}: {vs_one.max():.2e} vs one GPU (row {vs_one.argmax()})"
        a = two.generate(prompt, max_new_tokens=len(greedy), **kw).token_ids
        b = one.generate(prompt, max_new_tokens=len(greedy), **kw).token_ids
        # Token j is chosen by row L-1+j: compared while no earlier row was near a routing tie.
        n = len(greedy) if tie is None else max(0, tie - len(prompt) + 1)
        assert a[:n] == b[:n], f"{case} prompt {i}: greedy differs from one GPU"
        assert a[:n] == greedy[:n], f"{case} prompt {i}: greedy differs from the reference"
        if dtype == "float32" or "moe" not in case:
            assert n == len(greedy)


# ---- (b) dummy models of real size ----

PROMPT = [(i * 7919) % 100000 + 1 for i in range(16)]
NEW_TOKENS = 16
LAYERS = int(os.environ.get("QWEN3RS_MULTI_GPU_LAYERS", "0") or 0)


def dummy_spec(name, tmp_path):
    """`dummy:NAME`, or with QWEN3RS_MULTI_GPU_LAYERS a config of the same widths and fewer layers."""
    if not LAYERS:
        return f"dummy:{name}"
    config = json.loads((qwen3rs._model.CONFIGS_DIR / f"{name}.json").read_text())
    config["num_hidden_layers"] = LAYERS
    path = tmp_path / f"{name}-{LAYERS}-layers.json"
    path.write_text(json.dumps(config))
    return f"dummy:{path}"


def run_dummy(spec, dtype, tp, ep=False):
    """Prompt logits and greedy tokens of one load, which is freed before returning."""
    m = qwen3rs.load(spec, device=DEVICE, dtype=dtype, max_seq_len=512, max_batch=1, tensor_parallel=tp, expert_parallel=ep,
                     progress=False)
    logits = m.logits(PROMPT)
    tokens = m.generate(PROMPT, raw=True, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True).token_ids
    del m
    gc.collect()  # its device memory goes now, before the next load
    return logits, tokens


DUMMIES = [("Qwen3-8B", False), ("Qwen3-30B-A3B", False), ("Qwen3-30B-A3B", True)]


@pytest.mark.parametrize("name,ep", DUMMIES, ids=[f"{n}-{LAYERS or 'all'}-layers{'-ep' if ep else ''}" for n, ep in DUMMIES])
@pytest.mark.gpu
@TWO_GPUS
def test_sharded_dummy_model_equals_one_gpu(name, ep, tmp_path):
    spec = dummy_spec(name, tmp_path)
    # One GPU first (the f32 30B-A3B fills most of it), kept as numpy arrays.
    f32_one, f32_one_tokens = run_dummy(spec, "float32", 1)
    bf16_one, _ = run_dummy(spec, "bfloat16", 1)
    f32_two, f32_two_tokens = run_dummy(spec, "float32", 2, ep)
    bf16_two, _ = run_dummy(spec, "bfloat16", 2, ep)
    assert np.isfinite(f32_two).all() and np.isfinite(bf16_two).all()
    f32_err = row_errors(f32_two, f32_one)
    bf16_err = row_errors(bf16_two, bf16_one)
    bf16_vs_f32 = row_errors(bf16_two, f32_one)
    e = float(np.median(row_errors(bf16_one, f32_one)))  # how far bf16 is from f32 on one GPU
    print(f"{name}{' (expert_parallel)' if ep else ''}: f32 tp=2 vs 1 max row err {f32_err.max():.2e}; bf16 tp=2 vs 1 median {np.median(bf16_err):.2e} "
          f"(max {bf16_err.max():.2e}); bf16 tp=2 vs f32 median {np.median(bf16_vs_f32):.2e}; one-GPU bf16 vs f32 "
          f"median e = {e:.2e}; greedy f32 {f32_two_tokens}")
    moe = "A3B" in name
    assert np.median(f32_err) <= 1e-4 and f32_err.max() <= (5e-2 if moe else 1e-4), (
        f"{name} f32: row error median {np.median(f32_err):.2e}, max {f32_err.max():.2e} (row {f32_err.argmax()}) vs one GPU")
    assert f32_two_tokens == f32_one_tokens, f"{name} f32: greedy tokens differ from one GPU: {f32_two_tokens} vs {f32_one_tokens}"
    bar = max(BF16_BAR, (2.5 if moe else 2) * e)
    assert np.median(bf16_err) <= bar, f"{name} bf16: median row error {np.median(bf16_err):.2e} vs one GPU (bar {bar:.2e})"
    bar = max(BF16_BAR, (2.5 if moe else 1.5) * e)
    assert np.median(bf16_vs_f32) <= bar, f"{name} bf16: median row error {np.median(bf16_vs_f32):.2e} vs one-GPU f32 (bar {bar:.2e})"
