"""Linear layers and embeddings, stored the way the plan says.

One planned tensor (or several with the same storage, fused along the output
axis, e.g. q/k/v) becomes one initializer and one node:

| plan                          | node (x [1, S, K] -> [1, S, N])                   |
|-------------------------------|---------------------------------------------------|
| bits 16                       | MatMul, float32 W [K, N]                          |
| bits 8, per-channel           | DynamicQuantizeMatMul, int8 W [K, N], scale [N]   |
| bits 2/4/8, group g           | MatMulNBits, block_size g, accuracy_level from    |
|                               | the device settings                               |

Weights are read one tensor at a time (the embedding table in row blocks),
quantized, and written to the external data file before the next is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgeq.backends import onnx_quant as q
from edgeq.backends.onnx_graph import GraphWriter
from edgeq.errors import TargetError

log = logging.getLogger(__name__)

NBITS_SUPPORTED = (2, 4, 8)


@dataclass
class QuantSettings:
    """INT8 choices that depend on the device's CPU (see `int8_settings`)."""

    reduce_range: bool = False  # 7-bit per-channel weights (x86 without VNNI)
    accuracy_level: int = 4  # MatMulNBits: int8 activations per block
    isa_note: str = ""


def storage_key(tp) -> tuple:
    """Tensors with equal keys can share one fused initializer."""
    return (tp.bits, tp.group_size if tp.bits < 16 else None)


def check_supported(tp) -> None:
    """Refuse, before any work, a tensor plan this target cannot store."""
    if tp.bits >= 16:
        return
    if tp.group_size is None and tp.bits != 8:
        raise TargetError(
            f"plan: tensor '{tp.name}' asks for {tp.bits}-bit per-channel; the "
            "onnxruntime target stores per-channel weights as INT8 only; give a "
            "group size (block-wise MatMulNBits) or use --bits 8"
        )
    if tp.group_size is not None and tp.bits not in NBITS_SUPPORTED:
        raise TargetError(
            f"plan: tensor '{tp.name}' asks for {tp.bits} bits; MatMulNBits "
            f"takes {', '.join(map(str, NBITS_SUPPORTED))} bits (use --bits 4 or 8)"
        )
    cols = tp.shape[-1] if tp.shape else 0
    if tp.group_size is not None and cols % tp.group_size:
        raise TargetError(
            f"plan: tensor '{tp.name}' has input width {cols}, not a multiple of "
            f"its group size {tp.group_size}; make the plan with edgeq's planner, "
            "which falls back to a smaller group"
        )
    if tp.scheme == "affine":
        raise TargetError(
            f"plan: tensor '{tp.name}' asks for scheme 'affine'; the onnxruntime "
            "target stores symmetric weights only (plan with --target onnxruntime)"
        )


@dataclass
class Stored:
    """A weight written to the data file, ready to be applied to activations."""

    kind: str  # "float" [K, N] | "float_rows" [N, K] | "per_channel" | "nbits"
    weight: str  # initializer name
    k: int
    n: int
    bits: int = 16
    group: int | None = None
    bias: str | None = None


