"""`edgeq plan` and `edgeq eval`.

Results go to stdout (a table, or --json); progress to stderr. The library
does the work (edgeq.planner, edgeq.evaluate); this module parses flags and
prints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from edgeq.cli import app
from edgeq.errors import EdgeqError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """'2GB' -> 2e9 bytes, '1.5GiB' -> 1.5 * 2^30, '512MB', '300000000'."""
    m = _SIZE.match(text or "")
    if not m:
        raise EdgeqError(f"{flag} '{text}': write a size such as 2GB, 512MB or 1.5GiB")
    unit = (m.group(2) or "").lower()
    binary = "i" in unit
    prefix = unit[:1] if unit[:1] in "kmgt" else ""
    scale = 1024 ** "kmgt".index(prefix) * 1024 if binary and prefix else _UNITS[prefix]
    return int(float(m.group(1)) * scale)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


Opt = typer.Option


_BPW_HELP = "Mixed precision from measured sensitivity within this bits/weight budget."
_OVERRIDE_HELP = "PATTERN=BITS[/GROUP], e.g. 'lm_head.weight=8' (repeatable)."
_TEXT_HELP = "UTF-8 text to score [default: the project's evaluation text]."
_SOURCE_HELP = "Float model to compare with [default: the manifest's]."


@app.command("plan")
def plan_cmd(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file or known name.")],
    device: Annotated[str, Opt("--device", "-d", help="Device profile name (edgeq devices).")],
    target: Annotated[str | None, Opt(help="mlx or onnxruntime; default: the device's.")] = None,
    bits: Annotated[int | None, Opt(help="Uniform bits: 2, 3, 4, 6, 8 (16 keeps float).")] = None,
    group_size: Annotated[int | None, Opt(help="Group size: 32, 64 or 128.")] = None,
    target_bpw: Annotated[float | None, Opt(help=_BPW_HELP)] = None,
    max_memory: Annotated[str | None, Opt(help="Cap usable memory, e.g. 2GB.")] = None,
    context: Annotated[int, Opt(help="Context length for the KV cache.")] = 4096,
    kv_bits: Annotated[int, Opt(help="KV cache precision in bits.")] = 16,
    override: Annotated[list[str] | None, Opt(help=_OVERRIDE_HELP)] = None,
    all_rows: Annotated[bool, Opt("--all", help="One row per tensor.")] = False,
    json_out: Annotated[bool, Opt("--json", help="Print the plan document.")] = False,
    out: Annotated[Path | None, Opt(help="Save the plan for `edgeq deploy --plan`.")] = None,
):  # fmt: skip
    """Plan how MODEL is stored on a device: per-tensor bits, size, memory, speed."""
    from edgeq.planner import PlanRequest, check_fits, plan_model

    req = PlanRequest(
        target=target or "", bits=bits, group_size=group_size,
        context_length=context, kv_cache_bits=kv_bits,
        max_memory_bytes=parse_size(max_memory) if max_memory else None,
        target_bpw=target_bpw, overrides=list(override or []),
    )  # fmt: skip
    with _SensitivityProgress() as progress:
        req.progress = progress
        plan, source, dev = plan_model(model, device, req)
    if out:
        from edgeq.fsutil import atomic_write_text

        atomic_write_text(out, plan.to_json())
    if json_out:
        typer.echo(plan.to_json(), nl=False)
    else:
        from edgeq.cli.plan_table import print_plan

        print_plan(plan, all_rows=all_rows)
        if out:
            _stderr().print(f"plan saved to {out}")
    check_fits(plan, dev, source, req)


class _SensitivityProgress:
    """A progress bar on stderr while tensor sensitivity is measured."""

    def __enter__(self):
        self._progress = None
        return self

    def __call__(self, done: int, total: int, name: str) -> None:
        if self._progress is None:
            from rich.progress import Progress

            self._progress = Progress(console=_stderr(), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("measuring sensitivity", total=total)
        self._progress.update(self._task, completed=done, description=name[-40:])

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()


@app.command("eval")
def eval_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (edgeq deploy).")],
    text: Annotated[Path | None, Opt(help=_TEXT_HELP)] = None,
    source: Annotated[str | None, Opt(help=_SOURCE_HELP)] = None,
    max_tokens: Annotated[int, Opt(help="Score at most this many tokens.")] = 1024,
    window: Annotated[int, Opt(help="Sliding window length in tokens.")] = 512,
    stride: Annotated[int, Opt(help="Tokens the window moves each step.")] = 256,
    json_out: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
):  # fmt: skip
    """Perplexity, top-1 agreement and KL of an artifact against its float model."""
    from edgeq.evaluate import evaluate_artifact

    _stderr().print(f"evaluating {artifact} against its float model")
    result = evaluate_artifact(
        artifact, text=text, source=source, max_tokens=max_tokens,
        window=window, stride=stride,
    )  # fmt: skip
    if json_out:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    from edgeq.cli.plan_table import print_eval

    print_eval(result)
