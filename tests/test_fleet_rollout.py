"""Generated files, the rollout policy and the build cache, without ssh.

The policy tests replace the two slow parts (building, running Ansible)
with fakes, so canaries, batches and the failure budget are checked in
milliseconds; tests/test_fleet_ssh.py runs the real thing.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgeq import artifact
from edgeq.cli import app
from edgeq.fleet import playbook_tasks as tasks
from edgeq.fleet import rollout as rollout_mod
from edgeq.fleet.ansible_run import HostRun
from edgeq.fleet.build import Build, build_all
from edgeq.fleet.config import load_fleet
from edgeq.fleet.playbook import ansible_env, write_run_files

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K.gguf"
FLEET = """
[fleet]
model = "{model}"
{extra}

[defaults]
install_dir = "/opt/edgeq"
service = "supervisor"

[hosts.a]
address = "192.0.2.1"
device = "rpi5-8gb"

[hosts.b]
address = "192.0.2.2"
device = "rpi5-8gb"
min_decode_share = 2.0

[hosts.c]
address = "127.0.0.1"
device = "intel-n100-16gb"
min_tokens_per_s = 3.0

[hosts.d]
address = "192.0.2.4"
device = "intel-n100-16gb"
{hostd}

[rollout]
{rollout}
[rollout.gate]
min_decode_share = 0.25
"""


def fleet(tmp_path, rollout="", extra="", hostd=""):
    path = tmp_path / "fleet.toml"
    path.write_text(
        FLEET.format(model=MODEL, rollout=rollout, extra=extra, hostd=hostd)
    )
    return load_fleet(path)


def fake_builds(tmp_path) -> dict[str, Build]:
    builds = {}
    for device, arch in (("rpi5-8gb", "aarch64"), ("intel-n100-16gb", "x86_64")):
        folder = tmp_path / "builds" / device
        folder.mkdir(parents=True)
        (folder / "w.bin").write_text(device)
        info = {"target": "onnxruntime", "runtime": {"arch": arch, "packages": {}}}
        m = artifact.write_manifest(folder, info)
        builds[device] = Build(
            device, "k" * 16, folder, folder / "x.tar.gz", "f" * 64,
            m["artifact_id"], "onnxruntime", 100.0, cached=True,
        )  # fmt: skip
    return builds


def test_inventory_and_playbook(tmp_path):
    config = fleet(tmp_path, extra=f'wheel_cache = "{tmp_path / "wheels"}"')
    builds = fake_builds(tmp_path)
    paths = write_run_files(config, builds)
    hosts = yaml.safe_load(paths["inventory"].read_text())["all"]["hosts"]
    assert hosts["a"]["edgeq_release"] == builds["rpi5-8gb"].artifact_id
    assert hosts["a"]["edgeq_gate_min_share"] == 0.25  # the gate's
    assert hosts["b"]["edgeq_gate_min_share"] == 2.0  # the host's own
    assert hosts["c"]["edgeq_gate_min_tps"] == 3.0
    assert "UserKnownHostsFile=/dev/null" in hosts["c"]["ansible_ssh_common_args"]
    assert "ansible_ssh_common_args" not in hosts["a"]  # real hosts: known_hosts
    assert hosts["d"]["ansible_remote_tmp"] == "/opt/edgeq/.ansible-tmp"

    play = yaml.safe_load(paths["playbook"].read_text())[0]
    names = [t["name"] for t in play["tasks"]]
    assert names[:3] == ["ship agent", tasks.TASK_BEFORE, "copy archive"]
    block = next(t for t in play["tasks"] if "block" in t)
    steps = [t["name"] for t in block["block"]]
    assert steps[:4] == [
        "install runtime",
        tasks.TASK_GATE,
        "switch current",
        "restart server",
    ]
    assert block["rescue"][0]["name"] == tasks.TASK_ROLLBACK
    # The wheel cache: shipped when set, and handed to the runtime step.
    assert play["vars"]["edgeq_wheels"] == str(tmp_path / "wheels")
    wheel_task = next(t for t in play["tasks"] if t["name"] == "ship wheel cache")
    assert wheel_task["when"] == "edgeq_wheels is defined"
    assert "--wheels" in block["block"][0]["command"]["argv"]
    cfg = paths["cfg"].read_text()
    assert "host_key_checking" not in cfg  # not every host is on loopback
    assert (
        paths["state_dir"] / "ansible" / "agent" / "edgeq_host_service.py"
    ).is_file()


def _fake_ansible(outcomes: dict[str, str], calls: list, arch: dict | None = None):
    """run_playbook stand-in: facts for all; deploy results from `outcomes`."""

    def run(paths, playbook, limit, on_event=None, log_name=None):
        calls.append((playbook, list(limit)))
        runs = {}
        for name in limit:
            what = outcomes.get(name, "changed")
            run = HostRun(name, status=what if what != "rolled back" else "failed")
            if playbook == "facts" and what != "unreachable":
                run.status = "ok"
                real = "aarch64" if name in "ab" else "x86_64"
                facts = {"arch": (arch or {}).get(name, real), "python": "3.11.2"}
                run.agent[tasks.TASK_FACTS] = {"facts": facts}
            elif what == "rolled back":
                run.agent[tasks.TASK_ROLLBACK] = {"current": "0" * 16}
                run.msg = "health gate: too slow"
            runs[name] = run
        return runs

    return run


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    builds = fake_builds(tmp_path)
    monkeypatch.setattr(rollout_mod, "build_all", lambda config, devices, say: builds)
    calls: list = []

    def use(outcomes, arch=None):
        fake = _fake_ansible(outcomes, calls, arch)
        monkeypatch.setattr(rollout_mod, "run_playbook", fake)
        return calls

    return use


def test_canary_failure_stops_everything(tmp_path, fakes):
    calls = fakes({"c": "rolled back"})
    config = fleet(
        tmp_path, rollout='canary = ["c"]\nbatch = 2\nmax_failure_percent = 50'
    )
    result = rollout_mod.deploy_fleet(config)
    assert result.batches == [["c"], ["a", "b"], ["d"]]
    assert result.stopped.startswith("canary c failed")
    assert [c for c in calls if c[0] == "playbook"] == [("playbook", ["c"])]
    assert {result.hosts[n].status for n in "abd"} == {"not run"}


def test_failure_budget(tmp_path, fakes):
    calls = fakes({"a": "rolled back"})
    config = fleet(tmp_path, rollout="batch = 1\nmax_failure_percent = 25")
    result = rollout_mod.deploy_fleet(config)
    assert result.stopped is None  # 1 of 4 = 25%: not more than allowed
    assert (
        result.hosts["a"].status == "rolled back"
        and result.hosts["a"].release == "0" * 16
    )
    assert len([c for c in calls if c[0] == "playbook"]) == 4

    calls = fakes({"a": "rolled back", "b": "unreachable"})
    result = rollout_mod.deploy_fleet(config)
    assert "2 of 4 hosts failed (50% > max_failure_percent 25%): a, b" in result.stopped
    assert result.hosts["c"].status == "not run"  # the batch after b never ran
    assert result.hosts["b"].status == "unreachable"
    state = rollout_mod.load_state(config)
    assert state["hosts"]["b"]["status"] == "unreachable"


def test_preflight_refuses_a_host(tmp_path, fakes):
    # d claims to be an N100 but reports aarch64: refused, named, not run.
    calls = fakes({}, arch={"d": "aarch64"})
    config = fleet(tmp_path, rollout="batch = 4\nmax_failure_percent = 50")
    result = rollout_mod.deploy_fleet(config)
    d = result.hosts["d"]
    assert d.status == "refused"
    assert "built for x86_64 but the device is aarch64" in d.reason
    assert ("playbook", ["a", "b", "c"]) in calls


def test_dry_run_writes_and_shows_without_contacting(tmp_path):
    config = fleet(tmp_path)
    result = CliRunner().invoke(app, ["fleet", "deploy", str(config.path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "# ---- " + str(config.state_dir / "playbook.yml") in result.stdout
    assert (
        "name: health gate" in result.stdout
        and "ansible_host: 192.0.2.1" in result.stdout
    )
    assert "no host contacted" in result.output
    assert not (config.state_dir / "state.json").exists()


def test_cli_error_is_one_line(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text("[fleet]\nmodel = 'x'\n[hosts.a]\naddress = 1\n")
    result = CliRunner().invoke(app, ["fleet", "status", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert "host 'a'" in result.output


def test_build_cache_reuses_and_keys(tmp_path):
    config = fleet(tmp_path, extra=f'cache_dir = "{tmp_path / "cache"}"')
    build = {"quality_gate": False, "context_length": 512}
    config = dataclasses.replace(config, build=build)
    first = build_all(config, ["intel-n100-16gb", "intel-n100-16gb"])
    assert list(first) == ["intel-n100-16gb"] and not first["intel-n100-16gb"].cached
    again = build_all(config, ["intel-n100-16gb"])["intel-n100-16gb"]
    assert again.cached and again.artifact_id == first["intel-n100-16gb"].artifact_id
    assert again.archive_sha256 == first["intel-n100-16gb"].archive_sha256

    from edgeq.fleet.build import build_key

    other = dataclasses.replace(config, build={"quality_gate": False})
    assert build_key(other, "intel-n100-16gb")[0] != again.key


def test_preflight_judges_what_pip_would_install():
    from edgeq.preflight import check_runtime

    runtime = {"arch": "aarch64", "packages": {"onnxruntime": ">=1.18"}}
    facts = {"arch": "aarch64", "userland_bits": 64, "python": "3.11.2",
             "libc": "glibc 2.36", "packages": {"onnxruntime": "1.16.3"}}  # fmt: skip
    assert check_runtime(runtime, facts)  # as installed today: too old
    assert check_runtime(runtime, rollout_mod._as_installable(runtime, facts)) == []
    arm32 = {**facts, "arch": "armv7l"}  # C10: no wheel at all, still refused
    assert (
        "no armv7l wheels"
        in check_runtime(runtime, rollout_mod._as_installable(runtime, arm32))[0]
    )


@pytest.mark.skipif(shutil.which("ansible-playbook") is None, reason="no ansible-core")
def test_ansible_accepts_the_generated_playbooks(tmp_path):
    config = fleet(tmp_path, extra=f'wheel_cache = "{tmp_path}"')
    paths = write_run_files(config, fake_builds(tmp_path))
    books = [str(paths[name]) for name in ("playbook", "facts", "status", "rollback")]
    done = subprocess.run(
        ["ansible-playbook", "-i", str(paths["inventory"]), "--syntax-check", *books],
        env=ansible_env(paths), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
