"""Mixed precision vs uniform plans, and the decode-efficiency calibration.

    python bench/bench_plans.py plans [--models stories260K smollm2-135m]
                                      [--tokens 2048] [--artifacts]
    python bench/bench_plans.py efficiency [--tokens 32]

`plans`: for each model, uniform 4-bit group 64 and group 32 (MLX target)
and sensitivity-driven mixed plans at several bits-per-weight budgets
(the size of uniform g64, 4.6, the size of g32, ...). Each plan's
perplexity (sliding window 512, stride 256) on the model's evaluation text
(TinyStories for stories260K, Pride and Prejudice for SmolLM2), its increase
over the float model, top-1 next-token agreement and KL. The quantized
weights are simulated with edgeq.quant, bit-exact with mx.quantize (tests
check this and that a built artifact's logits match the simulation): MLX on
this Linux CPU would take hours for the same tokens. `--artifacts` also
builds each plan with the MLX backend and scores the first window with the
MLX engine, to show both agree. Also reports how well the sensitivity
table's extrapolated KLs match real measurements on a sample of tensors.

`efficiency`: measured memory bandwidth (edgeq devices' copy test) and
decode tokens/s of MLX (CPU) and ONNX Runtime artifacts built here, and the
share of bandwidth decode reaches: the factors edgeq.predict uses.

Results print as a table and are saved as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
DEVICE = "macbook-air-m2-16gb"
MODELS = {
    "stories260K": (str(SHARED / "models/stories260K.gguf"), "tinystories_valid_a.txt"),
    "smollm2-135m": ("smollm2-135m", "austen_prideprejudice.txt"),
}


class Memo:
    """Each window's logits computed once (the float side of every row)."""

    def __init__(self, model):
        self.model, self.memo = model, {}

    def logits(self, ids):
        key = tuple(ids)
        if key not in self.memo:
            self.memo[key] = self.model.logits(ids)
        return self.memo[key]


def plan_requests(source, device):
    """Uniform g64 and g32, and mixed plans around their sizes."""
    from edgeq.errors import PlanError
    from edgeq.planner import PlanRequest, make_plan

    g64 = make_plan(source, device, PlanRequest("mlx"))
    g32 = make_plan(source, device, PlanRequest("mlx", group_size=32))
    # Budgets exactly at the uniform plans' sizes (rounding down would push
    # the allocator below 4 bits).
    b64, b32 = g64.bits_per_weight, g32.bits_per_weight
    budgets = sorted({b64, 4.6, b64 + 0.2, b32})
    out = {"uniform 4-bit g64": g64, "uniform 4-bit g32": g32}
    for bpw in budgets:
        req = PlanRequest("mlx", target_bpw=bpw)
        try:
            out[f"mixed <= {bpw:.2f}"] = make_plan(source, device, req)
        except PlanError as e:  # a budget the model cannot meet: say so
            print(f"  skip mixed <= {bpw:.2f}: {e}")
    return out


def bench_model(name: str, tokens: int, artifacts: bool) -> dict:
    from edgeq.devices import get_device
    from edgeq.evaluate import SimulatedPlan, evaluate, float_reference
    from edgeq.models import open_model

    ref_path, text_name = MODELS[name]
    source = open_model(ref_path)
    device = get_device(DEVICE)
    reference = Memo(float_reference(source, 520))
    text = (SHARED / "text" / text_name).read_text(encoding="utf-8")
    ids = reference.model.tokenizer.encode(text[: tokens * 8])[:tokens]
    rows = []
    for label, plan in plan_requests(source, device).items():
        start = time.perf_counter()
        r = evaluate(SimulatedPlan(source, plan, 520), ids, reference)
        row = {"plan": label, "bits_per_weight": round(plan.bits_per_weight, 3),
               "predicted_kl_sum": plan.sensitivity.get("predicted_kl_sum"),
               "seconds": round(time.perf_counter() - start, 1), **r.to_dict()}  # fmt: skip
        if artifacts:
            row["artifact_check"] = artifact_check(source, plan, ids, reference)
        rows.append(row)
        print(f"  {label:20s} {row['bits_per_weight']:.3f} bpw  ppl "
              f"{r.perplexity:.3f} (+{r.ppl_increase:.2%})  top-1 "
              f"{r.top1_agreement:.3f}  KL {r.kl_mean:.4f}", flush=True)  # fmt: skip
    return {
        "model": name, "text": text_name, "tokens": len(ids), "window": 512,
        "stride": 256, "float_perplexity": rows[0]["reference_perplexity"],
        "rows": rows, "sensitivity_check": sensitivity_check(source),
    }  # fmt: skip


def artifact_check(source, plan, ids, reference) -> dict:
    """Build with the MLX backend; compare the engine with the simulation on
    the first 128 tokens."""
    from edgeq_targets.mlx.mlx_engine import MLXEngine

    from edgeq.backends import mlx_backend
    from edgeq.evaluate import SimulatedPlan, evaluate

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mlx_backend.build(source, plan, folder)
        for fname, data in source.tokenizer_files.items():
            (folder / fname).write_bytes(data)
        engine = MLXEngine(folder, {})
        head = ids[:128]
        sim = evaluate(engine, head, SimulatedPlan(source, plan, 200), 128, 128)
        real = evaluate(engine, head, reference, 128, 128)
    return {"kl_vs_simulation": sim.kl_mean, "top1_vs_simulation":
            sim.top1_agreement, "ppl_increase_built": real.ppl_increase}  # fmt: skip


