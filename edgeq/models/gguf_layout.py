"""Bounds-check a GGUF file's header before the gguf package parses it.

The gguf package trusts the counts in the header: an array that claims 2^60
elements in a 1 KB file makes its reader loop for ever (reads past the end
come back empty and never advance), and a truncated data section surfaces
as a numpy reshape error. This walk reads the same layout with every count
checked against the bytes that are left, so a damaged or hostile file gets
one clear ModelError in time proportional to its size.

Layout (GGUF v2/v3, all integers little-endian unless the file is swapped):

    "GGUF", u32 version, u64 n_tensors, u64 n_kv
    n_kv x  (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type,
                 u64 offset)
    padding to `general.alignment` (32), then the tensor data; each tensor's
    offset is relative to the start of the data.

A string is u64 length + UTF-8 bytes; an array is u32 item type + u64 count
+ items.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from edgeq.errors import ModelError

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
           10: "Q", 11: "q", 12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; a bound stops recursion


class _Corrupt(Exception):
    """The walk found something impossible; the message says what."""


class _Walker:
    def __init__(self, buf, order: str):
        self.buf, self.pos, self.order = buf, 0, order

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if size > self.left():
            raise _Corrupt(f"the header ends early at byte {self.pos}")
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def skip(self, nbytes: int, what: str) -> None:
        if nbytes > self.left():
            raise _Corrupt(
                f"{what} at byte {self.pos} claims {nbytes} bytes, "
                f"only {self.left()} are left"
            )
        self.pos += nbytes

    def count(self, n: int, min_bytes: int, what: str) -> int:
        # Each item needs at least min_bytes, so n is bounded by the file.
        if n * min_bytes > self.left():
            raise _Corrupt(
                f"{what} at byte {self.pos} claims {n} items, more than the "
                f"{self.left()} bytes left can hold"
            )
        return n

    def string(self, what: str) -> str:
        n = self.take("Q")
        start = self.pos
        self.skip(n, what)
        try:
            return bytes(self.buf[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at byte {start} is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string("a string")
        if vtype != _ARRAY or depth >= _MAX_NESTING:
            raise _Corrupt(f"unknown value type {vtype} at byte {self.pos - 4}")
        itype, n = self.take("I"), self.take("Q")
        if itype in _SCALAR:
            self.skip(n * struct.calcsize(_SCALAR[itype]), "an array")
            return None
        self.count(n, 8 if itype == _STRING else 12, "an array")
        for _ in range(n):
            self.value(itype, depth + 1)
        return None


def check_gguf_layout(path: Path, size: int) -> None:
    """Raise ModelError unless `path`'s header is well-formed and its tensor
    data fits in the file (`size` bytes)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        version = struct.unpack_from("<I", m, 4)[0] if size >= 8 else 0
        # A file written on a big-endian machine has its version byte-swapped.
        order = ">" if version and not version & 0xFFFF else "<"
        w = _Walker(memoryview(m), order)
        try:
            end = _walk(w, GGML_QUANT_SIZES, GGMLQuantizationType)
        except _Corrupt as e:
            raise ModelError(
                f"{path}: corrupt or truncated GGUF header ({e}); download it again"
            ) from None
        finally:
            w.buf.release()
    if end > size:
        raise ModelError(
            f"{path}: truncated: tensors need {end} bytes, file has {size}; "
            "download it again"
        )


def _walk(w: _Walker, quant_sizes, quant_types) -> int:
    """Walk the header; return the byte where the last tensor's data ends."""
    w.skip(4, "the magic")
    version = w.take("I")
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version} is not 2 or 3")
    n_tensors, n_kv = w.take("Q"), w.take("Q")
    w.count(n_kv, 13, "the metadata count")
    w.count(n_tensors, 24, "the tensor count")
    alignment = 32
    for _ in range(n_kv):
        key = w.string("a metadata key")
        vtype = w.take("I")
        value = w.value(vtype)
        if key == "general.alignment" and vtype == 4:
            if value == 0 or value & (value - 1):
                raise _Corrupt(f"general.alignment {value} is not a power of two")
            alignment = value
    spans = []
    for _ in range(n_tensors):
        name = w.string("a tensor name")
        n_dims = w.take("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Corrupt(f"tensor '{name}' has {n_dims} dimensions")
        dims = [w.take("Q") for _ in range(n_dims)]
        ggml_type, offset = w.take("I"), w.take("Q")
        try:
            block, type_size = quant_sizes[quant_types(ggml_type)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor '{name}' has unknown type {ggml_type}") from None
        if dims[0] % block:
            raise _Corrupt(f"tensor '{name}' row of {dims[0]} is not whole blocks")
        count = 1
        for d in dims:
            count *= d
        spans.append(offset + count // block * type_size)
    data_start = -(-w.pos // alignment) * alignment
    return data_start + max(spans, default=0)
