"""The shared quantization planner: plan = f(model, device, constraints).

Decides, before any heavy work, how each tensor is stored, whether the
result fits the device, and how fast it should decode. Both targets compile
the plan it returns (see edgeq.plan for the schema). Steps of `make_plan`:

1. defaults per target (mlx: 4-bit affine group 64; onnxruntime: INT8
   symmetric, moved to 8-bit blocks of 32 by the ONNX backend's rule);
2. shape checks per tensor, with fallbacks that are listed with their size
   cost (a smaller group, per-channel INT8, or 16-bit);
3. rules for the embedding table and the output head (reason "rule");
4. user overrides (`--override 'PATTERN=BITS[/GROUP]'`);
5. with `target_bpw`, sensitivity-driven mixed precision (edgeq.mixed);
6. warnings, then predictions: file size, memory, decode tokens/s.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edgeq.errors import PlanError
from edgeq.plan import VALID_GROUPS, Plan, TensorPlan, validate_against
from edgeq.predict import (
    activation_bytes,
    decode_bytes_per_token,
    kv_cache_bytes,
    predict,
)

log = logging.getLogger(__name__)

__all__ = [
    "PlanRequest",
    "activation_bytes",
    "check_fits",
    "decode_bytes_per_token",
    "kv_cache_bytes",
    "make_plan",
    "plan_model",
    "predict",
    "validate_against",
]  # fmt: skip

TARGET_DEFAULTS = {
    "mlx": {"bits": 4, "group_size": 64, "scheme": "affine"},
    # INT8 per-channel symmetric: what ONNX Runtime's dynamic MatMul takes.
    "onnxruntime": {"bits": 8, "group_size": None, "scheme": "symmetric"},
}
# Bits each target can store (besides 16 = kept in float).
TARGET_BITS = {"mlx": (2, 3, 4, 6, 8), "onnxruntime": (2, 4, 8)}
# The output head and the embedding table never go below this many bits:
# small models lose coherence first there (llama.cpp keeps its output at
# 6-bit in Q4_K_M for the same reason).
TABLE_MIN_BITS = 4
# A 16-bit fallback this large (share of parameters) is a warning, not a note.
BIG_TENSOR_SHARE = 0.01
_LAYER = re.compile(r"\.layers\.\d+\.")


@dataclass
class PlanRequest:
    """What the user asked for; None means the target's default."""

    target: str
    bits: int | None = None
    group_size: int | None = None
    context_length: int = 4096
    kv_cache_bits: int = 16
    threads: int | None = None
    max_memory_bytes: int | None = None
    target_bpw: float | None = None
    overrides: list[str] = field(default_factory=list)
    calibration_tokens: int | None = None
    use_cache: bool = True
    progress: Callable | None = field(default=None, repr=False, compare=False)


def make_plan(source, device, req: PlanRequest) -> Plan:
    """The plan for `source` on `device` (see the module docstring)."""
    defaults = _defaults(req)
    cfg = source.config
    tensors = [
        _tensor_plan(i.name, list(i.shape), defaults, req.target)
        for i in source.infos()
    ]
    plan = Plan(
        model=source.describe() | {"config": cfg.to_dict()},
        target=req.target,
        device=device.name,
        defaults=defaults,
        tensors=tensors,
        runtime={
            "context_length": req.context_length,
            "kv_cache_bits": req.kv_cache_bits,
            "threads": req.threads or device.cores,
            "max_memory_bytes": req.max_memory_bytes,
        },
    )
    floors = _apply_rules(plan, cfg)
    _apply_overrides(plan, req.overrides)
    if req.target_bpw is not None:
        _mix(plan, source, req, floors)
    elif req.target == "onnxruntime" and req.bits is None and req.group_size is None:
        _onnx_default_rules(plan, device)
    _warn(plan)
    predict(plan, cfg, device)
    return plan


def plan_model(model: str, device_name: str, req: PlanRequest):
    """Open the model and device by name and plan; refuses a target the
    device cannot run. Returns (plan, source, device); the caller decides
    what to do when the plan does not fit (see `check_fits`)."""
    from edgeq.backends import check_device_can_run
    from edgeq.devices import get_device
    from edgeq.models import open_model

    device = get_device(device_name)
    req.target = req.target or device.target
    check_device_can_run(req.target, device)
    source = open_model(model)
    return make_plan(source, device, req), source, device


