"""The CUDA backend at the model level. Without a GPU (CI): `device="auto"` gives the CPU and
`device="cuda"` raises a DeviceError naming what is missing, never a panic. With one (the H200
through the device tool, see README "GPU development"): GPU logits match the CPU's, generation
and the chat/sampling features run unchanged, GPU out-of-memory is a DeviceOutOfMemoryError and
the process stays usable. Conformance against the reference runs in test_conformance.py over
conftest.DEVICES. The kernel compile check needs only NVRTC and the CUDA headers."""

import numpy as np
import pytest

import qwen3rs
from conftest import FIXTURES, GPU
from qwen3rs.errors import DeviceError, DeviceOutOfMemoryError, InvalidArgumentError

CASE = "dense_tied_bf16"
MOE = "moe_top2_bf16"


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- everywhere ----


def test_cuda_available_is_a_bool_and_never_raises():
    assert isinstance(qwen3rs.cuda_available(), bool)
    reason = qwen3rs.cuda_unavailable_reason()
    assert (reason is None) == qwen3rs.cuda_available()


@pytest.mark.skipif(qwen3rs.cuda_available(), reason="a GPU is usable here")
def test_auto_is_cpu_without_gpu():
    m = qwen3rs.load(FIXTURES / CASE, device="auto", progress=False)
    assert m.device == "cpu"


@pytest.mark.skipif(qwen3rs.cuda_available(), reason="a GPU is usable here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "gpu"])
def test_cuda_without_gpu_is_a_clear_error(device):
    with pytest.raises(DeviceError) as e:
        qwen3rs.load(FIXTURES / CASE, device=device, progress=False)
    msg = str(e.value)
    assert "cuda" in msg.lower() and len(msg) > 30, msg
    # The process is fine: the CPU still works.
    assert qwen3rs.load(FIXTURES / CASE, device="cpu", progress=False).logits([1, 2, 3]).shape == (3, 1024)


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "tpu"])
def test_bad_device_names(device):
    with pytest.raises(InvalidArgumentError):
        qwen3rs.load(FIXTURES / CASE, device=device, progress=False)


def compile_sm90_or_skip():
    """Every kernel module compiled with NVRTC for sm_90 (no GPU needed); skips without NVRTC/headers."""
    try:
        return qwen3rs._native._compile_cuda_kernels("sm_90")
    except DeviceError as e:
        if "not found" in str(e) or "without the `cuda` feature" in str(e):
            pytest.skip(f"NVRTC or CUDA headers unavailable: {e}")
        raise


def test_kernels_compile_for_sm90():
    """Every kernel compiles with NVRTC for the H200, for every dtype."""
    done = compile_sm90_or_skip()
    assert len(done) == 27 and "attention/bfloat16" in done and "matmul_narrow/bfloat16" in done and "expert_gemm/float16" in done, done


@pytest.mark.parametrize("spec", ["GV_UNROLL=4,AD_KB=2,AD_MIN_BLOCKS=5,AD_BARRIER_RELAXED=2,AD_MERGE_STEP=1", "MD_SLOTS=4 MD_WPO=1 RD_UNROLL=6 BLOCK_TIMELINE=1",
                                  "GV_PAIR_ROWS=1 GV_MIN_BLOCKS=4 AD_STORES=1 AD_MERGE_STEP=16"])
def test_kernels_compile_with_tuning_defines(spec, monkeypatch):
    """QWEN3RS_CUDA_DEFINES sets tunable kernel constants at compile time (BLOCK_TIMELINE: the
    profiling build of common.cuh's Timeline)."""
    monkeypatch.setenv("QWEN3RS_CUDA_DEFINES", spec)
    assert len(compile_sm90_or_skip()) == 27


