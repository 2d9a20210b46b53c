"""`python runner/run.py serve`: the HTTP server on the device.

    python runner/run.py serve [--host 127.0.0.1] [--port 11434] [--threads N]

The runner CLI (cli.py) registers this module's `serve` subcommand.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edgeq_targets.common.api_common import ServerConfig


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The server's flags (the host CLI mirrors them)."""
    d = ServerConfig()
    p.add_argument(
        "--host",
        default=d.host,
        help="address to bind (default 127.0.0.1: this machine only)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=d.port,
        help="port (default 11434, Ollama's; 0 picks a free one)",
    )
    p.add_argument(
        "--model-name", default=None, help="extra model name clients may send"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=d.queue_size,
        help="requests that may wait; more get 503 + Retry-After",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help="ceiling on tokens generated per request",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes,
        help="largest request body accepted (413 above)",
    )


def add_parser(subparsers) -> None:
    """Register `serve` on the runner's subcommands (cli.py calls it)."""
    p = subparsers.add_parser(
        "serve", help="serve the model over Ollama- and OpenAI-compatible HTTP"
    )
    add_server_args(p)
    # --threads exists before the subcommand too; keep both spellings.
    p.add_argument(
        "--threads",
        dest="serve_threads",
        metavar="N",
        type=int,
        default=None,
        help="CPU threads for the engine",
    )
    p.set_defaults(func=serve_main)


def config_from_args(args) -> ServerConfig:
    """The ServerConfig the parsed flags describe."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        queue_size=args.queue_size,
        max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes,
    )


def serve_main(args) -> int:
    """Load the artifact's engine and serve it until Ctrl-C."""
    from edgeq_targets.common.cli import artifact_root
    from edgeq_targets.common.engine import ArtifactCorrupt, load_engine
    from edgeq_targets.common.server import ServeError, make_server, run

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    threads = args.serve_threads or args.threads
    try:
        engine = load_engine(
            args.artifact or artifact_root(), threads=threads, strict=True
        )
        server = make_server(engine, config_from_args(args))
    except (ArtifactCorrupt, ServeError, ValueError, ImportError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(
        f"serving {server.app.info.name} ({engine.name}) on {server.url}",
        file=sys.stderr,
        flush=True,
    )
    run(server)
    return 0
