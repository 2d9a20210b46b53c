"""One real profile of a stories260K MLX artifact, through `edgeq profile`
and through the artifact's own runner (a thread sweep of fresh processes).
Checks fields and their consistency, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeq import __version__
from edgeq.cli import app
from edgeq.profile import validate_record

MODEL = Path("/work/shared/models/stories260K.gguf")
FAST = ["--prompt-tokens", "8", "--gen-tokens", "4", "--repeats", "1"]

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not present")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("mlx_lm")
    from edgeq.deploy import DeployRequest, deploy

    out = tmp_path_factory.mktemp("profile-e2e") / "stories"
    req = DeployRequest(
        model=str(MODEL),
        device="macbook-air-m2-16gb",
        out=out,
        quality_gate=False,
        archive=False,
        smoke_tokens=2,
    )
    return deploy(req).folder


def check_consistent(rec: dict, manifest: dict) -> None:
    """What every real record must satisfy, whatever the timings."""
    validate_record(rec)
    cfg = rec["config"]
    for run in rec["samples"] + [rec["warmup"]]:
        assert run["gen_tokens"] == cfg["gen_tokens"]
        assert run["decode_tokens"] == run["gen_tokens"] - 1
        assert run["prompt_tokens"] == cfg["prompt_tokens"]
        assert 0 < run["ttft_s"] <= run["e2e_s"]
        assert run["decode_s"] == pytest.approx(run["e2e_s"] - run["ttft_s"])
        assert run["roofline_pct"] > 0
    assert rec["summary"]["decode_tokens_per_s"]["n"] == cfg["repeats"]
    assert rec["artifact"]["id"] == manifest["artifact_id"]
    assert (
        rec["plan"]["weights_bytes"] == manifest["plan"]["predictions"]["weights_bytes"]
    )
    mem = rec["memory"]
    assert mem["peak_rss_bytes"] > 0 and mem["rss_source"].startswith("os: ")
    assert mem["runtime_source"].startswith("mlx: ") and mem["runtime_peak_bytes"] > 0
    assert mem["kv_cache_bytes"] == manifest["plan"]["predictions"]["kv_cache_bytes"]
    assert rec["env"]["runtime"]["versions"]["mlx"]
    assert rec["env"]["python"] and rec["env"]["cpu_flags"] is not None


def test_edgeq_profile_json(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    args = ["profile", str(artifact), *FAST, "--json", "--bandwidth-gbs", "10"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (rec,) = [json.loads(x) for x in result.output.splitlines() if x.startswith("{")]
    check_consistent(rec, manifest)
    assert rec["config"]["prompt_tokens"] == 8 and rec["config"]["threads"] is None
    assert rec["env"]["edgeq_version"] == __version__
    assert rec["roofline"]["bandwidth_gbs"] == 10.0


def test_artifact_runner_profile_with_thread_sweep(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    run_py = artifact / "runner" / "run.py"
    cmd = [sys.executable, str(run_py), "profile", "--json", "--threads", "1,2"]
    done = subprocess.run(
        cmd + FAST, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in done.stdout.splitlines()]
    assert [r["config"]["threads"] for r in records] == [1, 2]
    for rec in records:
        check_consistent(rec, manifest)
        # On a device, the roofline uses the profile the artifact was built for.
        assert rec["roofline"]["bandwidth_gbs"] == 100.0
        assert rec["env"]["device"]["origin"].startswith("manifest")
