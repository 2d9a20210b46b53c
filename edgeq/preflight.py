"""Pre-flight: can this device install and run an artifact's runtime?

check_runtime() compares the ``runtime`` section of a manifest with a
device's facts and returns every reason it cannot run (empty: it can). It
is pure, so fleet code can run it on facts gathered from remote machines.

The runtime section, as builders write it::

    {"python": ">=3.10",
     "packages": {"onnxruntime": ">=1.18"},     # or {"mlx-lm": ">=0.22"}
     "onnx": {"opset": 21, "ir_version": 10},   # onnxruntime target only
     "arch": "aarch64",                         # omit or null: any
     "isa": ["dotprod"]}                        # CPU features it was tuned for

Device facts (local_device_facts() collects them for this machine)::

    {"arch": "aarch64",          # uname -m: x86_64, aarch64, arm64, armv7l
     "userland_bits": 64,        # 32 on a 32-bit OS over a 64-bit kernel
     "python": "3.11.7",
     "libc": "glibc 2.36",       # or "musl 1.2.4", or "" (macOS)
     "system": "linux",          # optional; platform.system().lower()
     "cpu_flags": ["fp", "asimd", ...],  # /proc/cpuinfo; None if unknown
     "packages": {"onnxruntime": "1.16.3"}}  # installed versions only

What onnxruntime can install and load comes from static tables below;
extend them when a release changes its wheels or its ONNX support.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeq.errors import ArtifactError

logger = logging.getLogger(__name__)

Version = tuple[int, ...]

# onnxruntime wheels on PyPI per minor release: (first minor, last minor,
# oldest Python, newest Python, oldest glibc). Read from PyPI's file list for
# onnxruntime up to 1.32: Linux wheels exist for x86_64 and aarch64 only,
# none for 32-bit ARM, i686 or musl. A release newer than the last row is
# assumed to keep the last row's range. Extend: add a row.
_ORT_WHEELS: tuple[tuple[Version, Version, Version, Version, Version], ...] = (
    ((1, 14), (1, 14), (3, 7), (3, 10), (2, 17)),
    ((1, 15), (1, 16), (3, 8), (3, 11), (2, 17)),
    ((1, 17), (1, 19), (3, 8), (3, 12), (2, 27)),
    ((1, 20), (1, 23), (3, 10), (3, 13), (2, 27)),
    ((1, 24), (1, 28), (3, 11), (3, 14), (2, 27)),
    ((1, 29), (1, 32), (3, 11), (3, 14), (2, 28)),
)
_ORT_WHEEL_ARCHS = ("x86_64", "aarch64")

# Highest ONNX opset (ai.onnx domain) and IR version an onnxruntime minor
# release loads. 1.16, 1.20-1.24, 1.27, 1.30 and 1.32 were measured by
# loading a one-node model into each release's wheel; the others follow the
# ONNX release each one bundles. A minor not listed takes the nearest lower
# row (an under-estimate at worst). Extend: add a row.
_ORT_MAX_ONNX: dict[Version, tuple[int, int]] = {
    (1, 14): (18, 8),
    (1, 15): (19, 9),
    (1, 16): (19, 9),
    (1, 17): (20, 9),
    (1, 18): (21, 10),
    (1, 19): (21, 10),
    (1, 20): (21, 10),
    (1, 21): (22, 10),
    (1, 22): (22, 10),
    (1, 23): (23, 11),
    (1, 24): (25, 13),
    (1, 27): (26, 13),
    (1, 30): (26, 13),
    (1, 32): (28, 14),
}

# Releases that crash with SIGILL at import on CPUs lacking a feature:
# (arch, first bad, first fixed, feature, where it was reported). 1.21.0's
# aarch64 wheel runs dot-product code unguarded (Raspberry Pi 4,
# Cortex-A72); 1.21.1 is unconfirmed, so the whole minor is refused.
_ORT_KNOWN_CRASHES = (
    ("aarch64", (1, 21, 0), (1, 22, 0), "dotprod", "microsoft/onnxruntime#24112"),
)

# edgeq ISA flags (devices.toml's "isa", a manifest's runtime.isa) -> the
# names Linux reports in /proc/cpuinfo (x86 "flags", arm64 "Features"); the
# same mapping edgeq.devices uses to detect a profile's flags. A flag not
# listed here is reported under its own name (avx2, i8mm, sve, ...).
_CPU_FLAG_ALIASES = {
    "neon": ("asimd",),
    "dotprod": ("asimddp",),
    "fp16": ("asimdhp", "fphp", "avx512_fp16"),
    "bf16": ("avx512_bf16",),
}

_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
_ARM32 = ("armv6l", "armv7l", "armv8l", "armhf", "arm")


# -- versions ----------------------------------------------------------------


def parse_version(text: str) -> Version | None:
    """Leading numeric release of a version string: '1.16.3+cpu' -> (1, 16, 3)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def _fmt(version: Version) -> str:
    return ".".join(map(str, version))


