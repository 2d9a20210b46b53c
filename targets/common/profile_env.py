"""What the profiler records beside its timings: memory by phase and source,
and the environment a result was measured in.

Ships inside every artifact with profile.py, so it imports only the standard
library; psutil is used when the device has it, /proc or getrusage otherwise.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

# Raw CPU flag names (Linux /proc/cpuinfo, macOS sysctl hw.optional.*) that
# decide which quantized kernels a runtime can use: VNNI / dot product for
# INT8, FP16 / BF16 for half-precision math. The rest of the ~100 flags only
# make results harder to read.
CPU_FLAGS_OF_INTEREST = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "asimdhp",
    "fphp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
    "neon",
    "dotprod",
    "FEAT_DotProd",
    "FEAT_I8MM",
    "FEAT_BF16",
    "FEAT_FP16",
    "AdvSIMD",
)

# Modules each target imports before the model loads. Importing them before
# the memory baseline keeps the runtime's own code out of the model's share.
RUNTIME_MODULES = {
    "mlx": ("mlx.core", "mlx_lm", "mlx_lm.models.cache", "tokenizers"),
    "onnxruntime": ("onnxruntime", "tokenizers"),
}
RUNTIME_PACKAGES = {"mlx": ("mlx", "mlx-lm"), "onnxruntime": ("onnxruntime",)}

_KB = 1024


# --- Memory ------------------------------------------------------------------


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (psutil, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm_bytes() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m[1]) * _KB if m else None


def _reset_vm_hwm() -> bool:
    """Reset Linux's peak-RSS counter to the current RSS (clear_refs "5",
    Linux >= 4.0), so each phase gets its own peak instead of the process's
    lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else _KB)  # macOS: bytes


class MemoryProbe:
    """Peak resident memory (OS) per phase, plus the runtime's own figure.

    Linux: VmHWM from /proc/self/status, reset at the start of each phase,
    so each phase has its own peak. Elsewhere: getrusage's ru_maxrss, which
    only grows, so a phase's figure is the peak since the process started;
    ``rss_per_phase`` says which. ``runtime`` is (label, read, reset) for a
    runtime that tracks its own allocations (MLX), or None.
    """

    def __init__(self, runtime: tuple | None = None):
        self.per_phase = _vm_hwm_bytes() is not None and _reset_vm_hwm()
        if self.per_phase:
            self.rss_source = "os: VmHWM of /proc/self/status, reset per phase"
        else:
            self.rss_source = "os: getrusage ru_maxrss, peak since process start"
        self.runtime = runtime
        self.baseline_bytes = current_rss_bytes()
        self.peaks: dict[str, int | None] = {}
        self.runtime_peaks: dict[str, int | None] = {}

    def start(self) -> None:
        """Begin a phase: reset the peaks that can be reset."""
        if self.per_phase:
            _reset_vm_hwm()
        if self.runtime and self.runtime[2]:
            self.runtime[2]()

    def stop(self, phase: str) -> None:
        """End a phase and keep its peaks under `phase`."""
        self.peaks[phase] = _vm_hwm_bytes() if self.per_phase else _ru_maxrss_bytes()
        if self.runtime:
            self.runtime_peaks[phase] = int(self.runtime[1]())

    def report(self, phases: tuple[str, ...]) -> dict:
        """The memory figures of `phases` (e.g. load, warmup, runs)."""
        peaks = {p: self.peaks.get(p) for p in phases}
        known = [v for v in peaks.values() if v is not None]
        peak = max(known) if known else None
        base = self.baseline_bytes
        out = {
            "rss_source": self.rss_source,
            "rss_per_phase": self.per_phase,
            "rss_baseline_bytes": base,
            "peak_rss_bytes_by_phase": peaks,
            "peak_rss_bytes": peak,
            "model_rss_bytes": _growth(peak, base),
            "load_rss_bytes": _growth(peaks.get("load"), base),
            "runtime_source": self.runtime[0] if self.runtime else None,
            "runtime_peak_bytes_by_phase": None,
            "runtime_peak_bytes": None,
        }
        if self.runtime:
            rt = {p: self.runtime_peaks.get(p) for p in phases}
            out["runtime_peak_bytes_by_phase"] = rt
            out["runtime_peak_bytes"] = max(
                (v for v in rt.values() if v is not None), default=None
            )
        return out


def _growth(peak: int | None, base: int | None) -> int | None:
    return peak - base if peak is not None and base else None


def runtime_memory(target: str) -> tuple | None:
    """(label, read, reset) of the runtime's own allocator peak, or None.

    Only MLX reports one; ONNX Runtime's CPU arena has no public peak, so its
    engines' figure is the OS one, already recorded."""
    if target != "mlx":
        return None
    try:
        import mlx.core as mx

        return (
            "mlx: allocator peak (mx.get_peak_memory), reset per phase",
            mx.get_peak_memory,
            getattr(mx, "reset_peak_memory", None),
        )
    except (ImportError, AttributeError):
        return None


def preload_runtime(target: str) -> None:
    """Import the target's runtime before the memory baseline is taken."""
    for name in RUNTIME_MODULES.get(target, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the engine will say what is missing


# --- Environment -------------------------------------------------------------


def cpu_info() -> dict:
    """CPU model, the flags that matter to quantized kernels, core counts."""
    model, flags = None, []
    if sys.platform.startswith("linux"):
        model, flags = _linux_cpu()
    elif sys.platform == "darwin":
        model, flags = _macos_cpu()
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return {
        "cpu_model": model or platform.processor() or None,
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in set(flags)],
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
    }


def _linux_cpu() -> tuple[str | None, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, []
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware")
    if model is None and fields.get("cpu part"):
        model = f"arm cpu part {fields['cpu part']}"
    flags = (fields.get("flags") or fields.get("features") or "").split()
    return model, flags


def _macos_cpu() -> tuple[str | None, list[str]]:
    try:
        out = subprocess.run(
            ["sysctl", "hw.optional", "machdep.cpu.brand_string"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, []
    model, flags = None, []
    for line in out.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "machdep.cpu.brand_string":
            model = value
        elif value == "1":
            flags.append(key.rsplit(".", 1)[-1])
    return model, flags


def ram_bytes() -> int | None:
    """Installed RAM (psutil, else sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def package_versions(names) -> dict:
    """Installed versions of `names` (None where missing)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(manifest: dict, threads: int | None) -> dict:
    """Everything about the machine and software a result depends on."""
    target = manifest.get("target")
    device = manifest.get("device") or {}
    profile = dict(device.get("profile") or {"name": device.get("name")})
    # Until a host says otherwise, the device is the one the artifact was
    # built for; `edgeq profile` replaces it with the measured machine.
    profile["origin"] = "manifest (the device the artifact was built for)"
    return {
        "host": socket.gethostname(),
        "os": platform.system(),
        "os_release": platform.release(),
        "arch": platform.machine(),
        **cpu_info(),
        "ram_bytes": ram_bytes(),
        "python": platform.python_version(),
        "runtime": {
            "name": target,
            "versions": package_versions(RUNTIME_PACKAGES.get(target, ())),
        },
        "threads": threads,
        "edgeq_build_version": manifest.get("edgeq_version"),
        "edgeq_version": None,
        "device": profile,
    }
