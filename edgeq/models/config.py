"""One description of a decoder's shape, whatever file it came from.

Both loaders (Hugging Face folder, GGUF file) produce a `ModelConfig`; the
planner, both targets and the runners read only this. `to_hf_config()` writes
it back as the config.json that mlx-lm and transformers expect.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from edgeq.errors import ModelError

# model_type in config.json -> edgeq architecture name.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

# The MLP activation each architecture's targets implement.
ACTIVATIONS = {
    "llama": "silu",
    "mistral": "silu",
    "qwen2": "silu",
    "qwen3": "silu",
    "gemma3": "gelu_pytorch_tanh",
}

# RoPE scaling variants the builders implement; anything else is refused.
ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Shape and numerics of a llama-family decoder, in Hugging Face terms."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    # Gemma 3: local layers use a sliding window and their own RoPE base;
    # every `sliding_window_pattern`-th layer is global.
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        for key in _POSITIVE_INTS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"{key} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            # RoPE rotates pairs of channels; an odd head is a corrupt config.
            raise ModelError(f"head_dim {self.head_dim} must be even")
        if self.architecture not in ARCHITECTURES.values():
            raise ModelError(
                f"architecture '{self.architecture}' is not supported; "
                f"edgeq handles {', '.join(sorted(set(ARCHITECTURES.values())))}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        check_rope_scaling(self.rope_scaling)

    @property
    def is_gemma(self) -> bool:
        return self.architecture == "gemma3"

    def layer_is_sliding(self, layer: int) -> bool:
        """True for Gemma 3's local (sliding-window) layers."""
        if not self.sliding_window_pattern:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_hf_config(self) -> dict:
        """config.json as transformers / mlx-lm read it."""
        model_type = "gemma3_text" if self.is_gemma else self.architecture
        cfg = {
            "architectures": [_HF_CLASS[self.architecture]],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            # mlx-lm reads rope_theta at the top level only (see models/README).
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "torch_dtype": "float16",
        }
        if self.architecture in ("llama", "qwen3"):
            cfg["attention_bias"] = self.attention_bias
        if self.is_gemma:
            cfg.update(
                sliding_window=self.sliding_window,
                sliding_window_pattern=self.sliding_window_pattern,
                rope_local_base_freq=self.rope_local_base_freq,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                hidden_activation=self.hidden_act,
            )
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            eos = self.eos_token_ids
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return cfg


# Fields every loader must fill with a positive integer.
_POSITIVE_INTS = (
    "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings",
)  # fmt: skip

_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


def check_rope_scaling(scaling: dict | None, where: str = "config.json") -> None:
    """Refuse RoPE scaling variants no target implements, by name."""
    if not scaling:
        return
    if not isinstance(scaling, dict):
        raise ModelError(f"{where}: rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return
    if kind not in ROPE_SCALING_TYPES:
        raise ModelError(
            f"{where}: rope_scaling type '{kind}' is not supported; edgeq "
            f"implements {', '.join(ROPE_SCALING_TYPES)}"
        )
    factor = scaling.get("factor")
    if not _is_number(factor) or factor <= 0:
        raise ModelError(
            f"{where}: rope_scaling '{kind}' needs a positive 'factor', got {factor!r}"
        )


def _is_number(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Fields:
    """Typed reads of config.json fields; a wrong type or range is one
    ModelError naming the file and the field."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def fail(self, key: str, expected: str):
        value = repr(self.raw.get(key))
        value = value if len(value) <= 60 else value[:57] + "..."
        raise ModelError(f"{self.where}: field '{key}' must be {expected}, got {value}")

    def int(self, key: str, default: int | None = None) -> int:
        value = self.raw.get(key)
        if value is None and default is not None:
            return default
        if key not in self.raw:
            raise ModelError(f"{self.where}: missing field '{key}'")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(key, "a positive integer")
        return value

    def optional_int(self, key: str) -> int | None:
        return None if self.raw.get(key) is None else self.int(key)

    def number(self, key: str, default: float | None) -> float | None:
        value = self.raw.get(key)
        if value is None:
            return None if default is None else float(default)
        if not _is_number(value) or value <= 0:
            self.fail(key, "a positive number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, "true or false")
        return value

    def token_ids(self, key: str) -> list[int]:
        value = self.raw.get(key)
        ids = [] if value is None else ([value] if isinstance(value, int) else value)
        if not isinstance(ids, list) or not all(_is_token_id(i) for i in ids):
            self.fail(key, "a token id or a list of them (integers >= 0)")
        return ids


def config_from_hf(raw: dict, where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict."""
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") == "gemma3" and isinstance(raw.get("text_config"), dict):
        raw = {**raw["text_config"], "model_type": "gemma3_text"}
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not supported; edgeq "
            f"handles {', '.join(sorted(ARCHITECTURES))}"
        )
    arch = ARCHITECTURES[model_type]
    gemma = arch == "gemma3"
    f = _Fields(raw, where)

    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads")
    # transformers 5 moved RoPE settings into rope_parameters.
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        f.fail("rope_parameters", "an object")
    if raw.get("rope_theta") is None and "rope_theta" in params:
        f = _Fields({**raw, "rope_theta": params["rope_theta"]}, where)
    rope_scaling = raw.get("rope_scaling")
    if rope_scaling is None and params.get("rope_type") not in (None, "default"):
        rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    check_rope_scaling(rope_scaling, where)
    act = raw.get("hidden_activation") or raw.get("hidden_act") or ACTIVATIONS[arch]
    if act != ACTIVATIONS[arch]:
        # Each target implements one activation per architecture; another
        # would run, silently wrong.
        raise ModelError(
            f"{where}: hidden_act {act!r} is not supported for {arch}; edgeq "
            f"implements '{ACTIVATIONS[arch]}'"
        )
    bos = f.token_ids("bos_token_id")
    fields = {
        "architecture": arch,
        "hidden_size": hidden,
        "num_layers": f.int("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": f.int("num_key_value_heads", heads),
        "head_dim": f.int("head_dim", max(1, hidden // heads)),
        "intermediate_size": f.int("intermediate_size"),
        "vocab_size": f.int("vocab_size"),
        "rms_norm_eps": f.number("rms_norm_eps", 1e-6),
        "rope_theta": f.number("rope_theta", 1e6 if gemma else 10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": f.int("max_position_embeddings", 2048),
        "tie_word_embeddings": f.flag(
            "tie_word_embeddings", gemma or model_type == "qwen3"
        ),
        "attention_bias": f.flag("attention_bias", arch == "qwen2"),
        "qk_norm": arch in ("qwen3", "gemma3"),
        "hidden_act": act,
        "sliding_window": f.optional_int("sliding_window") if gemma else None,
        "sliding_window_pattern": f.int("sliding_window_pattern", 6) if gemma else None,
        "rope_local_base_freq": f.number("rope_local_base_freq", 10000.0)
        if gemma
        else None,
        "query_pre_attn_scalar": f.number("query_pre_attn_scalar", None)
        if gemma
        else None,
        "bos_token_id": bos[0] if bos else None,
        "eos_token_ids": f.token_ids("eos_token_id"),
    }
    # ModelConfig checks what no single field shows (head counts, parity).
    try:
        return ModelConfig(**fields)
    except ModelError as e:
        raise ModelError(f"{where}: {e}") from None
