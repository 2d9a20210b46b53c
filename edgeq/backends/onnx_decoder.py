"""The decoder graph: embeddings, attention with a KV cache, MLP, head.

Graph interface (batch 1, float32):

    inputs   input_ids                 int64 [1, S]
             past_key_values.N.key     float [1, kv_heads, P, head_dim]  (P may be 0)
             past_key_values.N.value   float [1, kv_heads, P, head_dim]
             logits_to_keep            int64 [1]   0 = logits for all S positions,
                                                   n = for the last n
    outputs  logits                    float [1, S or n, vocab]
             present.N.key / .value    float [1, kv_heads, P + S, head_dim]

Positions are implied by the cache: the new tokens sit at P .. P+S-1 (no
padding, no attention mask: one sequence at a time, as on a device).

Two ways to build each part, chosen by `GraphOptions`:
- fused (default): ONNX Runtime contrib ops GroupQueryAttention (RoPE, GQA,
  causal and sliding-window masking, KV cache append in one kernel) and
  SkipSimplifiedLayerNormalization (residual add + RMSNorm);
- standard ops only (opset 14), used to measure the fused ops' gain and as
  the fallback when a runtime cannot run a fused op (case C06).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from edgeq.backends.onnx_linear import LinearEmitter, storage_key
from edgeq.reference import layer_rope_base, rope_tables

NEG_INF = float(np.finfo(np.float32).min)


@dataclass
class GraphOptions:
    fused_attention: bool = True  # GroupQueryAttention vs MatMul/Softmax
    fused_norms: bool = True  # (Skip)SimplifiedLayerNormalization vs ReduceMean
    fuse_projections: bool = True  # q/k/v and gate/up as one MatMul each
    context_length: int = 4096  # rows of the RoPE tables = longest sequence


class DecoderGraph:
    """Builds the whole decoder into a GraphWriter, one layer at a time."""

    def __init__(self, gw, lin: LinearEmitter, source, opts: GraphOptions):
        self.gw, self.lin, self.opts = gw, lin, opts
        self.source = source
        self.cfg = source.config
        self.rope: dict[tuple, tuple[str, str]] = {}
        self.rope_rows: dict[tuple, tuple[str, str]] = {}  # standard ops only
        self.masks: dict = {}  # standard ops only: window -> additive mask

    # -- whole graph -------------------------------------------------------------
    def build(self) -> None:
        cfg, gw = self.cfg, self.gw
        ids = gw.add_input("input_ids", TensorProto.INT64, [1, "sequence_length"])
        self._declare_cache()
        keep = gw.add_input("logits_to_keep", TensorProto.INT64, [1])
        self._positions(ids)
        table = self._embedding_table()
        x = self.lin.gather(table, ids)  # [1, S, hidden]
        if cfg.is_gemma:
            scale = gw.const("embed_scale", math.sqrt(cfg.hidden_size), np.float32)
            x = gw.node("Mul", [x, scale])
        pending = None  # the last block's output, not yet added to x
        for layer in range(cfg.num_layers):
            x, pending = self._block(layer, x, pending)
        h, _ = self._add_norm(x, pending, "model.norm.weight")
        # Slice the positions whose logits are wanted: start -n (0 = all).
        start = gw.node("Neg", [keep])
        h = gw.node(
            "Slice",
            [h, start, gw.const("big", [2**62]), gw.const("axis1", [1])],
        )
        head = table if cfg.tie_word_embeddings else self.lin.store(["lm_head.weight"])
        gw.rename_output(self.lin.apply(h, head), "logits")
        gw.add_output("logits", TensorProto.FLOAT, [1, "logits_length", cfg.vocab_size])

    def _declare_cache(self) -> None:
        cfg, gw = self.cfg, self.gw
        kv, d = cfg.num_kv_heads, cfg.head_dim
        for i in range(cfg.num_layers):
            for kind in ("key", "value"):
                gw.add_input(
                    f"past_key_values.{i}.{kind}",
                    TensorProto.FLOAT,
                    [1, kv, "past_sequence_length", d],
                )
                gw.add_output(
                    f"present.{i}.{kind}",
                    TensorProto.FLOAT,
                    [1, kv, "total_sequence_length", d],
                )

    def _positions(self, ids: str) -> None:
        """Sequence lengths, computed once from the input shapes."""
        gw = self.gw
        s = gw.node("Gather", [gw.node("Shape", [ids]), gw.const("i1", 1)])
        past = gw.node("Shape", ["past_key_values.0.key"])
        self.past_len = gw.node("Gather", [past, gw.const("i2", 2)])
        self.total_len = gw.node("Add", [self.past_len, s])  # scalar int64
        if self.opts.fused_attention:
            total32 = gw.node("Cast", [self.total_len], to=TensorProto.INT32)
            self.total32 = total32
            last = gw.node("Sub", [total32, gw.const("one32", 1, np.int32)])
            self.seqlens_k = gw.node("Reshape", [last, gw.const("shape1", [1])])
        self._standard_positions: tuple[str, str] | None = None

    def standard_positions(self) -> tuple[str, str]:
        """Query positions [S] = P .. T-1 and key positions [T] = 0 .. T-1,
        made the first time a standard-op attention layer needs them."""
        if self._standard_positions is None:
            gw, one = self.gw, self.gw.const("one", 1)
            queries = gw.node("Range", [self.past_len, self.total_len, one])
            keys = gw.node("Range", [gw.const("zero", 0), self.total_len, one])
            self._standard_positions = (queries, keys)
        return self._standard_positions

    def _embedding_table(self):
        name = "model.embed_tokens.weight"
        return self.lin.store([name], rows_layout=True)

    # -- norms -------------------------------------------------------------------
    def _norm_weight(self, name: str) -> str:
        """RMSNorm scale; Gemma stores w and scales by (1 + w)."""
        w = self.source.read(name)
        self.lin.done(name)
        if self.cfg.is_gemma:
            w = (1.0 + w.astype(np.float64)).astype(np.float32)
        return self.gw.initializer(name, w)

    def _norm(self, x: str, name: str) -> str:
        w, eps = self._norm_weight(name), self.cfg.rms_norm_eps
        if self.opts.fused_norms:
            return self.gw.node(
                "SimplifiedLayerNormalization",
                [x, w],
                axis=-1,
                epsilon=eps,
                stash_type=1,
            )
        return self._rms_standard(x, w, eps)

    def _rms_standard(self, x: str, w: str, eps: float) -> str:
        gw = self.gw
        ms = gw.node("ReduceMean", [gw.node("Mul", [x, x])], axes=[-1], keepdims=1)
        eps_c = gw.const("eps", eps, np.float32)
        inv = gw.node("Reciprocal", [gw.node("Sqrt", [gw.node("Add", [ms, eps_c])])])
        return gw.node("Mul", [gw.node("Mul", [x, inv]), w])

    def _add_norm(self, x: str, delta: str | None, name: str) -> tuple[str, str]:
        """(RMSNorm(x + delta), x + delta); delta None means x alone."""
        if delta is None:
            return self._norm(x, name), x
        if not self.opts.fused_norms:
            total = self.gw.node("Add", [x, delta])
            return self._norm(total, name), total
        w = self._norm_weight(name)
        normed, total = self.gw.fresh("normed"), self.gw.fresh("residual")
        self.gw.ms(
            "SkipSimplifiedLayerNormalization",
            [delta, x, w],
            outputs=[normed, "", "", total],
            epsilon=self.cfg.rms_norm_eps,
        )
        return normed, total

    # -- one block ---------------------------------------------------------------
    def _block(self, layer: int, x: str, pending: str | None) -> tuple[str, str]:
        p = f"model.layers.{layer}."
        h, x = self._add_norm(x, pending, p + "input_layernorm.weight")
        a = self._attention(layer, h)
        if not self.cfg.is_gemma:
            h, x = self._add_norm(x, a, p + "post_attention_layernorm.weight")
            return x, self._mlp(p, h)
        a = self._norm(a, p + "post_attention_layernorm.weight")
        h, x = self._add_norm(x, a, p + "pre_feedforward_layernorm.weight")
        return x, self._norm(self._mlp(p, h), p + "post_feedforward_layernorm.weight")

    def _mlp(self, p: str, h: str) -> str:
        gw, cfg = self.gw, self.cfg
        gate, up = p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"
        if self._fusable([gate, up]):
            both = self.lin.linear(h, [gate, up])  # [1, S, 2F]
            sizes = gw.const("split_ff", [cfg.intermediate_size] * 2)
            g, u = gw.node("Split", [both, sizes], n_out=2, axis=-1)
        else:
            g, u = self.lin.linear(h, [gate]), self.lin.linear(h, [up])
        return self.lin.linear(
            gw.node("Mul", [self._act(g), u]), [p + "mlp.down_proj.weight"]
        )

    def _act(self, g: str) -> str:
        gw = self.gw
        if not self.cfg.hidden_act.startswith("gelu"):
            return gw.node("Mul", [g, gw.node("Sigmoid", [g])])  # SiLU
        if self.opts.fused_norms:
            return gw.ms("FastGelu", [g])  # the tanh approximation
        c = gw.const("gelu_c", math.sqrt(2 / math.pi), np.float32)
        cube = gw.node("Mul", [gw.node("Mul", [g, g]), g])
        inner = gw.node(
            "Add", [g, gw.node("Mul", [cube, gw.const("k", 0.044715, np.float32)])]
        )
        t = gw.node("Tanh", [gw.node("Mul", [inner, c])])
        half = gw.node("Mul", [g, gw.const("half", 0.5, np.float32)])
        return gw.node(
            "Mul", [half, gw.node("Add", [t, gw.const("one_f", 1.0, np.float32)])]
        )

    def _fusable(self, names: list[str]) -> bool:
        if not self.opts.fuse_projections:
            return False
        return len({storage_key(self.lin.plan.tensor(n)) for n in names}) == 1

    # -- attention ---------------------------------------------------------------
    def _attention(self, layer: int, h: str) -> str:
        from edgeq.backends.onnx_attention import attention

        return attention(self, layer, h)

    def rope_tables(self, layer: int) -> tuple[str, str]:
        """cos/sin [context, head_dim/2] initializers for the layer's RoPE base."""
        key = layer_rope_base(self.cfg, layer)
        if key not in self.rope:
            cos, sin = rope_tables(self.cfg, key[0], self.opts.context_length, key[1])
            tag = f"{len(self.rope)}"
            self.rope[key] = (
                self.gw.initializer(f"rope_cos_{tag}", cos),
                self.gw.initializer(f"rope_sin_{tag}", sin),
            )
        return self.rope[key]
