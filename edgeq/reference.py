"""An independent numpy forward pass of every decoder edgeq accepts.

Written from the papers and Hugging Face transformers' semantics, not from
either target's code, so that both targets can be checked against it:

- RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w; Gemma
  stores w so that the scale is (1 + w).
- RoPE (Su et al. 2021) in the "rotate half" layout HF uses: the first and
  second halves of each head form the (x, y) pairs. Scaling variants: linear
  (positions / factor), llama3 (Llama 3.1's band-wise frequency scaling) and
  YaRN (Peng et al. 2023, with its attention factor folded into cos/sin).
- Grouped-query attention (Ainslie et al. 2023): each KV head serves
  num_heads / num_kv_heads query heads; causal mask, and for Gemma 3's local
  layers a sliding window where query i sees keys j with i - j < window.
- Gated MLP: down(act(gate(x)) * up(x)), act = SiLU or tanh-approximated GELU.
- Gemma 3: embeddings scaled by sqrt(hidden), per-head q/k RMSNorm, norms
  after attention and around the MLP, scores scaled by
  query_pre_attn_scalar^-0.5, local layers on their own RoPE base.
- Qwen2: q/k/v biases. Qwen3: per-head q/k RMSNorm (plain w).

All arithmetic is float32 except softmax and norm statistics (float64), so
the reference is at least as accurate as what it checks. It holds the whole
model in float32: a test tool for small models, not a runtime.
"""

from __future__ import annotations

import math

import numpy as np

from edgeq.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, base: float, scaled: bool = True):
    """Inverse frequencies [head_dim/2] and the attention factor that
    multiplies cos and sin (1.0 except for YaRN)."""
    dim = cfg.head_dim
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if not scaled or kind in (None, "default"):
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv, factor, scaling, cfg), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(inv, factor, scaling, cfg, base)
    raise ValueError(f"rope_scaling type '{kind}' is not implemented")


def _llama3_inv_freq(inv, factor, s, cfg):
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    # Long wavelengths are interpolated, short ones kept, the band between
    # blended linearly in 1 / wavelength.
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old_ctx / low, inv / factor, blended)
    return np.where(wavelen < old_ctx / high, inv, out)


def _yarn_inv_freq(inv, factor, s, cfg, base):
    dim = cfg.head_dim
    old_ctx = s.get("original_max_position_embeddings") or (cfg.max_position_embeddings)
    beta_fast = s.get("beta_fast") or 32.0
    beta_slow = s.get("beta_slow") or 1.0

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = (
            mscale(factor, m) / mscale(factor, m_all)
            if m and m_all
            else (mscale(factor))
        )

    def corr_dim(rotations):
        return (
            dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency
    return inv / factor * (1 - extrapolate) + inv * extrapolate, float(attn)


def rope_tables(cfg: ModelConfig, base: float, length: int, scaled: bool = True):
    """cos and sin [length, head_dim/2] as float32 (attention factor folded in)."""
    inv, attn = rope_inv_freq(cfg, base, scaled)
    angles = np.outer(np.arange(length, dtype=np.float64), inv)
    return (
        (np.cos(angles) * attn).astype(np.float32),
        (np.sin(angles) * attn).astype(np.float32),
    )


def layer_rope_base(cfg: ModelConfig, layer: int) -> tuple[float, bool]:
    """RoPE base of a layer and whether the config's scaling applies to it
    (Gemma 3's local layers use rope_local_base_freq, unscaled)."""
    if cfg.is_gemma and cfg.layer_is_sliding(layer):
        return float(cfg.rope_local_base_freq or 10000.0), False
    return float(cfg.rope_theta), True


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, plus_one: bool) -> np.ndarray:
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    scale = (1.0 + w.astype(np.float64)) if plus_one else w
    return (y * scale).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, S, D]; cos/sin [S, D/2]. Rotate-half layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    inner = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)
    return (0.5 * x64 * (1 + np.tanh(inner))).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / (1 + np.exp(-x64))).astype(np.float32)


