"""edgeq's agent on a fleet host: the careful steps of a rollout.

The generated playbook copies this file and edgeq_host_service.py (the gate
and the server supervisor) to ``<install_dir>/bin/`` and runs it with the
host's Python. It needs the standard library only (no
edgeq on the host) and prints one JSON object per call, so Ansible can tell
"changed" from "ok" and the controller can read figures back. Exit code 0
means the step succeeded, 1 that it failed (the JSON says why).

Layout it keeps under the install dir::

    bin/edgeq_host.py          this file (+ edgeq_host_service.py)
    incoming/<id>.tar.gz       an archive while it is being unpacked
    releases/<id>/             unpacked, verified artifacts
    current -> releases/<id>   switched atomically (rename of a new link)
    state/history.json         stack of activated ids, newest last
    state/gate-<id>.json       the last health gate result of a release
    run/server.json, logs/server.log   the supervised `run.py serve`
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import urllib.request

_ID = re.compile(r"[0-9a-f]{16}")
_IMPORT_NAMES = {"mlx-lm": "mlx_lm", "onnxruntime-gpu": "onnxruntime"}


class StepError(Exception):
    """A step failed; the message is the one line the operator sees."""


# -- paths and small files -----------------------------------------------------


def _release(root: str, rid: str) -> str:
    if not _ID.fullmatch(rid):
        raise StepError(f"{rid!r} is not an artifact id (16 hex digits)")
    return os.path.join(root, "releases", rid)


def _read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _history(root: str) -> list:
    return _read_json(os.path.join(root, "state", "history.json"), [])


def _current(root: str) -> str | None:
    link = os.path.join(root, "current")
    if not os.path.islink(link):
        return None
    return os.path.basename(os.readlink(link).rstrip("/"))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- verifying and unpacking ---------------------------------------------------


def verify_release(folder: str, rid: str | None = None) -> dict:
    """Check every file against manifest.json (size, sha256, nothing extra)."""
    manifest = _read_json(os.path.join(folder, "manifest.json"), None)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StepError(f"{folder}: manifest.json is missing or unreadable")
    if rid and manifest.get("artifact_id") != rid:
        raise StepError(
            f"{folder}: manifest names artifact {manifest.get('artifact_id')}, "
            f"expected {rid}"
        )
    found = set()
    for base, _dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), folder).replace(os.sep, "/")
            if rel != "manifest.json":
                found.add(rel)
    listed = manifest["files"]
    extra = sorted(found - set(listed))
    if extra:
        raise StepError(f"{folder}: '{extra[0]}' is not listed in manifest.json")
    for rel, entry in sorted(listed.items()):
        path = os.path.join(folder, rel)
        if rel not in found:
            raise StepError(f"{folder}: '{rel}' is missing; re-copy the artifact")
        if os.path.getsize(path) != entry["size"] or _sha256(path) != entry["sha256"]:
            raise StepError(
                f"{folder}: '{rel}' does not match its sha256 in manifest.json"
            )
    return manifest


def _member_path(member: tarfile.TarInfo, top: list) -> str | None:
    """The path under the archive's top folder; refuses what edgeq never writes."""
    name = member.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or "\\" in name or ".." in parts or not parts:
        raise StepError(f"archive entry {name!r} has an unsafe path; refusing it")
    if not (member.isfile() or member.isdir()):
        raise StepError(
            f"archive entry {name!r} is a link or special file; refusing it"
        )
    if not top:
        top.append(parts[0])
    if parts[0] != top[0]:
        raise StepError(f"archive entry {name!r} lies outside the top folder")
    if member.isdir():
        return None
    if len(parts) < 2:
        raise StepError(f"archive entry {name!r} is not inside a top folder")
    return "/".join(parts[1:])


def unpack(root: str, archive: str, rid: str, sha256: str) -> dict:
    """Check `archive` against `sha256`, then extract it into releases/<rid>
    (verified, via a temporary folder). An existing release is re-verified."""
    dest = _release(root, rid)
    if os.path.isdir(dest):
        try:
            verify_release(dest, rid)
        except StepError as e:
            _remove(dest)  # the next deploy copies it afresh
            raise StepError(f"{e}; removed the damaged release: deploy again") from None
        _remove(archive)
        return {"changed": False, "release": rid, "note": "already unpacked"}
    if not os.path.isfile(archive):
        raise StepError(f"{archive} is missing: the copy did not arrive; deploy again")
    got = _sha256(archive)
    if got != sha256:
        _remove(archive)
        raise StepError(
            f"archive sha256 is {got[:12]}.., expected {sha256[:12]}..: it was "
            "damaged in transit; deploy again"
        )
    tmp = os.path.join(root, "releases", f".{rid}.tmp-{os.getpid()}")
    _remove(tmp)
    os.makedirs(tmp)
    try:
        top: list = []
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                rel = _member_path(member, top)
                if rel is None:
                    continue
                out = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with tar.extractfile(member) as src, open(out, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        verify_release(tmp, rid)
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise StepError(
            f"{archive}: cannot unpack ({e}); re-copy the archive"
        ) from None
    finally:
        _remove(tmp)
    _remove(archive)  # the verified folder is the copy that counts
    return {"changed": True, "release": rid}


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


# -- runtime -------------------------------------------------------------------


def _version_ok(have: str, spec: str) -> bool:
    """A small PEP 440 subset: comma-joined >=, <=, ==, !=, <, > on numbers."""

    def num(text):
        m = re.match(r"\s*(\d+(?:\.\d+)*)", text)
        return tuple(int(p) for p in m.group(1).split(".")) if m else ()

    for clause in filter(None, (c.strip() for c in (spec or "").split(","))):
        m = re.match(r"(>=|<=|==|!=|<|>)\s*(.+)", clause)
        if not m:
            continue
        a, b = num(have), num(m.group(2))
        width = max(len(a), len(b))
        a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
        ops = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b}
        if not ops.get(m.group(1), a < b if m.group(1) == "<" else a > b):
            return False
    return True


