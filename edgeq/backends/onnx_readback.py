"""What model.onnx actually stores for each planned tensor (plan == artifact
checks). Reads the graph structure only, never the external data."""

from __future__ import annotations

import json

from onnx import TensorProto

from edgeq.errors import TargetError

_FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16)


def stored_tensors(model) -> dict[str, tuple[int, int | None]]:
    """{HF tensor name: (bits, group_size or None)}; 16 means float."""
    meta = {p.key: p.value for p in model.metadata_props}
    fused = json.loads(meta.get("edgeq.fused_weights", "{}"))
    tables = {
        k: tuple(v) for k, v in json.loads(meta.get("edgeq.tables", "{}")).items()
    }
    inits = {t.name: t for t in model.graph.initializer}
    storage: dict[str, tuple[int, int | None]] = {}
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
            if name in inits and _is_tensor_name(name, fused):
                got = _storage(node, pos, inits[name], tables.get(name))
                if got is None:
                    continue
                previous = storage.setdefault(name, got)
                if previous != got:
                    raise TargetError(
                        f"model.onnx: initializer '{name}' is read as {previous} "
                        f"and as {got} by different nodes"
                    )
    out: dict[str, tuple[int, int | None]] = {}
    for name, got in storage.items():
        for hf in fused.get(name, [name]):
            out[hf] = got
    return out


def _is_tensor_name(name: str, fused: dict) -> bool:
    return name in fused or name.endswith((".weight", ".bias"))


def _attr(node, key: str):
    for a in node.attribute:
        if a.name == key:
            return a.i
    return None


def _storage(node, pos: int, init, table=None) -> tuple[int, int | None] | None:
    """(bits, group) of an initializer from the node reading it at `pos`;
    `table` is the recorded storage of a block-quantized table that plain
    Gather nodes read."""
    op = node.op_type
    if op == "MatMulNBits" and pos == 1:
        return _attr(node, "bits"), _attr(node, "block_size")
    if op == "GatherBlockQuantized" and pos == 0:
        return _attr(node, "bits"), _attr(node, "block_size")
    if op == "DynamicQuantizeMatMul" and pos == 1:
        return 8, None
    if init.data_type in _FLOAT:
        return 16, None
    if op == "Gather" and init.data_type == TensorProto.UINT8:
        return table  # a block-quantized table: its storage is recorded
    if op == "Gather" and init.data_type == TensorProto.INT8:
        return 8, None  # rows of a per-channel table
    return None
