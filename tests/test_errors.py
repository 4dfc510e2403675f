"""Bad input of every kind is a clear Python exception naming the problem, never a crash or a panic."""

import json
import shutil
import struct

import numpy as np
import pytest

import qwen3rs
from qwen3rs.errors import CheckpointNotFoundError, ConfigError, InvalidArgumentError, Qwen3Error, WeightsError

SRC = "dense_tied_bf16"


@pytest.fixture
def ckpt(tmp_path, fixtures):
    dst = tmp_path / "ckpt"
    shutil.copytree(fixtures / SRC, dst)
    return dst


@pytest.fixture(scope="module")
def model(fixtures):
    return qwen3rs.load(fixtures / SRC, device="cpu", dtype="float32", max_seq_len=64, progress=False)


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def rewrite_header(ckpt, edit):
    """Rewrite model.safetensors with `edit(header)` applied and data unchanged."""
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def load(path, **kw):
    return qwen3rs.load(path, **{"device": "cpu", "progress": False, **kw})


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load(ckpt)


def test_missing_shard(tmp_path, fixtures):
    dst = tmp_path / "moe"
    shutil.copytree(fixtures / "moe_mixed_sharded_bf16", dst)
    (dst / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        load(dst)


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="config.json"):
        load(ckpt)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_incomplete_config(ckpt, field):
    edit_config(ckpt, **{field: None})
    with pytest.raises(ConfigError, match=field):
        load(ckpt)


def test_wrong_type_in_config(ckpt):
    edit_config(ckpt, hidden_size="large")
    with pytest.raises(ConfigError, match="hidden_size|invalid type"):
        load(ckpt)


def test_unsupported_architecture(ckpt):
    edit_config(ckpt, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        load(ckpt)


def test_bad_head_grouping(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load(ckpt)


def test_unsupported_rope_type(ckpt):
    edit_config(ckpt, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ConfigError, match="longrope"):
        load(ckpt)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load(ckpt)


def test_file_shorter_than_header_length(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match="model.safetensors"):
        load(ckpt)


def test_absurd_header_length(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load(ckpt)


def test_garbage_header(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"\xff" * n + data[8 + n :])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load(ckpt)


def test_missing_tensor(ckpt):
    rewrite_header(ckpt, lambda h: h.update({"model.layers.1.self_attn.k_norm.weight_renamed": h.pop("model.layers.1.self_attn.k_norm.weight")}))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight is missing"):
        load(ckpt)


def test_wrong_shape(ckpt):
    def edit(h):
        t = h["model.layers.0.self_attn.q_proj.weight"]
        t["shape"] = [t["shape"][1], t["shape"][0]]

    rewrite_header(ckpt, edit)
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight has shape"):
        load(ckpt)


def test_unsupported_tensor_dtype(ckpt):
    def edit(h):
        t = h["model.norm.weight"]
        t["dtype"] = "I16"

    rewrite_header(ckpt, edit)
    with pytest.raises(WeightsError, match=r"model\.norm\.weight has dtype"):
        load(ckpt)


@pytest.mark.parametrize("kw,match", [
    ({"dtype": "float8"}, "dtype"), ({"device": "tpu"}, "device"), ({"device": "cuda:x"}, "cuda:N"),
    ({"max_seq_len": 0}, "max_seq_len"), ({"dtype": 3}, "dtype"),
])
def test_bad_load_arguments(fixtures, kw, match):
    with pytest.raises(ValueError, match=match):
        load(fixtures / SRC, **kw)


@pytest.mark.parametrize("case,config,kw,match", [
    ("moe_top2_bf16", {}, {"tensor_parallel": 1}, r"expert_parallel=True .*tensor_parallel=1"),
    ("dense_tied_bf16", {}, {"tensor_parallel": 2}, r"expert_parallel=True needs a MoE model.*num_experts=0"),
    # 6 experts over 4 ranks (everything else divides by 4; the check comes before the weights load).
    ("moe_top2_bf16", {"num_experts": 6}, {"tensor_parallel": 4}, r"tensor_parallel=4 does not divide num_experts \(6\)"),
    ("moe_top2_bf16", {}, {"tensor_parallel": 2, "expert_parallel": "yes"}, r"expert_parallel must be True or False, got 'yes'"),
])
def test_bad_expert_parallel(tmp_path, fixtures, case, config, kw, match):
    dst = tmp_path / case
    shutil.copytree(fixtures / case, dst)
    edit_config(dst, **config)
    with pytest.raises(InvalidArgumentError, match=match):
        load(dst, **{"expert_parallel": True, **kw})


def test_unknown_dummy_name():
    with pytest.raises(InvalidArgumentError, match="Qwen3-0.6B"):
        qwen3rs.load("dummy:Qwen3-7B", device="cpu", progress=False)


def test_dummy_model_larger_than_host_memory():
    # Qwen3-235B-A22B's 470 GB of bf16 weights: refused before any is drawn, naming the sizes, where
    # drawing them would have the process killed for its memory.
    with pytest.raises(qwen3rs.errors.DeviceOutOfMemoryError, match=r"need 4\d\d\.\d GB of host memory on the CPU.*GB are available"):
        qwen3rs.load("dummy:Qwen3-235B-A22B", device="cpu", progress=False)


def test_cuda_without_gpu_is_a_clear_error(fixtures):
    if qwen3rs.cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(qwen3rs.DeviceError, match="cuda"):
        load(fixtures / SRC, device="cuda")


@pytest.mark.parametrize("ids,match", [
    ([1, 2, 1024], "1024"), ([1, -1], "-1"), ([], "empty"), ([1, 2**40], "out of range"),
    (["a"], "ints"), ("text", "sequence of ints"), (np.array([[1, 2]]), "1-D"),
])
def test_bad_token_ids_in_logits(model, ids, match):
    with pytest.raises(InvalidArgumentError, match=match):
        model.logits(ids)


def test_bad_prompt_ids_in_generate(model):
    with pytest.raises(InvalidArgumentError, match="1024"):
        model.generate([5, 1024], raw=True, max_new_tokens=2)
    with pytest.raises(InvalidArgumentError, match="empty"):
        model.generate([], raw=True, max_new_tokens=2)
    with pytest.raises(InvalidArgumentError, match="-3"):
        model.generate([5, 6], raw=True, max_new_tokens=2, stop_token_ids=[-3])


def test_prompt_longer_than_max_seq_len(model):
    with pytest.raises(InvalidArgumentError, match="max_seq_len"):
        model.logits(list(range(3, 3 + 65)))
    with pytest.raises(InvalidArgumentError, match="max_seq_len"):
        model.generate(list(range(3, 3 + 65)), raw=True, max_new_tokens=1)


def test_max_new_tokens_overflowing_cache(model):
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        model.generate(list(range(3, 3 + 60)), raw=True, max_new_tokens=5)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        model.generate([3, 4], raw=True, max_new_tokens=0)


@pytest.mark.parametrize("kw", [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5},
    {"min_p": 2.0}, {"repetition_penalty": 0.0}, {"seed": -1},
])
def test_bad_sampling_values(model, kw):
    with pytest.raises(ValueError):
        model.generate([3, 4], raw=True, max_new_tokens=2, **kw)


def test_model_stays_usable_after_errors(model, fixtures):
    for bad in ([1024], [], [-1]):
        with pytest.raises(Qwen3Error):
            model.logits(bad)
    assert model.logits([3, 4, 5]).shape == (3, 1024)
