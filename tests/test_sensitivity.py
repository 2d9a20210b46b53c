"""Tensor sensitivity (edgeq.sensitivity) and the mixed-precision allocator
(edgeq.mixed), on stories260K (genuinely float32, ~3 s to measure) and tiny
random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeq.devices import get_device
from edgeq.errors import PlanError
from edgeq.models.config import ModelConfig
from edgeq.planner import PlanRequest, make_plan
from edgeq.quant import fake_quantize
from edgeq.reference import RandomSource
from edgeq.sensitivity import (
    Choice,
    _Runner,
    calibration_ids,
    calibration_text,
    load_or_measure,
    measure,
)
from tests.conftest import STORIES_GGUF, TEXT_DIR

MAC = "macbook-air-m2-16gb"


@pytest.fixture(scope="module")
def stories():
    from edgeq.models import open_model

    return open_model(str(STORIES_GGUF))


@pytest.fixture(scope="module")
def table(stories):
    return measure(stories, "mlx", calibration_text(), 512)


def test_every_matrix_that_can_be_quantized_is_measured(stories, table):
    wanted = {
        i.name
        for i in stories.infos()
        if len(i.shape) == 2 and i.shape[1] % 32 == 0  # down_proj: 172 fits none
    }
    assert set(table.tensors) == wanted
    assert table.tokens == 512 and table.model_sha256 == stories.source_sha256
    # The output head matters most: every logit goes through it.
    at4 = {n: e.predicted_kl("4/64/affine") for n, e in table.tensors.items()}
    assert max(at4, key=at4.get) == "lm_head.weight"


def test_predicted_kl_falls_with_more_bits_and_smaller_groups(table):
    for e in table.tensors.values():
        kl = e.predicted_kl
        assert kl("3/64/affine") > kl("4/64/affine") > kl("6/64/affine")
        assert kl("6/64/affine") > kl("8/64/affine") > 0
        assert kl("4/32/affine") < kl("4/64/affine")
        assert e.measured == "3/64/affine" and e.kl > 0


def test_extrapolated_kl_agrees_with_real_measurements(stories, table):
    """The cheap extrapolation (measured KL x error ratio) against the KL
    measured for real at every choice, for a sample of tensors: ranks agree
    and values agree within a factor of 2 for nine in ten of them (3 for
    all)."""
    runner = _Runner(stories, calibration_ids(stories, calibration_text(), 512))
    names = sorted(table.tensors)[::4]
    pred, real = [], []
    for name in names:
        e = table.tensors[name]
        for key in e.errors:
            c = Choice.from_key(key)
            image = fake_quantize(runner.weight(name), c.bits, c.group_size, c.scheme)
            real.append(runner.kl_with(name, image))
            pred.append(e.predicted_kl(key))
    pred, real = np.array(pred), np.array(real)
    ranks = np.corrcoef(np.argsort(np.argsort(pred)), np.argsort(np.argsort(real)))
    assert ranks[0, 1] > 0.9
    # KLs under 1e-4 nats (8-bit choices) are noise and never decide a plan.
    off = np.abs(np.log(pred / real))[real > 1e-4]
    assert np.quantile(off, 0.9) < np.log(2) and off.max() < np.log(3)


def test_tables_are_cached_per_model_and_calibration_text(
    stories, monkeypatch, tmp_path
):
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path))
    first = load_or_measure(stories, "mlx", tokens=64)
    assert first.cache_path.startswith(str(tmp_path))
    assert (
        json.loads(Path(first.cache_path).read_text())["model_sha256"]
        == stories.source_sha256
    )

    def refuse(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("edgeq.sensitivity.measure", refuse)
    again = load_or_measure(stories, "mlx", tokens=64)
    assert again.tensors.keys() == first.tensors.keys()
    with pytest.raises(AssertionError, match="measured again"):
        load_or_measure(stories, "mlx", text=calibration_text() + " More.", tokens=64)


# -- the allocator ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One sensitivity cache for the module: each table is measured once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_mixed_plan_spends_the_budget_by_sensitivity(stories, cache):
    req = PlanRequest("mlx", target_bpw=6.9)
    plan = make_plan(stories, get_device(MAC), req)
    assert 6.8 < plan.bits_per_weight <= 6.9
    reasons = {t.reason for t in plan.tensors}
    assert reasons <= {"sensitivity", "rule", "shape-fallback", "not-a-matrix"}
    assert "sensitivity" in reasons
    upgraded = [t for t in plan.tensors if t.quantized and t.bits >= 6]
    assert upgraded and all("predicted KL" in t.note for t in upgraded)
    head = plan.tensor("lm_head.weight")
    assert head.bits >= 4 and head.reason in ("rule", "sensitivity")
    assert min(t.bits for t in plan.tensors if t.quantized) >= 4
    s = plan.sensitivity
    assert s["predicted_kl_sum"] < s["uniform_default_kl_sum"]
    assert plan.defaults["target_bpw"] == 6.9


def test_mixed_plan_beats_uniform_plans_on_held_out_text(stories, cache):
    """On TinyStories text (not the calibration text), the mixed plan sized
    between uniform group 64 and group 32 loses less perplexity than both and
    has lower KL than group 64 (quantized weights simulated bit-exactly; see
    test_evaluate)."""
    from edgeq.evaluate import SimulatedPlan, evaluate, float_reference

    dev = get_device(MAC)
    ref = float_reference(stories, 600)
    text = (TEXT_DIR / "tinystories_valid_a.txt").read_text()[:20000]
    ids = ref.tokenizer.encode(text)[:1024]
    kl, ppl = {}, {}
    for name, req in {
        "g64": PlanRequest("mlx"),
        "g32": PlanRequest("mlx", group_size=32),
        "mixed": PlanRequest("mlx", target_bpw=6.9),
    }.items():
        plan = make_plan(stories, dev, req)
        r = evaluate(SimulatedPlan(stories, plan, 600), ids, ref)
        kl[name], ppl[name] = r.kl_mean, r.ppl_increase
    assert ppl["mixed"] < ppl["g32"] < ppl["g64"]
    assert kl["mixed"] < kl["g64"]


def test_low_bits_only_when_the_budget_needs_them(stories, cache):
    plan = make_plan(stories, get_device(MAC), PlanRequest("mlx", target_bpw=6.4))
    assert 3 in {t.bits for t in plan.tensors}
    assert plan.bits_per_weight <= 6.4
    with pytest.raises(PlanError, match="--target-bpw 5 is below the smallest"):
        make_plan(stories, get_device(MAC), PlanRequest("mlx", target_bpw=5.0))


def test_tied_table_gets_one_precision_and_the_head_rule(cache):
    cfg = ModelConfig(architecture="llama", hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, intermediate_size=128,
                      vocab_size=256, tie_word_embeddings=True)  # fmt: skip
    src = RandomSource(cfg, seed=3)
    src.tokenizer_files = {}  # no tokenizer: calibrate on raw ids
    plan = make_plan(src, get_device(MAC), PlanRequest("mlx", target_bpw=4.6))
    emb = [t for t in plan.tensors if "embed" in t.name]
    assert len(emb) == 1 and emb[0].bits >= 4
    assert plan.bits_per_weight <= 4.6


def test_onnxruntime_mixed_plan_uses_its_own_storage(stories, cache):
    plan = make_plan(
        stories, get_device("x86-server-avx512-vnni"),
        PlanRequest("onnxruntime", target_bpw=5.5),
    )  # fmt: skip
    assert plan.bits_per_weight <= 5.5
    for t in plan.tensors:
        if t.quantized:
            assert t.scheme == "symmetric" and t.bits in (4, 8)
            assert t.group_size is None or t.shape[1] % t.group_size == 0
