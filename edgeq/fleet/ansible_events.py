"""Ansible stdout callback that writes one JSON object per line.

edgeq never imports this module: `ansible-playbook` loads it as the
``edgeq_events`` stdout callback (ANSIBLE_CALLBACK_PLUGINS points at this
folder), which is why it may import ansible at the top. edgeq.fleet.runner
reads the lines to follow each host through the playbook as it happens.

Events::

    {"event": "task", "name": ...}
    {"event": "result", "status": "ok|changed|failed|skipped|unreachable",
     "host": ..., "task": ..., "msg": ..., "stdout": ..., "rescued": ...}
    {"event": "stats", "hosts": {host: {"ok", "changed", "failures",
     "unreachable", "skipped", "rescued", "ignored"}}}
"""

from __future__ import annotations

import json
import sys
import time

from ansible.plugins.callback import CallbackBase

_MAX_TEXT = 8000  # an agent's JSON is small; a traceback need not be whole


def _parts(result):
    """(host name, task name, result dict) on ansible-core 2.15 to 2.19+."""
    host = getattr(result, "host", None) or result._host
    task = getattr(result, "task", None) or result._task
    data = getattr(result, "result", None)
    if not isinstance(data, dict):
        data = result._result
    return host.get_name(), task.get_name(), data


class CallbackModule(CallbackBase):
    """Writes playbook progress as JSON lines for edgeq."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "edgeq_events"

    def _emit(self, **event) -> None:
        event["t"] = round(time.time(), 3)
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()

    def _result(self, result, status: str) -> None:
        host, task, data = _parts(result)
        if status == "ok" and data.get("changed"):
            status = "changed"
        msg = data.get("msg") or data.get("stderr") or ""
        self._emit(
            event="result",
            status=status,
            host=host,
            task=task,
            msg=str(msg)[:_MAX_TEXT],
            stdout=str(data.get("stdout", ""))[:_MAX_TEXT],
        )

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._emit(event="task", name=task.get_name())

    def v2_runner_on_ok(self, result):
        self._result(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._result(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._result(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._result(result, "unreachable")

    def v2_runner_item_on_failed(self, result):
        self._result(result, "failed")

    def v2_playbook_on_stats(self, stats):
        hosts = {name: stats.summarize(name) for name in sorted(stats.processed)}
        self._emit(event="stats", hosts=hosts)
