"""One description of a decoder's shape, whatever file it came from.

Both loaders (Hugging Face folder, GGUF file) produce a `ModelConfig`; the
planner, both targets and the runners read only this. `to_hf_config()` writes
it back as the config.json that mlx-lm and transformers expect.
"""

from __future__ import annotations

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
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return
    if kind not in ROPE_SCALING_TYPES:
        raise ModelError(
            f"{where}: rope_scaling type '{kind}' is not supported; edgeq "
            f"implements {', '.join(ROPE_SCALING_TYPES)}"
        )
    if "factor" not in scaling:
        raise ModelError(f"{where}: rope_scaling '{kind}' has no 'factor'")


def config_from_hf(raw: dict, where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict."""
    if raw.get("model_type") == "gemma3" and "text_config" in raw:
        raw = {**raw["text_config"], "model_type": "gemma3_text"}
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"{where}: model_type '{model_type}' is not supported; edgeq "
            f"handles {', '.join(sorted(ARCHITECTURES))}"
        )
    arch = ARCHITECTURES[model_type]

    def need(key):
        if key not in raw:
            raise ModelError(f"{where}: missing field '{key}'")
        return raw[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    rope_theta = raw.get("rope_theta")
    rope_scaling = raw.get("rope_scaling")
    # transformers 5 moved RoPE settings into rope_parameters.
    params = raw.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = params.get("rope_theta", 1e6 if arch == "gemma3" else 10000.0)
    if rope_scaling is None and params.get("rope_type") not in (None, "default"):
        rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    check_rope_scaling(rope_scaling, where)
    eos = raw.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    tied_default = arch in ("gemma3",) or model_type == "qwen3"
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        intermediate_size=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", tied_default)),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        qk_norm=arch in ("qwen3", "gemma3"),
        hidden_act=raw.get("hidden_activation")
        or raw.get("hidden_act")
        or ("gelu_pytorch_tanh" if arch == "gemma3" else "silu"),
        sliding_window=raw.get("sliding_window") if arch == "gemma3" else None,
        sliding_window_pattern=raw.get("sliding_window_pattern", 6)
        if arch == "gemma3"
        else None,
        rope_local_base_freq=raw.get("rope_local_base_freq", 10000.0)
        if arch == "gemma3"
        else None,
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar")
        if arch == "gemma3"
        else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
