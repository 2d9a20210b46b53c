"""The shared quantization planner: plan = f(model, device, constraints).

Decides, before any heavy work, how each tensor is stored, whether the
result fits the device, and how fast it should decode. Both targets compile
the plan it returns (see edgeq.plan for the schema).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edgeq.errors import PlanError
from edgeq.plan import VALID_BITS, VALID_GROUPS, Plan, TensorPlan

log = logging.getLogger(__name__)

# Decode reaches this share of peak bandwidth when the profile does not say;
# calibrated against measured decode on this project's machines (see README).
DEFAULT_DECODE_EFFICIENCY = {"mlx": 0.65, "onnxruntime": 0.45}
# Bytes a runtime needs beyond weights and KV cache (interpreter, runtime
# libraries, arenas): measured RSS of an idle loaded runner, rounded up.
RUNTIME_OVERHEAD_BYTES = {"mlx": 400 << 20, "onnxruntime": 250 << 20}
TARGET_DEFAULTS = {
    "mlx": {"bits": 4, "group_size": 64, "scheme": "affine"},
    # INT8 per-channel symmetric: what ONNX Runtime's dynamic MatMul takes.
    "onnxruntime": {"bits": 8, "group_size": None, "scheme": "symmetric"},
}


@dataclass
class PlanRequest:
    target: str
    bits: int | None = None
    group_size: int | None = None
    context_length: int = 4096
    kv_cache_bits: int = 16
    threads: int | None = None
    max_memory_bytes: int | None = None


def is_matrix(name: str, shape) -> bool:
    return len(shape) == 2 and name.endswith(".weight")


def make_plan(source, device, req: PlanRequest) -> Plan:
    """A uniform plan with shape fallbacks, memory fit and speed predictions."""
    defaults = dict(TARGET_DEFAULTS[req.target])
    if req.bits is not None:
        if req.bits not in VALID_BITS:
            raise PlanError(f"--bits {req.bits}: choose one of {VALID_BITS}")
        defaults["bits"] = req.bits
    if req.group_size is not None:
        if req.group_size not in VALID_GROUPS:
            raise PlanError(f"--group-size {req.group_size}: choose {VALID_GROUPS}")
        defaults["group_size"] = req.group_size
    if req.target == "onnxruntime" and defaults["bits"] < 8:
        defaults.setdefault("group_size", 32)
        defaults["group_size"] = defaults["group_size"] or 32
        defaults["scheme"] = "symmetric"
    tensors = [_tensor_plan(i.name, list(i.shape), defaults) for i in source.infos()]
    plan = Plan(
        model=source.describe() | {"config": source.config.to_dict()},
        target=req.target,
        device=device.name,
        defaults=defaults,
        tensors=tensors,
        runtime={
            "context_length": req.context_length,
            "kv_cache_bits": req.kv_cache_bits,
            "threads": req.threads or device.cores,
        },
    )
    if defaults["bits"] in (2, 3):
        plan.warnings.append(
            f"uniform {defaults['bits']}-bit: small models often turn to "
            "gibberish below 4 bits; check `edgeq eval` before shipping"
        )
    predict(plan, source.config, device)
    return plan


def _tensor_plan(name: str, shape: list[int], d: dict) -> TensorPlan:
    if not is_matrix(name, shape):
        return TensorPlan(name, shape, 16, None, "float", "not-a-matrix")
    bits, group, scheme = d["bits"], d["group_size"], d["scheme"]
    if bits == 16:
        return TensorPlan(name, shape, 16, None, "float", "default")
    cols = shape[1]
    if group is None or cols % group == 0:
        return TensorPlan(name, shape, bits, group, scheme, "default")
    for smaller in (g for g in (128, 64, 32) if g < group):
        if cols % smaller == 0:
            return TensorPlan(
                name, shape, bits, smaller, scheme, "shape-fallback",
                f"input width {cols} is not a multiple of {group}; group {smaller}",
            )  # fmt: skip
    kept = TensorPlan(name, shape, 16, None, "float", "shape-fallback")
    cost = (
        kept.storage_bytes()
        - TensorPlan(name, shape, bits, None, scheme).storage_bytes()
    )
    kept.note = (
        f"input width {cols} fits no group size in {VALID_GROUPS}; kept in "
        f"16-bit (+{cost / 1e6:.2f} MB)"
    )
    return kept


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
    """Working buffers at batch 1: hidden states, attention scores over the
    context, the MLP's widest activation and the float32 logits."""
    return 4 * (
        4 * cfg.hidden_size
        + cfg.num_heads * context
        + 3 * cfg.intermediate_size
        + 2 * cfg.vocab_size
    )


def decode_bytes_per_token(plan: Plan, cfg) -> int:
    """Bytes read per decoded token: every weight once, except that only one
    row of the embedding table is gathered (unless it doubles as the head)."""
    total = 0
    for t in plan.tensors:
        if t.name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            total += t.storage_bytes() // max(1, t.shape[0])
        else:
            total += t.storage_bytes()
    return total


def predict(plan: Plan, cfg, device) -> None:
    """Fill plan.predictions and refuse a plan that does not fit."""
    ctx = plan.runtime["context_length"]
    weights = plan.weight_bytes
    kv = kv_cache_bytes(cfg, ctx, plan.runtime.get("kv_cache_bits", 16))
    act = activation_bytes(cfg, ctx)
    overhead = RUNTIME_OVERHEAD_BYTES[plan.target]
    peak = weights + kv + act + overhead
    eff = (
        getattr(device, "decode_efficiency", None)
        or DEFAULT_DECODE_EFFICIENCY[plan.target]
    )
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
        "usable_memory_bytes": int(device.usable_memory_bytes),
        "fits": peak <= device.usable_memory_bytes,
        "decode_bytes_per_token": per_token,
        "decode_efficiency": eff,
        "decode_tokens_per_s": round(bandwidth * eff / per_token, 1),
        "roofline_tokens_per_s": round(bandwidth / per_token, 1),
    }


def check_fits(plan: Plan, device, source=None, req: PlanRequest | None = None):
    """Raise PlanError when the plan needs more memory than the device has,
    naming the smallest plan that would fit, or saying none does."""
    p = plan.predictions
    limit = p["usable_memory_bytes"]
    if p["fits"]:
        return
    need = p["peak_memory_bytes"]
    hint = "no bit width fits; choose a smaller model or a larger device"
    if source is not None and req is not None:
        for bits in (b for b in (8, 6, 4, 3, 2) if b < plan.defaults["bits"]):
            trial = make_plan(
                source, device, PlanRequest(**{**req.__dict__, "bits": bits})
            )
            if trial.predictions["fits"]:
                hint = f"--bits {bits} would fit ({_gb(trial.predictions['peak_memory_bytes'])})"
                break
        else:
            ctx = req.context_length
            while ctx > 256:
                ctx //= 2
                trial = make_plan(
                    source,
                    device,
                    PlanRequest(**{**req.__dict__, "context_length": ctx}),
                )
                if trial.predictions["fits"]:
                    hint = f"--context {ctx} would fit"
                    break
    raise PlanError(
        f"model needs {_gb(need)} (weights {_gb(p['weights_bytes'])} + KV cache "
        f"{_gb(p['kv_cache_bytes'])} at {plan.runtime['context_length']} tokens "
        f"+ runtime) but device '{device.name}' has {_gb(limit)} usable; {hint}"
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
