"""The arithmetic of profiling: prompts cut to size, one run's figures,
their median / min / max, the roofline and the best thread counts.

Pure functions of token times and manifest data, so tests drive them with a
controlled clock. Ships inside every artifact: standard library only.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "edgeq.profile/1"

# The prompt: a fixed text, repeated and cut to N tokens, so every device and
# every run sees the same ids. Plain prose tokenizes like real prompts do.
PROMPT_TEXT = (
    "The harbour town woke slowly. Fishing boats came in with the tide, gulls "
    "followed them, and the market opened its shutters one by one. A baker "
    "carried trays of bread across the square while two children argued about "
    "the shape of the clouds. Near the lighthouse an old sailor mended a net "
    "and told anyone who stopped that the weather would turn by evening. "
    "Nobody believed him, yet everyone looked at the sky before going home."
)

# Per-run figures that get a median / min / max over the repeats.
SUMMARY_FIGURES = (
    "ttft_s",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "e2e_tokens_per_s",
    "decode_s",
    "e2e_s",
    "roofline_pct",
)
RSS_WARN_FACTOR = 1.5
# Growth any model brings whatever its size (runtime arenas and thread pools,
# model code, tokenizer: ~25 MB measured for a 0.3 MB ONNX model); below it
# the 1.5x rule would fire on every tiny model.
RSS_WARN_SLACK_BYTES = 32 * 2**20


# --- Prompts -----------------------------------------------------------------


def context_window(manifest: dict) -> int | None:
    """Tokens the artifact can hold: the plan's context length, capped by the
    model's trained positions."""
    plan = manifest.get("plan") or {}
    ctx = (plan.get("runtime") or {}).get("context_length")
    trained = ((plan.get("model") or {}).get("config") or {}).get(
        "max_position_embeddings"
    )
    sizes = [n for n in (ctx, trained) if isinstance(n, int) and n > 0]
    return min(sizes) if sizes else None


def fit_to_context(
    prompt_tokens: int, gen_tokens: int, context: int | None
) -> tuple[int, int, str | None]:
    """(prompt, generated) token counts that fit `context`, and a note when
    either was cut. The prompt gives way first; at least one prompt token
    stays."""
    if not context or prompt_tokens + gen_tokens <= context:
        return prompt_tokens, gen_tokens, None
    gen = min(gen_tokens, context - 1)
    prompt = max(1, min(prompt_tokens, context - gen))
    note = (
        f"cut to {prompt} prompt + {gen} generated tokens (asked "
        f"{prompt_tokens} + {gen_tokens}) by the context window of {context}"
    )
    return prompt, gen, note


