"""MLX engine: runs an MLX artifact with mlx-lm's model code and KV cache.

Needs only mlx-lm (and what it brings) on the device.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from edgeq_targets.common.engine import (
    GenerationConfig,
    GenerationStats,
    TextCodec,
    run_generation,
)


class MLXEngine:
    name = "mlx"

    def __init__(self, artifact: Path, manifest: dict, threads: int | None = None):
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self.artifact = Path(artifact)
        self.manifest = manifest
        start = time.perf_counter()
        self.model, _ = load_model(self.artifact)
        if not _has_gpu():
            _upcast_for_cpu(self.model)
        mx.eval(self.model.parameters())
        self.tokenizer = TextCodec(self.artifact)
        self.load_seconds = time.perf_counter() - start
        self.last_stats = GenerationStats()
        self.threads = threads  # MLX picks its own CPU threads

    def encode_prompt(self, prompt, chat: bool | None = None) -> list[int]:
        return self.tokenizer.encode_prompt(prompt, chat)

    def logits(self, ids: list[int], cache=None) -> np.ndarray:
        """Float32 logits [len(ids), vocab] for a whole sequence (evaluation)."""
        import mlx.core as mx

        out = self.model(mx.array([ids]), cache=cache)
        return np.array(out[0].astype(mx.float32))

    def new_cache(self):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def generate(self, ids: list[int], cfg: GenerationConfig):
        import mlx.core as mx

        cache = self.new_cache()

        def step(new_ids, first):
            out = self.model(mx.array([new_ids]), cache=cache)
            last = out[0, -1].astype(mx.float32)
            mx.eval(last)
            return np.array(last)

        return run_generation(self, ids, cfg, step)

    def peak_memory_bytes(self) -> int | None:
        """MLX's own allocator peak (not the OS figure)."""
        import mlx.core as mx

        try:
            return int(mx.get_peak_memory())
        except AttributeError:
            return None


def _has_gpu() -> bool:
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except AttributeError:
        return False


def _upcast_for_cpu(model) -> None:
    """MLX's CPU kernels for float16/bfloat16 quantized matmul are ~30x slower
    than float32 (measured: 1536x576 4-bit, 27 ms vs 0.8 ms). Without a GPU,
    run the stored 16-bit scales and weights in float32: the same values,
    exactly, at CPU speed. Packed 4-bit weights are untouched."""
    import mlx.core as mx
    from mlx.utils import tree_map

    def up(p):
        return p.astype(mx.float32) if p.dtype in (mx.float16, mx.bfloat16) else p

    model.update(tree_map(up, model.parameters()))
