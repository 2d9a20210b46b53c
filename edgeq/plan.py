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
     "predictions": {"file_size_bytes", "bits_per_weight", ...},
     "warnings": [...], "sensitivity": {...}}

bits: 2, 3, 4, 6, 8, or 16 (kept in 16-bit float). group_size: an int, or
null for per-channel (one scale per output row). scheme: "affine" (scale and
offset per group), "symmetric" (scale only), or "float" for kept tensors.
reason: why the tensor got its storage (see REASONS); note: the detail, in
words (the size cost of a fallback, the measured sensitivity, the rule).
"defaults" also lists the plan's "rules" in words, so a reader of the JSON
sees every rule that moved a tensor away from the default. "sensitivity"
(mixed-precision plans only) says how tensor sensitivity was measured.
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
    """How one tensor is stored: bits, group (None: per-channel), scheme."""

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
    """The whole decision for one model on one device and target."""

    model: dict
    target: str
    device: str
    defaults: dict
    tensors: list[TensorPlan]
    runtime: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sensitivity: dict = field(default_factory=dict)

    def tensor(self, name: str) -> TensorPlan:
        """The entry for tensor `name` (KeyError when the plan has none)."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every stored tensor (the weights' file size)."""
        return sum(t.storage_bytes() for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per parameter over all tensors, norms included."""
        params = sum(t.numel for t in self.tensors)
        return 8 * self.weight_bytes / params if params else 0.0

    def to_dict(self) -> dict:
        """The plan document (see the module docstring for the schema)."""
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
            "sensitivity": self.sensitivity,
            "tensors": [asdict(t) for t in self.tensors],
        }

    def to_json(self) -> str:
        """The plan document as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> Plan:
        """Read a plan document; PlanError names the field at fault."""
        if not isinstance(d, dict):
            raise PlanError(f"{where}: not an edgeq plan (expected a JSON object)")
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
                tp.shape = [int(x) for x in tp.shape]
            except (TypeError, ValueError) as e:
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
                sensitivity=d.get("sensitivity", {}),
            )
        except KeyError as e:
            raise PlanError(f"{where}: missing field {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a saved plan (`edgeq plan --out`); see `validate_against`."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"--plan {path}: file not found") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise PlanError(f"--plan {path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, where=str(path))


def validate_tensor_plan(t: TensorPlan, where: str) -> None:
    """Raise PlanError when one tensor's storage is not a valid choice."""
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


def validate_against(plan: Plan, source) -> None:
    """Check a loaded plan against the model it is replayed on: every tensor
    it names exists with the same shape, and every tensor of the model is
    planned. Raises PlanError with one line naming the first problem."""
    where = "--plan"
    infos = {i.name: list(i.shape) for i in source.infos()}
    planned = {t.name: t for t in plan.tensors}
    unknown = [n for n in planned if n not in infos]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise PlanError(
            f"{where}: tensor '{unknown[0]}'{more} is not in model "
            f"'{source.name}'; the plan was made for another model"
        )
    for name, shape in infos.items():
        t = planned.get(name)
        if t is None:
            raise PlanError(
                f"{where}: model tensor '{name}' is missing from the plan; make "
                "the plan for this model with `edgeq plan`"
            )
        if list(t.shape) != shape:
            raise PlanError(
                f"{where}: tensor '{name}' has shape {list(t.shape)} in the plan "
                f"but {shape} in model '{source.name}'; the plan was made for "
                "another model"
            )
        validate_tensor_plan(t, f"{where}: tensor '{name}'")
