"""The agent's health gate and server supervisor (beside edgeq_host.py).

Shipped with edgeq_host.py into ``<install_dir>/bin/`` and imported by it
for the commands that run the artifact or restart its server: ``gate``,
``service``, ``stop`` and ``rollback``. Standard library only, like the agent.

The supervisor (hosts with ``service = "supervisor"``, where there is no
systemd) starts ``runner/run.py serve`` of the current release in its own
session with output to logs/server.log, records it in run/server.json
(pid, release, port), and restarts it only when the current release or the
port changed or it stopped answering /health.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

try:  # on a host: edgeq_host.py lies beside this file
    import edgeq_host as core
except ImportError:  # inside edgeq (its tests import the package)
    from edgeq.fleet import edgeq_host as core

StepError = core.StepError
_TPS = re.compile(r"generation: (\d+) tokens, ([\d.]+) tokens/s")
_PROMPT_TPS = re.compile(r"prompt: (\d+) tokens, ([\d.]+) tokens/s")


# -- health gate ---------------------------------------------------------------


def _run_runner(folder: str, args: list, timeout: float):
    run_py = os.path.join(folder, "runner", "run.py")
    try:
        return subprocess.run(
            [sys.executable, run_py, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise StepError(f"run.py {args[0]} did not finish in {timeout:g} s") from None


def _has_command(folder: str, command: str) -> bool:
    return _run_runner(folder, [command, "--help"], 60).returncode == 0


def _summary_figure(data: dict, key: str):
    """A figure of `run.py profile --json`: the summary's median, else a
    top-level number (a simpler profiler), else None."""
    value = (data.get("summary") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("median")
    if value is None:
        value = data.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _profile(folder: str, timeout: float) -> dict | None:
    """Figures from the runner's profiler, or None when it has none or fails."""
    if not _has_command(folder, "profile"):
        return None
    done = _run_runner(folder, ["profile", "--json"], timeout)
    records = []
    for line in done.stdout.splitlines():  # JSON lines; the last one counts
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    data = records[-1] if records and isinstance(records[-1], dict) else None
    if done.returncode or data is None:
        return None
    figures = {
        key: _summary_figure(data, key)
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s")
    }
    figures["peak_rss_bytes"] = (data.get("memory") or {}).get("peak_rss_bytes")
    return figures if figures["decode_tokens_per_s"] is not None else None


def measure(folder: str, prompt: str, max_tokens: int, timeout: float, profile: bool):
    """Smoke text and decode tokens/s of a release, from its own runner.

    The text comes from `run.py generate` with the gate's prompt; the speed
    from `run.py profile --json` (warm-up, repeats, medians) when the runner
    has it and `profile` is set, else from generate's tokens/s line.
    """
    args = ["generate", "-p", prompt, "--max-tokens", str(max_tokens)]
    done = _run_runner(folder, args, timeout)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepError(f"run.py generate failed (exit {done.returncode}): {tail}")
    figures = {"text": done.stdout.strip(), "source": "generate"}
    m = _TPS.search(done.stderr)
    figures["decode_tokens_per_s"] = float(m.group(2)) if m else None
    m = _PROMPT_TPS.search(done.stderr)
    figures["prefill_tokens_per_s"] = float(m.group(2)) if m else None
    profiled = _profile(folder, timeout) if profile else None
    if profiled:
        figures.update(profiled, source="profile")
    return figures


def gate(root: str, rid: str, args) -> dict:
    """Run the health gate on releases/<rid>; record it; raise on failure."""
    folder = core._release(root, rid)
    manifest = core._read_json(os.path.join(folder, "manifest.json"), {})
    predicted = (manifest.get("predicted") or {}).get("decode_tokens_per_s")
    result = {"release": rid, "at": time.time(), "predicted_tokens_per_s": predicted}
    try:
        result.update(
            measure(folder, args.prompt, args.max_tokens, args.timeout, args.profile)
        )
        result["threshold_tokens_per_s"] = _threshold(args, predicted)
        result["reason"] = _gate_problem(result)
    except StepError as e:
        result["reason"] = str(e)
    result["ok"] = result["reason"] is None
    core._write_json(os.path.join(root, "state", f"gate-{rid}.json"), result)
    if not result["ok"]:
        raise StepError(result["reason"])
    return {"changed": False, **result}


