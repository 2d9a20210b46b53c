"""The host agent, run in-process on this machine (no ssh, no Ansible).

A tiny fake artifact stands in for a model: its runner/run.py prints text
and a tokens/s line, and `serve` answers /health, so the gate and the
supervisor run for real in a second or two.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import textwrap
from pathlib import Path

import pytest

from edgeq import artifact
from edgeq.fleet import edgeq_host as agent
from edgeq.fleet import edgeq_host_service as service

FAKE_RUN_PY = textwrap.dedent(
    """
    import os, sys
    TPS = os.environ.get("FAKE_TPS", "50.0")
    cmd = sys.argv[1]
    if "--help" in sys.argv:
        sys.exit(0 if cmd in ("generate", "serve") else 2)
    if cmd == "generate":
        print("Once upon a time there was a fake model")
        line = "prompt: 3 tokens, 100.0 tokens/s | generation: 8 tokens, "
        print(line + TPS + " tokens/s", file=sys.stderr)
    elif cmd == "serve":
        from http.server import BaseHTTPRequestHandler, HTTPServer
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
            def log_message(self, *a):
                pass
        port = int(sys.argv[sys.argv.index("--port") + 1])
        HTTPServer(("127.0.0.1", port), H).serve_forever()
    else:
        sys.exit(2)
    """
)


def make_release(
    tmp_path: Path, tag: str, predicted: float = 100.0
) -> tuple[Path, str, str]:
    """A fake artifact packed by edgeq: (archive, artifact id, archive sha256)."""
    folder = tmp_path / f"art-{tag}"
    (folder / "runner").mkdir(parents=True)
    (folder / "runner" / "run.py").write_text(FAKE_RUN_PY)
    (folder / "weights.bin").write_bytes(tag.encode() * 100)
    info = {"target": "onnxruntime", "runtime": {"packages": {}},
            "predicted": {"decode_tokens_per_s": predicted}}  # fmt: skip
    manifest = artifact.write_manifest(folder, info)
    archive = artifact.pack(folder, tmp_path / f"art-{tag}.tar.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    return archive, manifest["artifact_id"], digest


def install(root: Path, archive: Path, rid: str, sha: str) -> dict:
    agent.status(str(root), argparse.Namespace(init=1, mode="none", bind="", port=0))
    incoming = root / "incoming" / f"{rid}.tar.gz"
    incoming.write_bytes(archive.read_bytes())
    return agent.unpack(str(root), str(incoming), rid, sha)


def gate_args(**kw):
    base = {"prompt": "Once", "max_tokens": 8, "min_share": 0.1, "min_tps": None}
    base.update(timeout=60, profile=0)
    return argparse.Namespace(**{**base, **kw})


def test_unpack_verifies_and_is_idempotent(tmp_path):
    archive, rid, sha = make_release(tmp_path, "a")
    root = tmp_path / "host"
    assert install(root, archive, rid, sha)["changed"] is True
    assert (root / "releases" / rid / "manifest.json").is_file()
    assert not (root / "incoming" / f"{rid}.tar.gz").exists()  # removed once verified
    again = agent.unpack(str(root), str(root / "incoming" / "gone.tar.gz"), rid, sha)
    assert again["changed"] is False


def test_unpack_refuses_a_damaged_copy(tmp_path):
    archive, rid, _sha = make_release(tmp_path, "a")
    with pytest.raises(agent.StepError, match="damaged in transit"):
        install(tmp_path / "host", archive, rid, "0" * 64)
    assert not (tmp_path / "host" / "releases" / rid).exists()


def test_unpack_refuses_a_changed_file(tmp_path):
    archive, rid, sha = make_release(tmp_path, "a")
    root = tmp_path / "host"
    install(root, archive, rid, sha)
    (root / "releases" / rid / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(agent.StepError, match="weights.bin"):
        agent.unpack(str(root), "", rid, sha)
    assert not (root / "releases" / rid).exists()  # removed: the next deploy re-copies


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_unpack_refuses_unsafe_entries(tmp_path, kind):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("top/../../escape" if kind == "dotdot" else "top/link")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info, io.BytesIO(b""))
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    with pytest.raises(agent.StepError, match="refusing it"):
        install(tmp_path / "host", evil, "0123456789abcdef", sha)
    assert not (tmp_path / "escape").exists()


def test_activate_rollback_prune(tmp_path):
    root = tmp_path / "host"
    ids = []
    for tag in "abc":
        archive, rid, sha = make_release(tmp_path, tag)
        install(root, archive, rid, sha)
        ids.append(rid)
    a, b, c = ids
    assert agent.activate(str(root), a)["changed"]
    assert agent.activate(str(root), a)["changed"] is False
    agent.activate(str(root), b)
    agent.activate(str(root), c)
    assert os.readlink(root / "current") == f"releases/{c}"  # relative link
    assert agent.prune(str(root), keep=2)["removed"] == [a]

    none = argparse.Namespace(mode="none")
    assert service.rollback(str(root), None, none)["current"] == b
    with pytest.raises(agent.StepError, match="no earlier release"):
        service.rollback(str(root), None, none)  # a was pruned
    assert service.rollback(str(root), c, none)["current"] == c
    assert service.rollback(str(root), "", none)["current"] is None
    assert not (root / "current").exists()


def test_gate_passes_and_fails_on_speed(tmp_path, monkeypatch):
    archive, rid, sha = make_release(tmp_path, "a", predicted=100.0)
    root = tmp_path / "host"
    install(root, archive, rid, sha)
    monkeypatch.setenv("FAKE_TPS", "50.0")
    passed = service.gate(str(root), rid, gate_args(min_share=0.4))
    assert passed["decode_tokens_per_s"] == 50.0 and passed["text"].startswith("Once")
    with pytest.raises(
        agent.StepError, match="decode 50.0 tokens/s is below the gate's 60.0"
    ):
        service.gate(str(root), rid, gate_args(min_share=0.6))
    record = json.loads((root / "state" / f"gate-{rid}.json").read_text())
    assert record["ok"] is False and record["threshold_tokens_per_s"] == 60.0
    # An absolute floor replaces the share.
    assert service.gate(str(root), rid, gate_args(min_share=0.6, min_tps=10.0))["ok"]


def test_supervisor_starts_once_and_stops(tmp_path):
    from fleet_hosts import free_port

    archive, rid, sha = make_release(tmp_path, "a")
    root = tmp_path / "host"
    install(root, archive, rid, sha)
    agent.activate(str(root), rid)
    args = argparse.Namespace(
        bind="127.0.0.1", port=free_port(), timeout=30, mode="supervisor"
    )
    try:
        started = service.ensure_service(str(root), args)
        assert started["changed"] and started["health"] == "ok"
        again = service.ensure_service(str(root), args)
        assert again["changed"] is False and again["pid"] == started["pid"]
        status = agent.status(str(root), argparse.Namespace(init=0, **vars(args)))
        assert status["server"]["health"] == "ok" and status["current"] == rid
    finally:
        assert service.stop_service(str(root))
    assert not agent._alive(started["pid"])


def test_version_specs():
    assert agent._version_ok("1.18.1", ">=1.18")
    assert not agent._version_ok("1.17.9", ">=1.18")
    assert agent._version_ok("2.0", ">=1.0,<3")
    assert not agent._version_ok("3.0.0", ">=1.0,<3")


def test_runtime_installs_from_the_wheel_cache(tmp_path, monkeypatch):
    archive, rid, sha = make_release(tmp_path, "a")
    root = tmp_path / "host"
    install(root, archive, rid, sha)
    manifest = root / "releases" / rid / "manifest.json"
    data = json.loads(manifest.read_text())
    data["runtime"]["packages"] = {"edgeq-no-such-pkg": ">=1.0"}
    manifest.write_text(json.dumps(data))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "edgeq_no_such_pkg-1.0-py3-none-any.whl").write_bytes(b"")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        ok = "pip" in cmd
        return argparse.Namespace(returncode=0 if ok else 1, stderr="", stdout="")

    monkeypatch.setattr(agent.subprocess, "run", fake_run)
    # Installed after pip ran: the second look finds it.
    problems = iter(["edgeq-no-such-pkg is not installed", None])
    monkeypatch.setattr(agent, "_package_problem", lambda n, s: next(problems))
    result = agent.runtime(str(root), rid, str(wheels))
    assert result == {"changed": True, "installed": ["edgeq-no-such-pkg"]}
    pip = next(c for c in calls if "pip" in c)
    assert pip[pip.index("--find-links") + 1] == str(wheels) and "--no-index" in pip
    assert pip[-1] == "edgeq-no-such-pkg>=1.0"
