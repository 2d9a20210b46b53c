"""`edgeq verify` and `edgeq install`: check and unpack artifacts.

Results go to stdout, notes to stderr. The library (edgeq.artifact) is
imported inside the commands so that `edgeq --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeq.cli import app
from edgeq.errors import ArtifactError


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@app.command()
def verify(
    artifact: Annotated[
        Path, typer.Argument(help="Artifact folder or .tar.gz archive.")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON.")
    ] = False,
) -> None:
    """Check an artifact's files against the sizes and sha256 in its manifest."""
    from edgeq import artifact as lib

    try:
        manifest = lib.verify(artifact)
    except ArtifactError as e:
        if not as_json:
            raise
        typer.echo(json.dumps({"ok": False, "path": str(artifact), "error": str(e)}))
        raise typer.Exit(1) from None

    files = manifest["files"]
    total = sum(entry["size"] for entry in files.values())
    if as_json:
        result = {
            "ok": True,
            "path": str(artifact),
            "artifact_id": manifest["artifact_id"],
            "target": manifest.get("target"),
            "files": len(files),
            "total_bytes": total,
        }
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"OK {artifact}: artifact {manifest['artifact_id']}, "
        f"{len(files)} files, {_human_bytes(total)}"
    )


@app.command()
def install(
    archive: Annotated[Path, typer.Argument(help="Artifact .tar.gz to install.")],
    to: Annotated[
        Path, typer.Option("--to", help="Folder to install into, as DIR/<id>.")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing copy.")
    ] = False,
) -> None:
    """Verify an archive, check this machine can run it, and unpack it."""
    from edgeq import artifact as lib
    from edgeq import preflight

    typer.echo(f"checking {archive} against this machine...", err=True)
    dest = lib.install(archive, to, force=force)
    runtime = lib.load_manifest(dest)["runtime"]
    facts = preflight.local_device_facts(tuple(runtime.get("packages") or ()))
    missing = preflight.missing_packages(runtime, facts)
    if missing:
        wanted = " ".join(f"'{m}'" for m in missing)
        typer.echo(f"note: before running it, pip install {wanted}", err=True)
    typer.echo(str(dest))
