"""Quality of a built artifact against its float source: perplexity (sliding
window), top-1 next-token agreement and KL divergence; the quality gate.

Any object with `logits(ids) -> [len(ids), vocab]` (float32) is a model
here: the engines that run artifacts, and `float_reference(source)`.

Sliding window: the text's token ids are cut into windows of `window`
tokens starting every `stride` tokens; each window is run from scratch
(whole-sequence logits, no cache) and scores only the tokens that no
earlier window scored, so every token after the first is predicted once,
with at least `window - stride` tokens of context (except in the first
window). Defaults: window 512, stride 256.

The float reference is edgeq.reference's numpy model, not MLX: on a Linux
CPU MLX runs a 256-token SmolLM2 forward in ~48 s (float32), numpy in ~5 s,
and an independent implementation also catches a wrong build (a bad RoPE
base, a transposed table) that a reference sharing the target's model code
would reproduce.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import ArtifactError, QualityGateError

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 512
DEFAULT_STRIDE = 256
# The gate runs on this many tokens of the shipped hold-out text: enough
# for a stable figure (see README), few enough for deploy (seconds).
GATE_TOKENS = 256
# Largest relative perplexity increase the gate accepts when
# --max-ppl-increase is not given, per target and precision: plans that keep
# every matrix at 8 bits or more ("int8") should be near-lossless (the
# design's target is 1%; 5% leaves room for the noise of 256 tokens), and
# per-tensor INT8 activations that ruin a decoder (case C08, +50% on
# SmolLM2) must fail; 4-bit plans ("low") cost 10-40% on 135M-parameter
# models (README, "Quality gate"), 3-bit 60% and more, broken builds and
# 2-bit thousands of percent.
DEFAULT_MAX_PPL_INCREASE = {
    "mlx": {"int8": 0.05, "low": 0.5},
    "onnxruntime": {"int8": 0.05, "low": 0.5},
}
HOLDOUT_TEXT = Path(__file__).parent / "calibration" / "holdout.txt"
EVAL_TEXT = "austen_prideprejudice.txt"


@dataclass
class EvalResult:
    """Figures of one candidate against one reference on one token list."""

    tokens: int  # positions scored
    window: int
    stride: int
    perplexity: float  # the candidate's
    reference_perplexity: float | None = None
    ppl_increase: float | None = None  # candidate / reference - 1
    top1_agreement: float | None = None  # share of equal argmax
    kl_mean: float | None = None  # mean KL(reference || candidate), nats
    kl_p95: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Plain figures, rounded for a manifest or --json."""
        out = {}
        for k, v in asdict(self).items():
            out[k] = round(v, 6) if isinstance(v, float) else v
        return out


def source_tokenizer(source):
    """The model's tokenizer (edgeq_targets' TextCodec) from its files."""
    from edgeq_targets.common.engine import TextCodec

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in source.tokenizer_files.items():
            (Path(tmp) / name).write_bytes(data)
        return TextCodec(Path(tmp))


