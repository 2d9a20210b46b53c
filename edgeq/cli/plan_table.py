"""Rich tables for `edgeq plan` and `edgeq eval` (stdout)."""

from __future__ import annotations

import re

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _storage(t) -> str:
    if not t.quantized:
        return "16-bit"
    group = "per-chan" if t.group_size is None else f"g{t.group_size}"
    return f"{t.bits}-bit {group}"


def _spans(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start, prev = [], None, None
    for n in sorted(layers):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(out)


def condensed_rows(plan) -> list[dict]:
    """Tensors that differ only in their layer index and share storage and
    reason become one row; norms and biases become one row."""
    groups: dict[tuple, dict] = {}
    for t in plan.tensors:
        if t.reason == "not-a-matrix":
            key = ("norms, biases", "16-bit", "not-a-matrix")
            pattern, layer = key[0], None
        else:
            m = _LAYER.search(t.name)
            layer = int(m.group(1)) if m else None
            pattern = _LAYER.sub(".layers.*.", t.name) if m else t.name
            key = (pattern, _storage(t), t.reason)
        row = groups.setdefault(key, {
            "tensor": pattern, "storage": key[1], "reason": key[2], "count": 0,
            "layers": [], "bytes": 0, "params": 0, "shape": list(t.shape),
            "note": t.note,
        })  # fmt: skip
        row["count"] += 1
        row["bytes"] += t.storage_bytes()
        row["params"] += t.numel
        if layer is not None:
            row["layers"].append(layer)
        if row["shape"] != list(t.shape):
            row["shape"] = None
        if row["note"] != t.note:
            row["note"] = ""  # notes that differ per tensor: see --all
    return list(groups.values())


def _rows(plan, all_rows: bool) -> list[dict]:
    if not all_rows:
        return condensed_rows(plan)
    rows = []
    for t in plan.tensors:
        m = _LAYER.search(t.name)
        rows.append({
            "tensor": _LAYER.sub(".layers.*.", t.name), "storage": _storage(t),
            "reason": t.reason, "count": 1,
            "layers": [int(m.group(1))] if m else [], "bytes": t.storage_bytes(),
            "params": t.numel, "shape": list(t.shape), "note": t.note,
        })  # fmt: skip
    return rows


def _short(name: str) -> str:
    """'model.layers.*.mlp.down_proj.weight' -> 'mlp.down_proj'."""
    name = name.removeprefix("model.").removeprefix("layers.*.")
    return name.removesuffix(".weight")


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def print_plan(plan, all_rows: bool = False, console=None) -> None:
    """The per-tensor table (notes as numbered lines under it), then
    totals, rules and warnings."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    for col in ("tensor", "layers", "shape", "storage", "reason", "MB", "note"):
        right = col == "MB"
        table.add_column(col, no_wrap=True, justify="right" if right else "left")
    notes: list[str] = []
    for r in _rows(plan, all_rows):
        name = _short(r["tensor"])
        if r["tensor"] == "norms, biases":
            name = f"{name} x{r['count']}"
        shape = "x".join(map(str, r["shape"])) if r["shape"] else "various"
        mark = ""
        if r["note"]:
            if r["note"] not in notes:
                notes.append(r["note"])
            mark = f"[{notes.index(r['note']) + 1}]"
        table.add_row(name, _spans(r["layers"]), shape, r["storage"], r["reason"],
                      f"{r['bytes'] / 1e6:.2f}", mark)  # fmt: skip
    console.print(table)
    for i, note in enumerate(notes):
        console.print(f"[{i + 1}] {note}", highlight=False, markup=False)
    for line in summary_lines(plan):
        console.print(line, highlight=False, markup=False)


def summary_lines(plan) -> list[str]:
    """Totals, rules and warnings as plain lines."""
    p, rt = plan.predictions, plan.runtime
    gb = 1e9
    fits = "fits" if p["fits"] else "DOES NOT FIT"
    capped = " (--max-memory)" if p.get("memory_capped") else ""
    size = (
        f"file size {p['file_size_bytes'] / 1e6:.1f} MB, "
        f"{p['bits_per_weight']:.2f} bits per weight"
    )
    memory = (
        f"memory {p['peak_memory_bytes'] / gb:.2f} GB needed of "
        f"{p['usable_memory_bytes'] / gb:.2f} GB usable{capped}: {fits} (weights "
        f"{p['weights_bytes'] / gb:.2f} + KV cache {p['kv_cache_bytes'] / gb:.2f} "
        f"at {rt['context_length']} tokens + activations "
        f"{p['activation_bytes'] / gb:.2f} + runtime "
        f"{p['runtime_overhead_bytes'] / gb:.2f})"
    )
    speed = (
        f"decode ~{_num(p['decode_tokens_per_s'])} tokens/s predicted "
        f"(~{_num(p['decode_tokens_per_s_full_context'])} with a full context; "
        f"roofline {_num(p['roofline_tokens_per_s'])} x efficiency "
        f"{p['decode_efficiency']:g}, {p['decode_efficiency_source']})"
    )
    lines = [f"{plan.model.get('name')} -> {plan.target} on {plan.device}"]
    lines += [size, memory, speed]
    if plan.sensitivity:
        s = plan.sensitivity
        lines.append(
            f"mixed precision: predicted KL {s['predicted_kl_sum']:.3g} nats/token "
            f"(uniform default {s['uniform_default_kl_sum']:.3g}), from "
            f"{s['calibration_tokens']} calibration tokens"
        )
    lines += [f"rule: {r}" for r in plan.defaults.get("rules", [])]
    lines += [f"warning: {w}" for w in plan.warnings]
    return lines


def print_eval(result: dict, console=None) -> None:
    """`edgeq eval` figures as a two-column table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    fmt = {
        "perplexity": "{:.3f}", "reference_perplexity": "{:.3f}",
        "ppl_increase": "{:+.2%}", "top1_agreement": "{:.1%}",
        "kl_mean": "{:.4f} nats", "kl_p95": "{:.4f} nats", "seconds": "{:.1f} s",
    }  # fmt: skip
    for key, value in result.items():
        if value is None or isinstance(value, (dict, list)):
            continue
        shown = fmt[key].format(value) if key in fmt else str(value)
        table.add_row(key, shown)
    console.print(table)
