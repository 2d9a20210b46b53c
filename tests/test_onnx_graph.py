"""The float ONNX decoder against the numpy reference on tiny random models
of every architecture and RoPE variant, fused and standard-op graphs, step
by step through the KV cache (first step with an empty cache), plus
read_back == plan for each storage form.

Tolerance: max |logit difference| <= 1e-4 (float32 graphs; logits of these
models are O(1..100), measured differences are 1e-6..3e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
from edgeq_targets.onnxruntime.ort_engine import ORTEngine
from test_reference import TINY, tiny_config

from edgeq.backends import onnx_backend as ob
from edgeq.backends.onnx_decoder import GraphOptions
from edgeq.devices import get_device
from edgeq.errors import TargetError
from edgeq.planner import PlanRequest, make_plan
from edgeq.reference import RandomSource, ReferenceModel

ATOL = 1e-4
DEVICE = "x86-server-epyc-genoa"


def float_plan(src, **kw):
    req = PlanRequest(target="onnxruntime", bits=16, context_length=256, **kw)
    return make_plan(src, get_device(DEVICE), req)


def steps_vs_reference(engine, ref, ids) -> float:
    """Max error over: a 3-token prefill on an empty cache, single tokens,
    then a multi-token chunk on a non-empty cache."""
    cache, rcache = engine.new_cache(), ref.new_cache()
    errs = [np.abs(engine.forward(ids[:3], cache) - ref.forward(ids[:3], rcache))]
    for i in ids[3:9]:
        errs.append(np.abs(engine.forward([i], cache) - ref.forward([i], rcache)))
    errs.append(np.abs(engine.forward(ids[9:], cache) - ref.forward(ids[9:], rcache)))
    assert cache.length == len(ids)
    return float(max(e.max() for e in errs))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "standard-ops"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_float_graph_matches_reference(tmp_path, name, fused):
    cfg = tiny_config(name)
    src = RandomSource(cfg, seed=1)
    ref = ReferenceModel(src, 256)
    opts = GraphOptions(fused, fused, fused, context_length=256)
    ob.build(src, float_plan(src), tmp_path, options=opts)
    assert ob.metadata(tmp_path)["edgeq.fallback"] == ""
    engine = ORTEngine(tmp_path, threads=1)
    ids = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 12))
    whole = engine.logits(ids)
    assert whole.shape == (12, cfg.vocab_size)
    assert np.abs(whole - ref.forward(ids)).max() <= ATOL
    assert steps_vs_reference(engine, ReferenceModel(src, 256), ids) <= ATOL


def test_logits_to_keep_returns_last_positions(tmp_path):
    src = RandomSource(tiny_config("llama"), seed=2)
    ob.build(src, float_plan(src), tmp_path)
    engine = ORTEngine(tmp_path, threads=1)
    ids = [5, 6, 7, 8]
    last = engine.forward(ids, engine.new_cache(), keep=1)
    assert last.shape == (1, 128)
    np.testing.assert_allclose(last[0], engine.logits(ids)[-1], atol=1e-6)


def test_context_limit_is_a_clear_error(tmp_path):
    src = RandomSource(tiny_config("llama"), seed=2)
    ob.build(src, float_plan(src), tmp_path, options=GraphOptions(context_length=8))
    engine = ORTEngine(tmp_path, threads=1)
    with pytest.raises(ValueError, match="longer than the model's context of 8"):
        engine.logits(list(range(9)))


PLANS = {
    "int8-per-channel": {"bits": 8},
    "int8-block32": {"bits": 8, "group_size": 32},
    "int4-block32": {"bits": 4, "group_size": 32},
    "int4-block64": {"bits": 4, "group_size": 64},
    "int2-block32": {"bits": 2, "group_size": 32},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2-bias", "gemma3-window"])
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_read_back_equals_plan(tmp_path, arch, plan_name):
    src = RandomSource(tiny_config(arch), seed=4)
    req = PlanRequest(target="onnxruntime", context_length=64, **PLANS[plan_name])
    plan = make_plan(src, get_device(DEVICE), req)
    seen = []
    ob.build(src, plan, tmp_path, progress=seen.append)
    assert sorted(seen) == sorted(src.tensor_names())  # once per tensor
    stored = ob.read_back(tmp_path)
    assert stored == {t.name: (t.bits, t.group_size) for t in plan.tensors}
    ob.smoke_check(tmp_path)


def test_mixed_plan_is_honoured(tmp_path):
    """Per-tensor choices: a float head, 4-bit attention, per-channel MLP."""
    src = RandomSource(tiny_config("llama"), seed=5)
    plan = make_plan(src, get_device(DEVICE), PlanRequest(target="onnxruntime"))
    for t in plan.tensors:
        if t.name == "lm_head.weight":
            t.bits, t.group_size, t.scheme = 16, None, "float"
        elif "self_attn" in t.name and t.bits < 16:
            t.bits, t.group_size = 4, 32
    ob.build(src, plan, tmp_path)
    assert ob.read_back(tmp_path) == {
        t.name: (t.bits, t.group_size) for t in plan.tensors
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 3, "group_size": 32}, "MatMulNBits takes 2, 4, 8 bits"),
        ({"bits": 4, "group_size": None}, "per-channel weights as INT8 only"),
        ({"scheme": "affine", "group_size": 32}, "symmetric weights only"),
        ({"group_size": 48}, "not a multiple of its group size 48"),
    ],
)
def test_unsupported_tensor_plans_are_refused_before_work(tmp_path, change, message):
    src = RandomSource(tiny_config("llama"), seed=5)
    plan = make_plan(src, get_device(DEVICE), PlanRequest(target="onnxruntime"))
    t = plan.tensor("model.layers.0.mlp.up_proj.weight")
    for key, value in change.items():
        setattr(t, key, value)
    with pytest.raises(TargetError, match=message):
        ob.build(src, plan, tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_plan_for_another_target_is_refused(tmp_path):
    src = RandomSource(tiny_config("llama"), seed=5)
    plan = make_plan(src, get_device(DEVICE), PlanRequest(target="mlx"))
    with pytest.raises(TargetError, match="--target onnxruntime"):
        ob.build(src, plan, tmp_path)
