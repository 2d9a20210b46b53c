"""`edgeq profile compare`: results of many devices, targets and plans side
by side, measured next to predicted, as a table and a chart.

    rows = comparison_rows(records)       # one row per profile record
    write_report(rows, Path("report.html"))  # or .md (+ .png beside) or .png

The chart is drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from edgeq.profile import ProfileError

log = logging.getLogger(__name__)

MB = 1e6

# Table columns: (key of a row, header, format).
COLUMNS = (
    ("model", "model", "{}"),
    ("device", "device", "{}"),
    ("target", "target", "{}"),
    ("plan", "plan", "{}"),
    ("threads", "threads", "{}"),
    ("prompt", "prompt", "{}"),
    ("gen", "gen", "{}"),
    ("load_s", "load s", "{:.2f}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("prefill", "prefill tok/s", "{:.1f}"),
    ("decode", "decode tok/s", "{:.1f}"),
    ("decode_predicted", "decode predicted", "{:.1f}"),
    ("roofline_pct", "% roofline", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB (OS)", "{:.1f}"),
    ("runtime_mb", "runtime's own MB", "{:.1f}"),
    ("predicted_peak_mb", "predicted peak MB", "{:.1f}"),
)


def _median(rec: dict, figure: str):
    return ((rec.get("summary") or {}).get(figure) or {}).get("median")


def _spread(rec: dict, figure: str) -> tuple:
    s = (rec.get("summary") or {}).get(figure) or {}
    return s.get("min"), s.get("max")


def _mb(n) -> float | None:
    return n / MB if n is not None else None


def comparison_rows(records: list[dict]) -> list[dict]:
    """One row per record: who (model, device, target, plan, threads) and
    what (medians, predicted figures, memory)."""
    rows = []
    for rec in records:
        plan, cfg, mem = rec["plan"], rec["config"], rec["memory"]
        ttft = _median(rec, "ttft_s")
        rows.append(
            {
                "model": rec["artifact"].get("model"),
                "device": (rec["env"].get("device") or {}).get("name"),
                "target": rec["artifact"].get("target"),
                "plan": plan_label(plan),
                "threads": cfg.get("threads") or "default",
                "prompt": cfg.get("prompt_tokens"),
                "gen": cfg.get("gen_tokens"),
                "load_s": rec.get("load_s"),
                "ttft_ms": ttft * 1e3 if ttft is not None else None,
                "prefill": _median(rec, "prefill_tokens_per_s"),
                "prefill_range": _spread(rec, "prefill_tokens_per_s"),
                "decode": _median(rec, "decode_tokens_per_s"),
                "decode_range": _spread(rec, "decode_tokens_per_s"),
                "decode_predicted": rec["roofline"].get(
                    "predicted_decode_tokens_per_s"
                ),
                "roofline_pct": _median(rec, "roofline_pct"),
                "peak_rss_mb": _mb(mem.get("peak_rss_bytes")),
                "runtime_mb": _mb(mem.get("runtime_peak_bytes")),
                "predicted_peak_mb": _mb(mem.get("predicted_peak_bytes")),
                "weights_mb": _mb(
                    mem.get("weights_bytes") or plan.get("weights_bytes")
                ),
                "warnings": rec.get("warnings") or [],
            }
        )
    return rows


def plan_label(plan: dict) -> str:
    """ "4-bit g64 affine (4.503 bpw)"; no group size for per-channel plans."""
    group = f" g{plan['group_size']}" if plan.get("group_size") else ""
    scheme = f" {plan['scheme']}" if plan.get("scheme") else ""
    return f"{plan.get('bits')}-bit{group}{scheme} ({plan.get('bits_per_weight')} bpw)"


def cell(row: dict, key: str, fmt: str) -> str:
    """A table cell: "n/a" for a missing figure."""
    value = row.get(key)
    return "n/a" if value is None else fmt.format(value)


def row_label(row: dict) -> str:
    return (
        f"{row['model']}\n{row['device']}\n{row['target']} "
        f"t{row['threads']} p{row['prompt']}"
    )


# --- Chart --------------------------------------------------------------------


def _bars(ax, x, offset, width, values, ranges=None, **style):
    """Bars where values exist (n/a leaves a gap), with min-max error bars
    when `ranges` gives them."""
    ranges = ranges or [(None, None)] * len(values)
    keep = [(xi + offset, v, r) for xi, v, r in zip(x, values, ranges) if v]
    if not keep:
        return
    xs, vs, rs = zip(*keep)
    if all(lo is not None and hi is not None for lo, hi in rs):
        low = [v - lo for v, (lo, _) in zip(vs, rs)]
        high = [hi - v for v, (_, hi) in zip(vs, rs)]
        style.update(yerr=[low, high], capsize=3)
    ax.bar(xs, vs, width, **style)


def _speed_panel(ax, rows: list[dict], x: list[int]) -> None:
    w = 0.27
    col = {key: [r[key] for r in rows] for key in ("prefill", "decode")}
    spread = {key: [r[key + "_range"] for r in rows] for key in ("prefill", "decode")}
    _bars(
        ax,
        x,
        -w,
        w,
        col["prefill"],
        spread["prefill"],
        label="prefill",
        color="#4c72b0",
    )
    _bars(ax, x, 0, w, col["decode"], spread["decode"], label="decode", color="#dd8452")
    _bars(
        ax,
        x,
        w,
        w,
        [r["decode_predicted"] for r in rows],
        fill=False,
        hatch="//",
        edgecolor="#dd8452",
        label="decode predicted",
    )
    ax.set_yscale("log")  # prefill, decode and predictions differ by 10-100x
    ax.set_ylabel("tokens/s (median, min-max bars; log scale)")
    ax.set_title("Speed: measured vs predicted")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _memory_panel(ax, rows: list[dict], x: list[int]) -> None:
    w = 0.2
    series = (
        ("peak_rss_mb", "peak RSS (OS)", {"color": "#55a868"}),
        ("runtime_mb", "runtime's own peak", {"color": "#8172b3"}),
        (
            "predicted_peak_mb",
            "predicted peak (plan)",
            {"fill": False, "hatch": "//", "edgecolor": "#55a868"},
        ),
        ("weights_mb", "weights (plan)", {"color": "#c4c4c4"}),
    )
    for i, (key, label, style) in enumerate(series):
        _bars(ax, x, (i - 1.5) * w, w, [r[key] for r in rows], label=label, **style)
    ax.set_yscale("log")  # weights of a tiny model vs a runtime's overhead
    ax.set_ylabel("MB (log scale)")
    ax.set_title("Memory: measured vs predicted")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def chart_png(rows: list[dict]) -> bytes:
    """A PNG of two panels, tokens/s above memory; one group of bars per row."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and devices
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    width = min(40.0, max(8.0, 1.3 * len(rows) + 2))
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(width, 10))
    _speed_panel(speed, rows, x)
    _memory_panel(memory, rows, x)
    labels = [row_label(r) for r in rows]
    for ax in (speed, memory):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- Table and pages --------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = [
        "| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows
    ]
    return "\n".join([head, rule, *body])


