"""The plays edgeq runs, as data for yaml.safe_dump.

Every careful step runs the agent (host_agent.py), which prints JSON; the
tasks take "changed" from it, so a second run of the same release reports
changed=0. Task names are what the terminal shows per host, and the
rollout reads a few of them back (TASK_* below).
"""

from __future__ import annotations

from typing import Any

TASK_BEFORE = "read current release"
TASK_GATE = "health gate"
TASK_ROLLBACK = "roll back"
TASK_FAILED = "release failed"
TASK_FACTS = "gather device facts"
TASK_STATUS = "read status"

_AGENT = ["{{ ansible_python_interpreter }}", "{{ edgeq_agent }}"]
_ROOT = ["--root", "{{ edgeq_root }}"]
_SERVICE_ARGS = [
    "--mode",
    "{{ edgeq_service }}",
    "--bind",
    "127.0.0.1",
    "--port",
    "{{ edgeq_service_port }}",
    "--timeout",
    "{{ edgeq_gate_timeout }}",
]
# A src folder ending in "/" copies its files; a dest ending in "/" is
# created if missing: one task, not two.
_SHIP_AGENT = {
    "name": "ship agent",
    "copy": {
        "src": "{{ edgeq_agent_dir }}",
        "dest": "{{ edgeq_root }}/bin/",
        "mode": "0644",
    },
}
_NOT_PRESENT = "edgeq_release not in (edgeq_before.stdout | from_json).releases"
_PREVIOUS = "(edgeq_before.stdout | from_json).current"
_SWITCHING = "edgeq_release != " + _PREVIOUS
# Units live in /etc: sudo for a non-root user (root needs no sudo, which
# minimal images lack).
_BECOME = "{{ ansible_user != 'root' }}"
_UNIT_PATH = "/etc/systemd/system/{{ edgeq_service_name }}.service"


def _agent(name: str, args: list[str], register: str | None = None, **extra) -> dict:
    """A command task running the agent; "changed" comes from its JSON."""
    reg = register or "edgeq_" + name.replace(" ", "_").replace("(", "").replace(
        ")", ""
    )
    task = {"name": name, "command": {"argv": [*_AGENT, *args]}, "register": reg}
    task["changed_when"] = f"({reg}.stdout | from_json).changed | default(false)"
    task.update(extra)
    return task


def _script(name: str, args: str, register: str) -> dict:
    """The agent shipped and run in one go (hosts that may not have it yet)."""
    return {
        "name": name,
        "script": {
            "cmd": "{{ edgeq_agent_src }} " + args,
            "executable": "{{ ansible_python_interpreter }}",
        },
        "register": register,
        "changed_when": f"({register}.stdout | from_json).changed | default(false)",
    }


