"""`edgeq fleet status`: what each host runs now, and how well.

Each host is asked through Ansible (status.yml runs the agent's `status`):
its current release, the releases on disk, whether its server answers
/health, and the figures of the last health gate of the current release.
The last rollout's outcome per host comes from <state_dir>/state.json.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeq.fleet import playbook_tasks as tasks
from edgeq.fleet.ansible_run import run_playbook
from edgeq.fleet.config import FleetConfig
from edgeq.fleet.playbook import write_run_files
from edgeq.fleet.rollout import load_state

logger = logging.getLogger(__name__)


@dataclass
class HostStatus:
    """One row of `edgeq fleet status`."""

    host: str
    device: str
    address: str
    reachable: bool
    release: str | None = None
    releases: list[str] = field(default_factory=list)
    health: str = "unknown"  # ok, down, no server, or the error
    decode_tokens_per_s: float | None = None
    predicted_tokens_per_s: float | None = None
    decode_share: float | None = None  # measured / predicted
    prefill_tokens_per_s: float | None = None
    ttft_s: float | None = None
    peak_rss_mb: float | None = None
    figures_from: str | None = None  # "generate" or "profile" (run.py)
    gate_ok: bool | None = None
    last_rollout: str | None = None  # outcome of the last rollout on it
    last_rollout_at: str | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def fleet_status(config: FleetConfig, only: list[str] | None = None, progress=None):
    """A HostStatus per selected host, in fleet.toml order."""
    hosts = config.select(only)
    paths = write_run_files(config, None)
    on_event = (lambda event: progress("event", event)) if progress else None
    runs = run_playbook(paths, "status", [h.name for h in hosts], on_event, "status")
    saved = load_state(config)["hosts"]
    rows = []
    for host in hosts:
        run = runs[host.name]
        data = run.agent.get(tasks.TASK_STATUS)
        row = HostStatus(host.name, host.device, f"{host.address}:{host.port}",
                         reachable=run.status != "unreachable")  # fmt: skip
        last = saved.get(host.name)
        if last:
            row.last_rollout = last.get("status")
            row.last_rollout_at = last.get("at")
        if data is None or not data.get("ok", False):
            row.health = "unreachable" if not row.reachable else "unknown"
            row.error = run.msg.strip()[:300] or (data or {}).get("error", "")
        else:
            _fill(row, data, host.service)
        rows.append(row)
    return rows


def _fill(row: HostStatus, data: dict[str, Any], service: str) -> None:
    row.release = data.get("current")
    row.releases = data.get("releases", [])
    server = data.get("server") or {}
    if row.release is None:
        row.health = "no release"
    elif service == "none":
        row.health = "not served"  # service = "none" in fleet.toml
    elif server.get("note"):
        row.health = "no server"  # the runner has no serve command
    else:
        row.health = "ok" if server.get("health") == "ok" else "down"
        row.error = "" if row.health == "ok" else str(server.get("health", ""))
    gate = data.get("gate") or {}
    row.decode_tokens_per_s = gate.get("decode_tokens_per_s")
    row.predicted_tokens_per_s = gate.get("predicted_tokens_per_s")
    row.figures_from = gate.get("source")
    row.prefill_tokens_per_s = gate.get("prefill_tokens_per_s")
    row.ttft_s = gate.get("ttft_s")
    if gate.get("peak_rss_bytes"):
        row.peak_rss_mb = round(gate["peak_rss_bytes"] / 2**20, 1)
    row.gate_ok = gate.get("ok")
    if row.decode_tokens_per_s and row.predicted_tokens_per_s:
        row.decode_share = round(
            row.decode_tokens_per_s / row.predicted_tokens_per_s, 4
        )
