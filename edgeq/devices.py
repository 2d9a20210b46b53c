"""Device profiles: what a target device offers a model.

A profile is one table of a devices.toml file: memory, memory bandwidth, CPU
features, OS and the preferred target. edgeq reads two such files:

- the shipped ``devices.toml`` at the repository root (``EDGEQ_DEVICES``
  points elsewhere), and
- the user's ``~/.config/edgeq/devices.toml`` (``EDGEQ_USER_DEVICES`` points
  elsewhere), where :func:`detect` writes the profile of the machine it runs
  on. An entry there replaces a shipped entry of the same name.

Every problem in either file is reported as one :class:`DeviceError` line
naming the file, the device and the field.
"""

from __future__ import annotations

import datetime
import difflib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from edgeq.errors import DeviceError

log = logging.getLogger(__name__)

ARCHES = ("arm64", "x86_64")
OSES = ("macos", "linux")
TARGETS = ("mlx", "onnxruntime")

# Each ISA flag, and the architecture it belongs to (None: either). The order
# is the order profiles list them in.
ISA_FLAGS: dict[str, str | None] = {
    "avx2": "x86_64",
    "avx512f": "x86_64",
    "avx512_vnni": "x86_64",
    "avx_vnni": "x86_64",
    "neon": "arm64",
    "dotprod": "arm64",
    "i8mm": "arm64",
    "sve": "arm64",
    "fp16": None,
    "bf16": None,
}

# Fraction of peak bandwidth that decode reaches when a profile does not say.
# Rough figures to be replaced by measurements: llama.cpp and ONNX Runtime on a
# Raspberry Pi 5 reach about 60%; MLX on M-series GPUs does somewhat better.
DEFAULT_DECODE_EFFICIENCY = {"mlx": 0.65, "onnxruntime": 0.60}

GIB = 2**30  # RAM is sold in binary units: a "16 GB" Mac has 16 GiB.
GB = 10**9  # bandwidth is quoted in decimal units.

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_PYTHON_RE = re.compile(r"^3\.\d+$")
_REQUIRED = (
    "description",
    "ram_gb",
    "usable_fraction",
    "bandwidth_gbs",
    "arch",
    "isa",
    "cores",
    "os",
    "target",
)
_OPTIONAL = ("cpu", "decode_efficiency", "python", "runtime")


@dataclass(frozen=True)
class DeviceProfile:
    """One device of devices.toml, validated.

    ``ram_gb`` is in GiB (as RAM is sold), ``bandwidth_gbs`` in GB/s (10^9
    bytes/s, as bandwidth is quoted). ``source`` is the file it came from.
    """

    name: str
    description: str
    ram_gb: float
    usable_fraction: float
    bandwidth_gbs: float
    arch: str
    isa: tuple[str, ...]
    cores: int
    os: str
    target: str
    cpu: str | None = None
    decode_efficiency: float | None = None
    python: str | None = None
    runtime: dict[str, str] = field(default_factory=dict, hash=False)
    source: Path | None = field(default=None, compare=False)

    @property
    def usable_memory_bytes(self) -> int:
        """Bytes a model (weights, KV cache, activations) may occupy."""
        return int(self.ram_gb * GIB * self.usable_fraction)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Peak memory bandwidth in bytes per second."""
        return self.bandwidth_gbs * GB

    @property
    def expected_decode_efficiency(self) -> float:
        """``decode_efficiency``, or the default of the profile's target."""
        if self.decode_efficiency is not None:
            return self.decode_efficiency
        return DEFAULT_DECODE_EFFICIENCY[self.target]

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (``source`` as a string or None)."""
        return {
            "name": self.name,
            "description": self.description,
            "cpu": self.cpu,
            "ram_gb": self.ram_gb,
            "usable_fraction": self.usable_fraction,
            "bandwidth_gbs": self.bandwidth_gbs,
            "arch": self.arch,
            "isa": list(self.isa),
            "cores": self.cores,
            "os": self.os,
            "target": self.target,
            "decode_efficiency": self.decode_efficiency,
            "python": self.python,
            "runtime": dict(self.runtime),
            "source": str(self.source) if self.source else None,
        }


# --- Loading ---------------------------------------------------------------


def shipped_devices_path() -> Path:
    """The shipped devices.toml, or the file named by ``EDGEQ_DEVICES``."""
    env = os.environ.get("EDGEQ_DEVICES")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "devices.toml"


def user_devices_path() -> Path:
    """The user's devices file, or the file named by ``EDGEQ_USER_DEVICES``."""
    env = os.environ.get("EDGEQ_USER_DEVICES")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "edgeq" / "devices.toml"


