"""Running `edgeq` commands in tests and checking how they fail.

    from helpers_cli import assert_one_line_error, deploy_args
    result = CliRunner().invoke(app, deploy_args(model, tmp_path / "out"))
    assert_one_line_error(result, "output 'x' already exists; ...")

An `edgeq` error is one `Error:` line on stderr, exit code 1, no traceback;
and a failed build leaves neither its output nor a temporary folder.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MAC = "macbook-air-m1-8gb"  # mlx target: mlx-lm runs on Linux's CPU too
PI = "rpi5-8gb"  # onnxruntime target
EDGEQ = Path(sys.executable).with_name("edgeq")


def deploy_args(model, out: Path, device: str = MAC, *extra) -> list[str]:
    """`edgeq deploy` of a tiny model: no quality gate, no archive, 2 tokens."""
    return ["deploy", str(model), "--device", device, "--out", str(out),
            "--no-quality-gate", "--no-archive", "--smoke-tokens", "2", *extra]  # fmt: skip


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary folders or files that atomic writes leave when they fail."""
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def assert_one_line_error(result, message: str | re.Pattern) -> None:
    """Exit 1, exactly one `Error:` line, last on stderr; no traceback."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.exit_code == 1, text
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    if isinstance(message, re.Pattern):
        assert message.fullmatch(errors[0][len("Error: ") :]), errors[0]
    else:
        assert errors[0] == f"Error: {message}"


def assert_nothing_written(out: Path) -> None:
    """No output folder, no temporary folder beside it, no archive."""
    assert not out.exists(), sorted(out.iterdir()) if out.is_dir() else out
    assert not leftovers(out.parent, out.name)
    assert not Path(str(out) + ".tar.gz").exists()


def flip_byte(path: Path, at: int | None = None) -> None:
    """Flip the lowest bit of one byte (the middle one by default)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