def _defaults(req: PlanRequest) -> dict:
    if req.target not in TARGET_DEFAULTS:
        raise PlanError(
            f"--target {req.target}: unknown target; choose one of "
            f"{', '.join(TARGET_DEFAULTS)}"
        )
    defaults = dict(TARGET_DEFAULTS[req.target])
    allowed = TARGET_BITS[req.target] + (16,)
    if req.bits is not None:
        if req.bits not in allowed:
            raise PlanError(
                f"--bits {req.bits}: the {req.target} target stores "
                f"{', '.join(map(str, allowed))} bits"
            )
        defaults["bits"] = req.bits
    if req.group_size is not None:
        if req.group_size not in VALID_GROUPS:
            raise PlanError(f"--group-size {req.group_size}: choose {VALID_GROUPS}")
        defaults["group_size"] = req.group_size
    if req.target == "onnxruntime" and defaults["bits"] < 8:
        # Below 8 bits ONNX Runtime stores blocks (MatMulNBits), not channels.
        defaults["group_size"] = defaults["group_size"] or 32
    if req.target_bpw is not None and not 2.0 <= req.target_bpw <= 16.0:
        raise PlanError(f"--target-bpw {req.target_bpw:g}: choose 2 to 16")
    defaults["rules"] = []
    return defaults


def is_matrix(name: str, shape) -> bool:
    """A weight matrix the planner may quantize (norms and biases stay)."""
    return len(shape) == 2 and name.endswith(".weight")


def _tensor_plan(name: str, shape: list[int], d: dict, target: str) -> TensorPlan:
    if not is_matrix(name, shape):
        return TensorPlan(name, shape, 16, None, "float", "not-a-matrix")
    bits, group, scheme = d["bits"], d["group_size"], d["scheme"]
    if bits == 16:
        return TensorPlan(name, shape, 16, None, "float", "default")
    return fit_shape(TensorPlan(name, shape, bits, group, scheme), target)


def fit_shape(t: TensorPlan, target: str) -> TensorPlan:
    """`t` if its group divides the input width, else the nearest storage
    that does (a smaller group; per-channel INT8 on onnxruntime; 16-bit),
    with reason "shape-fallback" and the size cost in the note."""
    cols = t.shape[1]
    if t.group_size is None or cols % t.group_size == 0:
        return t
    wanted = f"{t.bits}-bit group {t.group_size}"
    for smaller in (g for g in sorted(VALID_GROUPS, reverse=True) if g < t.group_size):
        if cols % smaller == 0:
            out = replace(t, group_size=smaller, reason="shape-fallback")
            out.note = (
                f"input width {cols} is not a multiple of {t.group_size}; group "
                f"{smaller} instead ({_cost(out, t)})"
            )
            return out
    if target == "onnxruntime":
        out = replace(t, bits=8, group_size=None, scheme="symmetric")
    else:
        out = replace(t, bits=16, group_size=None, scheme="float")
    out.reason = "shape-fallback"
    out.note = (
        f"input width {cols} fits no group size in {VALID_GROUPS}; "
        f"{'8-bit per-channel' if out.quantized else 'kept in 16-bit'} instead of "
        f"{wanted} ({_cost(out, t)})"
    )
    return out


def _cost(new: TensorPlan, old: TensorPlan) -> str:
    """Size cost of storing `new` instead of `old` (old may be unstorable:
    its bytes are computed as if the last group were padded)."""
    delta = new.storage_bytes() - old.storage_bytes()
    return f"{'+' if delta >= 0 else '-'}{abs(delta) / 1e6:.3f} MB"


def head_name(plan: Plan) -> str:
    """The tensor that computes the logits: lm_head, or the tied table."""
    names = {t.name for t in plan.tensors}
    return (
        "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
    )