def load_devices(
    path: str | Path | None = None, user_path: str | Path | None = None
) -> dict[str, DeviceProfile]:
    """All device profiles by name: the shipped file, then the user's file.

    ``path`` replaces the shipped file and ``user_path`` the user's file; a
    missing user file simply adds nothing. Raises DeviceError on any problem.
    """
    shipped = Path(path) if path else shipped_devices_path()
    if not shipped.is_file():
        raise DeviceError(
            f"{shipped}: device profiles file not found; "
            "set EDGEQ_DEVICES to a devices.toml"
        )
    devices = _read_profiles(shipped)

    user = Path(user_path) if user_path else user_devices_path()
    if user.is_file():
        for name, profile in _read_profiles(user).items():
            if name in devices:
                log.debug("%s: device %r replaces the shipped one", user, name)
            devices[name] = profile
    return devices


def get_device(
    name: str, path: str | Path | None = None, user_path: str | Path | None = None
) -> DeviceProfile:
    """The profile called ``name``; DeviceError naming close matches if unknown.

    ``path`` and ``user_path`` are passed on to :func:`load_devices`.
    """
    devices = load_devices(path, user_path)
    if name in devices:
        return devices[name]
    close = difflib.get_close_matches(name, list(devices), n=3, cutoff=0.6)
    hint = f"did you mean {_quoted(close)}? " if close else ""
    raise DeviceError(
        f"unknown device {name!r}; {hint}`edgeq devices` lists them all, "
        "`edgeq devices detect` profiles this machine"
    )


def _read_profiles(path: Path) -> dict[str, DeviceProfile]:
    data = _parse_toml(_read_text(path), path)
    return {
        name: _profile_from_table(name, table, path) for name, table in data.items()
    }


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DeviceError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DeviceError(f"{path}: not UTF-8 text, as TOML must be") from None


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # Python 3.11-3.13 put the position at the end of the message:
        # "Invalid value (at line 3, column 10)" or "(at end of document)".
        message = str(e)
        at = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if at:
            where = f"line {at[1]}, column {at[2]}"
            message = message[: at.start()]
        else:
            where = f"line {text.count(chr(10)) + 1} (end of file)"
            message = message.replace(" (at end of document)", "")
        raise DeviceError(f"{path}: invalid TOML at {where}: {message}") from None


# --- Validation ------------------------------------------------------------


def _profile_from_table(name: str, table: Any, path: Path) -> DeviceProfile:
    """Check one entry field by field and build its profile."""
    where = f"{path}: device {name!r}"
    if not isinstance(table, dict):
        raise DeviceError(
            f"{where}: must be a table of fields ([{name}]), got {table!r}"
        )
    if not _NAME_RE.match(name):
        raise DeviceError(
            f"{where}: names may use only lowercase letters, digits and '-'"
        )
    _check_keys(table, where)
    _check_values(table, where)
    _check_isa(table["isa"], table["arch"], where)
    if table["target"] == "mlx" and (table["os"], table["arch"]) != ("macos", "arm64"):
        raise DeviceError(
            f"{where}: field 'target' is 'mlx', which runs only on Apple Silicon "
            "(os 'macos', arch 'arm64'); use 'onnxruntime'"
        )

    return DeviceProfile(
        name=name,
        description=table["description"],
        ram_gb=float(table["ram_gb"]),
        usable_fraction=float(table["usable_fraction"]),
        bandwidth_gbs=float(table["bandwidth_gbs"]),
        arch=table["arch"],
        isa=tuple(table["isa"]),
        cores=table["cores"],
        os=table["os"],
        target=table["target"],
        cpu=table.get("cpu"),
        decode_efficiency=table.get("decode_efficiency"),
        python=table.get("python"),
        runtime=dict(table.get("runtime", {})),
        source=path,
    )


