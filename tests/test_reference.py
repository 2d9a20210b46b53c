"""The numpy reference decoder (edgeq.reference) against published outputs
and against mlx-lm's model code, for every architecture edgeq accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeq.models.config import ModelConfig
from edgeq.reference import RandomSource, ReferenceModel, rope_inv_freq

STORIES = Path(__file__).parents[2] / "shared/models/stories260K.gguf"
ONCE = (
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the park. One day, she saw a big, red ball. She wanted to play "
    "with it, but it was too high."
)

BASE = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}
GEMMA = {
    "architecture": "gemma3",
    "qk_norm": True,
    "hidden_act": "gelu_pytorch_tanh",
    "sliding_window": 4,
    "sliding_window_pattern": 2,
    "rope_local_base_freq": 10000.0,
    "rope_theta": 1e6,
    "query_pre_attn_scalar": 24.0,
    "tie_word_embeddings": True,
    "num_layers": 3,
    "rms_norm_eps": 1e-6,
}
# Tiny configs covering each architecture and RoPE variant; shared with
# tests/test_onnx_graph.py.
TINY = {
    "llama": {"architecture": "llama"},
    "mistral-mqa": {"architecture": "mistral", "num_kv_heads": 1},
    "qwen2-bias": {"architecture": "qwen2", "attention_bias": True},
    "qwen3-qknorm": {
        "architecture": "qwen3",
        "qk_norm": True,
        "head_dim": 32,
        "tie_word_embeddings": True,
    },
    "gemma3-window": GEMMA,
    "rope-linear": {
        "architecture": "llama",
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
    },
    "rope-llama3": {
        "architecture": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "rope-yarn": {
        "architecture": "qwen2",
        "attention_bias": True,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


def tiny_config(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **TINY[name]})


def test_stories260k_greedy_reproduces_the_published_story():
    from tokenizers import Tokenizer

    from edgeq.models import open_model

    src = open_model(str(STORIES))
    tok = Tokenizer.from_str(src.tokenizer_files["tokenizer.json"].decode())
    ids = tok.encode("Once upon a time").ids
    out = ReferenceModel(src).greedy(ids, 64)
    assert tok.decode(ids + out).startswith(ONCE)


def test_cache_steps_equal_whole_sequence():
    ref = ReferenceModel(RandomSource(tiny_config("gemma3-window"), seed=3), 64)
    ids = list(range(3, 15))
    whole = ref.forward(ids)
    cache = ref.new_cache()
    steps = [ref.forward(ids[:5], cache)]
    steps += [ref.forward([i], cache) for i in ids[5:]]
    np.testing.assert_allclose(np.concatenate(steps), whole, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_reference_matches_mlx_lm(name):
    """mlx-lm's model code (an independent implementation) with the same
    weights gives the same logits, window and RoPE scaling included."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.utils import _get_classes

    cfg = tiny_config(name)
    src = RandomSource(cfg, seed=1)
    hf = cfg.to_hf_config()
    model_cls, args_cls = _get_classes(hf)
    model = model_cls(args_cls.from_dict(hf))
    weights = {n: mx.array(src.read(n)) for n in src.tensor_names()}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()))
    ids = [int(i) for i in np.random.default_rng(0).integers(0, cfg.vocab_size, 12)]
    theirs = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    ours = ReferenceModel(src, 256).forward(ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_yarn_attention_factor_default():
    cfg = tiny_config("rope-yarn")
    _, attn = rope_inv_freq(cfg, cfg.rope_theta)
    assert attn == pytest.approx(0.1 * np.log(4.0) + 1.0)


def test_unscaled_layers_ignore_scaling():
    cfg = tiny_config("rope-linear")
    plain, _ = rope_inv_freq(cfg, cfg.rope_theta, scaled=False)
    scaled, _ = rope_inv_freq(cfg, cfg.rope_theta)
    np.testing.assert_allclose(scaled * 4.0, plain)