class ReferenceModel:
    """The float32 model, evaluated with an explicit KV cache.

    cache: a list with one (keys, values) pair per layer, each
    [num_kv_heads, P, head_dim]; `new_cache()` makes an empty one.
    """

    def __init__(self, source, max_positions: int = 4096):
        self.cfg = cfg = source.config
        self.w = {name: source.read(name) for name in source.tensor_names()}
        # Projections kept as [in, out] so x @ W is a plain BLAS call (a
        # transposed view made numpy copy the matrix on every call).
        self.wt = {
            n: np.ascontiguousarray(w.T)
            for n, w in self.w.items()
            if w.ndim == 2 and n.startswith("model.layers.")
        }
        self.head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        self.rope = {}
        for layer in range(cfg.num_layers):
            key = layer_rope_base(cfg, layer)
            if key not in self.rope:
                self.rope[key] = rope_tables(cfg, key[0], max_positions, key[1])

    def new_cache(self) -> list:
        c = self.cfg
        empty = np.zeros((c.num_kv_heads, 0, c.head_dim), np.float32)
        return [(empty, empty) for _ in range(c.num_layers)]

    def forward(self, ids, cache: list | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] for ids appended after the cache (which is
        updated in place); no cache means an empty one."""
        cfg = self.cfg
        cache = self.new_cache() if cache is None else cache
        past = cache[0][0].shape[1]
        x = self.w["model.embed_tokens.weight"][np.asarray(ids)]
        if cfg.is_gemma:
            x = x * np.float32(math.sqrt(cfg.hidden_size))
        positions = np.arange(past, past + len(ids))
        for layer in range(cfg.num_layers):
            x = self._block(layer, x, positions, cache)
        x = rms_norm(x, self.w["model.norm.weight"], cfg.rms_norm_eps, cfg.is_gemma)
        return x @ self.head.T

    def _block(self, layer, x, positions, cache):
        cfg, p = self.cfg, f"model.layers.{layer}."
        eps, gemma = cfg.rms_norm_eps, cfg.is_gemma
        h = rms_norm(x, self.w[p + "input_layernorm.weight"], eps, gemma)
        h = self._attention(layer, h, positions, cache)
        if gemma:
            h = rms_norm(h, self.w[p + "post_attention_layernorm.weight"], eps, True)
            x = x + h
            h = rms_norm(x, self.w[p + "pre_feedforward_layernorm.weight"], eps, True)
            h = self._mlp(p, h)
            h = rms_norm(h, self.w[p + "post_feedforward_layernorm.weight"], eps, True)
            return x + h
        x = x + h
        h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], eps, False)
        return x + self._mlp(p, h)

    def _linear(self, name, x):
        y = x @ self.wt[name + ".weight"]
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _attention(self, layer, x, positions, cache):
        cfg, p = self.cfg, f"model.layers.{layer}.self_attn."
        S, D = x.shape[0], cfg.head_dim
        q = self._linear(p + "q_proj", x).reshape(S, cfg.num_heads, D)
        k = self._linear(p + "k_proj", x).reshape(S, cfg.num_kv_heads, D)
        v = self._linear(p + "v_proj", x).reshape(S, cfg.num_kv_heads, D)
        q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        if cfg.qk_norm:
            eps, gemma = cfg.rms_norm_eps, cfg.is_gemma
            q = rms_norm(q, self.w[p + "q_norm.weight"], eps, gemma)
            k = rms_norm(k, self.w[p + "k_norm.weight"], eps, gemma)
        cos, sin = self.rope[layer_rope_base(cfg, layer)]
        q = apply_rope(q, cos[positions], sin[positions])
        k = apply_rope(k, cos[positions], sin[positions])
        past_k, past_v = cache[layer]
        k = np.concatenate([past_k, k], axis=1)  # [kv_heads, T, D]
        v = np.concatenate([past_v, v], axis=1)
        cache[layer] = (k, v)
        out = self._scores_softmax_v(layer, q, k, v, positions)
        return self._linear(p + "o_proj", out.transpose(1, 0, 2).reshape(S, -1))

    def _scores_softmax_v(self, layer, q, k, v, positions):
        """q [H, S, D], k/v [KV, T, D] -> [H, S, D]."""
        cfg = self.cfg
        group = cfg.num_heads // cfg.num_kv_heads
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scalar = cfg.query_pre_attn_scalar if cfg.is_gemma else None
        scale = (scalar or cfg.head_dim) ** -0.5
        scores = (q.astype(np.float64) @ k.transpose(0, 2, 1)) * scale
        keys = np.arange(k.shape[1])
        allowed = keys[None, :] <= positions[:, None]
        if cfg.is_gemma and cfg.layer_is_sliding(layer) and cfg.sliding_window:
            allowed &= positions[:, None] - keys[None, :] < cfg.sliding_window
        scores = np.where(allowed[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        return (probs @ v).astype(np.float32)

    def _mlp(self, p, x):
        act = gelu_tanh if self.cfg.hidden_act.startswith("gelu") else silu
        gate = act(self._linear(p + "mlp.gate_proj", x))
        return self._linear(
            p + "mlp.down_proj", gate * self._linear(p + "mlp.up_proj", x)
        )

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n greedily generated tokens after ids, through the KV cache."""
        cache = self.new_cache()
        logits = self.forward(ids, cache)[-1]
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = self.forward([out[-1]], cache)[-1]
        return out


class RandomSource:
    """An in-memory model with random weights for a config: exercises every
    architecture's graph without a download. Implements the ModelSource
    reading interface (config, infos, tensor_names, info, read)."""

    format = "random"

    def __init__(self, cfg: ModelConfig, seed: int = 0, name: str = "random"):
        from edgeq.models.source import TensorInfo, expected_shapes

        self.config, self.name, self.path = cfg, name, name
        self.tokenizer_files: dict[str, bytes] = {}
        rng = np.random.default_rng(seed)
        self._arrays: dict[str, np.ndarray] = {}
        self._infos = {}
        for tname, shape in expected_shapes(cfg).items():
            self._arrays[tname] = self._init(rng, tname, shape)
            self._infos[tname] = TensorInfo(tname, tuple(shape), "F32")

    def _init(self, rng, name: str, shape) -> np.ndarray:
        if len(shape) == 1:
            # Norm scales near 1 (Gemma stores scale - 1); biases near 0.
            is_norm = "norm" in name
            centre = 1.0 if is_norm and not self.config.is_gemma else 0.0
            spread = 0.1 if is_norm else 0.02
            return (centre + spread * rng.standard_normal(shape)).astype(np.float32)
        scale = 1.0 if "embed" in name else 1.0 / math.sqrt(shape[1])
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def infos(self) -> list:
        return list(self._infos.values())

    def info(self, name: str):
        return self._infos[name]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        arr = self._arrays[name]
        return (arr if rows is None else arr[rows]).copy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": "random",
            "format": "random",
            "source_sha256": "",
            "architecture": self.config.architecture,
            "parameters": int(sum(a.size for a in self._arrays.values())),
        }

    @property
    def num_parameters(self) -> int:
        return self.describe()["parameters"]