# Restart=on-failure keeps the server up; `current` is resolved at each
# start, so a restart after the link switched runs the new release.
_SYSTEMD_UNIT = """\
[Unit]
Description=edgeq model server ({{ edgeq_root }})
After=network-online.target

[Service]
WorkingDirectory={{ edgeq_root }}
ExecStart={{ ansible_python_interpreter }} {{ edgeq_root }}/current/runner/run.py \\
    serve --host 127.0.0.1 --port {{ edgeq_service_port }}
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


_UNPACK = [
    "unpack", *_ROOT, "--id", "{{ edgeq_release }}",
    "--sha256", "{{ edgeq_archive_sha256 }}",
    "--archive", "{{ edgeq_root }}/incoming/{{ edgeq_release }}.tar.gz",
]  # fmt: skip


def _fetch_tasks() -> list[dict]:
    """Ship the agent; copy the archive unless its release is already there."""
    return [
        _SHIP_AGENT,
        _agent(
            TASK_BEFORE,
            ["status", *_ROOT, "--init", "1"],
            register="edgeq_before",
            changed_when=False,
        ),
        {
            "name": "copy archive",
            "copy": {
                "src": "{{ edgeq_archive }}",
                "dest": "{{ edgeq_root }}/incoming/{{ edgeq_release }}.tar.gz",
                "mode": "0644",
            },
            "when": _NOT_PRESENT,
        },
        {
            "name": "ship wheel cache",
            "copy": {"src": "{{ edgeq_wheels }}/", "dest": "{{ edgeq_root }}/wheels/"},
            "when": "edgeq_wheels is defined",
        },
        # The agent checks the archive's sha256 before it reads a byte of it.
        _agent("verify and unpack", _UNPACK),
    ]


def _release_tasks() -> list[dict]:
    """Install, gate, switch, serve: the part a failure rolls back."""
    wheels = "{{ (edgeq_root + '/wheels') if edgeq_wheels is defined else '' }}"
    # Flag and value on one line each, easier to read than one per line.
    gate = [
        "gate", *_ROOT, "--id", "{{ edgeq_release }}",
        "--prompt", "{{ edgeq_gate_prompt }}",
        "--max-tokens", "{{ edgeq_gate_max_tokens }}",
        "--min-share", "{{ edgeq_gate_min_share }}",
        "--timeout", "{{ edgeq_gate_timeout }}",
        "--profile", "{{ edgeq_gate_profile }}",
        "--min-tps", "{{ edgeq_gate_min_tps | default('') }}",
    ]  # fmt: skip
    systemd = "edgeq_service == 'systemd'"
    return [
        # A release that is already current passed its gate when it was
        # switched to; a re-run only checks that its server still answers.
        _agent(
            "install runtime",
            ["runtime", *_ROOT, "--id", "{{ edgeq_release }}", "--wheels", wheels],
            when=_SWITCHING,
        ),
        _agent(
            TASK_GATE, gate, register="edgeq_gate", changed_when=False, when=_SWITCHING
        ),
        _agent(
            "switch current",
            ["activate", *_ROOT, "--id", "{{ edgeq_release }}"],
            register="edgeq_switch",
            when=_SWITCHING,
        ),
        _agent(
            "restart server",
            ["service", *_ROOT, *_SERVICE_ARGS],
            when="edgeq_service == 'supervisor'",
        ),
        {
            "name": "write systemd unit",
            "copy": {"content": _SYSTEMD_UNIT, "dest": _UNIT_PATH, "mode": "0644"},
            "register": "edgeq_unit",
            "when": systemd,
            "become": _BECOME,
        },
        {
            "name": "restart server (systemd)",
            "systemd": {
                "name": "{{ edgeq_service_name }}",
                "daemon_reload": True,
                "enabled": True,
                "state": "{{ 'restarted' if (edgeq_switch is changed"
                " or edgeq_unit is changed) else 'started' }}",
            },
            "when": systemd,
            "become": _BECOME,
        },
        _agent(
            "check server health",
            ["health", *_SERVICE_ARGS],
            changed_when=False,
            when=systemd,
        ),
    ]


def _rescue_tasks() -> list[dict]:
    """Back to the release that was current before, then fail the host."""
    # The agent's JSON names the problem; other modules only have a msg.
    why = (
        "{% set out = (ansible_failed_result.stdout | default('')) or '{}' %}"
        "{{ (out | from_json).error"
        " | default(ansible_failed_result.msg | default('failed')) }}"
    )
    return [
        _agent(
            TASK_ROLLBACK,
            [
                "rollback",
                *_ROOT,
                "--to",
                "{{ " + _PREVIOUS + " or '' }}",
                *_SERVICE_ARGS,
            ],
        ),
        {
            "name": "restart previous server (systemd)",
            "systemd": {
                "name": "{{ edgeq_service_name }}",
                "state": "{{ 'restarted' if " + _PREVIOUS + " else 'stopped' }}",
            },
            "when": "edgeq_service == 'systemd'",
            "become": _BECOME,
        },
        {
            "name": TASK_FAILED,
            "fail": {
                "msg": "{{ ansible_failed_task.name }}: "
                + why
                + "; back on release {{ "
                + _PREVIOUS
                + " or 'none' }}"
            },
        },
    ]


def deploy_play(play_vars: dict[str, Any]) -> list[dict]:
    """The rollout of one batch: fetch, then install-gate-switch-serve."""
    return [
        {
            "name": "edgeq rollout",
            "hosts": "all",
            "gather_facts": False,
            "vars": play_vars,
            "tasks": [
                *_fetch_tasks(),
                {
                    "name": "install, gate, switch, serve",
                    "block": _release_tasks(),
                    "rescue": _rescue_tasks(),
                },
                _agent(
                    "keep last releases",
                    ["prune", *_ROOT, "--keep", "{{ edgeq_keep_releases }}"],
                ),
            ],
        }
    ]


def facts_play(play_vars: dict[str, Any]) -> list[dict]:
    """One task per host: the facts edgeq.preflight checks."""
    task = _script(
        TASK_FACTS, "facts --packages {{ edgeq_fact_packages }}", "edgeq_facts"
    )
    return [
        {
            "name": "edgeq pre-flight facts",
            "hosts": "all",
            "gather_facts": False,
            "vars": play_vars,
            "tasks": [task],
        }
    ]


def status_play(play_vars: dict[str, Any]) -> list[dict]:
    """Current release, server health and last gate figures per host."""
    args = (
        "status --root {{ edgeq_root }} --mode {{ edgeq_service }} --bind 127.0.0.1"
        " --port {{ edgeq_service_port }}"
    )
    task = _script(TASK_STATUS, args, "edgeq_status")
    return [
        {
            "name": "edgeq status",
            "hosts": "all",
            "gather_facts": False,
            "vars": play_vars,
            "tasks": [task],
        }
    ]


def rollback_play(play_vars: dict[str, Any]) -> list[dict]:
    """Back to the release before the current one (`edgeq fleet rollback`)."""
    tasks = [
        _SHIP_AGENT,
        _agent(
            TASK_ROLLBACK,
            ["rollback", *_ROOT, *_SERVICE_ARGS],
            register="edgeq_rollback",
        ),
        {
            "name": "restart server (systemd)",
            "systemd": {"name": "{{ edgeq_service_name }}", "state": "restarted"},
            "when": "edgeq_service == 'systemd' and edgeq_rollback is changed",
            "become": _BECOME,
        },
    ]
    return [
        {
            "name": "edgeq rollback",
            "hosts": "all",
            "gather_facts": False,
            "vars": play_vars,
            "tasks": tasks,
        }
    ]
