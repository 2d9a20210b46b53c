"""Staged rollout: canaries, then batches, within a failure budget.

deploy_fleet() runs these steps::

    select hosts -> batches (canaries first) -> build one artifact per
    profile (cached) -> write inventory + playbooks -> [--dry-run stops here]
    -> gather facts, pre-flight each host -> for each batch: ansible-playbook
    --limit <batch>; fold results; stop if a canary failed or failures
    exceed max_failure_percent of the hosts in the rollout

A host whose gate (or server start) fails is put back on its previous
release by the playbook itself; here it counts as a failure. The outcome
of every host is kept in <state_dir>/state.json for `edgeq fleet status`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeq.fleet import playbook_tasks as tasks
from edgeq.fleet.ansible_run import HostRun, run_playbook
from edgeq.fleet.build import Build, build_all
from edgeq.fleet.config import FleetConfig, Host, batch_size, expand_names
from edgeq.fleet.playbook import write_run_files
from edgeq.fsutil import atomic_write_text

logger = logging.getLogger(__name__)

# Outcomes that count against the failure budget.
FAILED = ("rolled back", "failed", "unreachable", "refused")


@dataclass
class HostOutcome:
    """How one host ended a rollout."""

    host: str
    device: str
    status: (
        str  # updated, up to date, rolled back, failed, unreachable, refused, not run
    )
    release: str | None = None  # current on the host afterwards, if known
    target_release: str | None = None
    reason: str = ""
    batch: int | None = None
    changed: int = 0
    gate: dict[str, Any] | None = None


@dataclass
class RolloutResult:
    """The whole rollout: per-host outcomes, batches, and why it stopped."""

    hosts: dict[str, HostOutcome]
    batches: list[list[str]]
    builds: dict[str, Build]
    paths: dict[str, Path]
    stopped: str | None = None  # the reason, when the policy stopped it
    dry_run: bool = False
    log: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [h for h, o in self.hosts.items() if o.status in FAILED]


def plan_batches(config: FleetConfig, hosts: list[Host]) -> list[list[str]]:
    """Batches of host names: the canaries, then `batch`-sized slices."""
    names = [h.name for h in hosts]
    canary = expand_names(config, list(config.policy.canary), "[rollout] canary")
    first = [n for n in names if n in canary]
    rest = [n for n in names if n not in canary]
    size = batch_size(config.policy.batch, len(names))
    batches = [first] if first else []
    batches += [rest[i : i + size] for i in range(0, len(rest), size)]
    return batches


def deploy_fleet(
    config: FleetConfig,
    only: list[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> RolloutResult:
    """Build, then roll out to the selected hosts per the policy.

    `progress(kind, info)` receives "build", "batch", "event" (a playbook
    event) and "host" (a finished host) notices. With `dry_run`, artifacts
    already in the cache are used but nothing is built or contacted: hosts
    whose artifact is missing get a placeholder in the inventory.
    """
    say = progress or (lambda kind, info: None)
    hosts = config.select(only)
    batches = plan_batches(config, hosts)
    devices = [h.device for h in hosts]
    if dry_run:
        builds = _cached_builds(config, devices)
    else:
        notify = lambda d, step, detail: say(
            "build", {"device": d, "step": step, "detail": detail}
        )
        builds = build_all(config, devices, notify)
    paths = write_run_files(config, builds)
    outcomes = {
        h.name: HostOutcome(h.name, h.device, "not run", target_release=_id(builds, h))
        for h in hosts
    }
    result = RolloutResult(outcomes, batches, builds, paths, dry_run=dry_run)
    if dry_run:
        return result
    result.log = (
        paths["state_dir"] / "logs" / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}.log"
    )
    _log_start(config, result)
    _preflight(config, hosts, builds, result, say)
    for number, batch in enumerate(batches):
        _run_batch(config, number, batch, result, say)
        result.stopped = _stop_reason(config, number, batch, result)
        if result.stopped:
            _log(result, f"rollout stopped: {result.stopped}")
            break
    counts: dict[str, int] = {}
    for o in result.hosts.values():
        counts[o.status] = counts.get(o.status, 0) + 1
    _log(result, "done: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    _save_state(config, result)
    return result


def _id(builds: dict[str, Build], host: Host) -> str | None:
    build = builds.get(host.device)
    return build.artifact_id if build else None


def _cached_builds(config: FleetConfig, devices: list[str]) -> dict[str, Build]:
    from edgeq.fleet.build import build_key, cached_build

    builds = {}
    for device in dict.fromkeys(devices):
        found = cached_build(config, device, build_key(config, device)[0])
        if found:
            builds[device] = found
    return builds


def _log_start(config: FleetConfig, result: RolloutResult) -> None:
    p = config.policy
    _log(result, f"rollout of {config.model} to {len(result.hosts)} hosts")
    for device, b in result.builds.items():
        source = "cache" if b.cached else "built"
        _log(result, f"  {device}: artifact {b.artifact_id} ({b.target}, {source}),"
             f" predicted {b.predicted_tokens_per_s} tokens/s")  # fmt: skip
    _log(result, f"  policy: canary {list(p.canary)}, batch {p.batch}, max_failure_"
         f"percent {p.max_failure_percent:g}, keep {p.keep_releases}; batches "
         f"{result.batches}")  # fmt: skip


def _log(result: RolloutResult, line: str) -> None:
    logger.info("%s", line)
    with open(result.log, "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")


# -- pre-flight --------------------------------------------------------------------


def _preflight(config, hosts, builds, result: RolloutResult, say) -> None:
    """Gather facts on every host and refuse those that cannot run the artifact."""
    from edgeq import artifact, preflight

    say(
        "batch",
        {"number": None, "hosts": [h.name for h in hosts], "step": "pre-flight"},
    )
    runs = run_playbook(
        result.paths, "facts", [h.name for h in hosts], _forward(say), "facts"
    )
    for host in hosts:
        run, outcome = runs[host.name], result.hosts[host.name]
        facts = (run.agent.get(tasks.TASK_FACTS) or {}).get("facts")
        if run.status == "unreachable":
            # Counted when its batch comes, so the policy sees it in order.
            outcome.status, outcome.reason = "unreachable", run.msg.strip()[:300]
            continue
        if facts is None:
            outcome.status = "failed"
            outcome.reason = (
                f"pre-flight: could not gather facts: {run.msg.strip()[:300]}"
            )
            continue
        runtime = artifact.load_manifest(builds[host.device].folder)["runtime"]
        reasons = preflight.check_runtime(runtime, _as_installable(runtime, facts))
        if not reasons:
            continue
        text = "; ".join(reasons)
        if host.preflight == "warn":
            warning = (
                f"host {host.name!r}: pre-flight ({text}); deploying anyway "
                '(preflight = "warn")'
            )
            result.warnings.append(warning)
            _log(result, warning)
        else:
            outcome.status, outcome.reason = "refused", f"pre-flight: {text}"
            _log(result, f"{host.name}: refused by pre-flight: {text}")


def _as_installable(runtime: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """`facts` without installed packages too old for `runtime`.

    The playbook's runtime step upgrades those, so pre-flight should judge
    what pip would install there (wheels for this arch and Python), not
    refuse the host for the version it has today.
    """
    from edgeq.preflight import version_satisfies

    wanted = runtime.get("packages") or {}
    installed = dict(facts.get("packages") or {})
    for name, spec in wanted.items():
        have = installed.get(name)
        if have and spec and not version_satisfies(have, spec):
            del installed[name]
    return {**facts, "packages": installed}


def _forward(say):
    return lambda event: say("event", event)


# -- batches -----------------------------------------------------------------------


def _run_batch(
    config, number: int, batch: list[str], result: RolloutResult, say
) -> None:
    todo = [n for n in batch if result.hosts[n].status == "not run"]
    for name in batch:
        result.hosts[name].batch = number
    kind = "canary" if number == 0 and config.policy.canary else f"batch {number}"
    _log(result, f"{kind}: {', '.join(batch)}")
    say("batch", {"number": number, "hosts": batch, "step": kind})
    if todo:
        runs = run_playbook(
            result.paths, "playbook", todo, _forward(say), f"deploy-{number}"
        )
        for name in todo:
            _fold_outcome(result.hosts[name], runs[name])
    for name in batch:
        o = result.hosts[name]
        _log(result, f"  {_describe(o)}")
        say("host", asdict(o))


def _describe(o: HostOutcome) -> str:
    """One log line for a host: outcome, release, Ansible changes, gate."""
    line = f"{o.host} ({o.device}): {o.status}, release {o.release or 'none'}"
    if o.status in ("updated", "up to date", "rolled back"):
        line += f", changed={o.changed}"
    gate = o.gate or {}
    if gate.get("decode_tokens_per_s") and o.status != "rolled back":
        line += (
            f"; gate passed: {gate['decode_tokens_per_s']:.1f} tokens/s "
            f"({gate.get('source')}) >= {gate.get('threshold_tokens_per_s', 0):.1f}"
        )
    return line + (f": {o.reason}" if o.reason else "")


def _fold_outcome(outcome: HostOutcome, run: HostRun) -> None:
    before = (run.agent.get(tasks.TASK_BEFORE) or {}).get("current")
    gate = run.agent.get(tasks.TASK_GATE)
    outcome.changed = run.changed
    outcome.gate = {
        k: v for k, v in (gate or {}).items() if k not in ("changed", "ok")
    } or None
    if run.status == "unreachable":
        outcome.status, outcome.reason = "unreachable", run.msg.strip()[:300]
        return
    if run.status == "failed":
        rollback = run.agent.get(tasks.TASK_ROLLBACK)
        outcome.status = "rolled back" if rollback is not None else "failed"
        outcome.release = (rollback or {}).get("current", before)
        outcome.reason = run.msg.strip()
        return
    outcome.release = outcome.target_release
    outcome.status = "updated" if run.changed else "up to date"


def _stop_reason(
    config, number: int, batch: list[str], result: RolloutResult
) -> str | None:
    failed = result.failed
    if number == 0 and config.policy.canary and any(n in failed for n in batch):
        bad = ", ".join(n for n in batch if n in failed)
        return f"canary {bad} failed; the other hosts were not touched"
    share = 100.0 * len(failed) / len(result.hosts)
    limit = config.policy.max_failure_percent
    if failed and share > limit:
        return (
            f"{len(failed)} of {len(result.hosts)} hosts failed ({share:.0f}% > "
            f"max_failure_percent {limit:g}%): {', '.join(failed)}"
        )
    return None


# -- state -------------------------------------------------------------------------


def state_path(config: FleetConfig) -> Path:
    """Where the last outcome of each host is kept."""
    return config.state_dir / "state.json"


def load_state(config: FleetConfig) -> dict[str, Any]:
    """The saved outcomes ({"hosts": {name: outcome}}), or an empty state."""
    try:
        return json.loads(state_path(config).read_text())
    except (OSError, ValueError):
        return {"hosts": {}}


def _save_state(config: FleetConfig, result: RolloutResult) -> None:
    state = load_state(config)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for name, outcome in result.hosts.items():
        if outcome.status != "not run":
            state["hosts"][name] = {**asdict(outcome), "at": now}
    state["last_rollout"] = {
        "at": now,
        "stopped": result.stopped,
        "log": str(result.log),
    }
    atomic_write_text(
        state_path(config), json.dumps(state, indent=2, sort_keys=True) + "\n"
    )


def rollback_fleet(
    config: FleetConfig,
    only: list[str] | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, HostOutcome]:
    """Put each selected host back on the release before its current one."""
    say = progress or (lambda kind, info: None)
    hosts = config.select(only)
    paths = write_run_files(config, None)
    runs = run_playbook(
        paths, "rollback", [h.name for h in hosts], _forward(say), "rollback"
    )
    outcomes = {}
    for host in hosts:
        run = runs[host.name]
        data = run.agent.get(tasks.TASK_ROLLBACK) or {}
        o = HostOutcome(
            host.name, host.device, "rolled back", release=data.get("current")
        )
        if run.status in ("failed", "unreachable"):
            o.status, o.reason = run.status, run.msg.strip()
        elif not run.changed:
            o.status = "up to date"
        outcomes[host.name] = o
        say("host", asdict(o))
    state = load_state(config)
    for name, o in outcomes.items():
        if o.status == "rolled back":
            state["hosts"][name] = {
                **asdict(o),
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
    atomic_write_text(
        state_path(config), json.dumps(state, indent=2, sort_keys=True) + "\n"
    )
    return outcomes
