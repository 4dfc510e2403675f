"""Tensor parallelism (issue 8): a model split over N ranks computes what the unsplit model does,
with every expert split by columns or (expert_parallel=True) whole experts spread over the ranks.
The sharding logic is backend-independent (src/backend/tp.rs); here CPU ranks in one process stand
in for GPUs, so every split is checked on every machine. GPU runs use the same code with NCCL."""

import functools
import json

import numpy as np
import pytest

import qwen3rs
from conftest import CASES, FIXTURES


MOE_CASES = [c for c in CASES if "moe" in c]


@functools.lru_cache(maxsize=None)
def model(case, dtype, tp, ep=False):
    return qwen3rs.load(FIXTURES / case, device="cpu", dtype=dtype, tensor_parallel=tp, expert_parallel=ep, progress=False)


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


# ---- expert parallelism: whole experts per rank (8 experts top-2, 16 top-4 with dense layers mixed in) ----


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", MOE_CASES)
def test_expert_parallel_logits_equal_unsharded_f32(case, tp):
    ids = prompt(case)
    ref, out = model(case, "float32", 1).logits(ids), model(case, "float32", tp, ep=True).logits(ids)
    assert row_errors(out, ref).max() <= 1e-5, case


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", MOE_CASES)
def test_expert_parallel_bf16_within_bf16_tolerance(case, tp):
    ids = prompt(case)
    ref, out = model(case, "bfloat16", 1).logits(ids), model(case, "bfloat16", tp, ep=True).logits(ids)
    # Each rank's sum over its experts rounded to bf16 before the all-reduce: rounding differences only.
    assert np.median(row_errors(out, ref)) <= 3e-2


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", MOE_CASES)
def test_expert_parallel_greedy_equals_unsharded(case, tp):
    ids = prompt(case)
    kw = dict(raw=True, max_new_tokens=16, temperature=0.0, ignore_eos=True)
    out = model(case, "float32", tp, ep=True).generate(ids, **kw).token_ids
    assert out == model(case, "float32", 1).generate(ids, **kw).token_ids


def test_expert_parallel_keeps_experts_whole(tmp_path):
    # moe_intermediate_size 30 doesn't divide by 4: the column split refuses it, whole experts don't
    # split columns at all (and compute what one device does, batched and chat-templated alike).
    config = json.loads((FIXTURES / "tiny_qwen3" / "moe_config.json").read_text())
    config["moe_intermediate_size"] = 30
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = f"dummy:{tmp_path / 'config.json'}"
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(30\)"):
        qwen3rs.load(spec, device="cpu", dtype="float32", tensor_parallel=4, progress=False)
    one = qwen3rs.load(spec, device="cpu", dtype="float32", progress=False)
    four = qwen3rs.load(spec, device="cpu", dtype="float32", tensor_parallel=4, expert_parallel=True, progress=False)
    assert row_errors(four.logits(list(range(3, 40))), one.logits(list(range(3, 40)))).max() <= 1e-5
    kw = dict(think=False, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in four.generate(["a", "bb"], **kw)] == [o.token_ids for o in one.generate(["a", "bb"], **kw)]


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