def _apply_rules(plan: Plan, cfg) -> dict[str, int]:
    """The embedding/head rules; returns the bit floors for mixed plans."""
    head = head_name(plan)
    tables = [n for n in (head, "model.embed_tokens.weight") if _has(plan, n)]
    tables = list(dict.fromkeys(tables))
    rules = plan.defaults["rules"]
    rules.append(
        f"output head and embedding table: at least {TABLE_MIN_BITS} bits "
        "(small models lose coherence there first)"
    )
    if head == "model.embed_tokens.weight":
        rules.append(
            "tied embeddings: model.embed_tokens.weight is also the output head "
            "and has one precision for both uses"
        )
        plan.tensor(head).note = "tied: also the output head"
    for name in tables:
        t = plan.tensor(name)
        if t.quantized and t.bits < TABLE_MIN_BITS:
            raised = fit_shape(
                replace(t, bits=TABLE_MIN_BITS, group_size=t.group_size), plan.target
            )
            raised.reason = "rule"
            raised.note = (
                f"{'output head' if name == head else 'embedding table'}: at least "
                f"{TABLE_MIN_BITS} bits (rule)"
            )
            _replace(plan, raised)
    return {name: TABLE_MIN_BITS for name in tables}


def _has(plan: Plan, name: str) -> bool:
    return any(t.name == name for t in plan.tensors)


def _replace(plan: Plan, new: TensorPlan) -> None:
    plan.tensors = [new if t.name == new.name else t for t in plan.tensors]


def parse_override(text: str, target: str) -> tuple[str, int, int | None]:
    """'PATTERN=BITS[/GROUP]' (GROUP 'pc' = per-channel) -> its parts."""
    pattern, sep, spec = text.partition("=")
    bits_s, _, group_s = spec.partition("/")
    try:
        bits = int(bits_s)
        group = None if group_s in ("", "pc") else int(group_s)
    except ValueError:
        bits = -1
    if not sep or not pattern or bits not in TARGET_BITS[target] + (16,):
        raise PlanError(
            f"--override '{text}': write PATTERN=BITS[/GROUP], e.g. "
            f"'lm_head.weight=8' or '*.down_proj.weight=6/32'; {target} stores "
            f"{', '.join(map(str, TARGET_BITS[target] + (16,)))} bits"
        )
    if group is not None and group not in VALID_GROUPS:
        raise PlanError(
            f"--override '{text}': group {group} is not one of {VALID_GROUPS}"
        )
    return pattern, bits, group


def _apply_overrides(plan: Plan, overrides: list[str]) -> None:
    for text in overrides:
        pattern, bits, group = parse_override(text, plan.target)
        hits = [t for t in plan.tensors if fnmatch.fnmatchcase(t.name, pattern)]
        hits = [t for t in hits if is_matrix(t.name, t.shape)]
        if not hits:
            raise PlanError(
                f"--override '{text}': no weight matrix matches '{pattern}'"
            )
        for t in hits:
            _replace(plan, _override(t, bits, group, plan))


def _override(t: TensorPlan, bits: int, group, plan: Plan) -> TensorPlan:
    if bits == 16:
        return replace(t, bits=16, group_size=None, scheme="float",
                       reason="user-override", note="--override")  # fmt: skip
    scheme = TARGET_DEFAULTS[plan.target]["scheme"]
    if group is None and plan.target == "mlx":
        group = plan.defaults.get("group_size") or 64
    if plan.target == "onnxruntime" and group is None and bits != 8:
        group = 32
    new = fit_shape(replace(t, bits=bits, group_size=group, scheme=scheme), plan.target)
    if new.reason == "shape-fallback":
        raise PlanError(
            f"--override: tensor '{t.name}' cannot be stored as {bits}-bit group "
            f"{group}: {new.note}"
        )
    new.reason, new.note = "user-override", "--override"
    return new


def _mix(plan: Plan, source, req: PlanRequest, floors: dict) -> None:
    from edgeq.mixed import allocate
    from edgeq.sensitivity import load_or_measure

    table = load_or_measure(
        source, req.target, tokens=req.calibration_tokens, progress=req.progress,
        use_cache=req.use_cache,
    )  # fmt: skip
    allocate(plan, table, req.target_bpw, floors)
    plan.defaults["target_bpw"] = req.target_bpw


