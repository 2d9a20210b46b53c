"""`edgeq deploy`, `edgeq run`, `edgeq pull`, `edgeq targets`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from edgeq.cli import app


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@app.command()
def deploy(
    model: str = typer.Argument(
        "smollm2-135m", help="Model folder, .gguf file or known name."
    ),
    device: str = typer.Option(
        ..., "--device", "-d", help="Device profile name (edgeq devices)."
    ),
    target: str | None = typer.Option(
        None, help="mlx or onnxruntime; default: the device's."
    ),
    out: Path | None = typer.Option(
        None, help="Output folder [default: dist/<model>-<device>]."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    bits: int | None = typer.Option(
        None, help="Bits per weight: 2, 3, 4, 6, 8 (16 keeps float)."
    ),
    group_size: int | None = typer.Option(None, help="Group size: 32, 64 or 128."),
    target_bpw: float | None = typer.Option(
        None, help="Mixed precision within this bits/weight budget."
    ),
    context: int = typer.Option(4096, help="Context length the memory check assumes."),
    plan: Path | None = typer.Option(
        None, help="Replay a saved plan (edgeq plan --out)."
    ),
    max_ppl_increase: float | None = typer.Option(
        None,
        help=(
            "Quality gate: allowed perplexity increase over the float model, "
            "0.05 = 5%. Default: 0.05 for 8-bit plans, 0.5 for 4-bit and lower."
        ),
    ),
    no_quality_gate: bool = typer.Option(
        False, "--no-quality-gate", help="Skip the quality gate."
    ),
    smoke_tokens: int = typer.Option(16, help="Tokens the smoke test generates."),
    no_archive: bool = typer.Option(False, "--no-archive", help="Skip the .tar.gz."),
    tie_embeddings: bool | None = typer.Option(
        None,
        "--tie-embeddings/--untie-embeddings",
        help=("Override the config's tie_word_embeddings."),
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Package MODEL for a device: quantize, add the runner, smoke-test, archive."""
    from edgeq.deploy import DeployRequest
    from edgeq.deploy import deploy as run_deploy

    req = DeployRequest(
        model=model, device=device, target=target, out=out, force=force,
        bits=bits, group_size=group_size, target_bpw=target_bpw,
        context_length=context, plan_path=plan, smoke_tokens=smoke_tokens,
        max_ppl_increase=max_ppl_increase, quality_gate=not no_quality_gate,
        archive=not no_archive, tie_embeddings=tie_embeddings,
    )  # fmt: skip
    with _DeployProgress() as progress:
        result = run_deploy(req, progress=progress)
    if json_out:
        typer.echo(json.dumps(result.manifest, indent=2, sort_keys=True))
        return
    _print_summary(result)