class FloatReference:
    """The source model in float32 (numpy), for comparisons."""

    name = "float"

    def __init__(self, source, max_positions: int = 4096):
        from edgeq.reference import ReferenceModel

        self.source = source
        self.model = ReferenceModel(source, max_positions=max_positions)
        self.tokenizer = source_tokenizer(source)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Float32 logits [len(ids), vocab] of the whole sequence."""
        return self.model.forward(list(ids)).astype(np.float32)


def float_reference(source, max_positions: int = 4096) -> FloatReference:
    """The float model built from the source tensors: `.logits(ids)` and
    `.tokenizer`, like the engines that run artifacts."""
    return FloatReference(source, max_positions)


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) for each window over n tokens: the
    logits at position i predict token i + 1, so a window scores targets
    first..end-1 from its positions first-1..end-2."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(
            f"need window >= 2 and 0 < stride <= window, got {window}, {stride}"
        )
    out, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + window, n)
        if end - begin >= 2:
            out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
        if end == n:
            break
    return out


def evaluate(
    candidate, ids: list[int], reference=None, window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
) -> EvalResult:  # fmt: skip
    """Perplexity of `candidate` on ids; with a reference also its
    perplexity, top-1 agreement and KL(reference || candidate)."""
    start = time.perf_counter()
    nll_c = nll_r = 0.0
    kls, agree, n = [], 0, 0
    for begin, end, first in sliding_windows(len(ids), window, stride):
        chunk = list(ids[begin:end])
        rows = slice(first - begin - 1, end - begin - 1)
        targets = np.asarray(chunk[first - begin :])
        lc = log_softmax(candidate.logits(chunk)[rows])
        at = np.arange(len(targets))
        nll_c -= float(lc[at, targets].sum())
        n += len(targets)
        if reference is not None:
            lr = log_softmax(reference.logits(chunk)[rows])
            nll_r -= float(lr[at, targets].sum())
            kls.append(np.sum(np.exp(lr) * (lr - lc), axis=-1))
            agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
    if n == 0:
        raise ValueError("no tokens to score: the text is shorter than two tokens")
    result = EvalResult(n, window, stride, math.exp(nll_c / n))
    if reference is not None:
        kl = np.concatenate(kls)
        result.reference_perplexity = math.exp(nll_r / n)
        result.ppl_increase = result.perplexity / result.reference_perplexity - 1
        result.top1_agreement = agree / n
        result.kl_mean = float(kl.mean())
        result.kl_p95 = float(np.percentile(kl, 95))
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities in float64 along the last axis."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# -- the quality gate --------------------------------------------------------


def quality_gate(
    candidate, reference, max_ppl_increase: float, ids: list[int] | None = None,
    target: str = "", hint: str = "",
) -> dict:  # fmt: skip
    """Measure `candidate` against `reference` on `ids` (default: the first
    GATE_TOKENS tokens of the shipped hold-out text) and raise
    QualityGateError, with the figures and `hint` (what to try), when
    perplexity rose by more than `max_ppl_increase` (0.25 = 25%). Returns
    the figures."""
    if ids is None:
        ids = gate_ids(reference.tokenizer)
    r = evaluate(candidate, ids, reference, window=len(ids), stride=len(ids))
    figures = {
        "quality_gate": "passed",
        "gate_text": f"edgeq/calibration/{HOLDOUT_TEXT.name}",
        "max_ppl_increase": max_ppl_increase,
        **{k: v for k, v in r.to_dict().items() if k not in ("window", "stride")},
    }
    if r.ppl_increase > max_ppl_increase:
        raise QualityGateError(_gate_message(r, max_ppl_increase, target, hint))
    log.info("quality gate passed: perplexity %+.1f%%", 100 * r.ppl_increase)
    return figures


def _gate_message(r: EvalResult, limit: float, target: str, hint: str) -> str:
    where = f" the {target} target" if target else ""
    hint = hint or "keep more bits (--bits 8, or a higher --target-bpw)"
    return (
        f"quality gate: perplexity rose {r.ppl_increase:.1%} over the float model "
        f"({r.reference_perplexity:.2f} -> {r.perplexity:.2f} on {r.tokens} tokens "
        f"of shipped text; top-1 agreement {r.top1_agreement:.1%}, KL "
        f"{r.kl_mean:.3f} nats), more than the {limit:.0%}{where} allows; {hint}, "
        f"or accept it with --max-ppl-increase "
        f"{math.ceil(r.ppl_increase * 100 + 1) / 100:g}"
    )


def gate_hint(plan) -> str:
    """What to try when a plan fails the gate."""
    quantized = [t for t in plan.tensors if t.quantized]
    if plan.target == "onnxruntime" and any(
        t.bits == 8 and t.group_size is None for t in quantized
    ):
        return (
            "store INT8 as 8-bit blocks of 32 (the default plan: drop --bits 8) "
            "or keep sensitive tensors in 16-bit (--override 'lm_head.weight=16')"
        )
    if any(t.bits < 8 for t in quantized):
        return "keep more bits (--bits 8, or a higher --target-bpw)"
    return "keep sensitive tensors in 16-bit (--override 'lm_head.weight=16')"


def gate_ids(tokenizer, tokens: int = GATE_TOKENS) -> list[int]:
    """The first `tokens` ids of the shipped hold-out text."""
    ids = tokenizer.encode(HOLDOUT_TEXT.read_text(encoding="utf-8"))
    return ids[:tokens]


def default_max_ppl_increase(plan) -> float:
    """The gate's limit for a plan when the user gives none (see
    DEFAULT_MAX_PPL_INCREASE)."""
    limits = DEFAULT_MAX_PPL_INCREASE.get(plan.target, {"int8": 0.05, "low": 0.5})
    quantized = [t.bits for t in plan.tensors if t.quantized]
    return limits["int8"] if min(quantized, default=16) >= 8 else limits["low"]


def run_quality_gate(
    artifact_dir: Path, source, plan, max_ppl_increase: float | None
) -> dict:
    """Deploy's gate: load the built artifact with its own engine, compare
    it with the float source on the hold-out text, return the figures for
    the manifest's "measured" or raise QualityGateError."""
    limit = (
        default_max_ppl_increase(plan)
        if max_ppl_increase is None
        else float(max_ppl_increase)
    )
    engine = load_artifact(artifact_dir, plan.target)
    reference = float_reference(source, max_positions=GATE_TOKENS + 8)
    return quality_gate(
        engine, reference, limit, target=plan.target, hint=gate_hint(plan)
    )


