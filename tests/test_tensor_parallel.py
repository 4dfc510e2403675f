"""Tensor parallelism (issue 8): a model split over N ranks computes what the unsplit model does.
The sharding logic is backend-independent (src/backend/tp.rs); here CPU ranks in one process stand
in for GPUs, so every split is checked on every machine. GPU runs use the same code with NCCL."""

import functools

import numpy as np
import pytest

import qwen3rs
from conftest import CASES, FIXTURES


@functools.lru_cache(maxsize=None)
def model(case, dtype, tp):
    return qwen3rs.load(FIXTURES / case, device="cpu", dtype=dtype, tensor_parallel=tp, progress=False)


def row_errors(out, ref):
    return np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)


def prompt(case):
    return np.load(FIXTURES / case / "reference.npz")["prompt_2"].tolist()


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_sharded_logits_equal_unsharded_f32(case, tp):
    # tp=4 with 2 KV heads replicates each KV head on two ranks.
    ids = prompt(case)
    ref, out = model(case, "float32", 1).logits(ids), model(case, "float32", tp).logits(ids)
    assert row_errors(out, ref).max() <= 1e-5, case


@pytest.mark.parametrize("case", ["dense_untied_f32_gqa4", "moe_mixed_sharded_bf16"])
def test_sharded_bf16_within_bf16_tolerance(case):
    ids = prompt(case)
    ref, out = model(case, "bfloat16", 1).logits(ids), model(case, "bfloat16", 2).logits(ids)
    # Partial sums rounded to bf16 before the all-reduce differ from one bf16 product by rounding only.
    assert np.median(row_errors(out, ref)) <= 3e-2


@pytest.mark.parametrize("case", CASES)
def test_sharded_greedy_equals_unsharded(case):
    ids = prompt(case)
    kw = dict(raw=True, max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert model(case, "float32", 2).generate(ids, **kw).token_ids == model(case, "float32", 1).generate(ids, **kw).token_ids


def test_sharded_chat_and_batch_work_unchanged():
    tiny = f"dummy:{FIXTURES / 'tiny_qwen3' / 'moe_config.json'}"
    one = qwen3rs.load(tiny, device="cpu", dtype="float32", progress=False)
    two = qwen3rs.load(tiny, device="cpu", dtype="float32", tensor_parallel=2, progress=False)
    kw = dict(think=False, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in two.generate(["a", "bb"], **kw)] == [o.token_ids for o in one.generate(["a", "bb"], **kw)]
    assert "," in two.device  # one name per rank


@pytest.mark.parametrize("tp,match", [(3, "num_attention_heads"), (0, "tensor_parallel"), (8, "num_attention_heads")])
def test_splits_that_do_not_divide_are_errors(tp, match):
    with pytest.raises(ValueError, match=match):
        qwen3rs.load(FIXTURES / "dense_tied_bf16", device="cpu", tensor_parallel=tp, progress=False)


def test_more_gpus_than_exist_is_an_error():
    with pytest.raises(qwen3rs.DeviceError):
        qwen3rs.load(FIXTURES / "dense_tied_bf16", device="cuda", tensor_parallel=64, progress=False)
