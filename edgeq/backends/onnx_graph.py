"""A small ONNX graph writer that streams initializers to external data.

Every initializer above `inline_limit_bytes` is appended to `model.onnx.data`
as soon as it is added and only its location stays in the protobuf, so the
writer never holds more than the tensor being added, and the protobuf stays
far below its 2 GB cap whatever the model size (case C05). The data file is
referenced by relative name, so the folder can be moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import TargetError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT_BYTES = 2**31 - 1  # protobuf's hard cap on one message
INLINE_LIMIT_BYTES = 1024  # tensors above this go to the external data file
# Large tensors start on 64 KiB boundaries so ONNX Runtime can mmap them
# (the onnx package's own default for external data).
ALIGN_THRESHOLD_BYTES = 1 << 20
ALIGN_BYTES = 1 << 16
MS_DOMAIN = "com.microsoft"

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
}


class GraphWriter:
    """Collects nodes and initializers; writes model.onnx(+.data) into `out`."""

    def __init__(
        self,
        out: Path,
        data_name: str = "model.onnx.data",
        inline_limit_bytes: int = INLINE_LIMIT_BYTES,
    ):
        self.out = Path(out)
        self.data_name = data_name
        self.inline_limit = inline_limit_bytes
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.metadata: dict[str, str] = {}
        self.domains: set[str] = set()
        self.external_bytes = 0
        self._names: dict[str, int] = {}
        # Held open across add calls; closed by save() or close().
        self._data = open(self.out / data_name, "wb")  # noqa: SIM115

    # -- names and tensors ---------------------------------------------------
    def fresh(self, stem: str) -> str:
        """A value name not used before, derived from `stem`."""
        n = self._names.get(stem, 0)
        self._names[stem] = n + 1
        return stem if n == 0 else f"{stem}_{n}"

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a constant; large ones go to the external data file now."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= self.inline_limit:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        if array.nbytes >= ALIGN_THRESHOLD_BYTES:
            pad = -self._data.tell() % ALIGN_BYTES
            self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(array.tobytes())
        self.external_bytes += array.nbytes
        self.initializers.append(
            self._external_proto(name, array.dtype, array.shape, offset, array.nbytes)
        )
        return name

    def const(self, stem: str, value, dtype=np.int64) -> str:
        return self.initializer(self.fresh(stem), np.asarray(value, dtype=dtype))

    # -- nodes ---------------------------------------------------------------
    def node(
        self,
        op: str,
        inputs: list,
        n_out: int = 1,
        domain: str = "",
        outputs=None,
        **attrs,
    ):
        """Append a node; returns its output name (or names if n_out > 1).
        `outputs` names them explicitly ("" for an unused optional output)."""
        if domain:
            self.domains.add(domain)
        outs = outputs or [self.fresh(f"{op}_out") for _ in range(n_out)]
        n_out = len(outs)
        name = self.fresh(op)
        self.nodes.append(
            helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def ms(self, op: str, inputs: list, n_out: int = 1, outputs=None, **attrs):
        """A com.microsoft contrib node."""
        return self.node(op, inputs, n_out, MS_DOMAIN, outputs, **attrs)

    def stream_initializer(self, name: str, dtype, shape: tuple, chunks) -> str:
        """Add a large constant written chunk by chunk (C-order pieces along
        the first axis), so the whole array never exists in memory."""
        dtype = np.dtype(dtype)
        expected = int(np.prod(shape)) * dtype.itemsize
        if expected >= ALIGN_THRESHOLD_BYTES:
            self._data.write(b"\0" * (-self._data.tell() % ALIGN_BYTES))
        offset = self._data.tell()
        for chunk in chunks:
            self._data.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        written = self._data.tell() - offset
        if written != expected:
            raise ValueError(f"{name}: wrote {written} bytes, shape needs {expected}")
        self.external_bytes += written
        self.initializers.append(
            self._external_proto(name, dtype, shape, offset, written)
        )
        return name

    def _external_proto(self, name, dtype, shape, offset, length) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = _NP_TO_ONNX[np.dtype(dtype)]
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_name),
            ("offset", str(offset)),
            ("length", str(length)),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def rename_output(self, value: str, name: str) -> None:
        """Make the node producing `value` write graph output `name` instead."""
        for n in reversed(self.nodes):
            for i, o in enumerate(n.output):
                if o == value:
                    n.output[i] = name
                    return
        raise KeyError(value)

    def add_input(self, name: str, elem_type, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # -- saving --------------------------------------------------------------
    def save(self, opset: int, ir_version: int, producer: str = "edgeq") -> Path:
        """Write model.onnx beside the data file; refuses an oversized proto."""
        self._data.close()
        graph = helper.make_graph(
            self.nodes, "decoder", self.inputs, self.outputs, self.initializers
        )
        imports = [helper.make_opsetid("", opset)]
        imports += [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=imports, producer_name=producer)
        model.ir_version = ir_version
        for key, value in sorted(self.metadata.items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        size = model.ByteSize()
        if size >= PROTOBUF_LIMIT_BYTES:
            raise TargetError(
                f"model.onnx would be {size} bytes, over protobuf's 2 GB cap, even "
                "with weights in external data; lower inline_limit_bytes"
            )
        path = self.out / "model.onnx"
        path.write_bytes(model.SerializeToString())
        if self.external_bytes == 0:
            # Keep the layout fixed: the data file always exists beside it.
            log.debug(
                "no tensor went to %s (all below the inline limit)", self.data_name
            )
        return path

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()


def check_single_file(total_bytes: int, limit: int | None = None) -> None:
    """Refuse, before any work, a request to inline weights past the cap."""
    limit = PROTOBUF_LIMIT_BYTES if limit is None else limit
    if total_bytes >= limit:
        raise TargetError(
            f"a single-file ONNX model would hold {total_bytes / 2**30:.2f} GiB of "
            f"weights, over protobuf's {limit / 2**30:.2f} GiB cap; keep the "
            "default external data (model.onnx.data)"
        )


def load_structure(path: Path) -> onnx.ModelProto:
    """model.onnx without loading its external data (cheap at any size)."""
    return onnx.load(str(path), load_external_data=False)
