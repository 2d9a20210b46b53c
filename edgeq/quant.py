"""Numpy reference quantizers and error metrics.

These mirror, in plain numpy, what each target stores, so that the planner
can price a choice (its error on real weights) without importing a runtime,
and so that tests can check each runtime against one written-down rule:

- `quantize_affine`: MLX's affine groups. Each run of `group_size`
  consecutive inputs of a row gets a scale and a bias; codes are unsigned
  `bits`-bit integers and w ~= scale * q + bias. MLX (0.2x and later) snaps
  the bias to the group's larger-magnitude edge and rescales so that the
  edge is exact, which also makes 0 exactly representable. `exact_zero=False`
  gives the textbook min/max rule (scale = (max - min) / (2^b - 1),
  bias = min) for comparison.
- `quantize_symmetric`: one scale per output row, signed codes in
  [-(2^(b-1) - 1), 2^(b-1) - 1], no offset: ONNX Runtime's per-channel INT8
  weights. Zero stays zero.
- `quantize_blockwise`: ONNX Runtime's MatMulNBits layout: blocks of
  `block_size` inputs, unsigned codes with a zero point (2^(b-1) when
  symmetric); `pack_matmul_nbits` writes the bytes the operator reads.

All weights are in Hugging Face layout: [out_features, in_features], and
groups run along the input axis (the last one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# MLX clamps a group's scale to at least this, so constant groups divide by
# something; copied as a number, not code.
MLX_SCALE_EPS = 1e-7


@dataclass
class AffineQuantized:
    """Codes [rows, cols] (uint8), scales and biases [rows, cols / group]."""

    q: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        return dequantize_affine(self.q, self.scales, self.biases, self.group_size)


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(w.shape)}")
    rows, cols = w.shape
    if group_size <= 0 or cols % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the input width {cols}"
        )
    return w.reshape(rows, cols // group_size, group_size)


def quantize_affine(
    w: np.ndarray, bits: int, group_size: int, exact_zero: bool = True
) -> AffineQuantized:
    """Affine group quantization of a [rows, cols] float matrix."""
    g = _groups(w, group_size)
    n_bins = np.float32(2**bits - 1)
    w_min, w_max = g.min(axis=-1), g.max(axis=-1)
    if exact_zero:
        scales, biases = _mlx_scale_bias(w_min, w_max, n_bins)
    else:
        scales = np.maximum((w_max - w_min) / n_bins, np.float32(MLX_SCALE_EPS))
        biases = w_min
    scales = scales.astype(np.float32)
    biases = biases.astype(np.float32)
    q = np.rint((g - biases[..., None]) / scales[..., None])
    q = np.clip(q, 0, n_bins).astype(np.uint8)
    return AffineQuantized(q.reshape(w.shape), scales, biases, bits, group_size)


def _mlx_scale_bias(w_min, w_max, n_bins):
    """MLX's rule: anchor the bias at the edge of larger magnitude and pick
    the scale so that this edge is hit exactly (it keeps 0 exact too)."""
    eps = np.float32(MLX_SCALE_EPS)
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, eps).astype(np.float32)
    scale = np.where(side, scale, -scale).astype(np.float32)
    edge = np.where(side, w_min, w_max).astype(np.float32)
    q0 = np.rint(edge / scale)
    nonzero = q0 != 0
    safe_q0 = np.where(nonzero, q0, np.float32(1))
    scale = np.where(nonzero, edge / safe_q0, scale).astype(np.float32)
    bias = np.where(nonzero, edge, np.float32(0)).astype(np.float32)
    return scale, bias


def dequantize_affine(q, scales, biases, group_size: int) -> np.ndarray:
    """w = scale * q + bias, group by group, as float32 [rows, cols]."""
    rows, cols = q.shape
    g = q.reshape(rows, cols // group_size, group_size).astype(np.float32)
    w = g * scales[..., None].astype(np.float32) + biases[..., None].astype(np.float32)
    return w.reshape(rows, cols)


@dataclass
class SymmetricQuantized:
    """Signed codes [rows, cols] (int8) and one scale per row."""

    q: np.ndarray
    scales: np.ndarray
    bits: int

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scales[:, None]


def quantize_symmetric(w: np.ndarray, bits: int = 8) -> SymmetricQuantized:
    """Per-channel (per output row) symmetric quantization; 0 maps to 0.

    The code range is symmetric, [-qmax, qmax] with qmax = 2^(b-1) - 1, as
    ONNX Runtime's per-channel INT8 weights use it (-128 is never produced).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(w.shape)}")
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    # An all-zero row keeps scale 1: its codes are 0 and so is the result.
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scales[:, None]), -qmax, qmax).astype(np.int8)
    return SymmetricQuantized(q, scales, bits)


