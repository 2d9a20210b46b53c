"""Generate the Ansible inventory, playbooks and config of a fleet.

Everything lands in the state dir (``.edgeq-fleet/`` beside fleet.toml) and
is kept, so a rollout can be read before it runs (``--dry-run``) and re-run
by hand::

    ansible.cfg          settings edgeq runs with (ANSIBLE_CONFIG=this file)
    inventory.yml        one entry per host: ssh details + edgeq_* variables
    playbook.yml         the rollout of one batch (--limit picks the batch)
    facts.yml            gathers pre-flight facts with the agent
    status.yml, rollback.yml
    ansible/agent/edgeq_host*.py            the agent hosts run
    ansible/callback_plugins/edgeq_events.py  JSON-lines progress for edgeq

The playbook's tasks are kept in playbook_tasks.py; this module writes files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeq.fleet import playbook_tasks as tasks
from edgeq.fleet.build import Build
from edgeq.fleet.config import FleetConfig, Host
from edgeq.fsutil import atomic_write_text

logger = logging.getLogger(__name__)

AGENT_NAME = "edgeq_host.py"
AGENT_FILES = (AGENT_NAME, "edgeq_host_service.py")
CALLBACK_NAME = "edgeq_events"
_HERE = Path(__file__).resolve().parent
# Packages the facts step reports versions of (both targets' runtimes).
FACT_PACKAGES = "onnxruntime,mlx,mlx-lm,numpy,tokenizers,jinja2"


def _yaml(data: Any) -> str:
    import yaml  # PyYAML comes with ansible-core; only needed here

    # A wide line limit: folded Jinja expressions are valid but hard to read.
    return yaml.safe_dump(data, sort_keys=False, width=1000, default_flow_style=False)


def host_vars(host: Host, build: Build | None, config: FleetConfig) -> dict[str, Any]:
    """Inventory variables of one host (`build` None: not built yet)."""
    gate = config.policy.gate
    hv: dict[str, Any] = {
        "ansible_host": host.address,
        "ansible_port": host.port,
        "ansible_user": host.user,
        "ansible_python_interpreter": host.python,
        # Per host, so test hosts sharing one machine keep separate temps.
        "ansible_remote_tmp": f"{host.install_dir}/.ansible-tmp",
    }
    if host.key_file:
        hv["ansible_ssh_private_key_file"] = host.key_file
    if host.is_loopback:
        # Many sshd instances on 127.0.0.1 are test or lab hosts: do not
        # record their throwaway host keys in the user's known_hosts.
        hv["ansible_ssh_common_args"] = (
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        )
    share = host.min_decode_share
    hv.update(
        edgeq_root=host.install_dir,
        edgeq_device=host.device,
        edgeq_service=host.service,
        edgeq_service_port=host.service_port,
        edgeq_service_name=f"edgeq-{_unit_name(host.install_dir)}",
        edgeq_preflight=host.preflight,
        edgeq_gate_min_share=gate.min_decode_share if share is None else share,
    )
    tps = host.min_tokens_per_s
    if tps is None and host.min_decode_share is None:
        tps = gate.min_tokens_per_s  # a host's share overrides a fleet floor
    if tps is not None:
        hv["edgeq_gate_min_tps"] = tps
    if build is None:
        hv.update(
            edgeq_release="not-built-yet", edgeq_archive="", edgeq_archive_sha256=""
        )
    else:
        hv.update(
            edgeq_release=build.artifact_id,
            edgeq_archive=str(build.archive),
            edgeq_archive_sha256=build.archive_sha256,
            edgeq_predicted_tokens_per_s=build.predicted_tokens_per_s,
        )
    return hv


def _unit_name(install_dir: str) -> str:
    # One unit per install dir, readable and still unique: opt-edgeq-3f2a91.
    slug = re.sub(r"[^A-Za-z0-9]+", "-", install_dir).strip("-")[-40:] or "root"
    return f"{slug}-{hashlib.sha256(install_dir.encode()).hexdigest()[:6]}"


def _group_name(name: str) -> str:
    # Ansible warns about group names that are not Python identifiers.
    return re.sub(r"\W", "_", name)


def inventory(config: FleetConfig, builds: dict[str, Build]) -> dict[str, Any]:
    """The inventory as data: all hosts, plus one group per fleet group."""
    hosts = {
        h.name: host_vars(h, builds.get(h.device), config)
        for h in config.hosts.values()
    }
    children = {
        _group_name(g): {"hosts": {m: None for m in members}}
        for g, members in config.groups.items()
    }
    body: dict[str, Any] = {"hosts": hosts}
    if children:
        body["children"] = children
    return {"all": body}


def play_vars(config: FleetConfig, state_dir: Path) -> dict[str, Any]:
    """Variables every host of a play shares."""
    gate = config.policy.gate
    pv: dict[str, Any] = {
        "edgeq_agent_dir": str(state_dir / "ansible" / "agent") + "/",
        "edgeq_agent_src": str(state_dir / "ansible" / "agent" / AGENT_NAME),
        "edgeq_agent": "{{ edgeq_root }}/bin/" + AGENT_NAME,
        "edgeq_keep_releases": config.policy.keep_releases,
        "edgeq_gate_prompt": gate.prompt,
        "edgeq_gate_max_tokens": gate.max_tokens,
        "edgeq_gate_timeout": gate.timeout_s,
        "edgeq_gate_profile": int(gate.use_profile),
        "edgeq_fact_packages": FACT_PACKAGES,
    }
    if config.wheel_cache:
        pv["edgeq_wheels"] = str(config.wheel_cache)
    return pv


def _ansible_cfg(config: FleetConfig, state_dir: Path, hosts: list[Host]) -> str:
    all_loopback = all(h.is_loopback for h in hosts)
    lines = [
        "# Written by edgeq fleet; run by hand with",
        f"#   ANSIBLE_CONFIG={state_dir / 'ansible.cfg'} ansible-playbook playbook.yml",
        "[defaults]",
        f"inventory = {state_dir / 'inventory.yml'}",
        f"callback_plugins = {state_dir / 'ansible' / 'callback_plugins'}",
        f"local_tmp = {state_dir / 'ansible' / 'tmp'}",
        "retry_files_enabled = False",
        "interpreter_python = auto_silent",
        "forks = 20",
        "timeout = 15",
    ]
    if all_loopback:
        lines.append("host_key_checking = False  # every host is on loopback")
    lines += [
        "",
        "[ssh_connection]",
        "pipelining = True",
        f"control_path_dir = {_control_dir(state_dir)}",
        "",
    ]
    return "\n".join(lines)


def _control_dir(state_dir: Path) -> Path:
    """Where ssh keeps its control sockets: under the state dir if short.

    A unix socket path must fit in ~104 bytes; ssh adds a 40-character hash.
    """
    here = state_dir / "ansible" / "cp"
    if len(str(here)) <= 56:
        return here
    tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"edgeq-cp-{tag}"


def write_run_files(
    config: FleetConfig, builds: dict[str, Build] | None
) -> dict[str, Path]:
    """Write inventory, playbooks, config, agent and callback; return paths.

    `builds` None is for status and rollback, which need no artifact: their
    inventory goes to hosts.yml so the last rollout's inventory.yml is kept.
    """
    state = config.state_dir
    ansible_dir = state / "ansible"
    for folder in (
        ansible_dir / "callback_plugins",
        ansible_dir / "tmp",
        state / "logs",
    ):
        folder.mkdir(parents=True, exist_ok=True)
    _control_dir(state).mkdir(parents=True, exist_ok=True, mode=0o700)
    (ansible_dir / "agent").mkdir(exist_ok=True)
    for name in AGENT_FILES:
        shutil.copyfile(_HERE / name, ansible_dir / "agent" / name)
    shutil.copyfile(
        _HERE / "ansible_events.py",
        ansible_dir / "callback_plugins" / f"{CALLBACK_NAME}.py",
    )
    pv = play_vars(config, state)
    documents = {
        "inventory": inventory(config, builds or {}),
        "playbook": tasks.deploy_play(pv),
        "facts": tasks.facts_play(pv),
        "status": tasks.status_play(pv),
        "rollback": tasks.rollback_play(pv),
    }
    paths = {"state_dir": state, "cfg": state / "ansible.cfg"}
    header = "# Generated by edgeq fleet from {}; edits are overwritten.\n"
    for name, data in documents.items():
        stem = "hosts" if name == "inventory" and builds is None else name
        path = state / f"{stem}.yml"
        atomic_write_text(path, header.format(config.path) + _yaml(data))
        paths[name] = path
    cfg = _ansible_cfg(config, state, list(config.hosts.values()))
    atomic_write_text(paths["cfg"], cfg)
    logger.info("wrote the inventory and playbooks into %s", state)
    return paths


def ansible_env(paths: dict[str, Path]) -> dict[str, str]:
    """Environment for ansible-playbook: our config and callback, no colour."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(paths["cfg"]),
        ANSIBLE_STDOUT_CALLBACK=CALLBACK_NAME,
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_DEPRECATION_WARNINGS="0",
        ANSIBLE_LOCALHOST_WARNING="0",
    )
    return env
