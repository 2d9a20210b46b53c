"""Profile an artifact where it runs: load time, time to first token,
prefill / decode / end-to-end tokens/s, memory by phase and source, and the
share of the memory-bandwidth roofline that decode reaches.

    python runner/run.py profile [--prompt-tokens 128,512] [--gen-tokens 128]
                                 [--repeats 5] [--threads 1,2,4] [--json]

Each (thread count, prompt size) gives one JSON record (README.md, section
"Profiling", documents every field). A thread sweep runs each thread count
in a fresh process, so that load time, first-run cost and peak memory of one
setting do not leak into the next. Ships inside every artifact: standard
library and the engine contract only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeq_targets.common.profile_figures import (
    SCHEMA,
    artifact_summary,
    best_threads,
    build_prompt,
    context_window,
    fit_to_context,
    memory_warnings,
    plan_summary,
    roofline,
    roofline_pct,
    run_figures,
    summarize,
    time_generation,
)


class ProfileFailed(Exception):
    """A problem the user can fix, said in one line."""


# --- Profiling an engine -----------------------------------------------------


@dataclass
class ProfileConfig:
    """What to measure. `threads` None leaves the runtime's default."""

    prompt_tokens: list[int] = field(default_factory=lambda: [128])
    gen_tokens: int = 128
    repeats: int = 5
    warmup: bool = True
    threads: int | None = None
    bandwidth_gbs: float | None = None
    bandwidth_source: str | None = None


class _NoMemory:
    """Stands in for MemoryProbe when memory is not measured (tests)."""

    def start(self) -> None:
        pass

    def stop(self, phase: str) -> None:
        pass

    def report(self, phases) -> dict:
        return {}


def profile_engine(
    engine,
    manifest: dict,
    cfg: ProfileConfig,
    memory=None,
    clock=time.perf_counter,
    env: dict | None = None,
) -> list[dict]:
    """One record per prompt size in `cfg`, for an engine already loaded."""
    from edgeq_targets.common.profile_env import environment

    memory = memory or _NoMemory()
    env = env if env is not None else environment(manifest, cfg.threads)
    return [
        _profile_prompt(engine, manifest, cfg, n, memory, clock, env)
        for n in cfg.prompt_tokens
    ]


def _timed_runs(engine, ids, n_gen, count, roof, clock) -> list[dict]:
    runs = []
    for _ in range(count):
        r = run_figures(time_generation(engine, ids, n_gen, clock))
        r["roofline_pct"] = roofline_pct(r["decode_tokens_per_s"], roof)
        runs.append(r)
    return runs


def _profile_prompt(engine, manifest, cfg, asked, memory, clock, env) -> dict:
    n_prompt, n_gen, cut = fit_to_context(
        asked, cfg.gen_tokens, context_window(manifest)
    )
    ids = build_prompt(engine.tokenizer, n_prompt)
    plan = manifest.get("plan") or {}
    preds = plan.get("predictions") or manifest.get("predicted") or {}
    roof = roofline(
        preds, plan.get("runtime") or {}, len(ids), n_gen, cfg.bandwidth_gbs
    )
    roof["bandwidth_source"] = cfg.bandwidth_source

    # The first run with a new prompt shape pays for allocation and kernel
    # selection; it is measured, kept apart and left out of the summary.
    warmup = None
    if cfg.warmup:
        memory.start()
        warmup = _timed_runs(engine, ids, n_gen, 1, roof, clock)[0]
        memory.stop("warmup")
    memory.start()
    runs = _timed_runs(engine, ids, n_gen, cfg.repeats, roof, clock)
    memory.stop("runs")

    summary = plan_summary(manifest)
    mem = _memory_section(
        memory.report(("load", "warmup", "runs")), summary, preds, len(ids) + n_gen
    )
    warnings = [cut] if cut else []
    if n_gen <= 1:
        warnings.append(f"{n_gen} generated token(s): decode figures are n/a")
    warnings += memory_warnings(mem, summary)
    return {
        "schema": SCHEMA,
        "test_time": _utc_now(),
        "artifact": artifact_summary(Path(getattr(engine, "artifact", "")), manifest),
        "plan": summary,
        "env": env,
        "config": _config_section(cfg, asked, len(ids), n_gen, manifest),
        "load_s": getattr(engine, "load_seconds", None),
        "warmup": warmup,
        "samples": runs,
        "summary": summarize(runs),
        "memory": mem,
        "roofline": roof,
        "warnings": warnings,
    }


