"""How much each tensor's quantization costs the model, measured.

For every weight matrix and every storage choice the target offers, the
table predicts the KL divergence (nats per token) between the float model's
next-token distribution and that of the model with only this tensor
quantized, on the calibration text shipped in edgeq/calibration/.

Method (two measurements, one extrapolation):

1. Real: the float model runs on the calibration tokens once; then, for
   each tensor, the tensor is replaced by its quantize-dequantize image at
   the most damaging choice (e.g. 3-bit group 64) and the model runs again
   from that tensor's layer on (earlier layers are unchanged, so their
   output is reused). The KL of the two runs is the tensor's measured
   sensitivity.
2. Cheap: for every choice, the activation-weighted error of the tensor,
   sum_j E[x_j^2] * mean_i dW_ij^2, with E[x_j^2] taken from the float run
   (rows of the embedding table are weighted by how often the text uses
   them instead).
3. KL for the other choices = measured KL * their error / the measured
   choice's error. For small perturbations KL is quadratic in the output
   change, and for one tensor the output change scales with its weighted
   error, so the ratio carries over; bench/bench_plans.py checks it against
   real measurements of every choice.

The forward pass is edgeq.reference's numpy model: MLX on a Linux CPU runs
float16 and quantized matmuls 50x slower than numpy's BLAS (measured: one
256-token SmolLM2 forward takes ~48 s in MLX float32, ~5 s in numpy).
Results are cached per model sha256, target and calibration text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeq.quant import fake_quantize
from edgeq.reference import ReferenceModel, rms_norm

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CALIBRATION_DIR = Path(__file__).parent / "calibration"
# Calibration length: the measurement's cost grows with tokens x parameters,
# its noise falls with tokens. A fixed budget of 1.6e10 token-parameters
# gives stories260K 512 tokens (seconds) and 135M-parameter models 128
# (minutes, once per model: the table is cached).
CALIBRATION_BUDGET = 1.6e10
MIN_TOKENS, MAX_TOKENS = 128, 512
ROW_BLOCK = 4096  # rows quantized at once when pricing a choice


@dataclass(frozen=True)
class Choice:
    """One way to store a matrix: bits, group (None: per-channel), scheme."""

    bits: int
    group_size: int | None
    scheme: str

    @property
    def key(self) -> str:
        group = "pc" if self.group_size is None else str(self.group_size)
        return f"{self.bits}/{group}/{self.scheme}"

    @classmethod
    def from_key(cls, key: str) -> Choice:
        bits, group, scheme = key.split("/")
        return cls(int(bits), None if group == "pc" else int(group), scheme)

    def fits(self, cols: int) -> bool:
        return self.group_size is None or cols % self.group_size == 0

    def bits_per_weight(self, cols: int) -> float:
        """Stored bits per weight, scales and offsets (16-bit) included."""
        if self.bits >= 16:
            return 16.0
        per_group = 16 if self.scheme == "symmetric" else 32
        group = cols if self.group_size is None else self.group_size
        return self.bits + per_group / group

    def describe(self) -> str:
        if self.bits >= 16:
            return "16-bit"
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"{self.bits}-bit {group}"


# The storage choices a mixed plan picks from, per target, cheapest first.
# 2-bit is left out on purpose: small models turn to gibberish there.
CHOICES = {
    "mlx": [
        Choice(3, 64, "affine"),
        Choice(3, 32, "affine"),
        Choice(4, 128, "affine"),
        Choice(4, 64, "affine"),
        Choice(4, 32, "affine"),
        Choice(6, 64, "affine"),
        Choice(8, 64, "affine"),
    ],
    "onnxruntime": [
        Choice(4, 128, "symmetric"),
        Choice(4, 64, "symmetric"),
        Choice(4, 32, "symmetric"),
        Choice(8, None, "symmetric"),
        Choice(8, 32, "symmetric"),
    ],
}


@dataclass
class TensorSensitivity:
    """Measured KL at `measured` and the weighted error of every choice."""

    name: str
    measured: str  # Choice.key the real KL was measured at
    kl: float  # nats per token, this tensor alone at `measured`
    errors: dict[str, float]  # Choice.key -> activation-weighted error

    def predicted_kl(self, key: str) -> float:
        """KL this tensor alone would cost at choice `key` (0 for float)."""
        if key not in self.errors:
            raise KeyError(f"{self.name}: no error recorded for choice {key}")
        ref = self.errors[self.measured]
        if ref <= 0:
            return 0.0
        return self.kl * self.errors[key] / ref


@dataclass
class SensitivityTable:
    """Per-tensor sensitivities of one model on one calibration text."""

    model_sha256: str
    target: str
    calibration_sha256: str
    tokens: int
    seconds: float
    tensors: dict[str, TensorSensitivity] = field(default_factory=dict)
    cache_path: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = CACHE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SensitivityTable:
        tensors = {k: TensorSensitivity(**v) for k, v in d["tensors"].items()}
        fields = {k: d[k] for k in ("model_sha256", "target", "calibration_sha256")}
        return cls(**fields, tokens=d["tokens"], seconds=d["seconds"],
                   tensors=tensors, cache_path=d.get("cache_path", ""))  # fmt: skip


def calibration_text(path: str | Path | None = None) -> str:
    """The calibration prose shipped with edgeq (or the file at `path`)."""
    path = Path(path) if path else CALIBRATION_DIR / "calibration.txt"
    return path.read_text(encoding="utf-8")


def is_matrix(name: str, shape) -> bool:
    """A weight matrix the planner may quantize."""
    return len(shape) == 2 and name.endswith(".weight")


def default_tokens(source) -> int:
    """Calibration tokens for a model of this size (CALIBRATION_BUDGET)."""
    params = sum(i.numel for i in source.infos())
    return int(min(MAX_TOKENS, max(MIN_TOKENS, CALIBRATION_BUDGET // max(1, params))))


def cache_path(source, target: str, text: str, tokens: int) -> Path:
    """Where the table of this model, target and calibration text lives."""
    from edgeq.models.registry import cache_dir

    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    sha = (source.describe().get("source_sha256") or "nosha")[:16]
    name = f"{sha}-{target}-{digest}-{tokens}-v{CACHE_VERSION}.json"
    return Path(cache_dir()) / "sensitivity" / name


def load_or_measure(
    source, target: str, text: str | None = None, tokens: int | None = None,
    progress=None, use_cache: bool = True,
) -> SensitivityTable:  # fmt: skip
    """The cached table for this model, or measure (and cache) it."""
    text = text if text is not None else calibration_text()
    tokens = tokens or default_tokens(source)
    path = cache_path(source, target, text, tokens)
    has_sha = bool(source.describe().get("source_sha256"))
    if use_cache and has_sha and path.exists():
        try:
            table = SensitivityTable.from_dict(json.loads(path.read_text()))
            log.info("sensitivity from cache %s", path)
            return table
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable sensitivity cache %s (%s)", path, e)
    table = measure(source, target, text, tokens, progress)
    if use_cache and has_sha:
        table.cache_path = str(path)
        _write_cache(path, table)
    return table


def _write_cache(path: Path, table: SensitivityTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.to_dict(), indent=1, sort_keys=True))
    os.replace(tmp, path)


def calibration_ids(source, text: str, tokens: int) -> list[int]:
    """The first `tokens` token ids of `text` under the model's tokenizer
    (a model without one, e.g. a random test model, gets the text's bytes
    folded into its vocabulary)."""
    if "tokenizer.json" not in source.tokenizer_files:
        log.warning("model has no tokenizer: calibrating on the text's bytes")
        vocab = source.config.vocab_size
        return [b % vocab for b in text.encode()[:tokens]]
    from edgeq.evaluate import source_tokenizer

    ids = source_tokenizer(source).encode(text)
    if len(ids) < 16:
        raise ValueError("calibration text is too short (under 16 tokens)")
    return ids[:tokens]


def measure(
    source, target: str, text: str, tokens: int, progress=None
) -> SensitivityTable:
    """Measure every matrix's sensitivity (see the module docstring)."""
    start = time.perf_counter()
    ids = calibration_ids(source, text, tokens)
    runner = _Runner(source, ids)
    choices = CHOICES[target]
    names = [i.name for i in source.infos() if is_matrix(i.name, i.shape)]
    table = SensitivityTable(
        model_sha256=source.describe().get("source_sha256", ""),
        target=target,
        calibration_sha256=hashlib.sha256(text.encode()).hexdigest(),
        tokens=len(ids),
        seconds=0.0,
    )
    for n, name in enumerate(names):
        entry = _one_tensor(runner, name, choices)
        if entry is not None:
            table.tensors[name] = entry
        if progress:
            progress(n + 1, len(names), name)
    layer_kls = [e.kl for n, e in table.tensors.items() if _layer_of(n) is not None]
    if layer_kls and max(layer_kls) <= 0:
        # A replaced weight that changes nothing means the reference model
        # keeps it somewhere set_weight does not know about.
        raise RuntimeError("sensitivity: replacing layer weights had no effect")
    table.seconds = round(time.perf_counter() - start, 1)
    log.info("measured %d tensors in %.0f s", len(table.tensors), table.seconds)
    return table