class _DeployProgress:
    """A rich progress bar on stderr: one tick per tensor, a line per step.
    The bar starts with the first tensor, so an early error prints alone."""

    def __enter__(self):
        self.console = _stderr_console()
        self.bar = None
        self.task = None
        return self

    def _start_bar(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"),
            TimeElapsedColumn(), console=self.console, transient=True,
        )  # fmt: skip
        self.bar.__enter__()
        self.task = self.bar.add_task("quantizing", total=None)

    def __call__(self, step: str, detail: str = ""):
        if step == "tensor":
            if self.bar is None:
                self._start_bar()
            self.bar.update(
                self.task, advance=1, description=f"quantizing {detail[:40]}"
            )
            return
        self._stop_bar()
        self.console.print(f"[dim]{step}[/dim] {detail}")

    def _stop_bar(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __exit__(self, *exc):
        self._stop_bar()


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    m, p = result.manifest, result.plan.predictions
    console = Console()
    size = sum(f["size"] for f in m["files"].values())
    t = Table(title=f"{m['model']['name']} for {m['device']['name']} ({m['target']})",
              show_header=False)  # fmt: skip
    t.add_row("artifact", f"{result.folder}  (id {m['artifact_id']})")
    if result.archive:
        t.add_row("archive", str(result.archive))
    t.add_row(
        "size",
        f"{size / 1e6:.1f} MB on disk, weights {p['weights_bytes'] / 1e6:.1f} MB",
    )
    t.add_row("bits per weight", f"{p['bits_per_weight']:.2f}")
    t.add_row(
        "memory",
        f"{p['peak_memory_bytes'] / 1e9:.2f} GB needed at {m['plan']['runtime']['context_length']}"
        f" tokens of context, {p['usable_memory_bytes'] / 1e9:.1f} GB usable",
    )
    t.add_row(
        "predicted decode", f"{p['decode_tokens_per_s']:.0f} tokens/s on the device"
    )
    q = m["measured"]
    if "ppl_increase" in q:
        t.add_row(
            "quality",
            f"perplexity {q.get('reference_perplexity', 0):.2f} -> "
            f"{q.get('perplexity', 0):.2f} "
            f"({100 * q['ppl_increase']:+.1f}%), top-1 agreement "
            f"{100 * q.get('top1_agreement', 0):.1f}%",
        )
    t.add_row("smoke test", repr(result.smoke_text.strip()[:120]))
    console.print(t)
    for w in m["plan"].get("warnings", []):
        _stderr_console().print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"Wrote {result.folder} in {result.timings.get('total_s', 0):.0f}s.")


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="Artifact folder (from edgeq deploy)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    max_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Sample from the k likeliest (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    seed: int | None = typer.Option(None, help="Random seed for sampling."),
    threads: int | None = typer.Option(None, help="CPU threads (onnxruntime)."),
    no_chat: bool = typer.Option(
        False, "--no-chat", help="Send the prompt raw, without the chat template."
    ),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
):
    """Generate text with an artifact; streams tokens, ends with tokens/s."""
    from edgeq_targets.common.cli import format_stats
    from edgeq_targets.common.engine import (
        ArtifactCorrupt,
        GenerationConfig,
        load_engine,
    )  # fmt: skip

    from edgeq.artifact import verify
    from edgeq.errors import ArtifactError

    try:
        cfg = GenerationConfig(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=list(stop),
        )  # fmt: skip
    except ValueError as e:
        raise ArtifactError(f"--{str(e).replace('_', '-')}") from None
    if threads is not None and threads < 1:
        raise ArtifactError(f"--threads must be >= 1, got {threads}")
    verify(artifact)
    try:
        engine = load_engine(artifact, threads=threads, verify=False)
    except ArtifactCorrupt as e:
        raise ArtifactError(str(e)) from None
    ids = engine.encode_prompt(prompt, chat=False if no_chat else None)
    limit = _context_limit(engine)
    if limit and len(ids) + max_tokens > limit:
        raise ArtifactError(
            f"--max-tokens {max_tokens}: the prompt ({len(ids)} tokens) plus the "
            f"tokens to generate pass the model's context of {limit} tokens; "
            "ask for fewer tokens or shorten the prompt"
        )
    for tok in engine.generate(ids, cfg):
        sys.stdout.write(tok.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    typer.echo(format_stats(engine.last_stats), err=True)


def _context_limit(engine) -> int | None:
    """Positions the model was trained for (RoPE tables end there)."""
    plan = engine.manifest.get("plan", {})
    cfg = plan.get("model", {}).get("config", {})
    return cfg.get("max_position_embeddings")


@app.command()
def pull(names: list[str] = typer.Argument(..., help="Known model names.")):
    """Fetch known models into the cache (~/.cache/edgeq) ahead of time."""
    from edgeq.models.registry import resolve_model

    for name in names:
        typer.echo(f"{name}: {resolve_model(name)}")


@app.command()
def targets(json_out: bool = typer.Option(False, "--json")):
    """List the targets edgeq builds for, and what each supports."""
    from dataclasses import asdict

    from edgeq.backends import TARGETS

    if json_out:
        typer.echo(json.dumps({k: asdict(v) for k, v in TARGETS.items()}, indent=2))
        return
    for t in TARGETS.values():
        bits = ",".join(map(str, t.bits))
        typer.echo(
            f"{t.name:12} {t.description}; bits {bits}; runs on {'/'.join(t.os)}"
        )
