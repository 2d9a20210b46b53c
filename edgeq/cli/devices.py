"""`edgeq devices`: list, show and detect device profiles.

Results (tables or ``--json``) go to stdout; progress goes to stderr. Rich is
imported inside the commands so that `edgeq --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeq.cli import sub_app
from edgeq.devices import DeviceProfile, detect, get_device, load_devices

devices_app = sub_app("devices", "List, show and detect device profiles.")

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print JSON instead of a table.")
]


# no_args_is_help=False: `edgeq devices` alone lists the profiles.
@devices_app.callback(invoke_without_command=True, no_args_is_help=False)
def list_devices(
    ctx: typer.Context,
    as_json: JsonFlag = False,
) -> None:
    """List, show and detect device profiles; alone, list them all."""
    if ctx.invoked_subcommand is not None:
        return
    devices = load_devices()
    if as_json:
        typer.echo(json.dumps([d.to_dict() for d in devices.values()], indent=2))
        return

    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Only the isa column wraps, so that names and figures stay whole on an
    # 80-column terminal.
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
        caption="RAM and usable memory in GB, bandwidth in GB/s",
    )
    for header in ("name", "target", "RAM", "usable", "GB/s", "arch"):
        right = header in ("RAM", "usable", "GB/s")
        table.add_column(header, no_wrap=True, justify="right" if right else "left")
    table.add_column("isa", overflow="fold")
    table.add_column("cores", no_wrap=True, justify="right")
    for d in devices.values():
        table.add_row(
            d.name,
            d.target,
            f"{d.ram_gb:g}",
            f"{d.usable_memory_bytes / 2**30:.1f}",
            f"{d.bandwidth_gbs:g}",
            d.arch,
            " ".join(d.isa),
            str(d.cores),
        )
    Console().print(table)


@devices_app.command("show")
def show(
    name: Annotated[
        str, typer.Argument(help="Device name, as `edgeq devices` lists them.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Show every field of one device profile."""
    profile = get_device(name)
    if as_json:
        typer.echo(json.dumps(profile.to_dict(), indent=2))
    else:
        _print_profile(profile)


@devices_app.command("detect")
def detect_command(
    name: Annotated[
        str | None,
        typer.Option("--name", help="Entry name [default: local-<hostname>]."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="File to write [default: ~/.config/edgeq/devices.toml]."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Profile this machine (CPU, RAM, measured bandwidth) and save it."""
    from rich.console import Console

    Console(stderr=True).print("Measuring memory bandwidth (a few seconds)...")
    profile = detect(out_path=out, name=name)
    if as_json:
        typer.echo(json.dumps(profile.to_dict(), indent=2))
        return
    _print_profile(profile)
    typer.echo(
        f"Measured {profile.bandwidth_gbs:g} GB/s; wrote device {profile.name!r} "
        f"to {profile.source}"
    )


def _print_profile(profile: DeviceProfile) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("field", "value", title=profile.name, show_header=False)
    for key, value in profile.to_dict().items():
        if key == "name" or value is None or value == {}:
            continue
        if isinstance(value, list):
            value = " ".join(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key, str(value))
    table.add_row("usable memory", f"{profile.usable_memory_bytes / 2**30:.1f} GiB")
    table.add_row(
        "decode efficiency used",
        f"{profile.expected_decode_efficiency:g}"
        + ("" if profile.decode_efficiency else f" (default for {profile.target})"),
    )
    Console().print(table)
