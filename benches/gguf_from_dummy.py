"""Write qwen3rs's random `dummy:<model>` weights as GGUF (BF16 or Q8_0) for llama.cpp, so both engines
run on exactly the same weights.

    cargo run --release --example dump_dummy -- python/qwen3rs/configs/Qwen3-0.6B.json /tmp/q06.safetensors
    python benches/gguf_from_dummy.py Qwen3-0.6B /tmp/q06.safetensors /tmp/q06-bf16.gguf bf16   # or q8_0

The safetensors file is written by examples/dump_dummy.rs (the same DummyWeights stream the model
loads); the vocabulary comes from the bundled tokenizer, padded to the config's vocab_size."""

import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "python" / "qwen3rs"

HF_TO_GGUF = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def read_safetensors(path):
    """name → uint16 array of bf16 bits, shaped."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "BF16", meta
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(raw, dtype=np.uint16, count=(b - a) // 2, offset=8 + n + a).reshape(meta["shape"])
    return out


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    return f"blk.{parts[2]}." + HF_TO_GGUF[".".join(parts[3:])]


def add_vocab(w, vocab_size):
    tok = json.loads((PKG / "tokenizer" / "tokenizer.json").read_text())
    tokens = ["" for _ in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for t, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for t in tok["added_tokens"]:
        tokens[t["id"]], types[t["id"]] = t["content"], gguf.TokenType.CONTROL
    for i in range(vocab_size):
        if not tokens[i]:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(151645)
    w.add_bos_token_id(151643)
    w.add_add_bos_token(False)


def main(model, st_path, out_path, kind):
    cfg = json.loads((PKG / "configs" / f"{model}.json").read_text())
    w = gguf.GGUFWriter(out_path, "qwen3")
    w.add_name(f"dummy-{model}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if kind == "q8_0" else gguf.LlamaFileType.MOSTLY_BF16)
    add_vocab(w, cfg["vocab_size"])
    for name, bits in read_safetensors(st_path).items():
        if bits.ndim == 1 or kind == "bf16":
            # Norms stay f32 (as llama.cpp's converter writes them); matrices BF16 as stored.
            if bits.ndim == 1:
                w.add_tensor(gguf_name(name), (bits.astype(np.uint32) << 16).view(np.float32))
            else:
                w.add_tensor(gguf_name(name), bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            f32 = (bits.astype(np.uint32) << 16).view(np.float32)
            q = gguf.quants.quantize(f32, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