def _package_problem(name: str, spec: str) -> str | None:
    """None if `name` is installed, satisfies `spec` and imports in a child."""
    from importlib import metadata

    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        return f"{name} is not installed"
    if not _version_ok(have, spec):
        return f"{name} {have} does not satisfy {spec}"
    module = _IMPORT_NAMES.get(name, name.replace("-", "_"))
    # A child process: a runtime built for another CPU dies of SIGILL here.
    cmd = [sys.executable, "-c", f"import {module}"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode < 0:
        return f"importing {module} killed Python with signal {-done.returncode}"
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["no output"]
        return f"importing {module} failed: {lines[-1]}"
    return None


def _imports_ok(packages: dict) -> bool:
    """The fast path: all versions fit and one child imports them all."""
    from importlib import metadata

    modules = []
    for name, spec in packages.items():
        try:
            if not _version_ok(metadata.version(name), spec):
                return False
        except metadata.PackageNotFoundError:
            return False
        modules.append(_IMPORT_NAMES.get(name, name.replace("-", "_")))
    code = "; ".join(f"import {m}" for m in modules) or "pass"
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True
    )
    return done.returncode == 0


def runtime(root: str, rid: str, wheels: str | None) -> dict:
    """Install the packages the manifest needs unless they already import."""
    manifest = _read_json(os.path.join(_release(root, rid), "manifest.json"), {})
    packages = (manifest.get("runtime") or {}).get("packages") or {}
    if _imports_ok(packages):
        return {"changed": False, "packages": sorted(packages)}
    missing = {n: s for n, s in packages.items() if _package_problem(n, s)}
    if not missing:
        return {"changed": False, "packages": sorted(packages)}
    cmd = [sys.executable, "-m", "pip", "install", "--quiet"]
    if wheels and os.path.isdir(wheels) and os.listdir(wheels):
        cmd += ["--no-index", "--find-links", wheels]  # no internet needed
    cmd += [f"{n}{s or ''}" for n, s in sorted(missing.items())]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepError(f"pip could not install {', '.join(sorted(missing))}: {tail}")
    still = [p for n, s in missing.items() if (p := _package_problem(n, s))]
    if still:
        raise StepError("runtime still unusable after install: " + "; ".join(still))
    return {"changed": True, "installed": sorted(missing)}


# -- switching releases ----------------------------------------------------------


def _switch(root: str, rid: str | None) -> None:
    """Point `current` at releases/<rid> (or remove it) in one rename."""
    link = os.path.join(root, "current")
    if rid is None:
        _remove(link)
        return
    tmp = f"{link}.tmp-{os.getpid()}"
    _remove(tmp)
    os.symlink(os.path.join("releases", rid), tmp)  # relative: the root may move
    os.replace(tmp, link)  # rename(2) over the old link: what `mv -T` does


def activate(root: str, rid: str) -> dict:
    """Make releases/<rid> current and push it on the history stack."""
    if not os.path.isdir(_release(root, rid)):
        raise StepError(f"release {rid} is not unpacked on this host")
    if _current(root) == rid:
        return {"changed": False, "current": rid}
    previous = _current(root)
    _switch(root, rid)
    history = [h for h in _history(root) if h != rid] + [rid]
    _write_json(os.path.join(root, "state", "history.json"), history)
    return {"changed": True, "current": rid, "previous": previous}


def prune(root: str, keep: int) -> dict:
    """Remove releases beyond the newest `keep` of the history (never current)."""
    kept = set(_history(root)[-keep:])
    kept.add(_current(root))
    removed = []
    releases = os.path.join(root, "releases")
    for name in sorted(os.listdir(releases)) if os.path.isdir(releases) else []:
        if name not in kept:
            _remove(os.path.join(releases, name))
            _remove(os.path.join(root, "state", f"gate-{name}.json"))
            removed.append(name)
    if removed:  # forget what is gone, so the history stays short
        history = [h for h in _history(root) if h not in removed]
        _write_json(os.path.join(root, "state", "history.json"), history)
    return {
        "changed": bool(removed),
        "removed": removed,
        "kept": sorted(k for k in kept if k),
    }


