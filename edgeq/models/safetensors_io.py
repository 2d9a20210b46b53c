"""A small, strict safetensors reader that reads one tensor (or rows) at a time.

Layout of a .safetensors file: 8 bytes little-endian u64 N, then N bytes of
JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"},
then the raw data; offsets are relative to the end of the header.

We read with plain file reads rather than mmap so that resident memory holds
only the tensor being converted, and so that every way a file can be broken
(git-lfs pointer, truncation, pickle renamed) gets its own message.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import ModelError

_DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # widened to float32 by hand
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}

_MAX_HEADER = 100 * 1024 * 1024
_MAX_ELEMENTS = 1 << 44  # 16 Ti elements: far beyond any checkpoint tensor


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def sniff_bad_weight_file(path: Path, head: bytes) -> str | None:
    """Say what a file that should hold weights really is, when we can tell."""
    if head.startswith(b"version https://git-lfs"):
        return (
            "is a git-lfs pointer, not the weights; run `git lfs pull` "
            "or download the real file"
        )
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "is a Python pickle, not safetensors; convert it to safetensors first"
    if head.startswith(b"PK\x03\x04"):
        return (
            "is a zip archive (a PyTorch checkpoint?), not safetensors; "
            "convert it to safetensors first"
        )
    return None


class SafetensorsFile:
    """Index of one .safetensors file; tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                rest = f.read(256)
        except FileNotFoundError:
            raise ModelError(f"{self.path}: file not found") from None
        what = sniff_bad_weight_file(self.path, head + rest)
        if what:
            raise ModelError(f"{self.path} {what}")
        if len(head) < 8:
            raise ModelError(
                f"{self.path}: truncated ({size} bytes): not a safetensors "
                "file; download it again"
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise ModelError(
                f"{self.path}: not a safetensors file or truncated (header "
                f"claims {n} bytes, file has {size}); download it again"
            )
        with open(self.path, "rb") as f:
            f.seek(8)
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ModelError(
                f"{self.path}: corrupt safetensors header ({e}); download it again"
            ) from None
        if not isinstance(header, dict):
            raise ModelError(
                f"{self.path}: corrupt safetensors header (not a JSON object); "
                "download it again"
            )
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, TensorEntry] = {}
        data_start = 8 + n
        expected_end = data_start
        for name, spec in header.items():
            self.entries[name] = entry = self._entry(name, spec, data_start)
            expected_end = max(expected_end, entry.end)
        if expected_end > size:
            raise ModelError(
                f"{self.path}: truncated: expected at least {expected_end} "
                f"bytes, found {size}; download it again"
            )

    def _entry(self, name, spec, data_start) -> TensorEntry:
        # Header values are untrusted JSON: only non-negative integers are
        # sizes (1e999 or 2.5 is not), and products use Python ints, which
        # do not wrap the way int64 does.
        try:
            dtype = spec["dtype"]
            shape = tuple(spec["shape"])
            begin, end = spec["data_offsets"]
            ok = all(_is_size(v) for v in (*shape, begin, end))
            # Even with a zero dimension (no bytes) no array may be larger
            # than numpy can index.
            ok = ok and math.prod(max(d, 1) for d in shape) <= _MAX_ELEMENTS
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelError(
                f"{self.path}: tensor '{name}' has a malformed header entry; "
                "download it again"
            )
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ModelError(
                f"{self.path}: tensor '{name}' has unsupported dtype {dtype!r}"
            )
        count = math.prod(shape)
        if end < begin or end - begin != count * _DTYPES[dtype][1]:
            raise ModelError(
                f"{self.path}: tensor '{name}' data size does not match its "
                f"shape {list(shape)} and dtype {dtype}"
            )
        return TensorEntry(name, dtype, shape, data_start + begin, data_start + end)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` as float32 (integers keep their type); `rows` reads a
        slice along the first axis only."""
        e = self.entries[name]
        np_dtype, width = _DTYPES[e.dtype]
        shape = list(e.shape)
        begin = e.begin
        if rows is not None and shape:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = width * math.prod(shape[1:])
            begin += start * row_bytes
            shape[0] = stop - start
        count = math.prod(shape)
        with open(self.path, "rb") as f:
            f.seek(begin)
            buf = f.read(count * width)
        if len(buf) != count * width:
            raise ModelError(f"{self.path}: truncated while reading '{name}'")
        arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        if e.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if np.issubdtype(np_dtype, np.floating):
            return arr.astype(np.float32)
        return arr.copy()