def build_prompt(codec, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` ids: PROMPT_TEXT repeated until long enough, cut."""
    per_copy = max(1, len(codec.encode(PROMPT_TEXT)))
    copies = n_tokens // per_copy + 2
    ids = codec.encode(" ".join([PROMPT_TEXT] * copies))
    return ids[:n_tokens]


# --- One run and its figures -------------------------------------------------


@dataclass
class RunTiming:
    """When a run started and when each token arrived (one clock)."""

    prompt_tokens: int
    start: float
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def time_generation(engine, ids, gen_tokens: int, clock=time.perf_counter):
    """Generate `gen_tokens` tokens (EOS ignored, as llama-bench does, so
    every run has the same length) and keep their times. `clock` must be the
    clock of Token.time: time.perf_counter for real engines."""
    from edgeq_targets.common.engine import GenerationConfig

    cfg = GenerationConfig(max_tokens=gen_tokens, stop_at_eos=False)
    timing = RunTiming(prompt_tokens=len(ids), start=clock())
    for tok in engine.generate(list(ids), cfg):
        timing.token_times.append(tok.time)
        timing.finish_reason = tok.finish_reason
    return timing


def rate(count: int, seconds: float | None) -> float | None:
    """count / seconds, or None ("n/a") when either is zero or not finite."""
    if count <= 0 or seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return count / seconds


def run_figures(t: RunTiming) -> dict:
    """The figures of one run (README: "Profiling", definitions).

    TTFT runs from the call to the first token (prefill plus one sample);
    decode covers the tokens after the first over the time after the first.
    """
    gen = len(t.token_times)
    first = t.token_times[0] if gen else None
    last = t.token_times[-1] if gen else None
    ttft = first - t.start if gen else None
    decode_s = last - first if gen >= 2 else None
    e2e_s = last - t.start if gen else None
    return {
        "prompt_tokens": t.prompt_tokens,
        "gen_tokens": gen,
        "decode_tokens": max(gen - 1, 0),
        "ttft_s": ttft,
        "prefill_tokens_per_s": rate(t.prompt_tokens, ttft),
        "decode_s": decode_s,
        "decode_tokens_per_s": rate(gen - 1, decode_s),
        "e2e_s": e2e_s,
        "e2e_tokens_per_s": rate(gen, e2e_s),
        "finish_reason": t.finish_reason,
    }


def summarize(runs: list[dict], figures=SUMMARY_FIGURES) -> dict:
    """Median, min and max of each figure over runs; n/a values are left out
    and counted apart (n is how many runs had the figure)."""
    out = {}
    for name in figures:
        values = [r[name] for r in runs if r.get(name) is not None]
        out[name] = {
            "median": statistics.median(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "n": len(values),
        }
    return out


# --- Roofline ----------------------------------------------------------------


def roofline(
    predictions: dict,
    plan_runtime: dict,
    prompt: int,
    gen: int,
    bandwidth_gbs: float | None,
) -> dict:
    """Bytes read per decoded token and the tokens/s the bandwidth allows.

    Bytes = the plan's decode_bytes_per_token (weights) plus the KV cache
    read at the mean decode position (prompt + gen / 2), taken from the
    plan's kv_cache_bytes at its context length.
    """
    weights = predictions.get("decode_bytes_per_token")
    kv_total = predictions.get("kv_cache_bytes")
    ctx = plan_runtime.get("context_length")
    kv_per_pos = kv_total / ctx if kv_total and ctx else 0.0
    kv_read = kv_per_pos * (prompt + gen / 2)
    per_token = weights + kv_read if weights else None
    bps = bandwidth_gbs * 1e9 if bandwidth_gbs else None
    top = bps / per_token if bps and per_token else None
    eff = predictions.get("decode_efficiency")
    return {
        "weights_bytes_per_token": weights,
        "kv_bytes_per_token": round(kv_read),
        "bytes_per_token": round(per_token) if per_token else None,
        "bandwidth_gbs": bandwidth_gbs,
        "roofline_tokens_per_s": top,
        "decode_efficiency": eff,
        "predicted_decode_tokens_per_s": top * eff if top and eff else None,
    }


def roofline_pct(decode_tps: float | None, roof: dict) -> float | None:
    """Decode tokens/s as a percentage of the roofline (None: n/a)."""
    top = roof.get("roofline_tokens_per_s")
    return 100.0 * decode_tps / top if decode_tps and top else None


# --- Records -----------------------------------------------------------------


def plan_summary(manifest: dict) -> dict:
    """The plan in a dozen fields: enough to tell two plans apart."""
    plan = manifest.get("plan") or {}
    p = plan.get("predictions") or manifest.get("predicted") or {}
    d, rt = plan.get("defaults") or {}, plan.get("runtime") or {}
    return {
        "bits": d.get("bits"),
        "group_size": d.get("group_size"),
        "scheme": d.get("scheme"),
        "bits_per_weight": p.get("bits_per_weight"),
        "context_length": rt.get("context_length"),
        "kv_cache_bits": rt.get("kv_cache_bits"),
        "threads": rt.get("threads"),
        "device": plan.get("device"),
        "weights_bytes": p.get("weights_bytes"),
        "kv_cache_bytes": p.get("kv_cache_bytes"),
        "decode_bytes_per_token": p.get("decode_bytes_per_token"),
        "predicted_decode_tokens_per_s": p.get("decode_tokens_per_s"),
        "predicted_peak_memory_bytes": p.get("peak_memory_bytes"),
    }


def artifact_summary(artifact: Path, manifest: dict) -> dict:
    model = manifest.get("model") or {}
    return {
        "id": manifest.get("artifact_id"),
        "path": str(artifact),
        "model": model.get("name"),
        "parameters": model.get("parameters"),
        "target": manifest.get("target"),
    }


def memory_warnings(memory: dict, plan: dict) -> list[str]:
    """A warning when loading grew resident memory past ~1.5x the weights: a
    sign that the runtime holds a second copy of them. The load phase alone
    counts: it materializes every weight, while later phases add the KV
    cache and activations that long prompts legitimately need."""
    grew, weights = memory.get("load_rss_bytes"), plan.get("weights_bytes")
    if not grew or not weights or grew <= RSS_WARN_FACTOR * weights:
        return []
    if grew - weights <= RSS_WARN_SLACK_BYTES:
        return []
    own = (memory.get("runtime_peak_bytes_by_phase") or {}).get("load")
    own_note = f"; the runtime's own peak is {own / 1e6:.1f} MB" if own else ""
    return [
        (
            f"resident memory grew by {grew / 1e6:.1f} MB while loading, "
            f"{grew / weights:.1f}x the weights ({weights / 1e6:.1f} MB){own_note}: "
            "the runtime may hold a second copy of weights (e.g. a constant-folded "
            "transposed embedding, or 16-bit weights converted and the originals "
            "kept in a cache)"
        )
    ]


def best_threads(records: list[dict]) -> dict | None:
    """The thread count with the highest median prefill and, separately,
    decode tokens/s (None with fewer than two thread counts). Prefill keeps
    gaining from cores; decode stops where memory bandwidth runs out."""
    by_threads: dict[int, list[dict]] = {}
    for r in records:
        t = (r.get("config") or {}).get("threads")
        if t:
            by_threads.setdefault(t, []).append(r)
    if len(by_threads) < 2:
        return None
    best = {}
    for phase in ("prefill", "decode"):
        fig = f"{phase}_tokens_per_s"
        scores = {}
        for t, recs in by_threads.items():
            vals = [r["summary"][fig]["median"] for r in recs]
            vals = [v for v in vals if v is not None]
            if vals:
                scores[t] = statistics.median(vals)
        if scores:
            t = max(scores, key=scores.get)
            best[phase] = {"threads": t, "tokens_per_s": scores[t], "all": scores}
    return best or None
