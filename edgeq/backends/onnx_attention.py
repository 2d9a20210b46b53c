"""Self-attention with a KV cache, fused (GroupQueryAttention) or in
standard ONNX ops. Shapes: H query heads, KV key/value heads, D head_dim,
S new tokens, P cached tokens, T = P + S.
"""

from __future__ import annotations

import numpy as np


def attention(dec, layer: int, h: str) -> str:
    """h [1, S, hidden] -> o_proj(attention) [1, S, hidden]; writes the
    layer's present.N.key / present.N.value outputs."""
    cfg, lin = dec.cfg, dec.lin
    p = f"model.layers.{layer}.self_attn."
    names = [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"]
    bias = (
        [n.replace(".weight", ".bias") for n in names] if cfg.attention_bias else None
    )
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if dec._fusable(names):
        qkv = lin.linear(h, names, bias)  # [1, S, (H + 2 KV) D]
        packed = (
            dec.opts.fused_attention and not cfg.qk_norm and _window(cfg, layer) is None
        )
        if packed:
            q, k, v = qkv, "", ""
        else:
            sizes = dec.gw.const("split_qkv", [q_size, kv_size, kv_size])
            q, k, v = dec.gw.node("Split", [qkv, sizes], n_out=3, axis=-1)
    else:
        q, k, v = (
            lin.linear(h, [n], [b] if b else None)
            for n, b in zip(names, bias or [None] * 3)
        )
    if cfg.qk_norm:
        q = _head_norm(dec, q, cfg.num_heads, p + "q_norm.weight")
        k = _head_norm(dec, k, cfg.num_kv_heads, p + "k_norm.weight")
    # Sliding-window layers always use explicit masks: GroupQueryAttention's
    # local_window_size keeps window + 1 keys in onnxruntime 1.22 and window
    # keys in 1.32, so a fused local layer would mean different things on
    # different devices (found running the tiny Gemma test on both).
    if dec.opts.fused_attention and _window(cfg, layer) is None:
        out = _gqa(dec, layer, q, k, v)
    else:
        out = _standard(dec, layer, q, k, v)
    return lin.linear(out, [p + "o_proj.weight"])


def _head_norm(dec, x: str, heads: int, name: str) -> str:
    """RMSNorm over each head's D values (Qwen3, Gemma 3)."""
    gw = dec.gw
    x4 = gw.node(
        "Reshape", [x, gw.const("shape_heads", [0, 0, heads, dec.cfg.head_dim])]
    )
    y = dec._norm(x4, name)
    return gw.node("Reshape", [y, gw.const("shape_flat", [0, 0, -1])])


def _scale(cfg) -> float:
    scalar = cfg.query_pre_attn_scalar if cfg.is_gemma else None
    return float((scalar or cfg.head_dim) ** -0.5)


def _window(cfg, layer: int) -> int | None:
    if cfg.is_gemma and cfg.layer_is_sliding(layer) and cfg.sliding_window:
        return int(cfg.sliding_window)
    return None


def _gqa(dec, layer, q, k, v) -> str:
    """GroupQueryAttention: RoPE on q and k, append to the cache, causal
    (and local) softmax attention; present = past + new along T."""
    cfg, gw = dec.cfg, dec.gw
    cos, sin = dec.rope_tables(layer)
    out = gw.fresh("attn")
    gw.ms(
        "GroupQueryAttention",
        [
            q,
            k,
            v,
            f"past_key_values.{layer}.key",
            f"past_key_values.{layer}.value",
            dec.seqlens_k,
            dec.total32,
            cos,
            sin,
        ],
        outputs=[out, f"present.{layer}.key", f"present.{layer}.value"],
        num_heads=cfg.num_heads,
        kv_num_heads=cfg.num_kv_heads,
        scale=_scale(cfg),
        do_rotary=1,
        rotary_interleaved=0,
    )
    return out


def _standard(dec, layer, q, k, v) -> str:
    """The same computation in standard ops (opset 14)."""
    cfg, gw = dec.cfg, dec.gw
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q4 = _heads_first(dec, q, H)  # [1, H, S, D]
    k4 = _heads_first(dec, k, KV)  # [1, KV, S, D]
    v4 = _heads_first(dec, v, KV)
    cos, sin = _rope_rows(dec, layer)  # [S, D]
    q4, k4 = _rotate(dec, q4, cos, sin), _rotate(dec, k4, cos, sin)
    keys = gw.node(
        "Concat",
        [f"past_key_values.{layer}.key", k4],
        axis=2,
        outputs=[f"present.{layer}.key"],
    )
    values = gw.node(
        "Concat",
        [f"past_key_values.{layer}.value", v4],
        axis=2,
        outputs=[f"present.{layer}.value"],
    )
    keys, values = _repeat_kv(dec, keys, H // KV), _repeat_kv(dec, values, H // KV)
    kt = gw.node("Transpose", [keys], perm=[0, 1, 3, 2])  # [1, H, D, T]
    scores = gw.node("MatMul", [q4, kt])  # [1, H, S, T]
    scores = gw.node("Mul", [scores, gw.const("attn_scale", _scale(cfg), np.float32)])
    scores = gw.node("Add", [scores, _mask(dec, _window(cfg, layer))])
    probs = gw.node("Softmax", [scores], axis=-1)
    ctx = gw.node("MatMul", [probs, values])  # [1, H, S, D]
    ctx = gw.node("Transpose", [ctx], perm=[0, 2, 1, 3])
    return gw.node("Reshape", [ctx, gw.const("shape_flat", [0, 0, H * D])])


def _heads_first(dec, x: str, heads: int) -> str:
    gw = dec.gw
    shape = gw.const("shape_heads", [0, 0, heads, dec.cfg.head_dim])
    return gw.node("Transpose", [gw.node("Reshape", [x, shape])], perm=[0, 2, 1, 3])


def _rope_rows(dec, layer: int) -> tuple[str, str]:
    """cos and sin rows [S, D] (both halves) at the new tokens' positions,
    gathered once per RoPE table."""
    tables = dec.rope_tables(layer)
    if tables not in dec.rope_rows:
        gw, rows = dec.gw, []
        for table in tables:
            queries, _ = dec.standard_positions()
            half = gw.node("Gather", [table, queries])  # [S, D/2]
            rows.append(gw.node("Concat", [half, half], axis=-1))
        dec.rope_rows[tables] = tuple(rows)
    return dec.rope_rows[tables]


def _rotate(dec, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    gw = dec.gw
    half = dec.cfg.head_dim // 2
    x1, x2 = gw.node(
        "Split", [x, gw.const("split_half", [half, half])], n_out=2, axis=-1
    )
    rot = gw.node("Concat", [gw.node("Neg", [x2]), x1], axis=-1)
    return gw.node("Add", [gw.node("Mul", [x, cos]), gw.node("Mul", [rot, sin])])


def _repeat_kv(dec, x: str, groups: int) -> str:
    """[1, KV, T, D] -> [1, KV * groups, T, D], each KV head repeated."""
    if groups == 1:
        return x
    gw = dec.gw
    x5 = gw.node("Unsqueeze", [x, gw.const("axis2", [2])])  # [1, KV, 1, T, D]
    x5 = gw.node("Expand", [x5, gw.const("expand_g", [1, 1, groups, 1, 1])])
    shape = gw.const("shape_h", [1, dec.cfg.num_heads, -1, dec.cfg.head_dim])
    return gw.node("Reshape", [x5, shape])


def _mask(dec, window: int | None) -> str:
    """Additive mask [S, T]: 0 where query i may see key j (j <= i, and
    i - j < window for local layers), float32 min elsewhere."""
    if window in dec.masks:
        return dec.masks[window]
    gw = dec.gw
    one = gw.const("axis1", [1])
    queries, keys = dec.standard_positions()
    qpos = gw.node("Unsqueeze", [queries, one])  # [S, 1]
    kpos = gw.node("Unsqueeze", [keys, gw.const("axis0", [0])])  # [1, T]
    allowed = gw.node("LessOrEqual", [kpos, qpos])
    if window:
        dist = gw.node("Sub", [qpos, kpos])
        near = gw.node("Less", [dist, gw.const("window", window)])
        allowed = gw.node("And", [allowed, near])
    zero = gw.const("zero_f", 0.0, np.float32)
    mask = gw.node("Where", [allowed, zero, gw.const("neg_inf", -3.4e38, np.float32)])
    dec.masks[window] = mask
    return mask
