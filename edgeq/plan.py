"""The plan: how each tensor is stored, runtime settings and predictions.

A plan is plain, versioned JSON. Both targets compile the same plan: the MLX
target through per-layer quantization entries in config.json, the ONNX
Runtime target through per-node operator choices. Schema (version 1):

    {"format": "edgeq-plan", "version": 1,
     "model": {...}, "target": "mlx", "device": "rpi5-8gb",
     "defaults": {"bits": 4, "group_size": 64},
     "tensors": [{"name", "shape", "bits", "group_size", "scheme", "reason",
                  "note"}],
     "runtime": {"context_length", "kv_cache_bits", "threads"},
     "predictions": {"file_size_bytes", "bits_per_weight", ...}}

bits: 2, 3, 4, 6, 8, or 16 (kept in 16-bit float). group_size: an int, or
null for per-channel (one scale per output row). scheme: "affine" (scale and
offset per group), "symmetric" (scale only), or "float" for kept tensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeq.errors import PlanError

PLAN_FORMAT = "edgeq-plan"
PLAN_VERSION = 1
VALID_BITS = (2, 3, 4, 6, 8, 16)
VALID_GROUPS = (32, 64, 128)
SCHEMES = ("affine", "symmetric", "float")
REASONS = (
    "default",
    "sensitivity",
    "shape-fallback",
    "tied",
    "user-override",
    "rule",
    "not-a-matrix",
)


@dataclass
class TensorPlan:
    name: str
    shape: list[int]
    bits: int
    group_size: int | None
    scheme: str
    reason: str = "default"
    note: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def storage_bytes(self) -> int:
        """Bytes on disk: packed weights plus 16-bit scales (and offsets)."""
        if not self.quantized:
            return self.numel * 2
        rows, cols = self.shape[0], self.numel // self.shape[0]
        groups = rows * (1 if self.group_size is None else -(-cols // self.group_size))
        per_group = 2 if self.scheme == "symmetric" else 4
        return self.numel * self.bits // 8 + groups * per_group


@dataclass
class Plan:
    model: dict
    target: str
    device: str
    defaults: dict
    tensors: list[TensorPlan]
    runtime: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def weight_bytes(self) -> int:
        return sum(t.storage_bytes() for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        params = sum(t.numel for t in self.tensors)
        return 8 * self.weight_bytes / params if params else 0.0

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "target": self.target,
            "device": self.device,
            "defaults": self.defaults,
            "runtime": self.runtime,
            "predictions": self.predictions,
            "warnings": self.warnings,
            "tensors": [asdict(t) for t in self.tensors],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"{where}: not an edgeq plan (field 'format')")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(
                f"{where}: plan version {d.get('version')} is not supported; "
                f"this edgeq reads version {PLAN_VERSION}"
            )
        tensors = []
        for i, t in enumerate(d.get("tensors", [])):
            try:
                tp = TensorPlan(**t)
            except TypeError as e:
                raise PlanError(f"{where}: tensors[{i}]: {e}") from None
            validate_tensor_plan(tp, f"{where}: tensor '{tp.name}'")
            tensors.append(tp)
        try:
            return cls(
                model=d["model"],
                target=d["target"],
                device=d["device"],
                defaults=d.get("defaults", {}),
                tensors=tensors,
                runtime=d.get("runtime", {}),
                predictions=d.get("predictions", {}),
                warnings=d.get("warnings", []),
            )
        except KeyError as e:
            raise PlanError(f"{where}: missing field {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"--plan {path}: file not found") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise PlanError(f"--plan {path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, where=str(path))


def validate_tensor_plan(t: TensorPlan, where: str) -> None:
    if t.bits not in VALID_BITS:
        raise PlanError(f"{where}: bits {t.bits} not in {VALID_BITS}")
    if t.scheme not in SCHEMES:
        raise PlanError(f"{where}: scheme '{t.scheme}' not in {SCHEMES}")
    if t.quantized and t.group_size is not None:
        cols = t.shape[-1] if t.shape else 0
        if t.group_size <= 0 or cols % t.group_size:
            raise PlanError(
                f"{where}: group_size {t.group_size} does not divide the input "
                f"width {cols}"
            )