def test_decode_attention_keeps_its_state_in_registers():
    """No decode attention kernel of head dim 128 (every Qwen3 size's) spills, as the shipped bf16
    build compiles them for the H200. A spill of 4 bytes in Qwen3-30B-A3B's kernel was reloaded after a
    cluster barrier's L1 invalidate, on the way to the merge: an L2 round trip that waited behind the
    o projection's early loads, ~0.9 µs a layer (RESULTS.md runs 40.5-40.6). Needs NVRTC only."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benches/profiles/ptxas_report.py"
    spec = importlib.util.spec_from_file_location("ptxas_report", path)
    pr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pr)
    if pr.cuda_home() is None:
        pytest.skip("NVRTC unavailable")
    lib, include = pr.nvrtc()
    log, _ = pr.compile_module(lib, include, "attention", pr.build_options("90a", "bf16", []))
    kernels = {name: (st, ld) for name, _, st, ld, _, _ in pr.resources(log) if name.startswith("attention_decode") and name.endswith("_d128")}
    assert len(kernels) == 12, sorted(kernels)  # g1, g2, g4, g8 × plain, _rope, _rope_push
    assert all(v == (0, 0) for v in kernels.values()), {k: v for k, v in kernels.items() if v != (0, 0)}


@pytest.mark.parametrize("spec, names", [
    ("Q_DTYPE=0", "not a tunable kernel constant"),   # the host must agree with it: not settable
    ("GV_UNROLL=0", "not a positive integer"),
    ("GV_UNROLL", "not a positive integer"),
    ("GV_UNROLL=4;AD_KB=2", "not a positive integer"),
    ("MD_SLOTS=1e3", "not a positive integer"),
])
def test_bad_tuning_defines_are_refused(spec, names, monkeypatch):
    monkeypatch.setenv("QWEN3RS_CUDA_DEFINES", spec)
    try:
        qwen3rs._native._compile_cuda_kernels("sm_90")
    except InvalidArgumentError as e:
        assert "QWEN3RS_CUDA_DEFINES" in str(e) and names in str(e), e
    except DeviceError as e:
        assert "without the `cuda` feature" in str(e), e
        pytest.skip("built without the cuda feature")
    else:
        raise AssertionError(f"{spec!r} was accepted")


# ---- on a GPU ----

gpu = [pytest.mark.gpu, GPU]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", [CASE, MOE, "dense_yarn_bf16", "dense_untied_f32_gqa4", "moe_mixed_sharded_bf16"])
@pytest.mark.gpu
@GPU
def test_gpu_logits_match_cpu(case, dtype):
    ids = list(range(1, 40))
    g = qwen3rs.load(FIXTURES / case, device="cuda", dtype=dtype, progress=False)
    c = qwen3rs.load(FIXTURES / case, device="cpu", dtype=dtype, progress=False)
    assert g.device == "cuda:0" and c.device == "cpu"
    err = rel(g.logits(ids), c.logits(ids))
    assert err <= (1e-4 if dtype == "float32" else 3e-2), f"{case} {dtype}: {err:.2e}"


@pytest.mark.gpu
@GPU
def test_auto_picks_cuda():
    assert qwen3rs.load(FIXTURES / CASE, device="auto", progress=False).device == "cuda:0"


@pytest.mark.gpu
@GPU
def test_bad_gpu_index_is_a_clear_error():
    with pytest.raises(DeviceError, match="cuda:99"):
        qwen3rs.load(FIXTURES / CASE, device="cuda:99", progress=False)


@pytest.mark.gpu
@GPU
def test_out_of_memory_is_an_exception_and_the_process_stays_usable():
    # Qwen3-0.6B's KV cache for 256 sequences of 40960 tokens is ~1.2 TB: more than any GPU.
    with pytest.raises(DeviceOutOfMemoryError):
        qwen3rs.load("dummy:Qwen3-0.6B", device="cuda", max_seq_len=40960, max_batch=256, progress=False)
    m = qwen3rs.load(FIXTURES / CASE, device="cuda", dtype="float32", progress=False)
    c = qwen3rs.load(FIXTURES / CASE, device="cpu", dtype="float32", progress=False)
    assert rel(m.logits([5, 6, 7]), c.logits([5, 6, 7])) <= 1e-4


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("device_top", ["0", "1"])
def test_sampling_features_unchanged_on_gpu(device_top, monkeypatch):
    """Sampling, penalties, logprobs-free greedy, stop ids and batching: same tokens as the CPU in f32;
    top-k sampling's candidates selected on the device too (QWEN3RS_CUDA_DEVICE_TOP=1)."""
    monkeypatch.setenv("QWEN3RS_CUDA_DEVICE_TOP", device_top)
    g = qwen3rs.load(FIXTURES / CASE, device="cuda", dtype="float32", progress=False)
    c = qwen3rs.load(FIXTURES / CASE, device="cpu", dtype="float32", progress=False)
    prompt = [3, 14, 15, 92, 65]
    for kw in [dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9, seed=3),
               dict(temperature=0.0, repetition_penalty=1.3), dict(temperature=1.0, min_p=0.05, presence_penalty=0.5, seed=1),
               dict(temperature=0.6, top_k=20, top_p=0.95, seed=5, logprobs=3), dict(temperature=1.2, top_k=64, min_p=0.02, seed=8)]:
        a = g.generate(prompt, raw=True, max_new_tokens=16, ignore_eos=True, **kw)
        b = c.generate(prompt, raw=True, max_new_tokens=16, ignore_eos=True, **kw)
        assert a.token_ids == b.token_ids, kw
    batch = g.generate([prompt, prompt[:2], [7] * 20], raw=True, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    single = [g.generate(p, raw=True, max_new_tokens=8, temperature=0.0, ignore_eos=True) for p in [prompt, prompt[:2], [7] * 20]]
    assert [x.token_ids for x in batch] == [x.token_ids for x in single]


@pytest.mark.gpu
@GPU
def test_long_prompt_crosses_prefill_chunks():
    """A prompt longer than one prefill chunk (512) and many KV blocks: GPU equals CPU."""
    ids = [(i * 37) % 1000 + 1 for i in range(700)]
    g = qwen3rs.load(FIXTURES / MOE, device="cuda", dtype="float32", progress=False)
    c = qwen3rs.load(FIXTURES / MOE, device="cpu", dtype="float32", progress=False)
    assert rel(g.logits(ids)[-5:], c.logits(ids)[-5:]) <= 1e-4


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("case", [CASE, MOE])
def test_cuda_graph_replay_gives_the_eager_tokens(case, monkeypatch):
    """Decode steps replayed as CUDA graphs (the default) give exactly the tokens of the eager path
    (QWEN3RS_CUDA_GRAPHS=0): one sequence (warm-up, capture, replays), a batch of three, a second
    request after a prefill, and a context crossing the split-KV threshold (the graph must be
    recaptured, not replayed with a stale launch shape). Replays are prepared a step ahead (the
    host's dry pass overlaps the previous step): also sampled tokens (the prepared step gets its ids
    late), stop tokens that end a sequence with a step prepared for it, and a batch whose sequences
    end at different steps (a prepared step of three rows, then steps of two and one). The graphs
    of earlier launch shapes are kept and replayed when a shape comes back (each request starts at a
    short context again; QWEN3RS_CUDA_GRAPH_CACHE, 8 by default): the same tokens with and without."""
    def run(flag, cache="0"):
        monkeypatch.setenv("QWEN3RS_CUDA_GRAPHS", flag)
        monkeypatch.setenv("QWEN3RS_CUDA_GRAPH_CACHE", cache)
        m = qwen3rs.load(FIXTURES / case, device="cuda", dtype="bfloat16", progress=False)
        kw = dict(raw=True, temperature=0.0, ignore_eos=True)
        out = [m.generate([3, 14, 15, 92, 65], max_new_tokens=40, **kw).token_ids]
        out += [x.token_ids for x in m.generate([[1, 2], [7] * 20, [9, 8, 7, 6]], max_new_tokens=24, **kw)]
        out.append(m.generate(list(range(1, 300)), max_new_tokens=20, **kw).token_ids)
        # Context crosses 512 mid-generation: decode attention changes its number of key splits (a
        # new launch shape, so the graph is recaptured).
        out.append(m.generate([(i * 37) % 1000 + 1 for i in range(500)], max_new_tokens=30, **kw).token_ids)
        out.append(m.generate([3, 14, 15, 92, 65], max_new_tokens=40, **kw).token_ids)
        sampled = dict(raw=True, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
        out.append(m.generate([5, 6, 7], max_new_tokens=30, **sampled).token_ids)
        stop = out[0][12:14]  # greedy tokens of the first request: it stops early, the same way again
        out.append(m.generate([3, 14, 15, 92, 65], max_new_tokens=40, stop_token_ids=stop, **kw).token_ids)
        ends = [x.token_ids for x in m.generate([[3, 14, 15, 92, 65], [2, 4], [8] * 9], max_new_tokens=30,
                                                stop_token_ids=stop, **kw)]
        out += ends + [m.generate([1, 2, 3], max_new_tokens=10, **kw).token_ids]
        return out
    eager, graphed, cached = run("0"), run("1"), run("1", cache="8")
    assert len(eager[-5]) < 40, "the stop token ends the request early"
    assert graphed == eager
    assert cached == eager


@pytest.mark.gpu
@GPU
def test_steps_launched_ahead_give_the_tokens_of_steps_launched_in_turn(monkeypatch):
    """Greedy decode steps are launched before the host has read the last step's tokens (fed them on
    the device; the default under graphs). They give exactly the tokens of steps launched after the
    host has read them (QWEN3RS_CUDA_AHEAD=0): one sequence; a batch whose sequences stop at
    different steps (a step launched for a sequence that stopped is never read); the thinking budget
    forcing its text in mid-way; a chat session whose turn stopped early (a discarded step wrote
    past its cache) and then goes on from that cache; sampling in between."""
    spec = f"dummy:{FIXTURES / 'tiny_qwen3' / 'config.json'}"

    def run(flag):
        monkeypatch.setenv("QWEN3RS_CUDA_AHEAD", flag)
        m = qwen3rs.load(spec, device="cuda", dtype="float32", progress=False)
        g = dict(think=False, temperature=0.0, ignore_eos=True)
        out = [m.generate("Hello there", max_new_tokens=40, **g).token_ids]
        stop = out[0][10:12]
        out += [x.token_ids for x in m.generate(["a", "bb", "Hello there"], max_new_tokens=30, stop_token_ids=stop, **g)]
        out.append(m.generate("Think hard", think=True, thinking_budget=6, max_new_tokens=40, temperature=0.0, ignore_eos=True).token_ids)
        with m.chat(think=False, max_new_tokens=16, temperature=0.0) as chat:
            first = chat.send("Hi", stop_token_ids=out[0][5:6])
            out += [first.token_ids, chat.send("More").token_ids, [chat.cached_tokens]]
        out.append(m.generate("x", think=False, max_new_tokens=12, seed=3, temperature=0.8, ignore_eos=True).token_ids)
        out.append(m.generate("Hello there", max_new_tokens=40, **g).token_ids)
        return out, m._native.steps_ahead()

    (in_turn, none), (ahead, (launched, discarded)) = run("0"), run("1")
    assert none == (0, 0)
    assert launched > 100 and discarded >= 1, (launched, discarded)
    assert len(in_turn[3]) <= 11 and len({len(x) for x in in_turn[1:4]}) > 1, "the batch's sequences stop at different steps"
    assert ahead == in_turn


@pytest.mark.gpu
@GPU
def test_dummy_weights_on_device_equal_the_cpu():
    """`dummy:` weights are drawn on the GPU with the host's generator: same logits as the CPU model,
    for a dense and a MoE config (the MoE experts are drawn by one launch per projection)."""
    for case in [CASE, MOE]:
        spec = f"dummy:{FIXTURES / case / 'config.json'}"
        g = qwen3rs.load(spec, device="cuda", dtype="float32", seed=3, progress=False)
        c = qwen3rs.load(spec, device="cpu", dtype="float32", seed=3, progress=False)
        ids = [1, 2, 3, 4, 5]
        assert rel(g.logits(ids), c.logits(ids)) <= 1e-4, case


@pytest.mark.gpu
@GPU
def test_decode_attention_exchange_leaves_the_tokens(tmp_path, monkeypatch):
    """The decode attention's clustered splits push their states (st.async) in a model with MoE layers
    and read them after a cluster barrier elsewhere (QWEN3RS_CUDA_ATTN_PUSH=1 / 0: always / never).
    A dummy MoE model with head_dim 128 (the fixtures' 32 take no grouped decode kernel): the same
    greedy tokens either way, graphs and eager, and its decode steps give the CPU's tokens and
    log-probabilities."""
    import json
    config = json.loads((FIXTURES / MOE / "config.json").read_text())
    config.update(head_dim=128, num_attention_heads=8, num_key_value_heads=2, hidden_size=256)
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = f"dummy:{tmp_path / 'config.json'}"
    kw = dict(raw=True, temperature=0.0, ignore_eos=True)

    def run(push, graphs):
        if push is None:
            monkeypatch.delenv("QWEN3RS_CUDA_ATTN_PUSH", raising=False)
        else:
            monkeypatch.setenv("QWEN3RS_CUDA_ATTN_PUSH", push)
        monkeypatch.setenv("QWEN3RS_CUDA_GRAPHS", graphs)
        m = qwen3rs.load(spec, device="cuda", dtype="bfloat16", seed=5, progress=False)
        out = [m.generate([3, 14, 15, 92, 65], max_new_tokens=48, **kw).token_ids]
        return out + [x.token_ids for x in m.generate([[1, 2], [7] * 200], max_new_tokens=24, **kw)]
    want = run("0", "1")
    assert run(None, "1") == want
    assert run("1", "0") == want
    # The push kernel is what runs by default here: never launching it changes the tokens, unless
    # the exchange by reads was asked for.
    monkeypatch.setenv("QWEN3RS_CUDA_SKIP", "attention_decode_rope_push_g2_d128")
    assert run(None, "1") != want
    assert run("0", "1") == want
    for name in ["QWEN3RS_CUDA_SKIP", "QWEN3RS_CUDA_ATTN_PUSH", "QWEN3RS_CUDA_GRAPHS"]:
        monkeypatch.delenv(name)

    # Decode steps on the GPU against the CPU (f32): the same tokens, their log-probabilities close
    # (seed 10: the CPU's best two tokens are at least 0.04 apart at every step).
    ids = [(i * 37) % 1000 + 1 for i in range(150)]
    got = [qwen3rs.load(spec, device=d, dtype="float32", seed=10, progress=False).generate(ids, max_new_tokens=16, logprobs=1, **kw)
           for d in ["cuda", "cpu"]]
    assert got[0].token_ids == got[1].token_ids
    assert np.allclose([x["logprob"] for x in got[0].logprobs], [x["logprob"] for x in got[1].logprobs], atol=1e-3)