def _pad(a: Version, b: Version) -> tuple[Version, Version]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def version_satisfies(version: str | Version, spec: str) -> bool:
    """True if `version` meets a requirement like '>=1.18,<1.22' or '==1.19.*'.

    Handles the operators pip users write (==, !=, >=, <=, >, <, ~=, and
    trailing .* with == and !=), on release numbers only.
    """
    have = parse_version(version) if isinstance(version, str) else version
    if have is None:
        return False
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        # Whole numbers between the dots: '.180' or '1..2' is not a version.
        match = re.fullmatch(r"(~=|==|!=|>=|<=|>|<)?\s*(\d+(?:\.\d+)*)(\.\*)?", clause)
        if not match:
            raise ArtifactError(
                f"runtime requirement '{spec}' is not a version range edgeq reads; "
                "use forms like '>=1.18' or '==1.19.2'"
            )
        op, want, star = (
            match.group(1) or "==",
            parse_version(match.group(2)),
            match.group(3),
        )
        if not _clause_holds(have, op, want, bool(star)):
            return False
    return True


def _clause_holds(have: Version, op: str, want: Version, star: bool) -> bool:
    if star:
        prefix = (have + (0,) * len(want))[: len(want)]
        return (prefix == want) == (op == "==")
    if op == "~=":
        same_series = have[: len(want) - 1] == want[:-1]
        return same_series and _clause_holds(have, ">=", want, False)
    a, b = _pad(have, want)
    results = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b}
    results.update({">": a > b, "<": a < b})
    return results[op]


def _norm_arch(arch: str | None) -> str:
    arch = (arch or "").lower()
    return _ARCH_ALIASES.get(arch, arch)