# -- the supervised server ---------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, TypeError):
        return False
    try:  # a recycled pid belongs to some other program
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"run.py" in f.read()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


def health(args, proc=None) -> dict:
    """Poll GET /health until it answers 200, the server exits, or time is up."""
    url = f"http://{args.bind}:{args.port}/health"
    deadline = time.time() + args.timeout
    last = "no answer"
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StepError(
                f"the server exited with code {proc.returncode}; see logs/server.log"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return {"health": "ok", "url": url}
                last = f"HTTP {response.status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.3)
    raise StepError(f"{url} did not answer 200 within {args.timeout:g} s ({last})")


# -- facts and status ----------------------------------------------------------------


def facts(packages: list) -> dict:
    """This host in the shape edgeq.preflight.check_runtime reads."""
    from importlib import metadata

    system = platform.system().lower()
    libc = ""
    if system == "linux":
        name, version = platform.libc_ver()
        libc = f"glibc {version}" if name == "glibc" and version else ""
    flags = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags = sorted(set(value.split()))
                    break
    except OSError:
        pass
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"changed": False, "facts": {
        "arch": platform.machine().lower(), "userland_bits": struct.calcsize("P") * 8,
        "python": platform.python_version(), "libc": libc, "system": system,
        "cpu_flags": flags, "packages": versions,
    }}  # fmt: skip


def status(root: str, args) -> dict:
    """Current release, releases on disk, server state and the last gate."""
    if args.init:
        for sub in ("incoming", "releases", "state"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
    rid = _current(root)
    releases = os.path.join(root, "releases")
    on_disk = (
        sorted(n for n in os.listdir(releases) if _ID.fullmatch(n))
        if os.path.isdir(releases)
        else []
    )
    server = _read_json(os.path.join(root, "run", "server.json"), {})
    if server.get("pid"):
        server["alive"] = _alive(server["pid"])
    if (
        rid
        and args.mode != "none"
        and not server.get("note")
        and server.get("alive", True)
    ):
        # Supervised and alive, or systemd (no pidfile here): ask the port.
        probe = argparse.Namespace(
            bind=args.bind, port=server.get("port", args.port), timeout=3
        )
        try:
            server.update(health(probe))
        except StepError as e:
            server["health"] = f"down: {e}"
    gate_file = os.path.join(root, "state", f"gate-{rid}.json") if rid else ""
    return {
        "changed": False, "current": rid, "releases": on_disk,
        "history": _history(root), "server": server,
        "gate": _read_json(gate_file, None) if rid else None,
    }  # fmt: skip


# -- command line ------------------------------------------------------------------


def _optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeq_host.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("command", choices=[
        "facts", "unpack", "runtime", "gate", "activate", "service", "health",
        "stop", "rollback", "prune", "status",
    ])  # fmt: skip
    p.add_argument("--root", default=".")
    p.add_argument("--id", default=None, help="artifact id")
    p.add_argument("--archive")
    p.add_argument("--sha256", default="")
    p.add_argument("--init", type=int, default=0, help="status: create the folders")
    p.add_argument("--wheels")
    p.add_argument("--packages", default="onnxruntime,mlx,mlx-lm,numpy,tokenizers")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--min-share", type=float, default=0.5)
    p.add_argument("--min-tps", type=_optional_float, default=None, help="'' for none")
    p.add_argument("--profile", type=int, default=1)
    p.add_argument("--to", default=None, help="rollback target id; '' for none")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument(
        "--mode", default="none", help="service mode: supervisor, systemd, none"
    )
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--timeout", type=float, default=120)
    return p


def run(args) -> dict:
    """Dispatch one command; returns its JSON-ready result."""
    root, c = os.path.abspath(args.root), args.command
    if c == "facts":
        return facts([p for p in args.packages.split(",") if p])
    if c == "unpack":
        return unpack(root, args.archive, args.id, args.sha256)
    if c == "runtime":
        return runtime(root, args.id, args.wheels)
    if c == "gate":
        return _service().gate(root, args.id, args)
    if c == "activate":
        return activate(root, args.id)
    if c == "service":
        return _service().ensure_service(root, args)
    if c == "health":
        return {"changed": False, **health(args)}
    if c == "stop":
        return {"changed": _service().stop_service(root)}
    if c == "rollback":
        return _service().rollback(root, args.to, args)
    if c == "prune":
        return prune(root, args.keep)
    return status(root, args)


def _service():
    """edgeq_host_service, imported only by the commands that need it, so
    `facts` and `status` run from this one file (Ansible's script module)."""
    # Run as a script, this module is __main__; the service module imports
    # it as edgeq_host and must get this same module (and StepError class).
    if __name__ == "__main__":
        sys.modules.setdefault("edgeq_host", sys.modules["__main__"])
    try:
        import edgeq_host_service
    except ImportError:
        from edgeq.fleet import edgeq_host_service
    return edgeq_host_service


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        result, code = {"ok": True, **run(args)}, 0
    except StepError as e:
        result, code = {"ok": False, "changed": False, "error": str(e)}, 1
    print(json.dumps(result, sort_keys=True, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
