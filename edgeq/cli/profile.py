"""`edgeq profile`: measure an artifact here, and compare saved results.

    edgeq profile ARTIFACT [options]      (short for `edgeq profile run ...`)
    edgeq profile compare results.jsonl ... [--out report.html|.md|.png]

Results go to stdout (a table, --json lines or --csv); progress to stderr.
The library (edgeq.profile, edgeq.report) is imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeq.cli import _EdgeqGroup, app


class _ProfileGroup(_EdgeqGroup):
    """Lets `edgeq profile ARTIFACT ...` stand for `edgeq profile run
    ARTIFACT ...`, as the issue's usage reads, while `compare` stays a
    subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


profile_app = typer.Typer(
    cls=_ProfileGroup,
    no_args_is_help=True,
    help="Measure an artifact's speed and memory here; compare saved results. "
    "`edgeq profile ARTIFACT` is short for `edgeq profile run ARTIFACT`.",
)
app.add_typer(profile_app, name="profile")


def _int_list(flag: str, text: str | None) -> list[int] | None:
    from edgeq.profile import ProfileError

    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ProfileError(
            f"{flag} {text!r}: expected positive integers separated by commas, "
            "e.g. 1,2,4"
        )
    return values


@profile_app.command("run")
def run_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder.")],
    prompt_tokens: Annotated[
        str, typer.Option(help="Prompt sizes in tokens, e.g. 128,512.")
    ] = "128",
    gen_tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 128,
    repeats: Annotated[int, typer.Option(help="Measured runs per setting.")] = 5,
    threads: Annotated[
        str | None,
        typer.Option(help="Thread counts to sweep, e.g. 1,2,4 (a process each)."),
    ] = None,
    no_warmup: Annotated[
        bool, typer.Option("--no-warmup", help="Skip the warm-up run.")
    ] = False,
    device: Annotated[
        str | None,
        typer.Option(help="Take the bandwidth from this profile, not this machine."),
    ] = None,
    bandwidth_gbs: Annotated[
        float | None, typer.Option(help="Bandwidth for the roofline, GB/s.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    save: Annotated[
        Path | None, typer.Option(help="Append the records to this JSONL file.")
    ] = None,
) -> None:
    """Measure load time, TTFT, prefill/decode tokens/s, memory and roofline."""
    from edgeq.profile import ProfileError, ProfileRequest, append_jsonl, run_profile

    if as_json and as_csv:
        raise ProfileError("--json and --csv: choose one output format")
    req = ProfileRequest(
        artifact=artifact,
        prompt_tokens=_int_list("--prompt-tokens", prompt_tokens),
        gen_tokens=gen_tokens,
        repeats=repeats,
        threads=_int_list("--threads", threads) or [None],
        warmup=not no_warmup,
        device=device,
        bandwidth_gbs=bandwidth_gbs,
    )
    result = _run_with_progress(req, run_profile)
    _print_result(result, as_json, as_csv)
    if save:
        append_jsonl(save, result.records)
        typer.echo(f"Appended {len(result.records)} records to {save}", err=True)


def _run_with_progress(req, run_profile):
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("starting") as status:

        def progress(i: int, n: int, threads) -> None:
            status.update(
                f"profiling {req.artifact.name} with {threads or 'default'} "
                f"threads ({i + 1}/{n}), a fresh process each"
            )

        return run_profile(req, progress)


def _print_result(result, as_json: bool, as_csv: bool) -> None:
    from edgeq.profile import to_csv

    if as_json:
        for rec in result.records:
            typer.echo(json.dumps(rec, allow_nan=False))
        return
    if as_csv:
        typer.echo(to_csv(result.records), nl=False)
        return
    _print_table(result.records)
    if result.best:
        parts = [
            f"{phase} {b['threads']} threads ({b['tokens_per_s']:.1f} tok/s)"
            for phase, b in result.best.items()
        ]
        typer.echo("Best: " + ", ".join(parts))
    if result.suggestion:
        typer.echo(result.suggestion)


def _print_table(records: list[dict]) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgeq.report import comparison_rows

    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        caption=escape(_caption(records)),
    )
    columns = (
        ("threads", "thr"),
        ("prompt", "prompt"),
        ("gen", "gen"),
        ("load_s", "load\ns"),
        ("ttft_ms", "TTFT\nms"),
        ("prefill", "prefill\ntok/s"),
        ("decode", "decode\ntok/s"),
        ("roofline_pct", "%\nroof"),
        ("peak_rss_mb", "RSS\nMB"),
        ("runtime_mb", "own\nMB"),
    )
    for _, header in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for row in comparison_rows(records):
        table.add_row(*(escape(_range_cell(row, key)) for key, _ in columns))
    console = Console()
    console.print(table)
    # Records of one artifact often share a warning; say each once.
    warnings = dict.fromkeys(w for rec in records for w in rec["warnings"])
    for w in warnings:
        console.print(f"[yellow]warning[/]: {escape(w)}", highlight=False)


def _num(value) -> str:
    """Two decimals for small figures, fewer for large: timings are noisy."""
    if value is None:
        return "n/a"
    if isinstance(value, (str, int)):
        return str(value)
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:.{digits}f}"


def _range_cell(row: dict, key: str) -> str:
    """The median, with min-max under it for the tokens/s figures."""
    text = _num(row.get(key))
    if key in ("prefill", "decode") and row[key] is not None:
        lo, hi = row[key + "_range"]
        text += f"\n{_num(lo)}-{_num(hi)}"
    return text


def _caption(records: list[dict]) -> str:
    if not records:
        return ""
    rec = records[0]
    dev = rec["env"]["device"]
    ttft = (rec.get("warmup") or {}).get("ttft_s")
    warm = f"warm-up TTFT {ttft * 1e3:.1f} ms (excluded)" if ttft else "no warm-up"
    return (
        f"{rec['artifact']['model']} ({rec['artifact']['target']}, "
        f"{rec['plan']['bits_per_weight']} bpw) on {dev.get('name')}; "
        f"roofline at {rec['roofline']['bandwidth_gbs']} GB/s "
        f"({dev.get('origin')}); medians of {rec['config']['repeats']} runs "
        f"(min-max under); RSS: {rec['memory'].get('rss_source')}; {warm}"
    )


@profile_app.command("compare")
def compare_command(
    files: Annotated[list[Path], typer.Argument(help="JSONL files made by --save.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Write a report: .html (table + chart), .md or .png."),
    ] = None,
) -> None:
    """Compare saved results: tokens/s and memory, measured and predicted."""
    from edgeq.profile import read_jsonl
    from edgeq.report import comparison_rows, markdown_table, write_report

    records = [rec for path in files for rec in read_jsonl(path)]
    rows = comparison_rows(records)
    if out is None:
        typer.echo(markdown_table(rows))
        return
    written = write_report(rows, out)
    typer.echo(f"Wrote {', '.join(map(str, written))} ({len(rows)} records)")
