"""What every loader hands to the planner and the targets.

A `ModelSource` has a config, a tokenizer (as files), and tensors under their
Hugging Face names in Hugging Face layout (Linear weights are [out, in]),
read one at a time as float32. No loader ever materialises the whole model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import ModelError
from edgeq.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    source_dtype: str  # as stored in the source: F32, BF16, Q4_1, Q4_K, ...

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class ModelSource:
    """Base class of the loaders. Subclasses fill `config`, `_infos`,
    `tokenizer_files` and implement `_read`."""

    format: str = "?"

    def __init__(self, path: Path, name: str):
        self.path = Path(path)
        self.name = name
        self.config: ModelConfig
        self.tokenizer_files: dict[str, bytes] = {}
        self._infos: dict[str, TensorInfo] = {}
        self.source_sha256: str = ""

    # -- tensors -------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` as float32 in Hugging Face layout; `rows` limits the
        read to a slice of the first axis (for large embedding tables)."""
        if name not in self._infos:
            raise KeyError(name)
        arr = self._read(name, rows)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            nan = int(np.isnan(arr).sum())
            inf = int(np.isinf(arr).sum())
            raise ModelError(
                f"{self.path}: tensor '{name}' has {nan} NaN and {inf} infinite "
                "values; the checkpoint is corrupt or was saved after training "
                "diverged: download it again or use an earlier checkpoint"
            )
        return arr

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._infos:
            yield name, self.read(name)

    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        """Read one tensor; every loader (HFFolder, GGUFModel) overrides it."""
        raise TypeError(f"{type(self).__name__} does not implement _read")

    # -- summary -------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": str(self.path),
            "format": self.format,
            "source_sha256": self.source_sha256,
            "architecture": self.config.architecture,
            "parameters": self.num_parameters,
        }


# Names a llama-family checkpoint may hold, per layer, in HF layout.
_LAYER = r"model\.layers\.(\d+)\."
_KNOWN = [
    re.compile(p)
    for p in (
        r"model\.embed_tokens\.weight",
        r"model\.norm\.weight",
        r"lm_head\.weight",
        _LAYER + r"self_attn\.[qkvo]_proj\.(weight|bias)",
        _LAYER + r"self_attn\.[qk]_norm\.weight",
        _LAYER + r"mlp\.(gate|up|down)_proj\.weight",
        _LAYER + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
        r"|post_feedforward_layernorm)\.weight",
    )
]


def check_tensor_set(src: ModelSource, tie: bool | None = None) -> None:
    """Every tensor the architecture needs is there with the right shape, and
    nothing unexplained is; settles tied embeddings (case C01). `tie` is the
    user's explicit choice (--tie-embeddings / --untie-embeddings)."""
    cfg = src.config
    # Each layer holds at least 9 tensors; a config claiming more layers
    # than the file can hold is refused before listing them all.
    if cfg.num_layers > len(src._infos):
        raise ModelError(
            f"{src.path}: config says {cfg.num_layers} layers but the checkpoint "
            f"holds only {len(src._infos)} tensors; config and weights do not "
            "belong together"
        )
    has_head = "lm_head.weight" in src._infos
    if tie is True:
        cfg.tie_word_embeddings = True
    elif tie is False and has_head:
        cfg.tie_word_embeddings = False
    expected = expected_shapes(cfg)
    if cfg.tie_word_embeddings and has_head:
        _drop_tied_copy(src)
    elif not cfg.tie_word_embeddings and not has_head:
        raise ModelError(
            f"{src.path}: config says tie_word_embeddings is false but the "
            "checkpoint has no 'lm_head.weight'; pass --tie-embeddings to reuse "
            "model.embed_tokens.weight as the output head, or fix the checkpoint"
        )
    missing = [n for n in expected if n not in src._infos]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(
            f"{src.path}: missing tensors {', '.join(missing[:3])}{more}; "
            "the download may be incomplete"
        )
    for name, shape in expected.items():
        got = src._infos[name].shape
        if tuple(got) != tuple(shape):
            raise ModelError(
                f"{src.path}: tensor '{name}' has shape {list(got)}, config.json "
                f"implies {list(shape)}; config and weights do not belong together"
            )
    unknown = [n for n in src._infos if n not in expected]
    for n in unknown:
        if "rotary_emb.inv_freq" in n:
            del src._infos[n]
            continue
        raise ModelError(
            f"{src.path}: unexpected tensor '{n}' for architecture "
            f"'{cfg.architecture}'; this model is not a plain {cfg.architecture}"
        )


def _drop_tied_copy(src: ModelSource) -> None:
    emb, head = src.info("model.embed_tokens.weight"), src.info("lm_head.weight")
    same = emb.shape == head.shape and np.array_equal(
        src.read("model.embed_tokens.weight", rows=slice(0, 64)),
        src.read("lm_head.weight", rows=slice(0, 64)),
    )
    if same:
        same = np.array_equal(
            src.read("model.embed_tokens.weight"), src.read("lm_head.weight")
        )
    if not same:
        raise ModelError(
            f"{src.path}: config says tie_word_embeddings is true but "
            "'lm_head.weight' differs from 'model.embed_tokens.weight'; pass "
            "--untie-embeddings to keep both, or fix config.json"
        )
    log.info("dropped lm_head.weight: an identical copy of the tied embedding")
    del src._infos["lm_head.weight"]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the architecture uses, with its HF shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, ffn = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (ffn, h),
                p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn),
            }
        )
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (d,)
            out[p + "self_attn.k_norm.weight"] = (d,)
        if cfg.is_gemma:
            out[p + "pre_feedforward_layernorm.weight"] = (h,)
            out[p + "post_feedforward_layernorm.weight"] = (h,)
    return out