def _onnx_default_rules(plan: Plan, device) -> None:
    """The ONNX backend's own rule for default INT8 plans (8-bit blocks of
    32 where the width allows): applied here so predictions match."""
    try:
        from edgeq.backends.onnx_backend import default_onnx_rules
    except ImportError:  # onnx not installed: keep per-channel INT8
        log.warning("onnx backend unavailable; INT8 stays per-channel")
        return
    default_onnx_rules(plan, device)
    if any(t.reason == "rule" and t.bits == 8 for t in plan.tensors):
        plan.defaults["rules"].append(
            "onnxruntime INT8: 8-bit blocks of 32 (MatMulNBits) where the input "
            "width allows, per-channel elsewhere"
        )


def _warn(plan: Plan) -> None:
    bits = plan.defaults["bits"]
    if bits in (2, 3) and plan.defaults.get("target_bpw") is None:
        plan.warnings.append(
            f"uniform {bits}-bit: small models often turn to gibberish below 4 "
            "bits; check `edgeq eval` before shipping"
        )
    params = sum(t.numel for t in plan.tensors)
    fallbacks = [t for t in plan.tensors if t.reason == "shape-fallback"]
    kept: dict[str, list[TensorPlan]] = {}
    for t in fallbacks:
        if not t.quantized:
            kept.setdefault(_LAYER.sub(".layers.*.", t.name), []).append(t)
    for pattern, group in kept.items():
        share = sum(t.numel for t in group) / params if params else 0.0
        if share >= BIG_TENSOR_SHARE:
            cost = sum(t.storage_bytes() for t in group) / 1e6
            plan.warnings.append(
                f"{len(group)} tensor(s) '{pattern}' ({share:.1%} of the weights, "
                f"{cost:.3f} MB) stay in 16-bit: {group[0].note}"
            )
    if fallbacks:
        plan.warnings.append(
            f"{len(fallbacks)} tensor(s) fell back from the requested storage "
            "because of their shape; see reason 'shape-fallback' in the plan"
        )


def check_fits(plan: Plan, device, source=None, req: PlanRequest | None = None):
    """Raise PlanError when the plan needs more memory than the device has,
    naming the closest plan that would fit (fewer bits, then a shorter
    context), or saying that none does."""
    p = plan.predictions
    if p["fits"]:
        return
    hint = "no plan fits: choose a smaller model or a larger device"
    if source is not None and req is not None:
        hint = _smallest_fitting(plan, device, source, req)
    limit = p["usable_memory_bytes"]
    capped = " (--max-memory)" if p.get("memory_capped") else ""
    raise PlanError(
        f"model needs {_gb(p['peak_memory_bytes'])} (weights "
        f"{_gb(p['weights_bytes'])} + KV cache {_gb(p['kv_cache_bytes'])} at "
        f"{plan.runtime['context_length']} tokens + activations "
        f"{_gb(p['activation_bytes'])} + runtime "
        f"{_gb(p['runtime_overhead_bytes'])}) but device '{device.name}' has "
        f"{_gb(limit)} usable{capped}; {hint}"
    )


def _smallest_fitting(plan: Plan, device, source, req: PlanRequest) -> str:
    base = replace(req, target_bpw=None, progress=None)
    bits_now = plan.defaults["bits"]
    lower = [b for b in sorted(TARGET_BITS[req.target], reverse=True) if b < bits_now]
    contexts = []
    ctx = req.context_length
    while ctx > 256:
        ctx //= 2
        contexts.append(ctx)
    # Fewer bits at the asked context first; then shorter contexts.
    trials = [(b, req.context_length) for b in lower]
    trials += [(b, c) for b in [bits_now] + lower for c in contexts]
    for bits, context in trials:
        trial = make_plan(
            source, device,
            replace(base, bits=bits, context_length=context, group_size=None),
        )  # fmt: skip
        if trial.predictions["fits"]:
            flags = [f"--bits {bits}"] if bits != bits_now else []
            if context != req.context_length:
                flags.append(f"--context {context}")
            need = _gb(trial.predictions["peak_memory_bytes"])
            return f"the closest plan that fits: {' '.join(flags)} ({need})"
    smallest = min(TARGET_BITS[req.target])
    return (
        f"no plan fits, not even {smallest}-bit at --context 256; choose a "
        "smaller model or a device with more memory"
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