def sensitivity_check(source, sample: int = 12) -> dict:
    """Extrapolated vs really measured KL for a sample of tensors."""
    from edgeq.quant import fake_quantize
    from edgeq.sensitivity import (
        Choice,
        _Runner,
        calibration_ids,
        calibration_text,
        load_or_measure,
    )  # fmt: skip

    table = load_or_measure(source, "mlx")
    runner = _Runner(source, calibration_ids(source, calibration_text(), table.tokens))
    names = sorted(table.tensors)[:: max(1, len(table.tensors) // sample)]
    pred, real = [], []
    for name in names:
        e = table.tensors[name]
        for key in e.errors:
            if key == e.measured:
                continue
            c = Choice.from_key(key)
            image = fake_quantize(runner.weight(name), c.bits, c.group_size, c.scheme)
            real.append(runner.kl_with(name, image))
            pred.append(e.predicted_kl(key))
    pred, real = np.array(pred), np.array(real)
    ranks = np.corrcoef(np.argsort(np.argsort(pred)), np.argsort(np.argsort(real)))
    ratio = pred / np.maximum(real, 1e-12)
    return {"tensors": len(names), "pairs": len(pred),
            "spearman": round(float(ranks[0, 1]), 4),
            "ratio_median": round(float(np.median(ratio)), 3),
            "ratio_p10_p90": [round(float(x), 3) for x in np.percentile(ratio, [10, 90])],
            "table_seconds": table.seconds, "calibration_tokens": table.tokens}  # fmt: skip


# -- decode efficiency --------------------------------------------------------------


def efficiency(tokens: int) -> dict:
    """Decode tokens/s x bytes read per token / measured bandwidth."""
    from edgeq.devices import measure_bandwidth_gbs

    bandwidth = max(measure_bandwidth_gbs(threads=t) for t in (1, 2))
    out = {"bandwidth_gbs": round(bandwidth, 2), "host": platform.machine(),
           "runs": []}  # fmt: skip
    for target, model, kw in [
        ("onnxruntime", "smollm2-135m", {}),
        ("mlx", "smollm2-135m", {}),
        ("mlx", str(SHARED / "models/stories260K.gguf"), {}),
    ]:
        out["runs"].append(decode_run(target, model, tokens, bandwidth, **kw))
        print(f"  {out['runs'][-1]}", flush=True)
    return out


def decode_run(target: str, model: str, tokens: int, bandwidth: float) -> dict:
    from edgeq_targets.common.engine import GenerationConfig, load_engine

    from edgeq.backends import load_backend
    from edgeq.devices import get_device
    from edgeq.models import open_model
    from edgeq.planner import PlanRequest, make_plan

    source = open_model(model)
    device = get_device(DEVICE if target == "mlx" else "x86-server-avx512-vnni")
    plan = make_plan(source, device, PlanRequest(target))
    speeds = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        load_backend(target).build(source, plan, folder)
        for fname, data in source.tokenizer_files.items():
            (folder / fname).write_bytes(data)
        engine = load_engine(folder, target=target, verify=False, threads=1)
        ids = engine.tokenizer.encode("Once upon a time")
        for _ in range(3):
            cfg = GenerationConfig(max_tokens=tokens, stop_at_eos=False)
            list(engine.generate(ids, cfg))
            s = engine.last_stats
            speeds.append((s.generated_tokens - 1) / (s.end - s.first_token))
    tps = statistics.median(speeds)
    per_token = plan.predictions["decode_bytes_per_token"]
    return {"target": target, "model": source.name, "decode_tokens_per_s": round(tps, 2),
            "bytes_per_token": per_token,
            "efficiency": round(tps * per_token / (bandwidth * 1e9), 4)}  # fmt: skip


def _table(results: list[dict]) -> None:
    for res in results:
        print(f"\n{res['model']} on {res['tokens']} tokens of {res['text']} "
              f"(float perplexity {res['float_perplexity']:.3f})")  # fmt: skip
        print(f"{'plan':22s} {'bits/w':>7s} {'ppl':>8s} {'increase':>9s} "
              f"{'top-1':>6s} {'KL':>7s}")  # fmt: skip
        for r in res["rows"]:
            print(f"{r['plan']:22s} {r['bits_per_weight']:7.3f} {r['perplexity']:8.3f} "
                  f"{r['ppl_increase']:+9.2%} {r['top1_agreement']:6.3f} "
                  f"{r['kl_mean']:7.4f}")  # fmt: skip
        print(f"sensitivity extrapolation vs real: {res['sensitivity_check']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plans")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--artifacts", action="store_true")
    e = sub.add_parser("efficiency")
    e.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.cmd == "plans":
        results = []
        for name in args.models:
            print(f"{name}:", flush=True)
            results.append(bench_model(name, args.tokens, args.artifacts))
        _table(results)
        doc = {"host": platform.node(), "device": DEVICE, "results": results}
    else:
        doc = efficiency(args.tokens)
    path = RESULTS / f"plans-{args.cmd}-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
