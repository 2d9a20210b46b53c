"""`edgeq fleet deploy|status|rollback`: roll artifacts out with Ansible.

Results go to stdout (tables, or --json), per-host progress to stderr. The
library (edgeq.fleet) is imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeq.cli import sub_app
from edgeq.errors import FleetError

fleet_app = sub_app("fleet", "Roll artifacts out to a fleet of devices with Ansible.")

FleetFile = Annotated[
    Path, typer.Argument(help="The fleet.toml describing hosts and policy.")
]
HostsOpt = Annotated[
    str | None,
    typer.Option("--hosts", help="Comma-separated hosts or groups; default: all."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

_STYLE = {
    "updated": "green", "up to date": "green", "rolled back": "yellow",
    "failed": "red", "unreachable": "red", "refused": "red", "not run": "dim",
}  # fmt: skip


def _names(hosts: str | None) -> list[str] | None:
    return [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None


def _console(stderr: bool = False):
    from rich.console import Console

    # Notes on stderr keep their lines whole (paths, reasons), even in a pipe.
    return Console(stderr=stderr, highlight=False, soft_wrap=stderr)


class _Progress:
    """One line per host on stderr: its current task, then its outcome."""

    def __init__(self, hosts: list[str]):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = _console(stderr=True)
        self.bar = Progress(
            TextColumn("{task.fields[host]:<14}"), BarColumn(bar_width=20),
            TextColumn("{task.description}"), TimeElapsedColumn(),
            console=self.console,
        )  # fmt: skip
        self.rows = {
            h: self.bar.add_task("waiting", host=h, total=None, visible=False)
            for h in hosts
        }

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "build" and info["step"] != "tensor":
            self.console.print(
                f"[dim]build[/] {info['device']}: {info['step']} {info['detail']}"[:120]
            )
        elif kind == "batch":
            self.console.print(f"[bold]{info['step']}[/]: {', '.join(info['hosts'])}")
        elif kind == "event" and info.get("event") == "result":
            row = self.rows.get(info["host"])
            if row is not None:
                self.bar.update(
                    row,
                    visible=True,
                    advance=1,
                    description=f"{info['task']} ({info['status']})",
                )
        elif kind == "host":
            row = self.rows.get(info["host"])
            if row is not None:
                style = _STYLE.get(info["status"], "")
                text = f"[{style}]{info['status']}[/] {info.get('release') or ''}"
                self.bar.update(
                    row, visible=True, total=1, completed=1, description=text
                )


@fleet_app.command("deploy")
def deploy(
    fleet: FleetFile,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Write and show the inventory and playbook; contact no host.",
        ),
    ] = False,
    hosts: HostsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build one artifact per device profile and roll it out: canaries, then batches."""
    from edgeq.fleet.config import load_fleet
    from edgeq.fleet.rollout import deploy_fleet

    config = load_fleet(fleet)
    selected = [h.name for h in config.select(_names(hosts))]
    with _Progress(selected) as progress:
        result = deploy_fleet(config, _names(hosts), dry_run=dry_run, progress=progress)
    if as_json:
        typer.echo(json.dumps(_rollout_json(result), indent=2))
    elif dry_run:
        _print_dry_run(result)
    else:
        _print_outcomes(result.hosts.values())
    _summary(result)


def _rollout_json(result) -> dict:
    from dataclasses import asdict

    return {
        "dry_run": result.dry_run,
        "stopped": result.stopped,
        "batches": result.batches,
        "builds": {d: b.to_dict() for d, b in result.builds.items()},
        "hosts": {n: asdict(o) for n, o in result.hosts.items()},
        "files": {k: str(v) for k, v in result.paths.items()},
        "log": str(result.log) if result.log else None,
        "warnings": result.warnings,
    }


def _print_dry_run(result) -> None:
    from rich.table import Table

    table = Table(title="edgeq fleet deploy --dry-run")
    for column in ("batch", "host", "device", "release", "archive"):
        table.add_column(column)
    for number, batch in enumerate(result.batches):
        for name in batch:
            o = result.hosts[name]
            build = result.builds.get(o.device)
            archive = (
                str(build.archive) if build else "not built yet (deploy builds it)"
            )
            table.add_row(str(number), name, o.device, o.target_release or "-", archive)
    _console().print(table)
    for key in ("inventory", "playbook"):
        typer.echo(f"\n# ---- {result.paths[key]}")
        typer.echo(result.paths[key].read_text())


def _print_outcomes(outcomes) -> None:
    from rich.table import Table

    table = Table()
    for column in (
        "host",
        "device",
        "batch",
        "result",
        "release",
        "decode tok/s",
        "reason",
    ):
        table.add_column(column)
    for o in outcomes:
        tps = (o.gate or {}).get("decode_tokens_per_s")
        style = _STYLE.get(o.status, "")
        table.add_row(
            o.host, o.device, "-" if o.batch is None else str(o.batch),
            f"[{style}]{o.status}[/]", o.release or "-",
            f"{tps:.1f}" if tps else "-", o.reason,
        )  # fmt: skip
    _console().print(table)


def _summary(result) -> None:
    err = _console(stderr=True)
    if result.dry_run:
        err.print(
            f"dry run: wrote {result.paths['playbook']} and "
            f"{result.paths['inventory']}; no host contacted"
        )
        return
    counts: dict[str, int] = {}
    for o in result.hosts.values():
        counts[o.status] = counts.get(o.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in counts.items())
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    err.print(f"{parts}; log: {result.log}")
    if result.stopped:
        raise FleetError(f"rollout stopped: {result.stopped}")


@fleet_app.command("status")
def status(fleet: FleetFile, hosts: HostsOpt = None, as_json: JsonOpt = False) -> None:
    """Show each host's active release, server health and last gate figures."""
    from rich.table import Table

    from edgeq.fleet.config import load_fleet
    from edgeq.fleet.status import fleet_status

    rows = fleet_status(load_fleet(fleet), _names(hosts))
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    table = Table(title=f"edgeq fleet status: {fleet}")
    for column in (
        "host",
        "device",
        "release",
        "health",
        "decode tok/s",
        "of predicted",
        "last rollout",
    ):
        table.add_column(column)
    for r in rows:
        share = f"{100 * r.decode_share:.1f}%" if r.decode_share is not None else "-"
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        health = r.health if r.reachable else "[red]unreachable[/]"
        table.add_row(
            r.host,
            r.device,
            r.release or "-",
            health,
            tps,
            share,
            r.last_rollout or "-",
        )
    _console().print(table)


@fleet_app.command("rollback")
def rollback(
    fleet: FleetFile, hosts: HostsOpt = None, as_json: JsonOpt = False
) -> None:
    """Put hosts back on the release they ran before the current one."""
    from dataclasses import asdict

    from edgeq.fleet.config import load_fleet
    from edgeq.fleet.rollout import rollback_fleet

    config = load_fleet(fleet)
    selected = [h.name for h in config.select(_names(hosts))]
    with _Progress(selected) as progress:
        outcomes = rollback_fleet(config, _names(hosts), progress=progress)
    if as_json:
        typer.echo(json.dumps({n: asdict(o) for n, o in outcomes.items()}, indent=2))
    else:
        _print_outcomes(outcomes.values())
    bad = [n for n, o in outcomes.items() if o.status in ("failed", "unreachable")]
    if bad:
        reasons = "; ".join(
            f"{n}: {outcomes[n].reason or outcomes[n].status}" for n in bad
        )
        raise FleetError(f"rollback failed on {len(bad)} host(s): {reasons}")
