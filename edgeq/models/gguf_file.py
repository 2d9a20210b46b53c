"""GGUF files (from llama.cpp or Ollama): dequantized one tensor at a time.

GGUF stores llama-arch Q and K projections in Meta's interleaved-RoPE row
order and Gemma's norm weights with the +1 already added; both are undone
here so that tensors come out exactly as a Hugging Face checkpoint holds them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np

from edgeq.errors import ModelError
from edgeq.models.config import ModelConfig, check_rope_scaling
from edgeq.models.gguf_layout import check_gguf_layout
from edgeq.models.source import ModelSource, TensorInfo, check_tensor_set

log = logging.getLogger(__name__)

_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
          "qwen3": "qwen3", "gemma3": "gemma3"}  # fmt: skip

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
# The norm after attention means different things per architecture.
_BLOCK_LLAMA = {"ffn_norm": "post_attention_layernorm"}
_BLOCK_GEMMA = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")

_NONE_ID = 0xFFFFFFFF  # "no such token" in some GGUF writers (stories260K)


def _open_reader(path: Path):
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"version https://git-lfs"):
        raise ModelError(
            f"{path} is a git-lfs pointer, not the weights; run `git lfs pull` "
            "or download the real file"
        )
    if head[:4] != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    # The gguf package trusts the header's counts; check them first.
    check_gguf_layout(path, size)
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError, TypeError, OverflowError) as e:
        raise ModelError(
            f"{path}: truncated or corrupt GGUF ({size} bytes): {e}; download it again"
        ) from None


class GGUFModel(ModelSource):
    format = "gguf"

    def __init__(self, path: Path, name: str | None = None, tie: bool | None = None):
        super().__init__(path, name or Path(path).stem)
        self._reader = r = _open_reader(self.path)
        # Metadata values have whatever type the file says; a value of the
        # wrong type or range is a corrupt file, reported as such.
        try:
            self.meta = {k: _field_value(f) for k, f in r.fields.items()
                         if not k.startswith("tokenizer.ggml.")}  # fmt: skip
            self.config = self._config()
        except KeyError as e:
            raise ModelError(f"{self.path}: GGUF metadata lacks {e}") from None
        except (ValueError, TypeError, IndexError, OverflowError) as e:
            raise ModelError(f"{self.path}: corrupt GGUF metadata ({e})") from None
        self._tensors = {}
        for t in r.tensors:
            hf = self._hf_name(t.name)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self._tensors[hf] = t
            self._infos[hf] = TensorInfo(hf, shape, t.tensor_type.name)
        self._check_sizes()
        check_tensor_set(self, tie)
        self.tokenizer_files = self._tokenizer_files()
        self.source_sha256 = _sha256(self.path)

    def _tokenizer_files(self) -> dict:
        from edgeq.models.gguf_tokenizer import tokenizer_files_from_gguf

        try:
            return tokenizer_files_from_gguf(self._reader, self.config, self.path)
        except ModelError:
            raise
        except KeyError as e:
            raise ModelError(f"{self.path}: GGUF tokenizer lacks {e}") from None
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception
            raise ModelError(
                f"{self.path}: GGUF tokenizer metadata is corrupt "
                f"({type(e).__name__}: {str(e)[:120]}); download it again"
            ) from None

    def _check_sizes(self) -> None:
        size = self.path.stat().st_size
        end = max(
            (int(t.data_offset) + int(t.n_bytes) for t in self._reader.tensors),
            default=0,
        )
        if end > size:
            raise ModelError(
                f"{self.path}: truncated: tensors need {end} bytes, file has "
                f"{size}; download it again"
            )

    def _get(self, key, default=None, required=False, kind=None):
        """Metadata `{arch}.{key}`; `kind` "int" or "float" insists on a
        positive number of that kind."""
        arch = self.meta.get("general.architecture")
        full = f"{arch}.{key}"
        if full not in self.meta:
            if required:
                raise ModelError(f"{self.path}: GGUF metadata lacks '{full}'")
            return default
        value = self.meta[full]
        if kind and not _positive(value, kind):
            raise ModelError(
                f"{self.path}: GGUF metadata '{full}' is {_short(value)}, not a "
                f"positive {'integer' if kind == 'int' else 'number'}; the file "
                "is corrupt"
            )
        return value

    def _config(self) -> ModelConfig:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in _ARCHS:
            raise ModelError(
                f"{self.path}: GGUF architecture {_short(arch)} is not supported; "
                f"edgeq handles {', '.join(sorted(_ARCHS))}"
            )
        g = self._get
        hidden = g("embedding_length", required=True, kind="int")
        heads = g("attention.head_count", required=True, kind="int")
        kv = g("attention.head_count_kv", heads)
        head_dim = g("attention.key_length", hidden // heads, kind="int")
        n_vocab = g("vocab_size", kind="int")
        if n_vocab is None:
            n_vocab = len(self._reader.fields["tokenizer.ggml.tokens"].data)
        scaling = None
        kind = g("rope.scaling.type")
        if kind not in (None, "none"):
            scaling = {"rope_type": kind, "factor": g("rope.scaling.factor", 1.0)}
            if kind == "yarn":
                scaling["original_max_position_embeddings"] = g(
                    "rope.scaling.original_context_length"
                )
            check_rope_scaling(scaling, where=str(self.path))
        tok = self._reader.fields
        bos = _token_id(tok, "tokenizer.ggml.bos_token_id")
        eos = _token_id(tok, "tokenizer.ggml.eos_token_id")
        eot = _token_id(tok, "tokenizer.ggml.eot_token_id")
        eos_ids = [i for i in (eos, eot) if i is not None]
        gemma = arch == "gemma3"
        if gemma:
            eos_ids += [_find_token(tok, "<end_of_turn>")]
            eos_ids = [i for i in dict.fromkeys(eos_ids) if i is not None]
        fields = {
            "architecture": _ARCHS[arch],
            "hidden_size": hidden,
            "num_layers": g("block_count", required=True, kind="int"),
            "num_heads": heads,
            "num_kv_heads": int(kv[0] if isinstance(kv, list) else kv),
            "head_dim": head_dim,
            "intermediate_size": g("feed_forward_length", required=True, kind="int"),
            "vocab_size": int(n_vocab),
            "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-5, kind="float"),
            "rope_theta": g("rope.freq_base", 1e6 if gemma else 10000.0, kind="float"),
            "rope_scaling": scaling,
            "max_position_embeddings": g("context_length", 2048, kind="int"),
            "tie_word_embeddings": not any(
                t.name == "output.weight" for t in self._reader.tensors
            ),
            "attention_bias": any(
                t.name.endswith("attn_q.bias") for t in self._reader.tensors
            ),
            "qk_norm": any(
                t.name.endswith("attn_q_norm.weight") for t in self._reader.tensors
            ),
            "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
            "sliding_window": g("attention.sliding_window", 512, kind="int")
            if gemma
            else None,
            "sliding_window_pattern": 6 if gemma else None,
            "rope_local_base_freq": 10000.0 if gemma else None,
            "query_pre_attn_scalar": float(head_dim) if gemma else None,
            "bos_token_id": bos,
            "eos_token_ids": eos_ids,
        }
        # ModelConfig checks what no single field shows (head counts, parity).
        try:
            return ModelConfig(**fields)
        except ModelError as e:
            raise ModelError(f"{self.path}: {e}") from None

    def _hf_name(self, gname: str) -> str:
        if gname in _GLOBAL:
            return _GLOBAL[gname]
        m = _BLK_RE.match(gname)
        table = {**_BLOCK, **(_BLOCK_GEMMA if self.config.is_gemma else _BLOCK_LLAMA)}
        if not m or m.group(2) not in table:
            raise ModelError(
                f"{self.path}: unexpected tensor '{gname}' for architecture "
                f"'{self.config.architecture}'"
            )
        return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"

    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        t = self._tensors[name]
        shape = self._infos[name].shape
        data = t.data
        if rows is not None and self._permuted(name):
            # Rows of a permuted tensor come from all over it: read it whole.
            return self._read(name, None)[rows]
        if rows is not None and len(shape) == 2:
            data = data[rows]
            shape = (data.shape[0], shape[1])
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.asarray(data, dtype=np.float32)
        else:
            try:
                arr = quants.dequantize(np.asarray(data), t.tensor_type)
            except NotImplementedError:
                raise ModelError(
                    f"{self.path}: tensor '{t.name}' is stored as "
                    f"{t.tensor_type.name}, which edgeq cannot dequantize; "
                    "convert the model with a common type (F16, Q8_0, Q4_K)"
                ) from None
        arr = arr.reshape(shape).astype(np.float32, copy=False)
        return self._to_hf(name, arr, rows)

    def _permuted(self, name: str) -> bool:
        return self.config.architecture in ("llama", "mistral") and name.endswith(
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
        )

    def _to_hf(self, name: str, arr: np.ndarray, rows) -> np.ndarray:
        cfg = self.config
        if cfg.is_gemma and name.endswith("norm.weight"):
            return arr - 1.0  # llama.cpp stores Gemma's (1 + w)
        if self._permuted(name):
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            return _unpermute(arr, heads)
        return arr


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> half-split RoPE)."""
    out, rest = w.shape[0], w.shape[1:]
    half = out // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _positive(value, kind: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "int" and not isinstance(value, int):
        return False
    return 0 < value < float("inf")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a field type gguf cannot decode
        return None


def _token_id(fields, key) -> int | None:
    if key not in fields:
        return None
    v = int(fields[key].contents())
    return None if v == _NONE_ID else v


def _find_token(fields, text: str) -> int | None:
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    for i, idx in enumerate(tokens.data):
        if bytes(tokens.parts[idx]).decode("utf-8", "replace") == text:
            return i
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
