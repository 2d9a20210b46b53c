"""Real ssh hosts on this machine for the fleet tests.

Each "host" is an sshd listening on its own port on 127.0.0.1, with a
throwaway host key and one authorized user key, all in a temporary folder,
and its own install root. Every host is this machine, so its Python already
has the runtimes. sshd runs as root (`PermitRootLogin yes`) with
`StrictModes no` because the keys live in world-readable pytest folders.

Usable as a library (start_hosts / stop_hosts) and from a shell:
    python tests/fleet_hosts.py DIR 3     # starts 3 hosts, prints fleet.toml
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    name: str
    port: int
    root: Path  # the host's install dir
    proc: subprocess.Popen | None = None
    service_port: int = 0  # where the agent's supervisor serves the model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sshd_problem() -> str | None:
    """Why sshd cannot run here, or None."""
    if not os.path.exists(SSHD):
        return (
            f"{SSHD} not found: run .ci/fleet-setup.sh (apt-get install openssh-server)"
        )
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "ssh or ssh-keygen missing: apt-get install openssh-client"
    if os.geteuid() != 0:
        return "sshd tests log in as root and need to run as root"
    if shutil.which("ansible-playbook") is None:
        return "ansible-playbook not on PATH: pip install ansible-core"
    return None


def make_keys(folder: Path) -> Path:
    """A host key and a user key; returns the user's private key."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "user_key"):
        if not (folder / name).exists():
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-f",
                    str(folder / name),
                ],
                check=True,
            )
    shutil.copyfile(folder / "user_key.pub", folder / "authorized_keys")
    return folder / "user_key"


def _config(folder: Path, port: int) -> Path:
    path = folder / f"sshd-{port}.conf"
    path.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {folder / 'host_key'}",
                "PermitRootLogin yes",
                f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                f"PidFile {folder / f'sshd-{port}.pid'}",
                "MaxStartups 50",
                "MaxSessions 50",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    return path


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd on port {port} did not listen within {timeout} s")


def start_hosts(folder: Path, names: list[str]) -> tuple[Path, list[SshHost]]:
    """Start one sshd per name; returns (user key, hosts)."""
    key = make_keys(folder / "keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation dir
    hosts = []
    for name in names:
        port = free_port()
        conf = _config(folder / "keys", port)
        # -e logs to stderr: a file, since a full pipe would stall sshd.
        with open(folder / "keys" / f"sshd-{port}.log", "w") as log:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(conf), "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        host = SshHost(name, port, folder / "hosts" / name, proc, free_port())
        hosts.append(host)
        _wait_listening(port, proc)
    return key, hosts


def stop_servers(root: Path) -> None:
    """Stop model servers the agent started under an install root."""
    import json

    info = root / "run" / "server.json"
    try:
        pid = json.loads(info.read_text()).get("pid")
    except (OSError, ValueError):
        return
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass


def stop_hosts(hosts: list[SshHost]) -> None:
    """Stop each sshd we started (by its own pid) and the servers it left."""
    for host in hosts:
        stop_servers(host.root)
        if host.proc and host.proc.poll() is None:
            host.proc.terminate()
            try:
                host.proc.wait(5)
            except subprocess.TimeoutExpired:
                host.proc.kill()


def host_table(host: SshHost, key: Path, device: str, **extra) -> str:
    """A [hosts.NAME] table for fleet.toml."""
    lines = [
        f"[hosts.{host.name}]",
        'address = "127.0.0.1"',
        f"port = {host.port}",
        'user = "root"',
        f'key_file = "{key}"',
        f'device = "{device}"',
        f'install_dir = "{host.root}"',
        f'python = "{sys.executable}"',
        'service = "supervisor"',
        f"service_port = {host.service_port or free_port()}",
        'preflight = "warn"',
    ]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    user_key, started = start_hosts(out, [f"h{i}" for i in range(count)])
    for h in started:
        print(host_table(h, user_key, "intel-n100-16gb"))
    print("# sshd pids:", " ".join(str(h.proc.pid) for h in started), file=sys.stderr)
    # SIGTERM must run the cleanup below, not end Python on the spot.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        stop_hosts(started)