def _check_keys(table: dict[str, Any], where: str) -> None:
    for key in table:
        if key not in _REQUIRED and key not in _OPTIONAL:
            close = difflib.get_close_matches(key, _REQUIRED + _OPTIONAL, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "remove it"
            raise DeviceError(f"{where}: unknown field {key!r}; {hint}")
    for key in _REQUIRED:
        if key not in table:
            raise DeviceError(f"{where}: field {key!r} is missing")


def _check_values(table: dict[str, Any], where: str) -> None:
    def check(key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise DeviceError(
                f"{where}: field {key!r} must be {expected}, got {table[key]!r}"
            )

    get = table.get
    check("description", _is_text(get("description")), "a non-empty string")
    check("ram_gb", _is_positive(get("ram_gb")), "a positive number")
    check("usable_fraction", _is_fraction(get("usable_fraction")), "a number in (0, 1]")
    check("bandwidth_gbs", _is_positive(get("bandwidth_gbs")), "a positive number")
    check("arch", get("arch") in ARCHES, f"one of {_quoted(ARCHES)}")
    check("isa", _is_str_list(get("isa")), "a list of strings")
    check("cores", _is_int(get("cores")) and get("cores") > 0, "a positive integer")
    check("os", get("os") in OSES, f"one of {_quoted(OSES)}")
    check("target", get("target") in TARGETS, f"one of {_quoted(TARGETS)}")
    if "cpu" in table:
        check("cpu", _is_text(get("cpu")), "a non-empty string")
    if "decode_efficiency" in table:
        check(
            "decode_efficiency",
            _is_fraction(get("decode_efficiency")),
            "a number in (0, 1]",
        )
    if "python" in table:
        check("python", _is_version(get("python")), "a version like '3.11'")
    if "runtime" in table:
        runtime = get("runtime")
        check(
            "runtime",
            isinstance(runtime, dict) and all(_is_text(v) for v in runtime.values()),
            "a table of version specifiers, e.g. { onnxruntime = '>=1.18' }",
        )


def _check_isa(isa: list[str], arch: str, where: str) -> None:
    for flag in isa:
        if flag not in ISA_FLAGS:
            raise DeviceError(
                f"{where}: field 'isa' has unknown flag {flag!r}; "
                f"known flags: {', '.join(ISA_FLAGS)}"
            )
        if ISA_FLAGS[flag] not in (None, arch):
            raise DeviceError(
                f"{where}: field 'isa' has {flag!r}, an {ISA_FLAGS[flag]} feature, "
                f"but arch is {arch!r}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # TOML has inf and nan; neither is a size or a speed.
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0 < value <= 1


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_version(value: Any) -> bool:
    return isinstance(value, str) and _PYTHON_RE.match(value) is not None


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _quoted(names: Any) -> str:
    return ", ".join(repr(n) for n in names)


# --- Detection -------------------------------------------------------------


class CpuInfo(NamedTuple):
    """What the OS reports about the CPU: model name and edgeq ISA flags."""

    model: str | None
    isa: tuple[str, ...]


# /proc/cpuinfo flag (x86 "flags", arm64 "Features") -> edgeq ISA flag.
_LINUX_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_fp16": "fp16",
    "avx512_bf16": "bf16",
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "asimdhp": "fp16",
    "fphp": "fp16",
    "bf16": "bf16",
}

# macOS sysctl key -> edgeq ISA flag. Intel Macs list AVX2 and AVX-512 VNNI
# among the words of machdep.cpu.leaf7_features instead (see parse_sysctl).
_SYSCTL_FLAGS = {
    "hw.optional.AdvSIMD": "neon",
    "hw.optional.neon": "neon",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.neon_fp16": "fp16",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
}

# Arm Ltd (implementer 0x41) "CPU part" numbers, as in Linux's cputype.h; arm64
# /proc/cpuinfo names no model, so this is how a Pi says it has Cortex-A76s.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd05": "Cortex-A55",
    "0xd08": "Cortex-A72",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}


def parse_cpuinfo(text: str) -> CpuInfo:
    """CPU model and ISA flags from the text of Linux's /proc/cpuinfo."""
    blocks = [_colon_fields(b) for b in text.split("\n\n") if b.strip()]
    blocks = [b for b in blocks if "processor" in b] or blocks or [{}]
    first = blocks[0]

    reported = set((first.get("flags") or first.get("features") or "").split())
    isa = _ordered(_LINUX_FLAGS[f] for f in reported if f in _LINUX_FLAGS)

    # Count core types, so a big.LITTLE board reads "4x Cortex-A55 + 4x ...".
    parts: dict[str, int] = {}
    for block in blocks:
        if (
            block.get("cpu implementer") == "0x41"
            and block.get("cpu part") in _ARM_PARTS
        ):
            part = _ARM_PARTS[block["cpu part"]]
            parts[part] = parts.get(part, 0) + 1
    if parts:
        model = " + ".join(f"{n}x {part}" for part, n in parts.items())
    else:
        model = first.get("model name") or first.get("hardware")
    return CpuInfo(model, isa)


def parse_sysctl(text: str) -> CpuInfo:
    """CPU model and ISA flags from macOS ``sysctl hw.optional machdep.cpu``."""
    fields = _colon_fields(text, lower=False)
    flags = [flag for key, flag in _SYSCTL_FLAGS.items() if fields.get(key, "0") == "1"]
    leaf7 = fields.get("machdep.cpu.leaf7_features", "").upper().split()
    words = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni"}
    flags += [flag for word, flag in words.items() if word in leaf7]
    return CpuInfo(fields.get("machdep.cpu.brand_string"), _ordered(flags))


def measure_bandwidth_gbs(
    buffer_mb: int = 256, threads: int = 1, max_seconds: float = 2.0
) -> float:
    """Memory bandwidth in GB/s from copying a buffer, best of several runs.

    Counts bytes read plus bytes written; glibc copies this large with
    non-temporal stores, which skip the extra read a cached write would cost
    (where that read happens, the figure is low by up to a third). Runs
    alternate between one
    thread and ``threads`` threads (numpy releases the GIL while copying):
    one core cannot saturate memory on most machines, yet on small VMs extra
    threads only add noise. Stops after ``max_seconds`` (at least 3 runs).
    On Apple Silicon this measures the CPU side; the GPU, which MLX uses,
    reaches more.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    size = buffer_mb * 2**20
    src = np.empty(size, dtype=np.uint8)
    # Untouched pages all map to one shared zero page, which reads from
    # cache; fill them so the copy reads real memory.
    src.fill(1)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault in dst's pages outside the timed runs

    splits = [1, threads] if threads > 1 else [1]
    best = math.inf
    deadline = time.perf_counter() + max_seconds
    with ThreadPoolExecutor(max_workers=max(splits)) as pool:
        for run in range(20):
            n = splits[run % len(splits)]
            pairs = zip(np.array_split(dst, n), np.array_split(src, n))
            start = time.perf_counter()
            list(pool.map(lambda pair: np.copyto(*pair), pairs))
            best = min(best, time.perf_counter() - start)
            if run >= 2 and time.perf_counter() > deadline:
                break
    return 2 * size / best / GB


def default_device_name() -> str:
    """``local-<hostname>``, reduced to lowercase letters, digits and '-'."""
    host = socket.gethostname().split(".")[0].lower()
    host = re.sub(r"[^a-z0-9]+", "-", host).strip("-")
    return f"local-{host or 'machine'}"


def detect(
    out_path: str | Path | None = None,
    name: str | None = None,
    *,
    buffer_mb: int = 256,
    max_seconds: float = 2.0,
) -> DeviceProfile:
    """Profile the machine this runs on and save it in a devices file.

    Reads the CPU model and features, RAM and core count, measures memory
    bandwidth (about ``max_seconds``), and writes the entry ``name`` (default
    ``local-<hostname>``) into ``out_path`` (default: the user devices file),
    replacing an older entry of that name and keeping the others.
    """
    import psutil

    os_name, arch = _platform()
    name = name or default_device_name()
    out = Path(out_path) if out_path else user_devices_path()
    if not _NAME_RE.match(name):
        raise DeviceError(
            f"--name {name!r}: names may use only lowercase letters, digits and '-'"
        )

    cpu = _read_cpu(os_name)
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    ram_gb = round(psutil.virtual_memory().total / GIB, 1)
    log.info("measuring memory bandwidth with %d MB buffers", buffer_mb)
    bandwidth = measure_bandwidth_gbs(buffer_mb, threads=cores, max_seconds=max_seconds)

    board = _board_name()
    table: dict[str, Any] = {
        "description": f"{board or cpu.model or platform.node()} (detected)",
        "ram_gb": ram_gb,
        "usable_fraction": 0.75,
        "bandwidth_gbs": round(bandwidth, 1),
        "arch": arch,
        "isa": list(cpu.isa),
        "cores": cores,
        "os": os_name,
        "target": "mlx" if (os_name, arch) == ("macos", "arm64") else "onnxruntime",
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    }
    if cpu.model:
        table["cpu"] = cpu.model
    profile = _profile_from_table(name, table, out)

    today = datetime.date.today().isoformat()
    comment = (
        f"measured by edgeq devices detect on {today}\n"
        "bandwidth_gbs: best numpy copy (read + write), below the vendor's peak"
    )
    save_profile(profile, out, comment=comment)
    return profile


def _platform() -> tuple[str, str]:
    system = {"Linux": "linux", "Darwin": "macos"}.get(platform.system())
    machine = platform.machine().lower()
    arch = {
        "x86_64": "x86_64",
        "amd64": "x86_64",
        "arm64": "arm64",
        "aarch64": "arm64",
    }.get(machine)
    if system is None or arch is None:
        raise DeviceError(
            f"edgeq devices detect supports Linux and macOS on arm64 or x86_64, "
            f"not {platform.system()} on {platform.machine()}; add the device to "
            "devices.toml by hand"
        )
    return system, arch


def _read_cpu(os_name: str) -> CpuInfo:
    if os_name == "linux":
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    result = subprocess.run(
        ["sysctl", "hw.optional", "machdep.cpu.brand_string"],
        capture_output=True,
        text=True,
        check=False,
    )
    return parse_sysctl(result.stdout)


def _board_name() -> str | None:
    """The board's name on device-tree systems ("Raspberry Pi 5 Model B ...")."""
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ") or None
    except OSError:
        return None


def _colon_fields(text: str, lower: bool = True) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            key = key.strip().lower() if lower else key.strip()
            fields.setdefault(key, value.strip())
    return fields


def _ordered(flags: Any) -> tuple[str, ...]:
    found = set(flags)
    return tuple(f for f in ISA_FLAGS if f in found)


# --- Writing ---------------------------------------------------------------

_USER_FILE_HEADER = """\
# Device profiles of your own machines, read by edgeq after the shipped
# devices.toml; an entry here replaces a shipped one of the same name.
# Same fields as devices.toml (README.md, "Device profiles").
"""


def save_profile(
    profile: DeviceProfile, path: str | Path, comment: str | None = None
) -> None:
    """Write ``profile`` into the devices file at ``path``, atomically.

    An entry of the same name is replaced together with the comment lines
    right above it; everything else in the file is kept as it was.
    """
    path = Path(path)
    old = _read_text(path) if path.exists() else ""
    _parse_toml(old, path)  # never rewrite a file we cannot read back

    entry = _format_entry(profile, comment)
    new = _replace_entry(old, profile.name, entry)
    try:
        tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        raise DeviceError(
            f"{path}: device {profile.name!r}: cannot update this entry because "
            f"it is not written as a [{profile.name}] table; edit it by hand"
        ) from None

    # Write beside the target and rename: a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote device %r to %s", profile.name, path)


def _format_entry(profile: DeviceProfile, comment: str | None) -> str:
    values = profile.to_dict()
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines.append(f"[{profile.name}]")
    for key in _REQUIRED[:1] + ("cpu",) + _REQUIRED[1:] + _OPTIONAL[1:]:
        value = values[key]
        if value is not None and value != {}:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML ones, except that TOML also
        # forbids a raw DEL character.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()
        )
        return "{ " + items + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


_HEADER_RE = re.compile(r"""^\s*\[\[?\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))""")


def _table_key(line: str) -> str | None:
    """The first key of a ``[table]`` header line, or None for other lines."""
    m = _HEADER_RE.match(line)
    return next(g for g in m.groups() if g is not None) if m else None


def _replace_entry(text: str, name: str, entry: str) -> str:
    lines = text.splitlines(keepends=True)
    keys = [_table_key(line) for line in lines]
    if name not in keys:
        body = text.rstrip("\n")
        return (body + "\n\n" if body else _USER_FILE_HEADER + "\n") + entry

    # The entry runs from its header (plus the comment lines right above it)
    # to the next table of another name, less the comments and blank lines
    # that introduce that next table.
    start = keys.index(name)
    end = next(
        (i for i in range(start + 1, len(lines)) if keys[i] not in (None, name)),
        len(lines),
    )
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    while end > start and _is_blank_or_comment(lines[end - 1]):
        end -= 1
    tail = "".join(lines[end:]).lstrip("\n")
    return "".join(lines[:start]) + entry + ("\n" + tail if tail else "")


def _is_blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return stripped == "" or stripped.startswith("#")
