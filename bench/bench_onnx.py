"""ONNX Runtime target: speed against float and llama.cpp, quality of each
INT8 choice, and where the time goes.

    python bench/bench_onnx.py speed   [--threads 2] [--repeats 5]
    python bench/bench_onnx.py quality [--windows 5]
    python bench/bench_onnx.py profile [--threads 2]

`speed` runs every engine side by side in one process on the same prompt:
the ONNX float32 graph, the shipped INT8 artifact (8-bit blocks of 32,
MatMulNBits), per-channel INT8 (DynamicQuantizeMatMul), 4-bit blocks of 32,
the standard-op graphs (no fused attention / norms) for the fused-op gain,
and llama.cpp (llama-cpp-python) on Q8_0 and Q4_0 GGUFs re-quantized from the
same dequantized weights, plus the Q4_1 original. Medians over repeats;
results printed and saved as JSON under bench/results/.

llama-cpp-python is a bench-only dependency (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # llama.cpp threads: no spin

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared/text/austen_prideprejudice.txt"
RESULTS = ROOT / "bench/results"
CACHE = Path(os.environ.get("EDGEQ_BENCH_CACHE", "/tmp/edgeq-bench-onnx"))
MODEL = "smollm2-135m"
DEVICE = "x86-server-epyc-genoa"  # this machine: AVX-512 VNNI


# -- building what is measured ------------------------------------------------------
def source():
    from edgeq.models import open_model

    return open_model(MODEL)


def onnx_variant(src, name: str, mutate=None, fused=True, settings=None, **req) -> Path:
    """Build (once, cached) an ONNX artifact folder for a plan variant."""
    from edgeq.backends import onnx_backend as ob
    from edgeq.backends.onnx_decoder import GraphOptions
    from edgeq.devices import get_device
    from edgeq.planner import PlanRequest, make_plan

    folder = CACHE / name
    if (folder / "model.onnx").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device = get_device(DEVICE)
    plan = make_plan(src, device, PlanRequest(target="onnxruntime", **req))
    if mutate:
        mutate(plan)
    opts = GraphOptions(fused, fused, fused, context_length=2048)
    ob.build(src, plan, folder, options=opts, settings=settings)
    return folder


def shipped(plan):
    from edgeq.backends.onnx_backend import default_onnx_rules

    default_onnx_rules(plan)


def requantize_gguf(kind: str) -> Path:
    """SmolLM2's Q4_1 GGUF re-encoded as Q8_0 or Q4_0 from its dequantized
    weights (the same float weights the ONNX models start from)."""
    import gguf

    from edgeq.models.registry import resolve_model

    out = CACHE / f"smollm2-135m-{kind}.gguf"
    if out.is_file():
        return out
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    reader = gguf.GGUFReader(resolve_model(MODEL))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int({"Q8_0": 7, "Q4_0": 2}[kind]))
    for t in reader.tensors:
        if t.tensor_type in (
            gguf.GGMLQuantizationType.F32,
            gguf.GGMLQuantizationType.F16,
        ):
            writer.add_tensor(t.name, np.array(t.data, np.float32))
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        writer.add_tensor(t.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# -- timing ---------------------------------------------------------------------------
class OnnxRunner:
    def __init__(self, folder: Path, threads: int, spin: bool = False, profile=""):
        from edgeq_targets.onnxruntime.ort_engine import ORTEngine

        start = time.perf_counter()
        self.engine = ORTEngine(folder, threads=threads, spin=spin, profile=profile)
        self.load_s = time.perf_counter() - start

    def prefill(self, ids):
        self.cache = self.engine.new_cache()
        return self.engine.forward(ids, self.cache, keep=1)[-1]

    def step(self, token):
        return self.engine.forward([token], self.cache, keep=1)[-1]


class LlamaRunner:
    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        start = time.perf_counter()
        self.llm = Llama(
            str(path),
            n_ctx=1024,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )
        self.load_s = time.perf_counter() - start

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])

    def step(self, token):
        self.llm.eval([token])
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])


def time_once(runner, prompt: list[int], decode: int) -> tuple[float, float, list]:
    """(prefill tokens/s, decode tokens/s, greedy tokens) of one run."""
    t0 = time.perf_counter()
    logits = runner.prefill(prompt)
    t1 = time.perf_counter()
    out = []
    for _ in range(decode):
        out.append(int(np.argmax(logits)))
        logits = runner.step(out[-1])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), decode / (t2 - t1), out


def time_interleaved(runners: dict, prompt, decode: int, repeats: int) -> dict:
    """Median prefill and decode tokens/s per runner. Each runner gets one
    untimed warm-up (first runs are many times slower: case C11); then the
    repeats go round-robin over the runners so that load from other
    processes on a shared machine falls on all of them alike."""
    for runner in runners.values():
        time_once(runner, prompt, 4)
    pre = {name: [] for name in runners}
    dec = {name: [] for name in runners}
    first = {}
    for _ in range(repeats):
        for name, runner in runners.items():
            p, d, out = time_once(runner, prompt, decode)
            pre[name].append(p)
            dec[name].append(d)
            first[name] = out[:8]
    return {
        name: {
            "prefill_tokens_per_s": statistics.median(pre[name]),
            "decode_tokens_per_s": statistics.median(dec[name]),
            "decode_spread": [min(dec[name]), max(dec[name])],
            "load_s": runners[name].load_s,
            "first_tokens": first[name],
        }
        for name in runners
    }


def prompt_ids(n: int) -> list[int]:
    from tokenizers import Tokenizer

    src = source()
    tok = Tokenizer.from_str(src.tokenizer_files["tokenizer.json"].decode())
    return tok.encode(TEXT.read_text()[:20000], add_special_tokens=False).ids[:n]


def speed_engines(src) -> dict:
    """name -> (kind, path or folder, options)"""
    return {
        "onnx float32": ("onnx", onnx_variant(src, "float", bits=16), {}),
        "onnx float32, standard ops": (
            "onnx",
            onnx_variant(src, "float-std", fused=False, bits=16),
            {},
        ),
        "onnx int8 shipped (8-bit g32)": (
            "onnx",
            onnx_variant(src, "int8", shipped),
            {},
        ),
        "onnx int8 shipped, spinning": (
            "onnx",
            onnx_variant(src, "int8", shipped),
            {"spin": True},
        ),
        "onnx int8 shipped, standard ops": (
            "onnx",
            onnx_variant(src, "int8-std", shipped, fused=False),
            {},
        ),
        "onnx int8 per-channel (DQMatMul)": (
            "onnx",
            onnx_variant(src, "int8-pc", bits=8),
            {},
        ),
        "onnx int4 g32": ("onnx", onnx_variant(src, "int4", bits=4, group_size=32), {}),
        "llama.cpp Q8_0": ("gguf", requantize_gguf("Q8_0"), {}),
        "llama.cpp Q4_0": ("gguf", requantize_gguf("Q4_0"), {}),
        "llama.cpp Q4_1 (original)": ("gguf", _original_gguf(), {}),
    }


def _original_gguf() -> Path:
    from edgeq.models.registry import resolve_model

    return resolve_model(MODEL)


def cmd_speed(args) -> dict:
    src = source()
    engines = speed_engines(src)
    prompt = prompt_ids(args.prompt)
    runners = {}
    for name, (kind, path, opts) in engines.items():
        if kind == "onnx":
            runners[name] = OnnxRunner(path, args.threads, **opts)
        else:
            runners[name] = LlamaRunner(path, args.threads)
    rows = time_interleaved(runners, prompt, args.decode, args.repeats)
    for name, (_, path, _) in engines.items():
        rows[name]["size_mb"] = _size_mb(path)
    base = rows["onnx float32"]["decode_tokens_per_s"]
    q8 = rows["llama.cpp Q8_0"]["decode_tokens_per_s"]
    for r in rows.values():
        r["decode_vs_float"] = r["decode_tokens_per_s"] / base
        r["decode_vs_llama_q8_0"] = r["decode_tokens_per_s"] / q8
    print_table(rows, args)
    return {"rows": rows, "prompt_tokens": len(prompt), "decode_tokens": args.decode}


def _size_mb(path: Path) -> float:
    files = path.glob("*") if path.is_dir() else [path]
    return (
        sum(f.stat().st_size for f in files if f.suffix in (".onnx", ".data", ".gguf"))
        / 1e6
    )


def print_table(rows: dict, args) -> None:
    print(
        f"\nSmolLM2-135M, {args.threads} threads, prompt {args.prompt} tokens, "
        f"decode {args.decode} tokens, median of {args.repeats}"
    )
    head = f"{'engine':36s} {'MB':>6s} {'prefill t/s':>11s} {'decode t/s':>10s} "
    print(head + f"{'x float':>8s} {'x Q8_0':>7s}")
    for name, r in rows.items():
        print(
            f"{name:36s} {r['size_mb']:6.0f} {r['prefill_tokens_per_s']:11.1f} "
            f"{r['decode_tokens_per_s']:10.1f} {r['decode_vs_float']:8.2f} "
            f"{r['decode_vs_llama_q8_0']:7.2f}"
        )


# -- quality ------------------------------------------------------------------------------
PC = {"bits": 8}  # explicit: the planner's default INT8 is already the rule


def quality_variants() -> dict:
    """name -> (plan mutation, request); every choice tried for item 4."""

    def keep(pred):
        def mutate(plan):
            for t in plan.tensors:
                if pred(t.name) and t.bits < 16:
                    t.bits, t.group_size, t.scheme = 16, None, "float"

        return mutate

    def chain(*fs):
        return lambda plan: [f(plan) for f in fs]

    head = lambda n: n == "model.embed_tokens.weight"
    down = lambda n: "down_proj" in n
    edge_down = lambda n: down(n) and n.split(".")[2] in ("0", "1", "29")
    return {
        "per-channel int8, all (DQMatMul)": (None, PC),
        "per-channel int8, head float": (keep(head), PC),
        "per-channel int8, head + down_proj float": (
            keep(lambda n: head(n) or down(n)),
            PC,
        ),
        "per-channel int8, reduce_range": ("reduce_range", PC),
        "8-bit g32 acc4, all (shipped)": (shipped, {}),
        "8-bit g64 acc4, all": (None, {"bits": 8, "group_size": 64}),
        "8-bit g128 acc4, all (g64 where 576)": (None, {"bits": 8, "group_size": 128}),
        "8-bit g32, head float": (chain(shipped, keep(head)), {}),
        "8-bit g32, down_proj float": (chain(shipped, keep(down)), {}),
        "8-bit g32, down_proj 0/1/29 float": (chain(shipped, keep(edge_down)), {}),
        "4-bit g32 acc4, all": (None, {"bits": 4, "group_size": 32}),
        "4-bit g32, head 8-bit g32": ("head8", {"bits": 4, "group_size": 32}),
    }


def cmd_quality(args) -> dict:
    from edgeq_targets.onnxruntime.ort_engine import ORTEngine
    from tokenizers import Tokenizer

    from edgeq.backends import onnx_linear
    from edgeq.backends.onnx_eval import CachedLogits, compare, token_windows

    src = source()
    tok = Tokenizer.from_str(src.tokenizer_files["tokenizer.json"].decode())
    ids = tok.encode(TEXT.read_text()[:40000], add_special_tokens=False).ids
    windows = token_windows(ids, 512, args.windows)
    reference = CachedLogits(
        ORTEngine(onnx_variant(src, "float", bits=16), threads=args.threads)
    )
    rows = {}
    for i, (name, (mutate, req)) in enumerate(quality_variants().items()):
        if mutate == "reduce_range":
            # The non-VNNI x86 setting, measured on this host for its cost.
            rr = onnx_linear.QuantSettings(reduce_range=True, isa_note="forced")
            folder = onnx_variant(src, "q-rr", settings=rr, **req)
        elif mutate == "head8":

            def head8(plan):
                t = plan.tensor("model.embed_tokens.weight")
                t.bits, t.group_size = 8, 32

            folder = onnx_variant(src, f"q{i}", head8, **req)
        else:
            folder = onnx_variant(src, f"q{i}", mutate, **req)
        r = compare(reference, ORTEngine(folder, threads=args.threads), windows)
        rows[name] = r.to_dict() | {"size_mb": _size_mb(folder)}
        print(
            f"{name:40s} agree {r.top1_agreement:6.2%}  ppl {r.ppl_reference:.3f} -> "
            f"{r.ppl_candidate:.3f} ({r.ppl_increase:+.2%})  KL {r.kl_mean:.4f}  "
            f"{rows[name]['size_mb']:.0f} MB",
            flush=True,
        )
    return {"rows": rows, "windows": len(windows), "window_tokens": 512}


# -- profile --------------------------------------------------------------------------------
def cmd_profile(args) -> dict:
    """ONNX Runtime's profiler on decode steps of the shipped INT8 model:
    time per operator type, as shares of the node time."""
    src = source()
    folder = onnx_variant(src, "int8", shipped)
    prefix = str(CACHE / "ort-profile")
    runner = OnnxRunner(folder, args.threads, profile=prefix)
    prompt = prompt_ids(args.prompt)
    for _ in range(2):
        time_once(runner, prompt, args.decode)
    trace = Path(runner.engine.session.end_profiling())
    events = json.loads(trace.read_text())
    runs = sorted(
        (e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    # Each timed run is one prefill call followed by `decode` single-token calls.
    phase_of = [
        ("prefill" if i % (args.decode + 1) == 0 else "decode", r["ts"], r["dur"])
        for i, r in enumerate(runs)
    ]
    shares = {"prefill": {}, "decode": {}}
    for ev in events:
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
            continue
        phase = next((p for p, ts, dur in phase_of if ts <= ev["ts"] <= ts + dur), None)
        if phase:
            op = ev.get("args", {}).get("op_name", "?")
            shares[phase][op] = shares[phase].get(op, 0.0) + ev["dur"]
    for phase, by_op in shares.items():
        total = sum(by_op.values()) or 1.0
        calls = sum(1 for p, _, _ in phase_of if p == phase)
        wall = sum(d for p, _, d in phase_of if p == phase)
        print(
            f"\n{phase}: {calls} calls, run time {wall / calls / 1000:.2f} ms/call, "
            f"kernels {total / wall:.0%} of it ({args.threads} threads)"
        )
        shares[phase] = {
            k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])
        }
        for op, share in list(shares[phase].items())[:8]:
            print(f"  {op:34s} {share:6.1%}")
    return {"kernel_time_share": shares, "trace": str(trace)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["speed", "quality", "profile"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=64, help="decoded tokens")
    parser.add_argument("--windows", type=int, default=5, help="512-token windows")
    args = parser.parse_args(argv)
    run = {"speed": cmd_speed, "quality": cmd_quality, "profile": cmd_profile}
    result = run[args.command](args)
    import onnxruntime

    result["environment"] = {
        "cpu": _cpu_model(),
        "threads": args.threads,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "machine": platform.machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"onnx-{args.command}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"\nsaved {path.relative_to(ROOT)}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
