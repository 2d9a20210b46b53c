"""`edgeq serve`: an artifact behind Ollama- and OpenAI-compatible HTTP APIs.

The server itself is the device-side one (edgeq_targets.common.server), so
`edgeq serve` on the host and `runner/run.py serve` on a device answer the
same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from edgeq.cli import app
from edgeq.errors import ArtifactError, EdgeqError


@app.command()
def serve(
    artifact: Annotated[
        Path, typer.Argument(help="Artifact folder (from edgeq deploy).")
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind; 127.0.0.1 serves this machine only.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port (11434 is Ollama's; 0 picks one).")
    ] = 11434,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for the engine.")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Extra model name clients may send.")
    ] = None,
    queue_size: Annotated[
        int, typer.Option(help="Requests that may wait; more get 503 + Retry-After.")
    ] = 8,
    max_tokens: Annotated[
        int, typer.Option(help="Ceiling on tokens generated per request.")
    ] = 1024,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body accepted (413 above).")
    ] = 1 << 20,
) -> None:
    """Serve an artifact over Ollama- and OpenAI-compatible HTTP APIs."""
    from edgeq_targets.common import server as srv
    from edgeq_targets.common.engine import load_engine

    from edgeq import artifact as lib

    if artifact.exists() and not artifact.is_dir():
        raise ArtifactError(
            f"{artifact}: serve needs an artifact folder; unpack the archive "
            "first with `edgeq install`"
        )
    typer.echo(f"verifying {artifact}...", err=True)
    lib.verify(artifact)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = load_engine(artifact, threads=threads, verify=False)
    config = srv.ServerConfig(
        host=host,
        port=port,
        model_name=model_name,
        queue_size=queue_size,
        max_tokens=max_tokens,
        max_body_bytes=max_body_bytes,
    )
    try:
        server = srv.make_server(engine, config)
    except srv.ServeError as e:
        raise EdgeqError(str(e)) from None
    typer.echo(
        f"serving {server.app.info.name} ({engine.name}) on {server.url}: "
        "Ollama API under /api, OpenAI API under /v1; Ctrl-C stops",
        err=True,
    )
    srv.run(server)
