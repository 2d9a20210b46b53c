"""Quality of a quantized ONNX decoder against its float twin: perplexity,
top-1 agreement and KL divergence over fixed token windows.

A small helper for the backend's own tests and bench; edgeq.evaluate is the
general tool. Any object with `logits(ids) -> [len(ids), vocab]` works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Agreement:
    tokens: int  # predicted positions compared
    ppl_reference: float
    ppl_candidate: float
    top1_agreement: float  # share of positions with the same argmax
    kl_mean: float  # mean KL(reference || candidate), nats

    @property
    def ppl_increase(self) -> float:
        return self.ppl_candidate / self.ppl_reference - 1.0

    def to_dict(self) -> dict:
        return asdict(self) | {"ppl_increase": self.ppl_increase}


class CachedLogits:
    """Wraps an engine so each window's logits are computed once (the
    reference side of several comparisons)."""

    def __init__(self, engine):
        self.engine = engine
        self._memo: dict[tuple, np.ndarray] = {}

    def logits(self, ids: list[int]) -> np.ndarray:
        key = tuple(ids)
        if key not in self._memo:
            self._memo[key] = self.engine.logits(ids)
        return self._memo[key]


def token_windows(ids: list[int], window: int, count: int, bos: int | None = None):
    """`count` consecutive windows of `window` tokens from ids (each starting
    with bos when given, as a fresh document would)."""
    body = window - (1 if bos is not None else 0)
    out = []
    for i in range(count):
        chunk = ids[i * body : (i + 1) * body]
        if len(chunk) < body:
            break
        out.append(([bos] if bos is not None else []) + list(chunk))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference, candidate, windows: list[list[int]]) -> Agreement:
    """Score `candidate` against `reference` on each window (whole-sequence
    logits, no cache); both predict tokens 1.. of each window."""
    nll_r = nll_c = kl = 0.0
    agree = n = 0
    for ids in windows:
        lr = _log_softmax(reference.logits(ids)[:-1])
        lc = _log_softmax(candidate.logits(ids)[:-1])
        target = np.asarray(ids[1:])
        rows = np.arange(len(target))
        nll_r -= lr[rows, target].sum()
        nll_c -= lc[rows, target].sum()
        kl += (np.exp(lr) * (lr - lc)).sum()
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        n += len(target)
    return Agreement(
        tokens=n,
        ppl_reference=float(np.exp(nll_r / n)),
        ppl_candidate=float(np.exp(nll_c / n)),
        top1_agreement=agree / n,
        kl_mean=float(kl / n),
    )