def _config_section(cfg, asked: int, n_prompt: int, n_gen: int, manifest) -> dict:
    return {
        "threads": cfg.threads,
        "prompt_tokens": n_prompt,
        "prompt_tokens_requested": asked,
        "gen_tokens": n_gen,
        "gen_tokens_requested": cfg.gen_tokens,
        "context_window": context_window(manifest),
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "ignore_eos": True,
    }


def _memory_section(measured: dict, plan: dict, preds: dict, used_tokens: int) -> dict:
    kv, ctx = plan.get("kv_cache_bytes"), plan.get("context_length")
    return {
        **measured,
        "weights_bytes": plan.get("weights_bytes"),
        "kv_cache_bytes": kv,
        "kv_cache_context": ctx,
        "kv_cache_bytes_used": round(kv * used_tokens / ctx) if kv and ctx else None,
        "predicted_peak_bytes": preds.get("peak_memory_bytes"),
    }


def _utc_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- Profiling an artifact -------------------------------------------------


def read_manifest(artifact: Path) -> dict:
    path = Path(artifact) / "manifest.json"
    if not path.is_file():
        raise ProfileFailed(f"{path}: not found; pass the artifact folder")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProfileFailed(f"{path}: unreadable ({e}); rebuild the artifact") from None


def manifest_bandwidth(manifest: dict) -> tuple[float | None, str | None]:
    """Bandwidth of the device the artifact was built for, from its profile."""
    device = manifest.get("device") or {}
    gbs = (device.get("profile") or {}).get("bandwidth_gbs")
    if not gbs:
        return None, None
    return float(gbs), f"device profile {device.get('name')!r} in the manifest"


def profile_artifact(artifact, cfg: ProfileConfig) -> list[dict]:
    """Load the artifact in this process, with memory measured from a
    baseline taken after the runtime is imported, and profile it."""
    from edgeq_targets.common.engine import ArtifactCorrupt, load_engine
    from edgeq_targets.common.profile_env import (
        MemoryProbe,
        preload_runtime,
        runtime_memory,
    )

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    target = manifest.get("target")
    if cfg.bandwidth_gbs is None:
        cfg.bandwidth_gbs, cfg.bandwidth_source = manifest_bandwidth(manifest)
    preload_runtime(target)
    memory = MemoryProbe(runtime_memory(target))
    memory.start()
    try:
        engine = load_engine(artifact, threads=cfg.threads, strict=True)
    except (ValueError, OSError, ImportError, ArtifactCorrupt) as e:
        raise ProfileFailed(f"{artifact}: cannot load: {e}") from None
    memory.stop("load")
    return profile_engine(engine, manifest, cfg, memory)


# --- Thread sweep --------------------------------------------------------------


def child_env(threads: int | None, base: dict | None = None) -> dict:
    """Environment of a child run: BLAS / OpenMP pools sized like the
    runtime's, so that a '1 thread' run is not helped by a hidden pool."""
    import os

    env = dict(os.environ if base is None else base)
    if threads:
        for name in (
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS",
        ):
            env[name] = str(threads)
    return env


def run_children(
    prefix: list[str], threads_list, options: list[str], run=subprocess.run
) -> list[dict]:
    """Profile each thread count in a fresh process (`prefix` + --threads T
    --json + `options`) and collect the JSON records it prints."""
    records = []
    for threads in threads_list:
        cmd = list(prefix) + (["--threads", str(threads)] if threads else [])
        cmd += ["--json"] + list(options)
        done = run(cmd, capture_output=True, text=True, env=child_env(threads))
        if done.returncode != 0:
            lines = (done.stderr or "").strip().splitlines() or ["no output"]
            raise ProfileFailed(
                f"profile run with {threads or 'default'} threads failed "
                f"(exit {done.returncode}): {lines[-1]}"
            )
        records += [
            json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")
        ]
    return records


# --- Command line ----------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; positive integers only."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of positive integers, e.g. 128,512"
        )
    return values


