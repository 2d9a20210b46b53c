"""Numpy weight quantizers in the layouts ONNX Runtime's operators read.

Two storage forms, both symmetric (no zero points stored):

- per-channel INT8 for `DynamicQuantizeMatMul` (com.microsoft): B is int8
  [K, N] (input features first), one float scale per output column [N].
  With `reduce_range` the weights use 7 bits (-63..63) so that a u8 x s8 pair
  sum fits int16 on x86 CPUs without VNNI (vpmaddubsw saturates; case C07).
- block-wise N-bit for `MatMulNBits` (com.microsoft):
  B is uint8 [N, K / block, block * bits / 8] packed along K, low bits first;
  scales [N, K / block]; the implied zero point is 2^(bits - 1), so stored
  values are q + 2^(bits - 1) with q in [-(2^(bits-1) - 1), 2^(bits-1) - 1].

Both work on a block of rows at a time, so callers can stream large tensors.
"""

from __future__ import annotations

import numpy as np


def int8_per_channel(w: np.ndarray, reduce_range: bool = False):
    """w [rows, K] float32 -> (q [rows, K] int8, scale [rows] float32)."""
    qmax = 63 if reduce_range else 127
    absmax = np.abs(w).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def blockwise(w: np.ndarray, bits: int, block: int):
    """w [rows, K] float32 -> (packed uint8 [rows, K/block, block*bits/8],
    scales [rows, K/block] float32). K must be a multiple of block."""
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"input width {cols} is not a multiple of block {block}")
    qmax = 2 ** (bits - 1) - 1
    wb = w.reshape(rows, cols // block, block)
    absmax = np.abs(wb).max(axis=2)
    scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scales[..., None]), -qmax, qmax).astype(np.int16)
    return pack_bits((q + 2 ** (bits - 1)).astype(np.uint8), bits), scales


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values along the last axis, low-order bits first."""
    if bits == 8:
        return u
    per_byte = 8 // bits
    u = u.reshape(*u.shape[:-1], u.shape[-1] // per_byte, per_byte)
    out = np.zeros(u.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= (u[..., i] << (bits * i)).astype(np.uint8)
    return out


def unpack_bits(p: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return p
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(p >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*p.shape[:-1], -1).astype(np.uint8)


def dequant_blockwise(packed: np.ndarray, scales: np.ndarray, bits: int):
    """Inverse of `blockwise`: [rows, K] float32 (for tests and evaluation)."""
    u = unpack_bits(packed, bits).astype(np.float32) - 2 ** (bits - 1)
    return (u * scales[..., None]).reshape(packed.shape[0], -1)


def row_blocks(rows: int, cols: int, budget_bytes: int = 64 << 20):
    """Row slices of a [rows, cols] float32 tensor, each within the budget."""
    step = max(1, budget_bytes // (4 * max(1, cols)))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))
