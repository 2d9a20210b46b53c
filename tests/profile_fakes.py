"""A fake engine on a controlled clock, for the profiler's arithmetic tests.

Each run costs `prefill_s` per prompt token until the first token, then
`decode_s` per further token; the first run costs `first_run_extra_s` more,
as a real runtime's first run does.
"""

from __future__ import annotations

from pathlib import Path

from edgeq_targets.common.engine import Token


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class WordCodec:
    """One token per word: easy to count."""

    def __init__(self):
        self.eos_ids: set[int] = set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


class FakeEngine:
    name = "fake"

    def __init__(self, clock, prefill_s=0.01, decode_s=0.05, first_run_extra_s=1.0):
        self.clock = clock
        self.prefill_s = prefill_s
        self.decode_s = decode_s
        self.first_run_extra_s = first_run_extra_s
        self.tokenizer = WordCodec()
        self.artifact = Path("/fake/artifact")
        self.load_seconds = 0.25
        self.calls: list[tuple[int, int]] = []  # (prompt tokens, max_tokens)

    def generate(self, ids, cfg):
        self.calls.append((len(ids), cfg.max_tokens))
        extra = self.first_run_extra_s if len(self.calls) == 1 else 0.0
        return self._tokens(len(ids), cfg.max_tokens, extra)

    def _tokens(self, n_prompt: int, n_gen: int, extra: float):
        for i in range(n_gen):
            step = n_prompt * self.prefill_s + extra if i == 0 else self.decode_s
            t = self.clock.advance(step)
            yield Token(i, "x", t, "length" if i == n_gen - 1 else None)


def fake_manifest(context_length: int = 4096, trained: int = 8192) -> dict:
    """A manifest with the plan fields the profiler reads."""
    return {
        "artifact_id": "0123456789abcdef",
        "target": "mlx",
        "model": {"name": "fake-model", "parameters": 1000},
        "device": {
            "name": "macbook-air-m2-16gb",
            "profile": {"name": "macbook-air-m2-16gb", "bandwidth_gbs": 100.0},
        },
        "edgeq_version": "0.1.0",
        "plan": {
            "device": "macbook-air-m2-16gb",
            "defaults": {"bits": 4, "group_size": 64, "scheme": "affine"},
            "runtime": {"context_length": context_length, "kv_cache_bits": 16},
            "model": {"config": {"max_position_embeddings": trained}},
            "predictions": {
                "bits_per_weight": 4.5,
                "weights_bytes": 1_000_000,
                "kv_cache_bytes": 1000 * context_length,
                "decode_bytes_per_token": 1_000_000,
                "decode_efficiency": 0.5,
                "decode_tokens_per_s": 50_000.0,
                "peak_memory_bytes": 500_000_000,
            },
        },
    }


FAKE_ENV = {
    "cpu_model": "fake cpu",
    "cpu_flags": ["avx2"],
    "threads": None,
    "runtime": {"name": "mlx", "versions": {}},
    "edgeq_version": None,
    "device": {"name": "fake-device"},
}
