"""An independent float64 numpy forward pass of Qwen3 / Qwen3-MoE, written from the transformers
modeling code, used by the tests as a second oracle (e.g. to find rows whose MoE routing is so close
to a tie that bf16 rounding may legitimately pick another expert)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float64 arrays (bf16 widened by a 16-bit shift)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        raw = np.frombuffer(data[8 + n + s : 8 + n + e], dtype=_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float64).reshape(info["shape"])
    return out


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    config = json.loads((folder / "config.json").read_text())
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(read_safetensors(f))
    return config, weights


def _rms_norm(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def _inv_freq(c):
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    base = c["rope_theta"]
    pos_freqs = base ** (np.arange(0, hd, 2) / hd)
    inv = 1.0 / pos_freqs
    rs = c.get("rope_scaling")
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv, 1.0
    assert rs.get("rope_type", rs.get("type")) == "yarn"
    orig = rs.get("original_max_position_embeddings") or c["max_position_embeddings"]
    factor = c["max_position_embeddings"] / orig if "original_max_position_embeddings" in rs else rs["factor"]
    attn = 0.1 * np.log(factor) + 1.0 if factor > 1 else 1.0
    dim_for = lambda rot: hd * np.log(orig / (rot * 2 * np.pi)) / (2 * np.log(base))
    low, high = max(np.floor(dim_for(32)), 0), min(np.ceil(dim_for(1)), hd - 1)
    ramp = np.clip((np.arange(hd // 2) - low) / ((high - low) or 0.001), 0, 1)
    extrap = 1 - ramp
    return (inv / factor) * (1 - extrap) + inv * extrap, attn


def forward(config: dict, w: dict[str, np.ndarray], ids: list[int]):
    """Logits [L, V] and, per row, the smallest router gap between the k-th and (k+1)-th expert
    probability over all MoE layers (inf for dense models)."""
    c = config
    L, H = len(ids), c["hidden_size"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or H // nh
    eps = c["rms_norm_eps"]
    inv, attn_factor = _inv_freq(c)
    ang = np.arange(L)[:, None] * inv[None, :]
    cos, sin = np.cos(ang) * attn_factor, np.sin(ang) * attn_factor

    def rope(x):  # [L, heads, hd], rotating halves
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        cs, sn = cos[:, None, :], sin[:, None, :]
        return np.concatenate([x1 * cs - x2 * sn, x2 * cs + x1 * sn], -1)

    silu = lambda v: v / (1 + np.exp(-v))
    margins = np.full(L, np.inf)
    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((L, L), -np.inf), 1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = _rms_norm((h @ w[p + "self_attn.q_proj.weight"].T).reshape(L, nh, hd), w[p + "self_attn.q_norm.weight"], eps)
        k = _rms_norm((h @ w[p + "self_attn.k_proj.weight"].T).reshape(L, nkv, hd), w[p + "self_attn.k_norm.weight"], eps)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(L, nkv, hd)
        q, k = rope(q), rope(k)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", probs, v).reshape(L, nh * hd)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        n_exp = c.get("num_experts", 0)
        is_moe = n_exp > 0 and i not in c.get("mlp_only_layers", []) and (i + 1) % c.get("decoder_sparse_step", 1) == 0
        if not is_moe:
            g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
            continue
        k_top = c["num_experts_per_tok"]
        logits = h @ w[p + "mlp.gate.weight"].T
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        order = np.argsort(-pr, axis=-1, kind="stable")
        srt = np.take_along_axis(pr, order, -1)
        margins = np.minimum(margins, srt[:, k_top - 1] - srt[:, k_top])
        out = np.zeros_like(x)
        for t in range(L):
            top = order[t, :k_top]
            wts = pr[t, top] / (pr[t, top].sum() if c.get("norm_topk_prob") else 1.0)
            for e, wt in zip(top, wts):
                ep = f"{p}mlp.experts.{e}."
                y = silu(w[ep + "gate_proj.weight"] @ h[t]) * (w[ep + "up_proj.weight"] @ h[t])
                out[t] += wt * (w[ep + "down_proj.weight"] @ y)
        x = x + out
    x = _rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T, margins
