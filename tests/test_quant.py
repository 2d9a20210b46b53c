"""Property tests for the numpy reference quantizers (edgeq.quant), and round
trips through each target's storage: MLX's mx.quantize / mx.dequantize and
ONNX Runtime's MatMulNBits / per-channel INT8 layouts, run by the runtimes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgeq.quant import (
    MLX_SCALE_EPS,
    dequantize_affine,
    error_stats,
    fake_quantize,
    pack_matmul_nbits,
    quantize_affine,
    quantize_blockwise,
    quantize_symmetric,
    weighted_error,
)

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def matrices(draw, group_choices=(32, 64, 128), max_rows=4, max_groups=3):
    """A float32 [rows, groups * g] matrix, with some constant, all-zero and
    tiny-range groups mixed in (the cases that divide by zero)."""
    g = draw(st.sampled_from(group_choices))
    rows = draw(st.integers(1, max_rows))
    cols = g * draw(st.integers(1, max_groups))
    w = draw(arrays(np.float32, (rows, cols), elements=finite))
    kind = draw(st.sampled_from(["as-is", "zero", "constant", "tiny", "scaled"]))
    r = draw(st.integers(0, rows - 1))
    if kind == "zero":
        w[r, :g] = 0.0
    elif kind == "constant":
        w[r, :g] = draw(finite)
    elif kind == "tiny":
        w[r, :g] = 1.0 + 1e-6 * np.arange(g, dtype=np.float32)
    elif kind == "scaled":
        w *= np.float32(draw(st.sampled_from([1e-4, 1e-2, 10.0])))
    return w, g


# -- affine groups (MLX) --------------------------------------------------------


@SETTINGS
@given(matrices(), st.sampled_from([2, 3, 4, 6, 8]))
def test_affine_error_bounded_per_group(wg, bits):
    """Inside the representable range a value is off by at most half a step;
    MLX snaps the bias to the larger edge, which can clip the far edge by at
    most one step (scale / (2 r) with r >= 1/2 the edge's share)."""
    w, g = wg
    a = quantize_affine(w, bits, g)
    d = a.dequantize()
    assert np.isfinite(d).all() and np.isfinite(a.scales).all()
    err = np.abs(d - w).reshape(w.shape[0], -1, g)
    step = np.abs(a.scales)[..., None]
    lo = np.minimum(a.biases, a.biases + (2**bits - 1) * a.scales)[..., None]
    hi = np.maximum(a.biases, a.biases + (2**bits - 1) * a.scales)[..., None]
    inside = (w.reshape(err.shape) >= lo) & (w.reshape(err.shape) <= hi)
    tol = 1e-5 * (np.abs(w).max() + 1)
    assert (err[inside] <= (step / 2 + tol).repeat(g, -1)[inside]).all()
    assert (err <= step + tol).all()


@SETTINGS
@given(matrices(), st.sampled_from([2, 3, 4, 8]))
def test_affine_minmax_rule_error_is_half_a_step(wg, bits):
    w, g = wg
    a = quantize_affine(w, bits, g, exact_zero=False)
    err = np.abs(a.dequantize() - w).reshape(w.shape[0], -1, g)
    tol = 1e-5 * (np.abs(w).max() + 1)
    assert (err <= a.scales[..., None] / 2 + tol).all()


@SETTINGS
@given(matrices(), st.sampled_from([2, 3, 4, 6, 8]))
def test_affine_keeps_exact_zeros_and_constant_groups(wg, bits):
    w, g = wg
    a = quantize_affine(w, bits, g)
    d = a.dequantize()
    # MLX's rule puts 0 on the grid: only float32 rounding of bias + q * scale
    # (a few ulps of the group's edge) separates it from exact.
    edge = np.abs(a.biases).repeat(g, axis=1)
    assert (np.abs(d[w == 0]) <= 4 * np.finfo(np.float32).eps * edge[w == 0]).all()
    groups = w.reshape(w.shape[0], -1, g)
    const = (groups == groups[..., :1]).all(-1)
    dg = d.reshape(groups.shape)
    # Exact up to float rounding; a constant smaller than half of MLX's
    # minimum scale (1e-7) may round to 0, as in MLX.
    np.testing.assert_allclose(dg[const], groups[const], rtol=1e-6, atol=MLX_SCALE_EPS)


def test_affine_refuses_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide the input width 96"):
        quantize_affine(np.zeros((2, 96), np.float32), 4, 64)


# -- round trips through MLX's storage ----------------------------------------


@settings(max_examples=25, deadline=None)
@given(matrices(max_rows=3, max_groups=2), st.sampled_from([2, 3, 4, 5, 6, 8]))
def test_mlx_quantize_matches_the_reference(wg, bits):
    """mx.quantize / mx.dequantize agree with the numpy reference: same
    scales and biases, same dequantized weights (float32 input)."""
    mx = pytest.importorskip("mlx.core")
    w, g = wg
    a = quantize_affine(w, bits, g)
    q, s, b = mx.quantize(mx.array(w), group_size=g, bits=bits)
    d = np.array(mx.dequantize(q, s, b, group_size=g, bits=bits))
    tol = 1e-6 * (np.abs(w).max() + 1)
    np.testing.assert_allclose(np.array(s), a.scales, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.array(b), a.biases, rtol=1e-6, atol=tol)
    np.testing.assert_allclose(d, a.dequantize(), rtol=1e-5, atol=tol)


def test_mlx_float16_storage_stays_within_the_reference_step():
    """The MLX builder quantizes float16 weights and stores float16 scales:
    the dequantized result is the reference's within one float16 rounding
    of the scale per code."""
    mx = pytest.importorskip("mlx.core")
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    w16 = w.astype(np.float16).astype(np.float32)
    a = quantize_affine(w16, 4, 64)
    q, s, b = mx.quantize(mx.array(w).astype(mx.float16), group_size=64, bits=4)
    d = np.array(mx.dequantize(q, s, b, group_size=64, bits=4).astype(mx.float32))
    step = np.abs(a.scales).repeat(64, axis=1)
    assert (np.abs(d - a.dequantize()) <= 0.02 * step + 2e-3).all()
    assert np.abs(d - w).max() < np.abs(a.scales).max()


# -- symmetric per-channel INT8 and block-wise (ONNX Runtime) -------------------


@SETTINGS
@given(matrices(group_choices=(16, 32, 48)), st.sampled_from([4, 8]))
def test_symmetric_keeps_zeros_and_bounds_error(wg, bits):
    w, _ = wg
    sq = quantize_symmetric(w, bits)
    d = sq.dequantize()
    assert np.isfinite(d).all()
    assert (d[w == 0] == 0).all()
    qmax = 2 ** (bits - 1) - 1
    assert np.abs(sq.q).max() <= qmax
    tol = 1e-6 * (np.abs(w).max() + 1)
    assert (np.abs(d - w) <= sq.scales[:, None] / 2 + tol).all()


@SETTINGS
@given(matrices(group_choices=(16, 32, 64)), st.sampled_from([4, 8]), st.data())
def test_blockwise_keeps_zeros_and_bounds_error(wg, bits, data):
    """The block's largest magnitude maps to code 0 exactly; the other side
    of zero reaches one step less, so it clips by at most one step."""
    w, g = wg
    cols = data.draw(st.integers(1, w.shape[1]))  # K need not fill the blocks
    w = w[:, :cols]
    bq = quantize_blockwise(w, bits, g)
    d = bq.dequantize()
    assert d.shape == w.shape and np.isfinite(d).all()
    assert (d[w == 0] == 0).all()
    step = np.abs(bq.scales).repeat(g, axis=1)[:, :cols]
    tol = 1e-6 * (np.abs(w).max() + 1)
    assert (np.abs(d - w) <= step + tol).all()


def _ort_session(nodes, inputs, outputs, inits):
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )


@settings(max_examples=6, deadline=None)
@given(matrices(group_choices=(16, 32, 64), max_groups=2), st.sampled_from([4, 8]))
def test_matmul_nbits_round_trip_through_onnxruntime(wg, bits):
    """The packed B / scales / zero points, run by ONNX Runtime's MatMulNBits
    on an identity input, give back exactly the reference's weights."""
    from onnx import TensorProto, helper, numpy_helper

    w, g = wg
    n, k = w.shape
    packed = pack_matmul_nbits(quantize_blockwise(w, bits, g))
    inits = [numpy_helper.from_array(v, name) for name, v in packed.items()]
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"],
        domain="com.microsoft", K=k, N=n, bits=bits, block_size=g,
    )  # fmt: skip
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])
    sess = _ort_session([node], [a], [y], inits)
    got = sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
    want = quantize_blockwise(w, bits, g).dequantize()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(w).max())


def test_per_channel_int8_round_trip_through_onnxruntime():
    """int8 W [K, N] with one scale per output column (axis 1), as ONNX
    Runtime's per-channel INT8 stores it, dequantized by the runtime."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(3).standard_normal((24, 40)).astype(np.float32)
    w[5] = 0.0
    sq = quantize_symmetric(w, 8)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(sq.q.T), "Wq"),
        numpy_helper.from_array(sq.scales, "scale"),
        numpy_helper.from_array(np.zeros(24, np.int8), "zp"),
    ]
    node = helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["W"], axis=1)
    out = helper.make_tensor_value_info("W", TensorProto.FLOAT, [40, 24])
    got = _ort_session([node], [], [out], inits).run(None, {})[0].T
    np.testing.assert_allclose(got, sq.dequantize(), rtol=1e-6, atol=0)
    assert (got[5] == 0).all()


# -- metrics and the plan-facing helper -------------------------------------------


def test_error_stats_and_weighted_error():
    w = np.array([[1.0, -2.0, 0.0, 4.0]], np.float32)
    w_hat = w + np.array([[0.5, 0.0, 0.0, -0.5]], np.float32)
    s = error_stats(w, w_hat)
    assert s["mse"] == pytest.approx(0.125)
    assert s["max_abs"] == pytest.approx(0.5)
    assert s["sqnr_db"] == pytest.approx(10 * np.log10(21 / 4 / 0.125))
    # Errors on an input that never fires cost nothing.
    assert weighted_error(w, w_hat, [0.0, 1.0, 1.0, 0.0]) == 0.0
    assert weighted_error(w, w_hat, [1.0, 0.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert error_stats(w, w)["sqnr_db"] == float("inf")


def test_fake_quantize_follows_the_plan_terms():
    w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    assert fake_quantize(w, 16, None, "float") is not None
    np.testing.assert_array_equal(fake_quantize(w, 16, None, "float"), w)
    a = quantize_affine(w, 4, 32)
    np.testing.assert_array_equal(
        fake_quantize(w, 4, 32, "affine"),
        dequantize_affine(a.q, a.scales, a.biases, 32),
    )
    np.testing.assert_array_equal(
        fake_quantize(w, 8, None, "symmetric"), quantize_symmetric(w).dequantize()
    )
    with pytest.raises(ValueError, match="needs a group size"):
        fake_quantize(w, 4, None, "affine")
