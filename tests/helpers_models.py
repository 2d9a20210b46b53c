"""Tiny random models on disk, for tests that need a real file to read.

Each writer builds what a user would download: a Hugging Face folder
(config.json, model.safetensors or shards + index, tokenizer.json,
tokenizer_config.json) or a GGUF file, filled with small random weights.
Tensor names and shapes are written out here from the Hugging Face layout,
not taken from edgeq, so a loader bug cannot hide behind a shared table.

    from helpers_models import write_hf_model
    folder = write_hf_model(tmp_path / "m", "qwen2", lm_head="copy")

Sizes default to the shared cases' recipe (hidden 64, 2 layers, 4 heads,
vocab 256): a deploy of one takes a few seconds.

- tiny_config(arch, **overrides), tensor_shapes(config), random_tensors()
- write_hf_model(folder, arch, shards=, lm_head=, **overrides), edit_config()
- write_tokenizer(folder), save_safetensors(path, tensors)
- write_gguf_model(path, arch, tie=, metadata=)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")

# config.json per architecture at the cases' size. Qwen2 has q/k/v biases,
# Qwen3 and Gemma 3 per-head q/k norms; Gemma 3 also sandwich norms and
# sliding-window layers.
_BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_CONFIGS = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "tie_word_embeddings": False,
        "attention_bias": False,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "tie_word_embeddings": False,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "tie_word_embeddings": True,
        "attention_bias": False,
    },
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "sliding_window": 32,
        "sliding_window_pattern": 2,
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
    },
}


def tiny_config(arch: str = "llama", **overrides) -> dict:
    """config.json contents for a tiny model; `overrides` replace keys (a
    value of None removes the key)."""
    cfg = {**_BASE, **_CONFIGS[arch]}
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` holds, HF layout ([out, in])."""
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    ffn, vocab = config["intermediate_size"], config["vocab_size"]
    mt = config["model_type"]
    bias = config.get("attention_bias", mt == "qwen2")
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        norms = ["input_layernorm", "post_attention_layernorm"]
        if mt.startswith("gemma3"):
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for n in norms:
            shapes[p + n + ".weight"] = (h,)
        a = p + "self_attn."
        shapes |= {
            a + "q_proj.weight": (heads * d, h),
            a + "k_proj.weight": (kv * d, h),
            a + "v_proj.weight": (kv * d, h),
            a + "o_proj.weight": (h, heads * d),
        }
        if bias:
            shapes |= {
                a + "q_proj.bias": (heads * d,),
                a + "k_proj.bias": (kv * d,),
                a + "v_proj.bias": (kv * d,),
            }
        if mt in ("qwen3", "gemma3_text"):
            shapes |= {a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)}
        m = p + "mlp."
        shapes |= {
            m + "gate_proj.weight": (ffn, h),
            m + "up_proj.weight": (ffn, h),
            m + "down_proj.weight": (h, ffn),
        }
    shapes["model.norm.weight"] = (h,)
    return shapes


def random_tensors(
    config: dict, seed: int = 0, dtype=np.float16, lm_head: str = "auto"
) -> dict[str, np.ndarray]:
    """Random weights for `config`. `lm_head`: "auto" (present unless the
    config ties embeddings), "copy" (identical to the embedding), "different"
    (its own random tensor) or "absent"."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            # Gemma stores the norm scale as (1 + w): zeros are neutral there.
            base = 0.0 if config["model_type"].startswith("gemma") else 1.0
            arr = base + 0.05 * rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) * (0.5 / np.sqrt(shape[-1]))
        out[name] = arr.astype(dtype)
    if lm_head == "auto":
        lm_head = "absent" if config.get("tie_word_embeddings") else "different"
    emb = out["model.embed_tokens.weight"]
    if lm_head == "copy":
        out["lm_head.weight"] = emb.copy()
    elif lm_head == "different":
        out["lm_head.weight"] = (rng.standard_normal(emb.shape) * 0.05).astype(dtype)
    elif lm_head != "absent":
        raise ValueError(f"lm_head={lm_head!r}")
    return out


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write `tensors` with the safetensors package (the reference writer)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def write_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    """A byte-level BPE tokenizer.json: the 256 byte symbols (so any text
    encodes), cut to `vocab_size` or padded with special tokens up to it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet[:vocab_size])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = [f"<|extra_{i}|>" for i in range(vocab_size - len(vocab))]
    tok.add_special_tokens([AddedToken(t, special=True) for t in extra])
    tok.save(str(folder / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))


def write_hf_model(
    folder: Path,
    arch: str = "llama",
    *,
    config: dict | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    lm_head: str = "auto",
    shards: int = 1,
    seed: int = 0,
    dtype=np.float16,
    **overrides,
) -> Path:
    """Write a tiny random Hugging Face folder and return its path.

    `config` replaces the whole config.json; `overrides` edit the default
    one (see tiny_config). `tensors` replaces the weights. With `shards` > 1
    the tensors are split round-robin into model-0000i-of-0000n.safetensors
    files plus model.safetensors.index.json, as transformers writes them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None else tiny_config(arch, **overrides)
    if tensors is None:
        tensors = random_tensors(cfg, seed=seed, dtype=dtype, lm_head=lm_head)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(folder, cfg.get("vocab_size", 256))
    if shards <= 1:
        save_safetensors(folder / "model.safetensors", tensors)
        return folder
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_safetensors(folder / fname, part)
        weight_map |= {n: fname for n in part}
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def edit_config(folder: Path, **changes) -> Path:
    """Change keys of folder/config.json after the weights were written (a
    value of None removes the key); returns the config path."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg, indent=2))
    return path


def write_gguf_model(
    path: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    tie: bool = False,
    n_layers: int = 1,
    hidden: int = 32,
    heads: int = 2,
    ffn: int = 64,
    vocab: int = 64,
    metadata: dict | None = None,
) -> Path:
    """Write a tiny float32 GGUF, as llama.cpp's converter lays it out
    (blk.N.* names, [in, out] shapes reversed, BPE tokenizer metadata).
    `metadata` adds or replaces `{arch}.*` keys, e.g. {"context_length": 9}."""
    import gguf
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for key, value in (metadata or {}).items():
        full = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    # Byte symbols and one merge: GGUF writers skip an empty merges array.
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())[: vocab - 1]
    tokens.append(tokens[0] + tokens[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, *shape):
        scale = 1.0 if len(shape) == 1 else 0.5 / np.sqrt(shape[-1])
        base = 1.0 if len(shape) == 1 else 0.0
        arr = (base + scale * rng.standard_normal(shape)).astype(np.float32)
        w.add_tensor(name, arr)

    add("token_embd.weight", vocab, hidden)
    for i in range(n_layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", hidden)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(b + part + ".weight", hidden, hidden)
        add(b + "ffn_norm.weight", hidden)
        add(b + "ffn_gate.weight", ffn, hidden)
        add(b + "ffn_up.weight", ffn, hidden)
        add(b + "ffn_down.weight", hidden, ffn)
    add("output_norm.weight", hidden)
    if not tie:
        add("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
