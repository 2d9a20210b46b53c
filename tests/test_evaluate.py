"""Evaluation (edgeq.evaluate): sliding-window perplexity, agreement and KL,
the float reference, plan simulation, the quality gate and `edgeq eval`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeq.devices import get_device
from edgeq.errors import ArtifactError, QualityGateError
from edgeq.evaluate import (
    SimulatedPlan,
    default_max_ppl_increase,
    evaluate,
    float_reference,
    quality_gate,
    run_quality_gate,
    sliding_windows,
)
from edgeq.planner import PlanRequest, make_plan
from tests.conftest import STORIES_GGUF, TEXT_DIR

MAC = "macbook-air-m2-16gb"


@pytest.mark.parametrize("n, window, stride", [(10, 4, 2), (1000, 512, 256),
                                               (513, 512, 512), (7, 16, 8)])  # fmt: skip
def test_sliding_windows_score_each_token_once(n, window, stride):
    scored = []
    for begin, end, first in sliding_windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        if begin > 0:  # later windows give every scored token enough context
            assert first - begin >= min(window - stride, first - begin)
        scored += range(first, end)
    missing = set(range(1, n)) - set(scored)
    assert len(scored) == len(set(scored))
    # With stride == window the first token of each window has no context.
    assert (
        missing <= {k for k in range(window, n, window)}
        if stride == window
        else not missing
    )


class Fixed:
    """A 'model' whose logits are a fixed function of the last token."""

    def __init__(self, table):
        self.table = np.asarray(table, np.float32)

    def logits(self, ids):
        return self.table[np.asarray(ids)]


def test_perplexity_agreement_and_kl_by_hand():
    ref = Fixed(np.log([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    cand = Fixed(np.log([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    ids = [0, 1, 2, 2, 0]
    r = evaluate(cand, ids, ref, window=8, stride=8)
    # Targets 1,2,2,0 after 0,1,2,2: reference p = .25,.25,.8,.1
    nll_ref = -np.log([0.25, 0.25, 0.8, 0.1]).mean()
    nll_cand = -np.log([0.5, 0.25, 0.8, 0.1]).mean()
    assert r.tokens == 4
    assert r.reference_perplexity == pytest.approx(math.exp(nll_ref))
    assert r.perplexity == pytest.approx(math.exp(nll_cand))
    assert r.top1_agreement == 0.75  # only position 0 (after token 0) differs
    kl0 = 0.5 * np.log(0.5 / 0.25) + 0.25 * np.log(0.25 / 0.5)
    assert r.kl_mean == pytest.approx(kl0 / 4)
    same = evaluate(ref, ids, ref, window=3, stride=1)
    assert same.ppl_increase == pytest.approx(0) and same.top1_agreement == 1.0
    assert same.kl_mean == pytest.approx(0, abs=1e-12)


@pytest.fixture(scope="module")
def stories():
    from edgeq.models import open_model

    return open_model(str(STORIES_GGUF))


def _build(src, plan, out):
    """An MLX artifact folder as deploy lays it out (minus the runner)."""
    from edgeq.artifact import write_manifest
    from edgeq.backends import mlx_backend

    out.mkdir(parents=True, exist_ok=True)
    mlx_backend.build(src, plan, out)
    for name, data in src.tokenizer_files.items():
        (out / name).write_bytes(data)
    write_manifest(out, {"target": "mlx", "runtime": {},
                         "model": {"source": str(STORIES_GGUF)}})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def artifacts(stories, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dev = get_device(MAC)
    plans = {
        "g64": make_plan(stories, dev, PlanRequest("mlx")),
        "f16": make_plan(stories, dev, PlanRequest("mlx", bits=16)),
        # 2-bit everywhere the rules allow, tables forced down too: gibberish.
        "2bit": make_plan(stories, dev, PlanRequest("mlx", bits=2, overrides=[
            "lm_head.weight=2", "model.embed_tokens.weight=2"])),
    }  # fmt: skip
    return {k: (_build(stories, p, root / k), p) for k, p in plans.items()}


def test_float_reference_and_simulation_match_the_mlx_artifacts(stories, artifacts):
    """The numpy float model matches the 16-bit MLX artifact, and the plan
    simulation (bit-exact quantizers) matches the 4-bit artifact, to the
    precision of float16 storage: the bench may compare plans simulated."""
    from edgeq_targets.common.engine import load_engine

    ref = float_reference(stories, 200)
    text = (TEXT_DIR / "tinystories_valid_a.txt").read_text()[:3000]
    ids = ref.tokenizer.encode(text)[:160]
    f16 = evaluate(load_engine(artifacts["f16"][0]), ids, ref, window=200, stride=200)
    assert f16.kl_mean < 2e-3 and f16.top1_agreement > 0.97
    folder, plan = artifacts["g64"]
    built = load_engine(folder)
    sim = evaluate(
        built, ids, SimulatedPlan(stories, plan, 200), window=200, stride=200
    )
    assert sim.kl_mean < 2e-3 and sim.top1_agreement > 0.97
    real = evaluate(built, ids, ref, window=200, stride=200)
    assert real.kl_mean > 20 * sim.kl_mean  # the quantization itself shows


def test_quality_gate_passes_4bit_and_blocks_gibberish(stories, artifacts):
    folder, plan = artifacts["g64"]
    figures = run_quality_gate(folder, stories, plan, None)
    assert figures["quality_gate"] == "passed" and figures["tokens"] == 255
    assert 0 < figures["ppl_increase"] < default_max_ppl_increase(plan) == 0.5
    assert 0.6 < figures["top1_agreement"] < 1 and figures["kl_mean"] > 0
    with pytest.raises(QualityGateError) as e:
        run_quality_gate(folder, stories, plan, 0.01)
    msg = str(e.value)
    assert "perplexity rose" in msg and "top-1 agreement" in msg
    assert "more than the 1% the mlx target allows" in msg and "\n" not in msg

    folder, plan = artifacts["2bit"]
    with pytest.raises(QualityGateError, match="more than the 50%"):
        run_quality_gate(folder, stories, plan, None)


def test_gate_limits_per_precision(stories):
    dev = get_device("x86-server-avx512-vnni")
    int8 = make_plan(stories, dev, PlanRequest("onnxruntime"))
    int4 = make_plan(stories, dev, PlanRequest("onnxruntime", bits=4))
    assert default_max_ppl_increase(int8) == 0.05
    assert default_max_ppl_increase(int4) == 0.5


def test_gate_on_any_engine_pair(stories):
    ref = float_reference(stories, 64)
    ids = ref.tokenizer.encode("Once upon a time there was a cat.")
    figures = quality_gate(ref, ref, 0.0, ids=ids)
    assert figures["ppl_increase"] == 0 and figures["top1_agreement"] == 1


def test_eval_command(artifacts):
    from edgeq.cli import app

    folder, _ = artifacts["g64"]
    text = TEXT_DIR / "tinystories_valid_a.txt"
    args = ["eval", str(folder), "--text", str(text), "--max-tokens", "300"]
    r = CliRunner().invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["source"] == str(STORIES_GGUF) and doc["tokens"] == 299
    assert doc["window"] == 512 and doc["stride"] == 256
    assert 1 < doc["reference_perplexity"] < doc["perplexity"] < 10
    assert 0.5 < doc["top1_agreement"] < 1
    r = CliRunner().invoke(app, args)
    assert "top1_agreement" in r.output and "ppl_increase" in r.output


@pytest.mark.parametrize("args, msg", [
    (["/nonexistent-artifact"], "no such artifact folder"),
    (["ARTIFACT", "--text", "/nonexistent.txt"], "--text /nonexistent.txt: file not found"),
])  # fmt: skip
def test_eval_errors_are_one_line(artifacts, args, msg):
    from edgeq.cli import app

    args = [str(artifacts["g64"][0]) if a == "ARTIFACT" else a for a in args]
    r = CliRunner().invoke(app, ["eval", *args])
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output


def test_load_artifact_without_manifest_needs_a_target(tmp_path):
    from edgeq.evaluate import load_artifact

    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(tmp_path)


def test_gate_hint_fits_the_plan(stories):
    """Case C08: a per-channel INT8 plan that fails is pointed at 8-bit
    blocks (SmolLM2: +51% perplexity per-channel, blocked; see README)."""
    from edgeq.evaluate import gate_hint

    x86 = get_device("x86-server-avx512-vnni")
    per_channel = make_plan(stories, x86, PlanRequest("onnxruntime", bits=8))
    assert "8-bit blocks of 32" in gate_hint(per_channel)
    blocks = make_plan(stories, x86, PlanRequest("onnxruntime"))
    assert "--override" in gate_hint(blocks)
    four = make_plan(stories, get_device(MAC), PlanRequest("mlx"))
    assert "--bits 8" in gate_hint(four)
