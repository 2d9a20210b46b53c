"""Run ansible-playbook as a subprocess and follow each host as it goes.

The generated config makes ansible-playbook print one JSON event per line
(see ansible_events.py); this module reads them while the play runs, hands
each to a callback (the CLI turns them into per-host progress), keeps them
in a .jsonl log, and sums them up per host at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq.errors import FleetError
from edgeq.fleet.playbook import ansible_env

logger = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclass
class HostRun:
    """What one host did in one playbook run."""

    name: str
    status: str = "ok"  # ok, changed, failed, unreachable
    changed: int = 0
    failed_task: str | None = None
    msg: str = ""
    agent: dict[str, dict] = field(default_factory=dict)  # task -> agent JSON
    tasks_done: int = 0


def _agent_json(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fold(runs: dict[str, HostRun], event: Event) -> None:
    """Update the per-host summary with one event."""
    if event.get("event") == "result":
        run = runs.setdefault(event["host"], HostRun(event["host"]))
        run.tasks_done += 1
        data = _agent_json(event.get("stdout", ""))
        if data is not None:
            run.agent[event["task"]] = data
        if event["status"] in ("failed", "unreachable"):
            run.failed_task = event["task"]
            run.msg = (data or {}).get("error") or event.get("msg", "")
            if event["status"] == "unreachable":
                run.status = "unreachable"
    elif event.get("event") == "stats":
        for name, counts in event["hosts"].items():
            run = runs.setdefault(name, HostRun(name))
            run.changed = counts.get("changed", 0)
            if counts.get("unreachable"):
                run.status = "unreachable"
            elif counts.get("failures"):
                run.status = "failed"
            else:
                run.status = "changed" if run.changed else "ok"


def run_playbook(
    paths: dict[str, Path],
    playbook: str,
    limit: list[str],
    on_event: Callable[[Event], None] | None = None,
    log_name: str | None = None,
) -> dict[str, HostRun]:
    """Run `playbook` ("playbook", "facts", ...) on the hosts in `limit`.

    Returns one HostRun per host of `limit`. Raises FleetError when
    ansible-playbook itself fails (bad inventory, missing binary) rather
    than a host.
    """
    exe = shutil.which("ansible-playbook")
    if exe is None:
        raise FleetError(
            "ansible-playbook not found on PATH: install ansible-core "
            "(pip install ansible-core) in the environment that runs edgeq"
        )
    state = paths["state_dir"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = state / "logs" / f"{log_name or playbook}-{stamp}.jsonl"
    cmd = [
        exe,
        "-i",
        str(paths["inventory"]),
        str(paths[playbook]),
        "--limit",
        ",".join(limit),
    ]
    logger.info("running %s", " ".join(cmd))
    runs = {name: HostRun(name) for name in limit}
    with (
        open(log_path, "a") as log,
        open(state / "logs" / "ansible-stderr.log", "a") as err,
    ):
        proc = subprocess.Popen(
            cmd, cwd=state, env=ansible_env(paths), stdout=subprocess.PIPE,
            stderr=err, text=True, bufsize=1,
        )  # fmt: skip
        stats_seen = False
        for line in proc.stdout:
            event = _agent_json(line.strip())
            if event is None:
                logger.debug("ansible: %s", line.rstrip())
                continue
            log.write(line)
            stats_seen = stats_seen or event.get("event") == "stats"
            _fold(runs, event)
            if on_event:
                on_event(event)
        code = proc.wait()
    if not stats_seen:
        tail = _tail(state / "logs" / "ansible-stderr.log")
        raise FleetError(
            f"ansible-playbook {paths[playbook].name} failed before running any "
            f"host (exit {code}): {tail}; see {state / 'logs' / 'ansible-stderr.log'}"
        )
    return runs


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return "no error output"
    errors = [ln for ln in lines if ln.lstrip().startswith(("[ERROR]", "ERROR"))]
    return (errors or lines or ["no error output"])[-1].strip()[:300]