@dataclass
class BlockwiseQuantized:
    """ONNX Runtime MatMulNBits: unsigned codes [rows, blocks * block_size]
    (input axis zero-padded to whole blocks), scales and zero points
    [rows, blocks]."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    cols: int  # the unpadded input width K

    def dequantize(self) -> np.ndarray:
        rows = self.q.shape[0]
        g = self.q.reshape(rows, -1, self.block_size).astype(np.float32)
        w = (g - self.zero_points[..., None]) * self.scales[..., None]
        return w.reshape(rows, -1)[:, : self.cols]


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool = True
) -> BlockwiseQuantized:
    """Block-wise quantization in ONNX Runtime's MatMulNBits convention.

    Symmetric: the value of largest magnitude in a block maps to code 0 with
    zero point 2^(b-1) (scale = that value / -2^(b-1)), so the block's sign
    matches and 0 stays exact. Asymmetric: min/max with an integer zero
    point. A width that is not a whole number of blocks is zero-padded, as
    the operator does (K need not divide by block_size).
    """
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :cols] = w
    g = padded.reshape(rows, blocks, block_size)
    top = np.float32(2**bits - 1)
    mid = np.float32(2 ** (bits - 1))
    if symmetric:
        idx = np.abs(g).argmax(axis=-1)
        extreme = np.take_along_axis(g, idx[..., None], axis=-1)[..., 0]
        scales = extreme / -mid
        zps = np.full(scales.shape, mid, np.float32)
    else:
        lo = np.minimum(g.min(axis=-1), 0)
        hi = np.maximum(g.max(axis=-1), 0)
        scales = (hi - lo) / top
        zps = np.clip(np.rint(-lo / np.where(scales == 0, 1, scales)), 0, top)
    scales = np.where(scales == 0, np.float32(1), scales).astype(np.float32)
    q = np.clip(np.rint(g / scales[..., None]) + zps[..., None], 0, top)
    return BlockwiseQuantized(
        q.reshape(rows, -1).astype(np.uint8),
        scales,
        zps.astype(np.uint8),
        bits,
        block_size,
        cols,
    )


def pack_matmul_nbits(bq: BlockwiseQuantized) -> dict[str, np.ndarray]:
    """The initializers of a MatMulNBits node: B uint8 [N, blocks, blob]
    with codes packed low bits first, scales float32 [N * blocks], and zero
    points uint8 packed the same way, one row of blocks per output."""
    rows, width = bq.q.shape
    blocks = width // bq.block_size
    b = _pack_bits(bq.q, bq.bits).reshape(rows, blocks, bq.block_size * bq.bits // 8)
    zp = _pack_bits(bq.zero_points, bq.bits, pad_to_byte=True).reshape(-1)
    return {"B": b, "scales": bq.scales.reshape(-1), "zero_points": zp}


def _pack_bits(codes: np.ndarray, bits: int, pad_to_byte: bool = False):
    """Pack unsigned codes of `bits` (4 or 8) along the last axis, the
    first code in the low bits of each byte."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if bits != 4:
        raise ValueError(f"MatMulNBits packing is written for 4 or 8 bits, not {bits}")
    if codes.shape[-1] % 2:
        if not pad_to_byte:
            raise ValueError("4-bit codes must come in pairs")
        pad = np.zeros(codes.shape[:-1] + (1,), np.uint8)
        codes = np.concatenate([codes, pad], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


# -- error metrics ------------------------------------------------------------


def error_stats(w: np.ndarray, w_hat: np.ndarray) -> dict[str, float]:
    """How far `w_hat` is from `w`: mean squared and largest absolute error,
    relative RMS error and signal-to-quantization-noise ratio in dB."""
    w = np.asarray(w, dtype=np.float64)
    d = np.asarray(w_hat, dtype=np.float64) - w
    mse = float(np.mean(d * d)) if d.size else 0.0
    power = float(np.mean(w * w)) if w.size else 0.0
    rel = float(np.sqrt(mse / power)) if power > 0 else 0.0
    sqnr = float(10 * np.log10(power / mse)) if mse > 0 and power > 0 else float("inf")
    max_abs = float(np.abs(d).max()) if d.size else 0.0
    return {"mse": mse, "max_abs": max_abs, "rel_rmse": rel, "sqnr_db": sqnr}


def weighted_error(w: np.ndarray, w_hat: np.ndarray, input_power) -> float:
    """Expected squared error of the layer's output per row, weighting each
    input column's error by the mean square of that input on calibration
    text (E[x_j^2]): the diagonal of the activation-weighted error
    tr(dW H dW^T) with H = E[x x^T]."""
    d = np.asarray(w_hat, dtype=np.float64) - np.asarray(w, dtype=np.float64)
    return float(np.mean((d * d) @ np.asarray(input_power, dtype=np.float64)))


def fake_quantize(w: np.ndarray, bits: int, group_size: int | None, scheme: str):
    """Quantize and dequantize in one step, per the plan's terms: what the
    target would compute with instead of `w` (float32, same shape)."""
    if bits >= 16 or scheme == "float":
        return np.asarray(w, dtype=np.float32)
    if scheme == "affine":
        if group_size is None:
            raise ValueError("affine quantization needs a group size")
        return quantize_affine(w, bits, group_size).dequantize()
    if group_size is None:
        return quantize_symmetric(w, bits).dequantize()
    return quantize_blockwise(w, bits, group_size).dequantize()
