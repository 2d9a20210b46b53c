"""The `edgeq` command line.

This package only parses flags, calls the library and prints. Each command
group lives in its own module and registers itself on `app`. Heavy imports
(mlx, onnxruntime, ansible) stay inside the library functions, so
`edgeq --help` answers at once.
"""

import typer
from typer.core import TyperGroup

from edgeq.errors import EdgeqError


class _EdgeqGroup(TyperGroup):
    """Turns EdgeqError into one `Error: ...` line on stderr and its exit code
    (1), with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeqError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    name="edgeq",
    cls=_EdgeqGroup,
    help="Package, profile, serve and roll out language models for a device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    # Help texts hold brackets ("PATTERN=BITS[/GROUP]", "[default: ...]")
    # that rich would read as markup and swallow or crash on.
    rich_markup_mode=None,
)


def sub_app(name: str, help: str) -> typer.Typer:
    """A command group (`edgeq NAME ...`) with the same error handling."""
    group = typer.Typer(
        cls=_EdgeqGroup, help=help, no_args_is_help=True, rich_markup_mode=None
    )
    app.add_typer(group, name=name)
    return group


# Command modules register themselves on `app` when imported.
for _optional in ("devices", "build", "plan", "profile", "serve", "fleet", "artifact"):
    try:
        __import__(f"edgeq.cli.{_optional}")
    except ModuleNotFoundError as _e:  # a command group not written yet
        if _e.name != f"edgeq.cli.{_optional}":
            raise


def main() -> None:
    """Console-script entry point."""
    app()
