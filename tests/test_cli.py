"""The CLI through typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from edgeq.cli import app

runner = CliRunner()


def test_help_imports_no_heavy_runtime():
    """`edgeq --help` must answer at once: mlx, onnxruntime, ansible and
    numpy are imported only by the commands that need them."""
    code = (
        "import sys; from edgeq.cli import app; "
        "print([m for m in ('mlx', 'onnxruntime', 'ansible', 'numpy', 'mlx_lm') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("deploy", "run", "devices", "verify", "pull", "targets"):
        assert command in result.stdout


def test_deploy_and_run_through_the_cli(tmp_path, stories_gguf):
    out = tmp_path / "art"
    result = runner.invoke(app, ["deploy", str(stories_gguf), "--device",
                                 "macbook-air-m2-16gb", "--out", str(out),
                                 "--no-quality-gate"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.stdout and "smoke test" in result.stdout
    assert (tmp_path / "art.tar.gz").is_file()

    result = runner.invoke(app, ["run", str(out), "-p", "Once upon a time",
                                 "--max-tokens", "12", "--no-chat"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(", there was a little")
    assert "generation: 12 tokens" in result.stderr

    # An existing output is refused, with the flag that overrides it.
    again = runner.invoke(app, ["deploy", str(stories_gguf), "--device",
                                "macbook-air-m2-16gb", "--out", str(out)])  # fmt: skip
    assert again.exit_code == 1
    assert again.stderr == (
        f"Error: output '{out}' already exists; pass --force to replace it or "
        "choose another --out\n"
    )


def test_deploy_json_prints_the_manifest(tmp_path, stories_gguf):
    result = runner.invoke(app, ["deploy", str(stories_gguf), "--device",
                                 "macbook-air-m2-16gb", "--out", str(tmp_path / "a"),
                                 "--no-quality-gate", "--no-archive", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["target"] == "mlx"
    defaults = manifest["plan"]["defaults"]
    assert (defaults["bits"], defaults["group_size"]) == (4, 64)


def test_mlx_on_a_raspberry_pi_is_refused(tmp_path, stories_gguf):
    result = runner.invoke(app, ["deploy", str(stories_gguf), "--device", "rpi5-8gb",
                                 "--target", "mlx", "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: --target mlx cannot run on device 'rpi5-8gb' (linux/arm64); mlx "
        "needs macos on arm64; use --target onnxruntime (the device's preferred "
        "target)\n"
    )
    assert not (tmp_path / "x").exists()


def test_user_error_reaches_the_terminal_as_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "deploy", "no-such-model", "--device",
         "rpi5-8gb", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: model 'no-such-model' is neither a file or folder nor a known name "
        "(gemma3-270m, smollm2-135m); give a Hugging Face folder or a .gguf file"
    ]
