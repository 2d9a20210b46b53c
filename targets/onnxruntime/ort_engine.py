"""ONNX Runtime engine: runs an edgeq ONNX decoder with its KV cache.

Ships inside artifacts (runner/edgeq_targets/onnxruntime/); needs only
onnxruntime, numpy and tokenizers (jinja2 for chat templates).

The graph (see the artifact's model.onnx metadata) takes input_ids [1, S],
past_key_values.N.key/value [1, kv_heads, P, head_dim] and logits_to_keep
[1] (0 = every position), and returns logits plus present.N.key/value
[1, kv_heads, P + S, head_dim]; positions are P .. P + S - 1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from edgeq_targets.common.engine import (
    GenerationConfig,
    GenerationStats,
    TextCodec,
    run_generation,
)


def session_options(threads: int | None = None, spin: bool = False, profile: str = ""):
    """Session settings for a small CPU box: all graph optimizations, a fixed
    thread count, and no spinning between calls (spinning threads burn a
    core while the caller samples and detokenizes; measured in bench/)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or max(1, (os.cpu_count() or 2))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return so


class KVCache:
    """The per-layer present tensors of the last call, fed back as past.
    Values stay ONNX Runtime OrtValues between calls (no copy to numpy)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int):
        empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
        self.past = {}
        for i in range(layers):
            self.past[f"past_key_values.{i}.key"] = empty
            self.past[f"past_key_values.{i}.value"] = empty

    @property
    def length(self) -> int:
        first = next(iter(self.past.values()))
        shape = first.shape if isinstance(first, np.ndarray) else first.shape()
        return shape[2]


class ORTEngine:
    name = "onnxruntime"

    def __init__(
        self,
        artifact: Path,
        manifest: dict | None = None,
        threads: int | None = None,
        spin: bool = False,
        profile: str = "",
        model_file: str = "model.onnx",
    ):
        import onnxruntime as ort

        self.artifact = Path(artifact)
        self.manifest = manifest or {}
        self.threads = threads
        start = time.perf_counter()
        so = session_options(threads, spin, profile)
        self.session = ort.InferenceSession(
            str(self.artifact / model_file), so, providers=["CPUExecutionProvider"]
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = json.loads(meta.get("edgeq.config", "{}"))
        options = json.loads(meta.get("edgeq.options", "{}"))
        self.context_length = int(options.get("context_length", 0)) or None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._logits_at = self.output_names.index("logits")
        self._layers = sum(1 for n in self.output_names if n.endswith(".key"))
        past = self.session.get_inputs()[1]
        self._kv_heads, self._head_dim = past.shape[1], past.shape[3]
        self.tokenizer = (
            TextCodec(self.artifact)
            if (self.artifact / "tokenizer.json").is_file()
            else None
        )
        self.load_seconds = time.perf_counter() - start
        self.last_stats = GenerationStats()

    def encode_prompt(self, prompt, chat: bool | None = None) -> list[int]:
        return self.tokenizer.encode_prompt(prompt, chat)

    def new_cache(self) -> KVCache:
        return KVCache(self._layers, self._kv_heads, self._head_dim)

    def forward(self, ids, cache: KVCache, keep: int = 0) -> np.ndarray:
        """Run ids after the cache (updated in place); logits [n, vocab] for
        the last `keep` positions (0 = all)."""
        if self.context_length and cache.length + len(ids) > self.context_length:
            raise ValueError(
                f"sequence of {cache.length + len(ids)} tokens is longer than the "
                f"model's context of {self.context_length} (its RoPE tables)"
            )
        # IOBinding: presents come back as OrtValues and are bound as the
        # next call's past without a round trip through numpy.
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        binding.bind_cpu_input("logits_to_keep", np.array([keep], np.int64))
        for name, value in cache.past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        for name, value in zip(self.output_names, outs):
            if name.startswith("present."):
                cache.past["past_key_values." + name[len("present.") :]] = value
        return outs[self._logits_at].numpy()[0]

    def logits(self, ids: list[int], cache: KVCache | None = None) -> np.ndarray:
        """Float32 logits [len(ids), vocab] for a whole sequence (evaluation)."""
        return self.forward(ids, cache or self.new_cache(), keep=0)

    def generate(self, ids: list[int], cfg: GenerationConfig):
        cache = self.new_cache()

        def step(new_ids, first):
            return self.forward(new_ids, cache, keep=1)[-1]

        return run_generation(self, ids, cfg, step)

    def peak_memory_bytes(self) -> int | None:
        """Peak resident set size of this process (the OS figure; ONNX Runtime
        does not report its own arena peak on CPU)."""
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)
        except (ImportError, AttributeError):
            return None