def _one_tensor(runner: _Runner, name: str, choices) -> TensorSensitivity | None:
    w = runner.weight(name)
    valid = [c for c in choices if c.fits(w.shape[1])]
    if not valid:
        return None
    errors = {c.key: runner.weighted_error(name, c) for c in valid}
    worst = max(valid, key=lambda c: errors[c.key])
    image = fake_quantize(w, worst.bits, worst.group_size, worst.scheme)
    kl = runner.kl_with(name, image)
    return TensorSensitivity(name, worst.key, kl, errors)


class _Runner:
    """The float numpy model, run once on the calibration ids, able to rerun
    from any layer with one tensor replaced."""

    def __init__(self, source, ids: list[int]):
        self.model = RecordingModel(source, max_positions=len(ids))
        self.cfg = source.config
        self.ids = np.asarray(ids)
        self.positions = np.arange(len(ids))
        tied = "lm_head.weight" not in self.model.w
        self.head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.layer_inputs, self.final = self._run_recording()
        self.head_power = np.mean(self.final.astype(np.float64) ** 2, axis=0)
        self.base_logp = _log_softmax(self.final @ self.model.head.T)

    def weight(self, name: str) -> np.ndarray:
        return self.model.w[name]

    def _run_recording(self):
        m = self.model
        m.recording = True
        x = self._embed()
        inputs = []
        cache = m.new_cache()
        for layer in range(self.cfg.num_layers):
            inputs.append(x)
            x = m._block(layer, x, self.positions, cache)
        m.recording = False
        return inputs, self._final_norm(x)

    def _embed(self) -> np.ndarray:
        x = self.model.w["model.embed_tokens.weight"][self.ids]
        if self.cfg.is_gemma:
            x = x * np.float32(np.sqrt(self.cfg.hidden_size))
        return x

    def _final_norm(self, x):
        cfg = self.cfg
        return rms_norm(x, self.model.w["model.norm.weight"], cfg.rms_norm_eps,
                        cfg.is_gemma)  # fmt: skip

    def _final_from(self, start: int, x):
        cache = self.model.new_cache()
        for layer in range(start, self.cfg.num_layers):
            x = self.model._block(layer, x, self.positions, cache)
        return self._final_norm(x)

    def weighted_error(self, name: str, c: Choice) -> float:
        """Activation-weighted error of storing `name` as `c`, computed in
        row blocks (quantization is row-local) so a large embedding table
        never has a second full copy."""
        w = self.weight(name)
        if name == "model.embed_tokens.weight" and name != self.head_name:
            # A gathered table: only the rows the text uses, by their count.
            rows, counts = np.unique(self.ids, return_counts=True)
            d = _error(w[rows], c)
            return float(counts @ np.sum(d * d, axis=1) / counts.sum())
        power = self.head_power if name == self.head_name else (
            self.model.input_power[name]
        )  # fmt: skip
        total = 0.0
        for start in range(0, w.shape[0], ROW_BLOCK):
            d = _error(w[start : start + ROW_BLOCK], c)
            total += float(np.sum((d * d) @ power))
        return total / w.shape[0]

    def kl_with(self, name: str, image) -> float:
        """KL(float || float with `name` replaced by `image`), per token."""
        m = self.model
        saved = m.w[name]
        set_weight(m, name, image)
        try:
            layer = _layer_of(name)
            if layer is not None:
                final = self._final_from(layer, self.layer_inputs[layer])
            elif name == "model.embed_tokens.weight":
                final = self._final_from(0, self._embed())
            else:  # an untied head: the hidden states do not change
                final = self.final
            logp = _log_softmax(final @ m.head.T)
        finally:
            set_weight(m, name, saved)
        return kl_divergence(self.base_logp, logp)


