"""Mixed precision: spend a bits-per-weight budget where it buys the most.

Each quantizable matrix may take any storage choice its target offers
(edgeq.sensitivity.CHOICES) that its input width allows and its rule floor
permits; the sensitivity table predicts the KL each choice costs. The total
predicted KL (tensors treated as independent, which holds for small
perturbations) is minimised under the byte budget by the classic greedy for
this multiple-choice knapsack: each tensor's choices are reduced to their
lower convex hull in (bytes, KL), every tensor starts at its cheapest hull
point, and the upgrade with the largest KL saved per byte is bought next
until the budget is spent.
"""

from __future__ import annotations

import heapq
import logging

from edgeq.errors import PlanError
from edgeq.plan import Plan, TensorPlan
from edgeq.sensitivity import CHOICES, Choice, SensitivityTable

log = logging.getLogger(__name__)

# Choices below this many bits are used only when the budget cannot be met
# without them: on stories260K, trading 4-bit for 3-bit tensors cost more
# than the sum of their measured KLs predicted (errors compound), so at
# 4.5+ bits per weight they made plans worse (bench/bench_plans.py).
LOW_BITS_FROM = 4
METHOD = (
    "KL(float || quantized) per tensor on the shipped calibration text, "
    "measured at its most damaging choice and scaled to the other choices by "
    "activation-weighted weight error"
)


def _option(t: TensorPlan, c: Choice, table: SensitivityTable):
    bytes_ = TensorPlan(t.name, t.shape, c.bits, c.group_size, c.scheme).storage_bytes()
    return (bytes_, table.tensors[t.name].predicted_kl(c.key), c)


def _options(t: TensorPlan, table: SensitivityTable, target: str, min_bits: int):
    keys = table.tensors[t.name].errors
    return [
        _option(t, c, table)
        for c in CHOICES[target]
        if c.key in keys and c.bits >= min_bits
    ]


def _hull(options: list) -> list:
    """Lower convex hull of (bytes, kl) points, cheapest first, each next
    point strictly better in KL: the only choices worth buying."""
    pts = sorted(options, key=lambda o: (o[0], o[1]))
    frontier = []
    for p in pts:
        if frontier and p[1] >= frontier[-1][1]:
            continue  # costs more and is no better
        frontier.append(p)
    hull: list = []
    for p in frontier:
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], p):
            hull.pop()  # hull[-1] saves less per byte than going straight on
        hull.append(p)
    return hull


def _slope(a, b) -> float:
    """KL saved per extra byte going from a to b."""
    return (a[1] - b[1]) / max(1, b[0] - a[0])


def choosable(t: TensorPlan, table: SensitivityTable) -> bool:
    """Tensors the allocator may move: measured, not pinned by the user."""
    return t.name in table.tensors and t.reason != "user-override"


def allocate(
    plan: Plan, table: SensitivityTable, target_bpw: float, floors: dict[str, int]
) -> None:
    """Set each choosable tensor's storage so that the plan's bits per weight
    stays <= target_bpw with the least predicted KL; `floors` maps tensor
    names to their minimum bits (the rules). Raises PlanError when even the
    cheapest choices exceed the budget."""
    params = sum(t.numel for t in plan.tensors)
    budget = target_bpw * params / 8
    moving = [t for t in plan.tensors if choosable(t, table)]
    names = {t.name for t in moving}
    fixed = sum(t.storage_bytes() for t in plan.tensors if t.name not in names)
    for min_bits in (LOW_BITS_FROM, 0):
        hulls = {
            t.name: _hull(
                _options(t, table, plan.target, max(min_bits, floors.get(t.name, 0)))
            )
            for t in moving
        }
        total = fixed + sum(h[0][0] for h in hulls.values())
        if total <= budget:
            break
    else:
        raise PlanError(
            f"--target-bpw {target_bpw:g} is below the smallest mixed plan for "
            f"this model ({8 * total / params:.2f} bits per weight with every "
            "matrix at its cheapest choice and the rule floors); raise it, or "
            "use --bits for a uniform plan"
        )
    at = {name: 0 for name in hulls}
    total = _greedy(hulls, at, total, budget)
    _apply(plan, hulls, at, table, floors)
    log.info("mixed plan: %.3f bits per weight", 8 * total / params)


def _greedy(hulls: dict, at: dict, total: float, budget: float) -> float:
    heap = []
    for name, h in hulls.items():
        if len(h) > 1:
            heapq.heappush(heap, (-_slope(h[0], h[1]), name))
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        extra = h[i + 1][0] - h[i][0]
        if total + extra > budget:
            continue  # this tensor's further upgrades only cost more
        total += extra
        at[name] = i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, (-_slope(h[i + 1], h[i + 2]), name))
    return total


def _apply(plan: Plan, hulls: dict, at: dict, table, floors) -> None:
    default = Choice(
        plan.defaults["bits"], plan.defaults.get("group_size"),
        plan.defaults.get("scheme", "affine"),
    )  # fmt: skip
    chosen_kl = uniform_kl = 0.0
    for t in plan.tensors:
        if t.name not in hulls:
            continue
        _, kl, c = hulls[t.name][at[t.name]]
        entry = table.tensors[t.name]
        t.bits, t.group_size, t.scheme = c.bits, c.group_size, c.scheme
        floor = floors.get(t.name, 0)
        lowest = min(Choice.from_key(k).bits for k in entry.errors)
        t.reason = "rule" if c.bits == floor and lowest < floor else "sensitivity"
        ref = entry.predicted_kl(default.key) if default.key in entry.errors else None
        t.note = f"predicted KL {kl:.1e} nats" + (
            f" (uniform {default.describe()}: {ref:.1e})" if ref is not None else ""
        )
        if t.reason == "rule":
            t.note = f"at least {floor} bits (rule); " + t.note
        chosen_kl += kl
        uniform_kl += ref if ref is not None else kl
    plan.sensitivity = {
        "method": METHOD,
        "calibration_tokens": table.tokens,
        "calibration_sha256": table.calibration_sha256,
        "measured_seconds": table.seconds,
        "cache": table.cache_path,
        "predicted_kl_sum": round(chosen_kl, 6),
        "uniform_default_kl_sum": round(uniform_kl, 6),
    }