class LinearEmitter:
    """Writes weight initializers (`store`) and the nodes that use them
    (`apply`, `gather`); the two are apart so that a tied table can be stored
    once and used by both the embedding gather and the output head."""

    def __init__(self, gw: GraphWriter, source, plan, settings: QuantSettings, done):
        self.gw = gw
        self.source = source
        self.plan = plan
        self.settings = settings
        self.done = done  # callback(tensor name), once per tensor consumed
        # fused initializer name -> the HF tensors in it, in order (read_back)
        self.fused: dict[str, list[str]] = {}
        # block-quantized tables read by Gather -> [bits, group] (read_back)
        self.tables: dict[str, list] = {}

    def linear(self, x: str, names: list[str], bias: list[str] | None = None) -> str:
        """x [1, S, K] -> [1, S, sum of N_i] for weights `names` ([N_i, K] each,
        same storage key), concatenated along N; optional biases [N_i]."""
        return self.apply(x, self.store(names, bias))

    def store(self, names: list[str], bias=None, rows_layout=False) -> Stored:
        """Write weights `names` (fused along N when several) per the plan;
        `rows_layout` keeps a float table [N, K] (an embedding shared with
        the head) instead of transposing it."""
        plans = [self.plan.tensor(n) for n in names]
        if len({storage_key(p) for p in plans}) != 1:
            raise ValueError(f"cannot fuse tensors stored differently: {names}")
        wname = names[0] if len(names) == 1 else _fused_name(names)
        if len(names) > 1:
            self.fused[wname] = list(names)
        k = self.source.info(names[0]).shape[1]
        n = sum(self.source.info(x).shape[0] for x in names)
        bits, group = storage_key(plans[0])
        bias_name = self._bias(wname, bias) if bias else None
        if bits >= 16 and rows_layout:
            self._float_rows(wname, names[0])
            kind = "float_rows"
        elif bits >= 16:
            w = np.concatenate([self._read(x).T for x in names], axis=1)
            self.gw.initializer(wname, w)
            kind = "float"
        elif group is None:
            self._per_channel(wname, names)
            kind = "per_channel"
        else:
            self._nbits(wname, names, bits, group)
            kind = "nbits"
        return Stored(kind, wname, k, n, bits, group, bias_name)

    def apply(self, x: str, st: Stored) -> str:
        gw = self.gw
        if st.kind == "float":
            y = gw.node("MatMul", [x, st.weight])
        elif st.kind == "float_rows":
            # Gemm with transB reads the [N, K] table in place: no transposed
            # copy for ONNX Runtime to constant-fold into memory (case C12).
            flat = gw.node("Reshape", [x, gw.const("shape_k", [-1, st.k])])
            y = gw.node("Gemm", [flat, st.weight], transB=1)
            y = gw.node("Reshape", [y, gw.const("shape_1_s_n", [1, -1, st.n])])
        elif st.kind == "per_channel":
            inputs = [x, st.weight, st.weight + "_scale"]
            if st.bias:
                return gw.ms("DynamicQuantizeMatMul", inputs + ["", st.bias])
            y = gw.ms("DynamicQuantizeMatMul", inputs)
        else:
            y = gw.ms(
                "MatMulNBits",
                [x, st.weight, st.weight + "_scales"],
                K=st.k,
                N=st.n,
                bits=st.bits,
                block_size=st.group,
                accuracy_level=self.settings.accuracy_level,
            )
        return gw.node("Add", [y, st.bias]) if st.bias else y

    def gather(self, st: Stored, ids: str) -> str:
        """Embedding rows [1, S, K] for ids [1, S] from a stored [V, K] table."""
        gw = self.gw
        if st.kind == "float_rows":
            return gw.node("Gather", [st.weight, ids])
        if st.kind == "per_channel":
            # int8 [K, V]: gather columns, then each token's scale.
            cols = gw.node("Gather", [st.weight, ids], axis=1)  # [K, 1, S]
            rows = gw.node("Transpose", [cols], perm=[1, 2, 0])  # [1, S, K]
            scale = gw.node("Gather", [st.weight + "_scale", ids])  # [1, S]
            scale = gw.node("Unsqueeze", [scale, gw.const("axis_last", [-1])])
            return gw.node("Mul", [gw.node("Cast", [rows], to=1), scale])
        if st.kind == "nbits":
            return self._gather_blockwise(st, ids)
        raise ValueError(f"{st.weight}: a [K, N] float weight is not a table")

    def _gather_blockwise(self, st: Stored, ids: str) -> str:
        """Rows of B [V, K/group, blob] (shared with a MatMulNBits head, no
        second copy), unpacked and scaled with standard ops: the contrib
        GatherBlockQuantized takes this layout only in recent onnxruntime
        (1.22 refuses it), and gathering S rows costs nothing either way."""
        gw = self.gw
        self.tables[st.weight] = [st.bits, st.group]
        rows = gw.node("Gather", [st.weight, ids])  # [1, S, K/group, blob]
        if st.bits == 8:
            q = gw.node("Cast", [rows], to=1)
        else:
            q = self._unpack(rows, st.bits)  # [1, S, K/group, group]
        zero = gw.const("zero_point", float(2 ** (st.bits - 1)), np.float32)
        scale = gw.node("Gather", [st.weight + "_scales", ids])  # [1, S, K/group]
        scale = gw.node("Unsqueeze", [scale, gw.const("axis_last", [-1])])
        w = gw.node("Mul", [gw.node("Sub", [q, zero]), scale])
        return gw.node("Reshape", [w, gw.const("shape_1_s_k", [1, -1, st.k])])

    def _unpack(self, packed: str, bits: int) -> str:
        """uint8 [..., blob] -> float [..., blob * 8 / bits], low bits first."""
        gw = self.gw
        x = gw.node("Cast", [packed], to=6)  # int32: Div/Mod take it everywhere
        parts = []
        for i in range(8 // bits):
            shifted = gw.node("Div", [x, gw.const("pow2", 2 ** (bits * i), np.int32)])
            part = gw.node("Mod", [shifted, gw.const("base", 2**bits, np.int32)])
            parts.append(gw.node("Unsqueeze", [part, gw.const("axis_last", [-1])]))
        both = gw.node("Concat", parts, axis=-1)  # [..., blob, 8 / bits]
        flat = gw.node("Reshape", [both, gw.const("shape_unpack", [0, 0, 0, -1])])
        return gw.node("Cast", [flat], to=1)

    # -- writing weights -------------------------------------------------------
    def _read(self, name: str) -> np.ndarray:
        w = self.source.read(name)
        self.done(name)
        return w

    def _bias(self, wname: str, bias: list[str]) -> str:
        b = np.concatenate([self._read(n) for n in bias]).astype(np.float32)
        name = bias[0] if len(bias) == 1 else wname.replace(".weight", ".bias")
        if len(bias) > 1:
            self.fused[name] = list(bias)
        return self.gw.initializer(name, b)

    def _float_rows(self, wname: str, name: str) -> None:
        rows, cols = self.source.info(name).shape
        chunks = (self.source.read(name, rows=rs) for rs in q.row_blocks(rows, cols))
        self.gw.stream_initializer(wname, np.float32, (rows, cols), chunks)
        self.done(name)

    def _per_channel(self, wname: str, names: list[str]) -> None:
        """int8 [K, N] + scale [N]; activations become uint8 per tensor at run
        time inside DynamicQuantizeMatMul."""
        parts, scales = [], []
        for n in names:
            rows, cols = self.source.info(n).shape
            for rs in q.row_blocks(rows, cols):
                wq, s = q.int8_per_channel(
                    self.source.read(n, rows=rs), self.settings.reduce_range
                )
                parts.append(wq)
                scales.append(s)
            self.done(n)
        # The transposed copy costs 1 byte per weight of one tensor, never float.
        self.gw.initializer(wname, np.concatenate(parts, axis=0).T)
        self.gw.initializer(wname + "_scale", np.concatenate(scales))

    def _nbits(self, wname: str, names: list[str], bits: int, group: int) -> None:
        """B uint8 [N, K/group, group*bits/8] written in row blocks straight to
        the data file; scales [N, K/group]."""
        k = self.source.info(names[0]).shape[1]
        n_total = sum(self.source.info(n).shape[0] for n in names)
        scales: list[np.ndarray] = []

        def chunks():
            for n in names:
                for rs in q.row_blocks(self.source.info(n).shape[0], k):
                    packed, s = q.blockwise(self.source.read(n, rows=rs), bits, group)
                    scales.append(s)
                    yield packed
                self.done(n)

        shape = (n_total, k // group, group * bits // 8)
        self.gw.stream_initializer(wname, np.uint8, shape, chunks())
        self.gw.initializer(wname + "_scales", np.concatenate(scales))


def _fused_name(names: list[str]) -> str:
    """model.layers.0.self_attn.q_proj.weight + k + v -> ...qkv_proj.weight"""
    prefix = names[0].rsplit(".", 2)[0]
    short = "".join(n.rsplit(".", 2)[1].split("_")[0] for n in names)
    return f"{prefix}.{short}_proj.weight"