def _threshold(args, predicted) -> float:
    if args.min_tps is not None:
        return args.min_tps
    if not predicted:
        raise StepError("the manifest has no predicted decode tokens/s to compare")
    return args.min_share * predicted


def _gate_problem(r: dict) -> str | None:
    if not r["text"]:
        return "the smoke prompt produced no text"
    tps, need = r["decode_tokens_per_s"], r["threshold_tokens_per_s"]
    if tps is None:
        return "the runner reported no decode tokens/s"
    if tps < need:
        return f"decode {tps:.1f} tokens/s is below the gate's {need:.1f} tokens/s"
    return None


# -- the supervised server ---------------------------------------------------------


def stop_service(root: str) -> bool:
    """Stop the supervised server, if one runs; True if one was stopped."""
    path = os.path.join(root, "run", "server.json")
    info = core._read_json(path, {})
    pid = info.get("pid")
    stopped = False
    if pid and core._alive(pid):
        os.killpg(pid, signal.SIGTERM)  # its own session: the whole group
        for _ in range(100):
            if not core._alive(pid):
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        stopped = True
    core._remove(path)
    return stopped


def ensure_service(root: str, args) -> dict:
    """Keep `run.py serve` of the current release running; check /health."""
    rid = core._current(root)
    info = core._read_json(os.path.join(root, "run", "server.json"), {})
    want = {"release": rid, "port": args.port, "bind": args.bind}
    same = all(info.get(k) == v for k, v in want.items())
    if rid and same and info.get("pid") and core._alive(info["pid"]):
        try:
            return {"changed": False, **info, **core.health(args)}
        except StepError:
            pass  # running but not answering: restart it below
    stopped = stop_service(root)
    if rid is None:
        return {"changed": stopped, "note": "no current release; server stopped"}
    folder = os.path.join(root, "current")
    if not _has_command(folder, "serve"):
        note = "the runner has no serve command; no server started"
        core._write_json(
            os.path.join(root, "run", "server.json"), {**want, "note": note}
        )
        return {"changed": stopped, "note": note}
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    cmd = [sys.executable, os.path.join(folder, "runner", "run.py"), "serve",
           "--host", args.bind, "--port", str(args.port)]  # fmt: skip
    # A new session and no inherited pipes: what nohup gives, and Ansible's
    # command task does not wait for the server's output to close.
    with open(os.path.join(root, "logs", "server.log"), "ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )  # fmt: skip
    info = {**want, "pid": proc.pid, "started": time.time()}
    core._write_json(os.path.join(root, "run", "server.json"), info)
    try:
        return {"changed": True, **info, **core.health(args, proc)}
    except StepError:
        stop_service(root)
        raise


# -- going back ------------------------------------------------------------------


def rollback(root: str, to: str | None, args) -> dict:
    """Go back to `to` ("" for none), or to the release before the current one."""
    history, current = core._history(root), core._current(root)
    if to is None:
        stack = [h for h in history if h != current]
        while stack and not os.path.isdir(core._release(root, stack[-1])):
            stack.pop()  # pruned by hand: skip it
        if not stack:
            raise StepError("no earlier release on this host to roll back to")
        to, history = stack[-1], stack
    elif to:
        history = history[: history.index(to) + 1] if to in history else history + [to]
    else:
        history = []
    if to and not os.path.isdir(core._release(root, to)):
        raise StepError(f"release {to} is not on this host; cannot roll back to it")
    if (to or None) != current:
        core._switch(root, to or None)
    core._write_json(os.path.join(root, "state", "history.json"), history)
    result = {"changed": (to or None) != current, "current": to or None,
              "rolled_back_from": current}  # fmt: skip
    if args.mode == "supervisor":
        result["service"] = ensure_service(root, args)
        result["changed"] = result["changed"] or result["service"]["changed"]
    return result
