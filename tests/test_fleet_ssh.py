"""Fleet rollouts over real ssh: sshd instances on 127.0.0.1, real Ansible.

Three hosts of two device profiles (intel-n100-16gb, rpi5-8gb), each an
sshd on its own port with its own install root. Release v1 goes to all of
them; then v2 goes out with a canary and a batch, and pi-c's gate asks for
1000x the predicted speed, so pi-c must end up back on v1 while the others
run v2. Every host is this machine, so pre-flight runs in "warn" mode: the
profiles describe other CPUs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fleet_hosts import free_port, host_table, sshd_problem, start_hosts, stop_hosts
from typer.testing import CliRunner

from edgeq.cli import app

_PROBLEM = sshd_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no sshd: {_PROBLEM}")

STORIES = Path(
    os.environ.get("EDGEQ_SHARED", Path(__file__).resolve().parents[2] / "shared")
)
MODEL = STORIES / "models" / "stories260K.gguf"
DEVICES = {"n100-a": "intel-n100-16gb", "pi-b": "rpi5-8gb", "pi-c": "rpi5-8gb"}


def write_fleet(
    folder: Path, hosts_toml: str, rollout: str, build: str, cache: Path
) -> Path:
    """A fleet.toml in its own folder (so its .edgeq-fleet/ is its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fleet.toml"
    path.write_text(
        f'[fleet]\nmodel = "{MODEL}"\ncache_dir = "{cache}"\n\n'
        f"[build]\nquality_gate = false\n{build}\n\n{rollout}\n\n{hosts_toml}"
    )
    return path


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet-ssh")
    key, started = start_hosts(folder, list(DEVICES))
    yield folder, key, started
    stop_hosts(started)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "fleet-cache"


def _tables(hosts, **extra_by_host) -> str:
    _folder, key, started = hosts
    return "\n".join(
        host_table(h, key, DEVICES[h.name], **extra_by_host.get(h.name, {}))
        for h in started
    )


V1_ROLLOUT = """[rollout]
batch = "100%"
keep_releases = 2
[rollout.gate]
max_tokens = 8
min_tokens_per_s = 1.0
use_profile = false"""

V2_ROLLOUT = """[rollout]
canary = ["n100-a"]
batch = 2
max_failure_percent = 50
keep_releases = 2
[rollout.gate]
max_tokens = 8
min_tokens_per_s = 1.0"""


@pytest.fixture(scope="module")
def rollout(hosts, cache):
    """v1 on every host, v1 again (nothing to do), then v2 with pi-c's gate
    set to fail. Returns (first, again, second, v2 fleet.toml)."""
    from edgeq.fleet.config import load_fleet
    from edgeq.fleet.rollout import deploy_fleet

    folder = hosts[0]
    build_v1 = "context_length = 2048"  # another artifact than v2's default
    v1 = write_fleet(folder / "v1", _tables(hosts), V1_ROLLOUT, build_v1, cache)
    first = deploy_fleet(load_fleet(v1))
    again = CliRunner().invoke(app, ["fleet", "deploy", str(v1), "--json"])
    failing = {"pi-c": {"min_decode_share": 1000.0}}  # 1000x the prediction
    v2 = write_fleet(folder / "v2", _tables(hosts, **failing), V2_ROLLOUT, "", cache)
    second = deploy_fleet(load_fleet(v2))
    print(second.log.read_text())  # the rollout's log, shown with -rP / -s
    return first, again, second, v2


def _current(host_root: Path) -> str | None:
    link = host_root / "current"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def test_first_release_reaches_every_host(rollout):
    first, _again, _second, _v2 = rollout
    assert {o.status for o in first.hosts.values()} == {"updated"}, first.hosts
    assert first.batches == [["n100-a", "pi-b", "pi-c"]]
    assert len(first.builds) == 2  # one artifact per device profile


def test_failing_gate_rolls_back_only_that_host(rollout, hosts):
    first, _again, second, _v2 = rollout
    _folder, _key, started = hosts
    roots = {h.name: h.root for h in started}
    v1 = {d: b.artifact_id for d, b in first.builds.items()}
    v2 = {d: b.artifact_id for d, b in second.builds.items()}
    assert v1["rpi5-8gb"] != v2["rpi5-8gb"]
    assert second.batches == [["n100-a"], ["pi-b", "pi-c"]]
    assert second.stopped is None  # 1 of 3 failed: within max_failure_percent 50

    c = second.hosts["pi-c"]
    assert c.status == "rolled back"
    assert "health gate" in c.reason and "below the gate" in c.reason
    assert c.release == v1["rpi5-8gb"] == _current(roots["pi-c"])
    assert second.hosts["n100-a"].status == second.hosts["pi-b"].status == "updated"
    assert _current(roots["n100-a"]) == v2["intel-n100-16gb"]
    assert _current(roots["pi-b"]) == v2["rpi5-8gb"]
    # pi-c's server still serves v1; the others were restarted on v2.
    server = json.loads((roots["pi-c"] / "run" / "server.json").read_text())
    assert server["release"] == v1["rpi5-8gb"]
    log = second.log.read_text()
    assert "canary: n100-a" in log and "pi-c (rpi5-8gb): rolled back" in log


def test_status_reports_release_health_and_figures(rollout):
    _first, _again, second, v2 = rollout
    result = CliRunner().invoke(app, ["fleet", "status", str(v2), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["host"]: r for r in json.loads(result.stdout)}
    a = rows["n100-a"]
    assert a["release"] == second.builds["intel-n100-16gb"].artifact_id
    assert a["health"] == "ok" and a["decode_tokens_per_s"] > 1
    assert a["figures_from"] in ("profile", "generate")
    assert 0 < a["decode_share"] < 1  # this host is no Xeon: far below the plan
    assert rows["pi-c"]["last_rollout"] == "rolled back"


def test_second_deploy_changes_nothing(rollout):
    first, again, _second, _v2 = rollout
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert {o["status"] for o in report["hosts"].values()} == {"up to date"}
    assert all(o["changed"] == 0 for o in report["hosts"].values())  # Ansible's
    assert all(b["cached"] for b in report["builds"].values())  # no rebuild
    ids = {d: b["artifact_id"] for d, b in report["builds"].items()}
    assert ids == {d: b.artifact_id for d, b in first.builds.items()}


def test_rollback_command(rollout, hosts):
    first, _again, _second, v2 = rollout
    roots = {h.name: h.root for h in hosts[2]}
    result = CliRunner().invoke(app, ["fleet", "rollback", str(v2), "--hosts", "pi-b"])
    assert result.exit_code == 0, result.output
    assert _current(roots["pi-b"]) == first.builds["rpi5-8gb"].artifact_id
    server = json.loads((roots["pi-b"] / "run" / "server.json").read_text())
    assert server["release"] == first.builds["rpi5-8gb"].artifact_id


def test_unreachable_host_stops_rollout(hosts, cache, rollout):
    folder, key, started = hosts
    a = next(h for h in started if h.name == "n100-a")
    before = _current(a.root)
    dead = host_table(a, key, "intel-n100-16gb").replace(
        "[hosts.n100-a]", "[hosts.gone]"
    )
    dead = dead.replace(f"port = {a.port}", f"port = {free_port()}")  # nothing listens
    rollout_toml = (
        "[rollout]\nbatch = 1\nmax_failure_percent = 0\n"
        "[rollout.gate]\nmin_tokens_per_s = 1.0"
    )
    path = write_fleet(
        folder / "dead",
        dead + "\n" + host_table(a, key, "intel-n100-16gb"),
        rollout_toml,
        "",
        cache,
    )
    result = CliRunner().invoke(app, ["fleet", "deploy", str(path)])
    assert result.exit_code == 1
    assert "Error: rollout stopped: 1 of 2 hosts failed" in result.output
    assert "gone" in result.output
    assert _current(a.root) == before  # the later batch was never touched