def add_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `run.py profile` and `python -m ...profile`."""
    p.add_argument(
        "--prompt-tokens",
        type=int_list,
        default=[128],
        help="prompt sizes in tokens, e.g. 128,512",
    )
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run")
    p.add_argument(
        "--threads",
        dest="sweep_threads",
        type=int_list,
        default=None,
        help="thread counts, e.g. 1,2,4 (one process each)",
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="memory bandwidth for the roofline [default: manifest]",
    )
    p.add_argument("--bandwidth-source", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON lines")


def add_parser(subparsers) -> None:
    """Register `profile` on the runner's command line (targets/common/cli.py)."""
    p = subparsers.add_parser("profile", help="measure speed and memory (JSON lines)")
    add_options(p)
    p.set_defaults(func=profile_main)


def _child_options(args) -> list[str]:
    opts = [
        "--prompt-tokens",
        ",".join(map(str, args.prompt_tokens)),
        "--gen-tokens",
        str(args.gen_tokens),
        "--repeats",
        str(args.repeats),
    ]
    if args.no_warmup:
        opts.append("--no-warmup")
    if args.bandwidth_gbs:
        opts += ["--bandwidth-gbs", str(args.bandwidth_gbs)]
        source = args.bandwidth_source or "given with --bandwidth-gbs"
        opts.append(f"--bandwidth-source={source}")
    return opts


def child_prefix(artifact: Path) -> list[str]:
    """How to start a child run: through the artifact's runner when this
    code runs from one, else through this module of the installed package."""
    run_py = Path(__file__).resolve().parents[2] / "run.py"
    if run_py.is_file():
        return [sys.executable, str(run_py), "--artifact", str(artifact), "profile"]
    module = "edgeq_targets.common.profile"
    return [sys.executable, "-m", module, "--artifact", str(artifact)]


def profile_main(args) -> int:
    """Run the profile the parsed `args` ask for and print the records."""
    from edgeq_targets.common.cli import artifact_root

    artifact = Path(args.artifact) if args.artifact else artifact_root()
    threads = args.sweep_threads or [getattr(args, "threads", None)]
    try:
        if len(threads) > 1:
            prefix = child_prefix(artifact)
            records = run_children(prefix, threads, _child_options(args))
        else:
            cfg = ProfileConfig(
                prompt_tokens=args.prompt_tokens,
                gen_tokens=args.gen_tokens,
                repeats=args.repeats,
                warmup=not args.no_warmup,
                threads=threads[0],
                bandwidth_gbs=args.bandwidth_gbs,
                bandwidth_source=args.bandwidth_source
                or ("given with --bandwidth-gbs" if args.bandwidth_gbs else None),
            )
            records = profile_artifact(artifact, cfg)
    except ProfileFailed as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    for rec in records:
        print(json.dumps(rec) if args.json else format_record(rec))
    best = best_threads(records)
    if best and not args.json:
        print(format_best(best))
    return 0


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def format_record(rec: dict) -> str:
    """One plain-text line per record (the runner has no rich)."""
    s, c, m = rec["summary"], rec["config"], rec["memory"]
    med = {k: v["median"] for k, v in s.items()}
    rss = m.get("peak_rss_bytes")
    own = m.get("runtime_peak_bytes")
    line = (
        f"{rec['artifact']['model']} {rec['artifact']['target']} "
        f"threads={c['threads'] or 'default'} prompt={c['prompt_tokens']} "
        f"gen={c['gen_tokens']} | load {_fmt(rec['load_s'], ' s', 2)} | "
        f"TTFT {_fmt(med['ttft_s'] and med['ttft_s'] * 1e3, ' ms')} | "
        f"prefill {_fmt(med['prefill_tokens_per_s'])} tok/s | "
        f"decode {_fmt(med['decode_tokens_per_s'])} tok/s "
        f"({_fmt(med['roofline_pct'], '% of roofline')}) | "
        f"e2e {_fmt(med['e2e_tokens_per_s'])} tok/s | "
        f"peak RSS {_fmt(rss and rss / 1e6, ' MB')}"
    )
    if own:
        line += f", runtime's own {own / 1e6:.1f} MB"
    return "\n".join([line] + [f"  warning: {w}" for w in rec.get("warnings", [])])


def format_best(best: dict) -> str:
    parts = [
        f"{phase} {b['threads']} ({b['tokens_per_s']:.1f} tok/s)"
        for phase, b in best.items()
    ]
    return "best threads: " + ", ".join(parts)


def main(argv=None) -> int:
    """`python -m edgeq_targets.common.profile --artifact DIR [options]`."""
    parser = argparse.ArgumentParser(prog="edgeq_targets.common.profile")
    parser.add_argument("--artifact", required=True, help="artifact folder")
    add_options(parser)
    return profile_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