def _warning_lines(rows: list[dict]) -> list[str]:
    return [
        f"{r['model']} on {r['device']} (t{r['threads']}, p{r['prompt']}): {w}"
        for r in rows
        for w in r["warnings"]
    ]


NOTES = (
    "Medians over repeats, warm-up excluded. Decode: tokens after the first "
    "over the time after the first. Predicted decode: this device's bandwidth "
    "/ bytes per token x the plan's decode efficiency. Predicted peak: the "
    "plan's weights + KV cache at its full context + activations + runtime "
    "overhead. n/a: no value (e.g. one generated token)."
)


def render_markdown(rows: list[dict], png_name: str | None) -> str:
    parts = ["# edgeq profile comparison", "", markdown_table(rows), "", NOTES]
    if png_name:
        parts += ["", f"![tokens/s and memory]({png_name})"]
    warnings = _warning_lines(rows)
    if warnings:
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(parts) + "\n"


def render_html(rows: list[dict], png: bytes) -> str:
    """A self-contained page: the table, the chart inline (base64), notes."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{esc(cell(r, k, f))}</td>" for k, _, f in COLUMNS)
        + "</tr>"
        for r in rows
    )
    warnings = "".join(f"<li>{esc(w)}</li>" for w in _warning_lines(rows))
    image = base64.b64encode(png).decode("ascii")
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        "<title>edgeq profile comparison</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{max-width:100%}</style></head><body>\n"
        "<h1>edgeq profile comparison</h1>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>\n"
        f"<p>{esc(NOTES)}</p>\n"
        f"<img alt='tokens/s and memory' src='data:image/png;base64,{image}'>\n"
        + (f"<h2>Warnings</h2><ul>{warnings}</ul>\n" if warnings else "")
        + "</body></html>\n"
    )


def write_report(rows: list[dict], out: Path) -> list[Path]:
    """Write `out` by its suffix: .png (chart), .html (table + chart inline),
    .md (table, with the chart as a .png of the same name beside it)."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".png", ".html", ".htm", ".md"):
        raise ProfileError(
            f"--out {out}: unknown report type {out.suffix!r}; "
            "use a .html, .md or .png file"
        )
    if not rows:
        raise ProfileError("no records to compare; pass files made by --save")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = chart_png(rows)
    if kind == ".png":
        out.write_bytes(png)
        return [out]
    if kind == ".md":
        chart = out.with_suffix(".png")
        chart.write_bytes(png)
        out.write_text(render_markdown(rows, chart.name), encoding="utf-8")
        return [out, chart]
    out.write_text(render_html(rows, png), encoding="utf-8")
    return [out]
