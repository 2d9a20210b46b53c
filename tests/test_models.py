"""Loaders: GGUF files and Hugging Face folders (single file and sharded)
give the same tensors, in Hugging Face layout, one at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgeq.errors import ModelError
from edgeq.models import open_model
from edgeq.models.config import config_from_hf


def export_hf(source, folder, shards: int = 1, dtype=np.float32) -> None:
    """Write `source` as a Hugging Face folder (optionally sharded + index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(source.config.to_hf_config()))
    for name, data in source.tokenizer_files.items():
        (folder / name).write_bytes(data)
    names = source.tensor_names()
    if shards == 1:
        save_file({n: source.read(n).astype(dtype) for n in names},
                  str(folder / "model.safetensors"))  # fmt: skip
        return
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: source.read(n).astype(dtype) for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_stories_gguf_config(stories_gguf):
    m = open_model(str(stories_gguf))
    c = m.config
    assert (c.architecture, c.hidden_size, c.num_layers) == ("llama", 64, 5)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (8, 4, 8)
    assert (c.intermediate_size, c.vocab_size) == (172, 512)
    assert c.tie_word_embeddings is False
    # GGUF writes "no token" as 2**32 - 1; those must not become token ids.
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert m.num_parameters == 292_800
    assert m.info("model.layers.0.mlp.down_proj.weight").shape == (64, 172)


def test_gguf_qk_rows_are_unpermuted_consistently(stories_gguf):
    """Reading rows of a permuted tensor must equal slicing the whole one."""
    m = open_model(str(stories_gguf))
    name = "model.layers.2.self_attn.q_proj.weight"
    whole = m.read(name)
    assert np.array_equal(m.read(name, rows=slice(8, 24)), whole[8:24])
    # Undo by hand: llama.cpp interleaves the two RoPE halves of each head.
    import gguf

    raw = next(t for t in gguf.GGUFReader(stories_gguf).tensors
               if t.name == "blk.2.attn_q.weight")  # fmt: skip
    raw = np.asarray(raw.data, dtype=np.float32).reshape(64, 64)
    head0 = raw[:8]  # head_dim 8: rows 0,2,4,6 are the first half
    assert np.array_equal(whole[:4], head0[0::2])
    assert np.array_equal(whole[4:8], head0[1::2])


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_matches_gguf(stories_gguf, tmp_path, shards):
    gguf_model = open_model(str(stories_gguf))
    export_hf(gguf_model, tmp_path / "hf", shards=shards)
    hf = open_model(str(tmp_path / "hf"))
    assert hf.format == "hf"
    assert hf.config.to_dict() == gguf_model.config.to_dict()
    assert sorted(hf.tensor_names()) == sorted(gguf_model.tensor_names())
    for name in gguf_model.tensor_names():
        assert np.array_equal(hf.read(name), gguf_model.read(name)), name


def test_bf16_safetensors_widen_exactly(stories_gguf, tmp_path):
    import ml_dtypes

    src = open_model(str(stories_gguf))
    export_hf(src, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    hf = open_model(str(tmp_path / "bf16"))
    name = "model.layers.0.mlp.up_proj.weight"
    want = src.read(name).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert hf.info(name).source_dtype == "BF16"
    assert np.array_equal(hf.read(name), want)


def test_tokenizer_rebuilt_from_gguf_round_trips(stories_gguf):
    from tokenizers import Tokenizer

    m = open_model(str(stories_gguf))
    tok = Tokenizer.from_str(m.tokenizer_files["tokenizer.json"].decode())
    text = "Once upon a time, there was a little girl named Lily."
    enc = tok.encode(text)
    assert enc.ids[0] == 1  # add_bos_token: <s>
    assert enc.tokens[1:5] == ["\u2581Once", "\u2581upon", "\u2581a", "\u2581time"]
    assert tok.decode(enc.ids) == text


def test_smollm2_tokenizer_and_chat_template():

    m = open_model("smollm2-135m")
    assert m.config.tie_word_embeddings and m.config.num_kv_heads == 3
    tcfg = json.loads(m.tokenizer_files["tokenizer_config.json"])
    assert tcfg["eos_token"] == "<|im_end|>" or tcfg["eos_token"] == "<|endoftext|>"
    assert "<|im_start|>" in tcfg["chat_template"]


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        (
            {"rope_scaling": {"rope_type": "longrope", "factor": 4.0}},
            "rope_scaling type 'longrope' is not supported; edgeq implements "
            "linear, llama3, yarn",
        ),
    ],
)
def test_config_refusals_name_the_field(patch, message):
    raw = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256,
    }  # fmt: skip
    with pytest.raises(ModelError) as e:
        config_from_hf({**raw, **patch}, where="m/config.json")
    assert str(e.value).startswith("m/config.json: ")
    assert message in str(e.value)


def test_transformers5_rope_parameters_are_read():
    """mlx-lm reads rope_theta only at the top level; a config with only
    rope_parameters must not silently run with the default base."""
    raw = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    }  # fmt: skip
    cfg = config_from_hf(raw)
    assert cfg.rope_theta == 500000.0
    assert cfg.to_hf_config()["rope_theta"] == 500000.0


def test_unknown_reference_is_one_clear_line():
    with pytest.raises(ModelError) as e:
        open_model("no-such-model")
    assert str(e.value) == (
        "model 'no-such-model' is neither a file or folder nor a known name "
        "(gemma3-270m, smollm2-135m); give a Hugging Face folder or a .gguf file"
    )
