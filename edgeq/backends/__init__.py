"""Host-side builders, one per target, behind one small interface.

A backend module provides:

    build(source, plan, out: Path, progress=None) -> list[str]
    runtime_requirements(plan, device) -> dict      # for the manifest
    smoke_check(folder) -> None                     # raises TargetError
    read_back(folder) -> {tensor: (bits, group)}    # what was stored

`TARGETS` is static data, so `edgeq targets` and device checks answer
without importing mlx or onnxruntime. A third-party target registers by
adding an entry (module path + capabilities), the way the built-ins do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgeq.errors import TargetError


@dataclass(frozen=True)
class TargetInfo:
    name: str
    module: str
    description: str
    bits: tuple[int, ...]
    group_sizes: tuple[int | None, ...]
    os: tuple[str, ...]
    arch: tuple[str, ...]
    runner_packages: dict


TARGETS = {
    "mlx": TargetInfo(
        "mlx",
        "edgeq.backends.mlx_backend",
        "MLX affine group quantization, run by mlx-lm (Apple Silicon)",
        (2, 3, 4, 6, 8, 16),
        (32, 64, 128),
        ("macos",),
        ("arm64",),
        {"mlx-lm": ">=0.22"},
    ),
    "onnxruntime": TargetInfo(
        "onnxruntime",
        "edgeq.backends.onnx_backend",
        "ONNX decoder with INT8 dynamic / 4-bit MatMulNBits, run by ONNX Runtime",
        (4, 8, 16),
        (None, 32, 64, 128),
        ("linux", "macos", "windows"),
        ("x86_64", "arm64"),
        {"onnxruntime": ">=1.18", "numpy": ">=1.24", "tokenizers": ">=0.19"},
    ),
}


def target_info(name: str) -> TargetInfo:
    if name not in TARGETS:
        raise TargetError(
            f"--target {name}: unknown target; choose one of {', '.join(TARGETS)}"
        )
    return TARGETS[name]


def check_device_can_run(target: str, device) -> None:
    """Refuse a target the device cannot run (MLX on a Raspberry Pi)."""
    info = target_info(target)
    if device.os not in info.os or device.arch not in info.arch:
        raise TargetError(
            f"--target {target} cannot run on device '{device.name}' "
            f"({device.os}/{device.arch}); {target} needs "
            f"{'/'.join(info.os)} on {'/'.join(info.arch)}; use "
            f"--target {device.target} (the device's preferred target)"
        )


def load_backend(name: str):
    """Import the backend module for target `name` (lazily: mlx/onnx are heavy)."""
    return importlib.import_module(target_info(name).module)