def set_weight(model: ReferenceModel, name: str, value: np.ndarray) -> None:
    """Replace one weight of a ReferenceModel in every form it keeps (the
    [out, in] table, its transposed copy for BLAS, the head alias)."""
    model.w[name] = value
    transposed = getattr(model, "wt", None)
    if transposed is not None and name in transposed:
        transposed[name] = np.ascontiguousarray(value.T)
    tied = "lm_head.weight" not in model.w
    if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
        model.head = value


def _error(w: np.ndarray, c: Choice) -> np.ndarray:
    image = fake_quantize(w, c.bits, c.group_size, c.scheme)
    return image.astype(np.float64) - w


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> float:
    """Mean over positions of KL(p || q), from log-probabilities [S, V]."""
    return float(np.mean(np.sum(np.exp(logp) * (logp - logq), axis=-1)))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return int(parts[2])
    return None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class RecordingModel(ReferenceModel):
    """ReferenceModel that, while `recording`, keeps E[x_j^2] of every
    linear layer's input (the diagonal of its activation Gram matrix)."""

    recording = False

    def __init__(self, source, max_positions: int = 4096):
        super().__init__(source, max_positions=max_positions)
        self.input_power: dict[str, np.ndarray] = {}

    def _linear(self, name, x):
        if self.recording:
            power = np.mean(x.astype(np.float64) ** 2, axis=0)
            self.input_power[name + ".weight"] = power
        return super()._linear(name, x)
