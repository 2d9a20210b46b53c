"""Predictions for a plan: file size, peak memory, decode tokens/s.

Memory model (batch 1, bytes):

    peak = weights (as stored)
         + KV cache: layers x 2 x KV heads x head_dim x context x kv bits / 8
           (Gemma 3's sliding-window layers keep only their window)
         + activations: hidden states, attention scores over the context,
           the MLP's widest activation and the float32 logits
         + runtime overhead (interpreter, runtime libraries, arenas)

Decode speed is memory-bound: every generated token reads each weight once
(only one row of an untied embedding table) plus the KV cache so far, so

    decode tokens/s = bandwidth x efficiency / bytes read per token.

`efficiency` is the share of the device's peak bandwidth a runtime reaches;
see DECODE_EFFICIENCY for where each figure comes from.
"""

from __future__ import annotations

# Share of peak bandwidth that decode reaches, by (target, device OS), used
# when a device profile gives no decode_efficiency of its own. Calibrated on
# the build machine (2-vCPU x86_64 VM, `edgeq devices`' copy test for the
# bandwidth) with `python bench/bench_plans.py efficiency`: SmolLM2-135M,
# 1 thread, bench/results/plans-efficiency-20261204-191200.json. MLX on
# macOS cannot be measured here (no Apple GPU): that figure is an
# assumption until a Mac run replaces it.
DECODE_EFFICIENCY = {
    ("onnxruntime", "linux"): (0.38, "measured: onnxruntime INT8 decode here"),
    ("onnxruntime", "macos"): (0.38, "measured on linux x86_64, unverified here"),
    ("mlx", "macos"): (0.65, "assumed, not measured (no Apple GPU here)"),
    # MLX's CPU backend has no fast quantized kernels: compute-bound on
    # Linux, far below the memory roofline.
    ("mlx", "linux"): (0.019, "measured: mlx CPU decode here"),
}
FALLBACK_EFFICIENCY = (0.38, "default")
# Bytes a runtime needs beyond weights and KV cache (interpreter, runtime
# libraries, arenas): RSS of an idle loaded runner, rounded up.
RUNTIME_OVERHEAD_BYTES = {"mlx": 400 << 20, "onnxruntime": 250 << 20}


def kv_cache_bytes(cfg, context: int, kv_bits: int = 16) -> int:
    """Keys and values for every layer at `context` tokens; Gemma's local
    layers keep only their sliding window."""
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * kv_bits // 8
    total = 0
    for layer in range(cfg.num_layers):
        span = context
        if cfg.layer_is_sliding(layer) and cfg.sliding_window:
            span = min(context, cfg.sliding_window)
        total += per_token * span
    return total


def activation_bytes(cfg, context: int) -> int:
    """Working buffers at batch 1 while decoding: hidden states, attention
    scores over the context, the MLP's widest activation and the float32
    logits. (A long prompt's prefill needs more where a runtime
    materialises the scores of a whole chunk; runtimes chunk it.)"""
    return 4 * (
        4 * cfg.hidden_size
        + cfg.num_heads * context
        + 3 * cfg.intermediate_size
        + 2 * cfg.vocab_size
    )


def decode_bytes_per_token(plan, cfg) -> int:
    """Weight bytes read per decoded token: every weight once, except that
    only one row of the embedding table is gathered (unless it doubles as
    the head)."""
    total = 0
    for t in plan.tensors:
        if t.name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            total += t.storage_bytes() // max(1, t.shape[0])
        else:
            total += t.storage_bytes()
    return total


def decode_efficiency(target: str, device) -> tuple[float, str]:
    """(share of peak bandwidth, where the figure comes from)."""
    own = getattr(device, "decode_efficiency", None)
    if own:
        return float(own), "device profile"
    return DECODE_EFFICIENCY.get((target, device.os), FALLBACK_EFFICIENCY)


def usable_memory(plan, device) -> tuple[int, bool]:
    """The device's usable bytes, capped by --max-memory; and if capped."""
    usable = int(device.usable_memory_bytes)
    cap = plan.runtime.get("max_memory_bytes")
    if cap and cap < usable:
        return int(cap), True
    return usable, False


def predict(plan, cfg, device) -> None:
    """Fill plan.predictions (sizes in bytes, speeds in tokens/s)."""
    ctx = plan.runtime["context_length"]
    kv_bits = plan.runtime.get("kv_cache_bits", 16)
    weights = plan.weight_bytes
    kv = kv_cache_bytes(cfg, ctx, kv_bits)
    act = activation_bytes(cfg, ctx)
    overhead = RUNTIME_OVERHEAD_BYTES.get(plan.target, 300 << 20)
    peak = weights + kv + act + overhead
    usable, capped = usable_memory(plan, device)
    eff, eff_source = decode_efficiency(plan.target, device)
    per_token = decode_bytes_per_token(plan, cfg)
    bandwidth = device.bandwidth_gbs * 1e9
    plan.predictions = {
        "file_size_bytes": weights,
        "bits_per_weight": round(plan.bits_per_weight, 3),
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "activation_bytes": act,
        "runtime_overhead_bytes": overhead,
        "peak_memory_bytes": peak,
        "usable_memory_bytes": usable,
        "memory_capped": capped,
        "fits": peak <= usable,
        "decode_bytes_per_token": per_token,
        "decode_efficiency": eff,
        "decode_efficiency_source": eff_source,
        "decode_tokens_per_s": round(bandwidth * eff / per_token, 1),
        "decode_tokens_per_s_full_context": round(
            bandwidth * eff / (per_token + kv), 1
        ),
        "roofline_tokens_per_s": round(bandwidth / per_token, 1),
    }