def _norm_package(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(facts: dict[str, Any]) -> dict[str, str]:
    return {_norm_package(k): v for k, v in (facts.get("packages") or {}).items()}


def _minor(python: str | None) -> str:
    version = parse_version(python or "")
    return _fmt(version[:2]) if version else "?"


def _has_feature(feature: str, flags: set[str]) -> bool:
    return bool({feature, *_CPU_FLAG_ALIASES.get(feature, ())} & flags)


def _feature_label(feature: str) -> str:
    aliases = [a for a in _CPU_FLAG_ALIASES.get(feature, ()) if a != feature]
    return f"'{feature}' ({'/'.join(aliases)})" if aliases else f"'{feature}'"


# -- the checks ----------------------------------------------------------------


def check_runtime(runtime: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """Every reason the device described by `facts` cannot run `runtime`.

    `runtime` is a manifest's runtime section and `facts` a device's facts
    (both described in the module docstring). An empty list means nothing
    known stands in the way; it does not prove the import works, which
    import_smoke_test() checks on the device itself.
    """
    packages = runtime.get("packages") or {}
    reasons = _check_arch(runtime, facts, packages)
    if reasons:
        return reasons  # the other checks are moot until the OS changes
    reasons += _check_python(runtime, facts)
    reasons += _check_isa(runtime, facts)
    reasons += _check_installed(packages, facts)
    if "onnxruntime" in packages:
        reasons += _check_onnxruntime(runtime, facts)
    return reasons


def _check_arch(
    runtime: dict[str, Any], facts: dict[str, Any], packages: dict[str, str]
) -> list[str]:
    arch = _norm_arch(facts.get("arch"))
    shown = facts.get("arch")
    if "onnxruntime" in packages:
        name = "onnxruntime"
    else:
        name = "mlx" if "mlx-lm" in packages else "the artifact's runtime"
    if arch in _ARM32:
        py = _minor(facts.get("python"))
        return [f"{name} publishes no {shown} wheels for Python {py}; use a 64-bit OS"]
    if facts.get("userland_bits") == 32:
        return [
            (
                f"the device runs a 32-bit user space on a 64-bit {shown} kernel "
                f"and {name} publishes no 32-bit wheels; install a 64-bit OS"
            )
        ]
    want = runtime.get("arch")
    if want and _norm_arch(want) != arch:
        return [
            (
                f"artifact is built for {want} but the device is {shown}: "
                "rebuild it for this device's profile"
            )
        ]
    return []


def _check_python(runtime: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    spec, python = runtime.get("python"), facts.get("python")
    if spec and python and not version_satisfies(python, spec):
        return [
            (
                f"artifact needs Python {spec} but the device has Python {python}: "
                "install a matching Python"
            )
        ]
    return []


def _check_isa(runtime: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    if facts.get("cpu_flags") is None:
        logger.info("CPU features of the device unknown; ISA check skipped")
        return []
    flags = set(facts["cpu_flags"])
    return [
        f"device lacks CPU feature {_feature_label(feature)} that this artifact's "
        "INT8 kernels were tuned for; rebuild for a profile without it"
        for feature in runtime.get("isa") or []
        if not _has_feature(feature, flags)
    ]


def _check_installed(packages: dict[str, str], facts: dict[str, Any]) -> list[str]:
    installed = _installed(facts)
    reasons = []
    for name, spec in sorted(packages.items()):
        have = installed.get(_norm_package(name))
        if have and spec and not version_satisfies(have, spec):
            reasons.append(
                f"{name} {have} on the device does not satisfy the artifact's "
                f"requirement {name}{spec}: pip install '{name}{spec}'"
            )
    return reasons


def _check_onnxruntime(runtime: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    spec = runtime["packages"]["onnxruntime"] or ""
    have = _installed(facts).get("onnxruntime")
    if have:
        version, shown = parse_version(have), f"{have} on the device"
    else:
        version = _pick_ort_release(spec, facts)
        if version is None:
            return [_no_wheel_reason(spec, facts)]
        shown = f"{_fmt(version)} (what pip installs for onnxruntime{spec})"
    reasons = [
        _known_crash(version, shown, facts),
        _onnx_limit(version, shown, runtime),
    ]
    return [r for r in reasons if r]


# -- onnxruntime tables ----------------------------------------------------------


def _wheel_row(version: Version):
    """The _ORT_WHEELS row for a release; the last row for newer ones."""
    minor = _pad(version[:2], (0, 0))[0]
    for row in _ORT_WHEELS:
        if row[0] <= minor <= row[1]:
            return row
    return _ORT_WHEELS[-1] if minor > _ORT_WHEELS[-1][1] else None


def _wheel_problem(version: Version, facts: dict[str, Any]) -> str | None:
    """Why no wheel of this release installs on the device: a kind, or None."""
    row = _wheel_row(version)
    if row is None:
        return "unknown"
    if _norm_arch(facts.get("arch")) not in _ORT_WHEEL_ARCHS:
        return "arch"
    libc = (facts.get("libc") or "").lower()
    if libc.startswith("musl"):
        return "musl"
    python = parse_version(facts.get("python") or "")
    if python and not row[2] <= python[:2] <= row[3]:
        return "python"
    glibc = parse_version(libc.removeprefix("glibc").strip()) if libc else None
    if libc.startswith("glibc") and glibc and glibc[:2] < row[4]:
        return "glibc"
    # TODO: macOS wheels need macOS >= 11/13/14 and stop for x86_64 Macs at
    # 1.23; facts do not carry the macOS version yet, so this is unchecked.
    return None


def _ort_releases(spec: str) -> list[Version]:
    """Candidate releases: each known minor, plus versions the spec names."""
    minors = [(1, m) for row in _ORT_WHEELS for m in range(row[0][1], row[1][1] + 1)]
    named = [parse_version(v) for v in re.findall(r"\d+(?:\.\d+)+", spec)]
    return sorted({*minors, *named}, key=lambda v: _pad(v, (0, 0, 0))[0])


def _pick_ort_release(spec: str, facts: dict[str, Any]) -> Version | None:
    """The newest release matching `spec` that has a wheel for the device."""
    fits = [
        v
        for v in _ort_releases(spec)
        if version_satisfies(v, spec) and _wheel_problem(v, facts) is None
    ]
    return fits[-1] if fits else None


def _span(versions: list[Version]) -> str:
    first, last = _fmt(versions[0][:2]), _fmt(versions[-1][:2])
    return first if first == last else f"{first}-{last}"


def _no_wheel_reason(spec: str, facts: dict[str, Any]) -> str:
    """Explain why no release matching `spec` installs on the device."""
    wanted = f"onnxruntime{spec}"
    matching = [v for v in _ort_releases(spec) if version_satisfies(v, spec)]
    problems = {_wheel_problem(v, facts) for v in matching}
    if not matching or problems == {"unknown"}:
        return f"no onnxruntime release edgeq knows matches '{wanted}'; rebuild"
    if "arch" in problems:
        return (
            f"onnxruntime publishes no {facts.get('arch')} wheels; install an "
            "onnxruntime built for this device first, or use an x86_64 or aarch64 one"
        )
    if "musl" in problems:
        return (
            f"onnxruntime publishes no wheels for musl libc ({facts.get('libc')}); "
            "use a glibc-based OS such as Debian or Raspberry Pi OS"
        )
    fits = [v for v in _ort_releases("") if _wheel_problem(v, facts) is None]
    rebuild = f" or rebuild with onnxruntime >= {_fmt(fits[0][:2])}" if fits else ""
    if fits and fits[-1][:2] < _ORT_WHEELS[-1][1]:
        rebuild = f" or rebuild with onnxruntime {_span(fits)}"
    if "python" in problems:
        lo = min(_wheel_row(v)[2] for v in matching)
        hi = max(_wheel_row(v)[3] for v in matching)
        have = "; ".join(
            f"onnxruntime {_span(vs)} has wheels for Python {_fmt(k[0])}-{_fmt(k[1])}"
            for k, vs in _group(matching, lambda row: row[2:4])
        )
        return (
            f"{wanted} publishes no wheel for Python {facts.get('python')} "
            f"({have}): use Python {_fmt(lo)}-{_fmt(hi)} on the device{rebuild}"
        )
    need = "; ".join(
        f"onnxruntime {_span(vs)} needs glibc >= {_fmt(k)}"
        for k, vs in _group(matching, lambda row: row[4])
    )
    return (
        f"{wanted} publishes no wheel for {facts.get('libc')} ({need}): "
        f"upgrade the device's OS{rebuild}"
    )


def _group(versions: list[Version], key: Callable) -> list[tuple[Any, list[Version]]]:
    """Runs of consecutive releases whose wheel rows share key(row)."""
    groups: list[tuple[Any, list[Version]]] = []
    for v in versions:
        k = key(_wheel_row(v))
        if groups and groups[-1][0] == k:
            groups[-1][1].append(v)
        else:
            groups.append((k, [v]))
    return groups


def _known_crash(version: Version, shown: str, facts: dict[str, Any]) -> str | None:
    if facts.get("cpu_flags") is None:
        return None
    flags, arch = set(facts["cpu_flags"]), _norm_arch(facts.get("arch"))
    padded = _pad(version, (0, 0, 0))[0]
    for crash_arch, first, fixed, feature, source in _ORT_KNOWN_CRASHES:
        affected = arch == crash_arch and first <= padded < fixed
        if affected and not _has_feature(feature, flags):
            return (
                f"onnxruntime {shown} crashes with an illegal instruction on "
                f"CPUs without {_feature_label(feature)} such as this one "
                f"({source}): install onnxruntime >= {_fmt(fixed[:2])} or "
                f"< {_fmt(first[:2])}"
            )
    return None


def _ort_max_onnx(version: Version) -> tuple[int, int] | None:
    known = [v for v in _ORT_MAX_ONNX if v <= version[:2]]
    return _ORT_MAX_ONNX[max(known)] if known else None


def _onnx_limit(version: Version, shown: str, runtime: dict[str, Any]) -> str | None:
    onnx = runtime.get("onnx") or {}
    opset, ir = onnx.get("opset") or 0, onnx.get("ir_version") or 0
    if not (opset or ir):
        return None
    limits = _ort_max_onnx(version)
    if limits is None:
        oldest = _fmt(min(_ORT_MAX_ONNX))
        return (
            f"onnxruntime {shown} is older than any release edgeq knows "
            f"({oldest}): upgrade onnxruntime"
        )
    max_opset, max_ir = limits
    if opset <= max_opset and ir <= max_ir:
        return None
    enough = [
        v for v, (o, i) in sorted(_ORT_MAX_ONNX.items()) if o >= opset and i >= ir
    ]
    fix = f"upgrade onnxruntime to >= {_fmt(enough[0])} or " if enough else ""
    return (
        f"model needs ONNX opset {opset} and IR version {ir}; onnxruntime {shown} "
        f"supports up to opset {max_opset} and IR {max_ir}: {fix}rebuild with a "
        "lower opset"
    )


def raise_for(reasons: list[str], subject: str) -> None:
    """Raise ArtifactError joining `reasons` into one line, if there are any."""
    if reasons:
        raise ArtifactError(
            f"{subject} cannot run on this device: " + "; ".join(reasons)
        )


def require_runtime(
    runtime: dict[str, Any], facts: dict[str, Any], subject: str = "artifact"
) -> None:
    """check_runtime(), raising ArtifactError with every reason in one line."""
    raise_for(check_runtime(runtime, facts), subject)


def missing_packages(runtime: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """Requirements (``name>=x``) of `runtime` not installed on the device."""
    installed = _installed(facts)
    return [
        f"{name}{spec or ''}"
        for name, spec in sorted((runtime.get("packages") or {}).items())
        if _norm_package(name) not in installed
    ]


# -- this machine -----------------------------------------------------------------

DEFAULT_PACKAGES = ("onnxruntime", "mlx", "mlx-lm", "numpy", "tokenizers")


def local_device_facts(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """Facts about this machine in the shape check_runtime() reads."""
    system = platform.system().lower()
    return {
        "arch": platform.machine().lower(),
        "userland_bits": struct.calcsize("P") * 8,
        "python": platform.python_version(),
        "libc": _local_libc(system),
        "system": system,
        "cpu_flags": _local_cpu_flags(system),
        "packages": _installed_versions(packages),
    }


def _local_libc(system: str) -> str:
    if system != "linux":
        return ""
    name, version = platform.libc_ver()
    if name == "glibc" and version:
        return f"glibc {version}"
    if any(Path("/lib").glob("ld-musl-*")):
        return "musl"
    return ""


def _local_cpu_flags(system: str) -> list[str] | None:
    """CPU feature flags as the kernel names them; None when unknown."""
    if system == "linux":
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86, ARM
                return sorted(set(value.split()))
        return None
    if system == "darwin":
        return _darwin_cpu_flags()
    return None


# macOS reports features as sysctl hw.optional.* = 1; they are recorded
# under edgeq's flag names, which the checks accept as well. Not exercised
# by the test suite, which runs on Linux.
_DARWIN_FLAGS = {
    "AdvSIMD": "neon",
    "neon": "neon",
    "arm.FEAT_DotProd": "dotprod",
    "arm.FEAT_I8MM": "i8mm",
    "arm.FEAT_FP16": "fp16",
    "arm.FEAT_BF16": "bf16",
    "avx2_0": "avx2",
    "avx512f": "avx512f",
}


def _darwin_cpu_flags() -> list[str] | None:
    try:
        out = subprocess.run(
            ["sysctl", "hw.optional"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    flags = set()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        name = _DARWIN_FLAGS.get(key.strip().removeprefix("hw.optional."))
        if name and value.strip() == "1":
            flags.add(name)
    return sorted(flags)


def _installed_versions(packages: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# -- import smoke test ---------------------------------------------------------

_IMPORT_NAMES = {"mlx-lm": "mlx_lm", "onnxruntime-gpu": "onnxruntime"}
_SIGNAL_HINTS = {
    "SIGILL": "this build uses CPU instructions the device lacks; "
    "install a build made for this CPU",
    "SIGSEGV": "the installed build is broken on this device; "
    "reinstall it or try another version",
    "SIGBUS": "the installed build is broken on this device; "
    "reinstall it or try another version",
}


def import_smoke_test(
    package: str,
    code: str | None = None,
    python: str | None = None,
    timeout_s: float = 120.0,
) -> str | None:
    """Import `package` in a child Python; None if it works, else the reason.

    A runtime built for other CPUs dies of SIGILL inside import, which would
    kill the caller; in a child process it becomes a reason naming the
    signal. `code` replaces ``import <module>`` (tests use it to crash on
    purpose); `python` defaults to this interpreter.
    """
    if code is None:
        module = _IMPORT_NAMES.get(package, package.replace("-", "_"))
        if not re.fullmatch(r"[A-Za-z_][\w.]*", module):
            raise ValueError(f"not an importable module name: {package!r}")
        code = f"import {module}"
    try:
        done = subprocess.run(
            [python or sys.executable, "-c", code],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PYTHONFAULTHANDLER": ""},
        )
    except subprocess.TimeoutExpired:
        return f"importing {package} did not finish within {timeout_s:g} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        number = -done.returncode
        name = _signal_name(number)
        hint = _SIGNAL_HINTS.get(name, "reinstall it or check the device")
        return (
            f"importing {package} killed Python with {name} "
            f"({signal.strsignal(number)}): {hint}"
        )
    lines = done.stderr.strip().splitlines() or ["no error output"]
    return f"importing {package} failed with exit code {done.returncode}: {lines[-1]}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def local_preflight(runtime: dict[str, Any]) -> list[str]:
    """check_runtime() on this machine, then import each installed runtime."""
    packages = tuple(runtime.get("packages") or {})
    facts = local_device_facts(tuple(dict.fromkeys(packages + DEFAULT_PACKAGES)))
    reasons = check_runtime(runtime, facts)
    if reasons:
        return reasons
    installed = _installed(facts)
    for name in packages:
        if _norm_package(name) in installed:
            reason = import_smoke_test(name)
            if reason:
                reasons.append(reason)
    return reasons