def load_artifact(folder: Path, target: str | None = None):
    """The artifact's engine; `target` when the manifest is not written yet."""
    from edgeq_targets.common.engine import ArtifactCorrupt, load_engine

    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    if target is None and not (folder / "manifest.json").exists():
        raise ArtifactError(
            f"{folder}: no manifest.json; is this an artifact built by edgeq deploy?"
        )
    try:
        return load_engine(folder, target=target, verify=target is None)
    except ArtifactCorrupt as e:  # a file does not match the manifest
        raise ArtifactError(str(e)) from None


class SimulatedPlan(FloatReference):
    """The float reference with every planned tensor replaced by its
    quantize-dequantize image (edgeq.quant, bit-exact with MLX's affine
    rule and ONNX Runtime's block layout): what an artifact built from the
    plan computes, up to the runtime's float16/bfloat16 arithmetic. Fast
    enough to compare plans where a target's runtime is slow here."""

    name = "simulated"

    def __init__(self, source, plan, max_positions: int = 4096):
        from edgeq.quant import fake_quantize
        from edgeq.sensitivity import set_weight

        super().__init__(source, max_positions)
        for t in plan.tensors:
            if t.quantized:
                w = self.model.w[t.name]
                image = fake_quantize(w, t.bits, t.group_size, t.scheme)
                set_weight(self.model, t.name, image)


# -- `edgeq eval` ------------------------------------------------------------


def default_eval_text() -> Path:
    """The project's evaluation text: $EDGEQ_EVAL_TEXT, else Pride and
    Prejudice from ../shared/text beside the repository, else the shipped
    hold-out text (an installed edgeq has no ../shared)."""
    env = os.environ.get("EDGEQ_EVAL_TEXT")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[2] / "shared" / "text" / EVAL_TEXT
    return shared if shared.exists() else HOLDOUT_TEXT


def read_text(path: Path, flag: str = "--text") -> str:
    """The UTF-8 text at `path`, or ArtifactError naming the flag."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{flag} {path}: file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ArtifactError(f"{flag} {path}: not a UTF-8 text file ({e})") from None


def evaluate_artifact(
    artifact: Path, text: Path | None = None, source: str | None = None,
    max_tokens: int = 1024, window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
) -> dict:  # fmt: skip
    """`edgeq eval`: the artifact's perplexity on the text (sliding window),
    and against its float source (the manifest's model.source unless
    `source` is given) perplexity increase, top-1 agreement and KL."""
    from edgeq.models import open_model

    text_path = Path(text) if text else default_eval_text()
    body = read_text(text_path)
    engine = load_artifact(artifact)
    manifest = getattr(engine, "manifest", {}) or {}
    source_ref = source or manifest.get("model", {}).get("source")
    ids = engine.tokenizer.encode(body)[:max_tokens]
    reference = None
    if source_ref:
        reference = float_reference(open_model(source_ref), window + 8)
    else:
        log.warning("no source model: perplexity only (pass --source)")
    result = evaluate(engine, ids, reference, window, stride)
    return {
        "artifact": str(artifact),
        "target": manifest.get("target"),
        "text": str(text_path),
        "source": source_ref,
        **result.to_dict(),
    }
