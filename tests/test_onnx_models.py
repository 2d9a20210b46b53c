"""Real models: the float ONNX graph against the numpy reference, step by
step through the KV cache (the first step with an empty cache), and greedy
generation token for token. Gemma 3 has its own file (its GGUF takes ~45 s
to open), tests/test_onnx_gemma.py.

Tolerance: max |logit difference| <= 1e-3. Measured: stories260K 2e-5,
SmolLM2-135M 2e-4 (logits up to ~35).
"""

from __future__ import annotations

import numpy as np
import pytest
from edgeq_targets.onnxruntime.ort_engine import ORTEngine
from test_onnx_graph import DEVICE
from test_reference import STORIES

from edgeq.backends import onnx_backend as ob
from edgeq.devices import get_device
from edgeq.planner import PlanRequest, make_plan
from edgeq.reference import ReferenceModel

ATOL = 1e-3
GREEDY_TOKENS = 64


def build_float(src, folder):
    req = PlanRequest(target="onnxruntime", bits=16, context_length=1024)
    ob.build(src, make_plan(src, get_device(DEVICE), req), folder)
    return ORTEngine(folder, threads=2)


def check_against_reference(engine, ref, ids):
    """Whole sequence, then prefill 4 + one token at a time."""
    assert np.abs(engine.logits(ids) - ref.forward(ids)).max() <= ATOL
    cache, rcache = engine.new_cache(), ref.new_cache()
    worst = np.abs(engine.forward(ids[:4], cache) - ref.forward(ids[:4], rcache)).max()
    for i in ids[4:]:
        step = np.abs(engine.forward([i], cache) - ref.forward([i], rcache)).max()
        worst = max(worst, step)
    assert worst <= ATOL


def greedy_onnx(engine, ids, n):
    cache, out = engine.new_cache(), []
    logits = engine.forward(ids, cache, keep=1)[-1]
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = engine.forward([out[-1]], cache, keep=1)[-1]
    return out


@pytest.fixture(scope="module", params=["stories260K", "smollm2-135m"])
def model(request, tmp_path_factory):
    from tokenizers import Tokenizer

    from edgeq.models import open_model

    ref_name = str(STORIES) if request.param == "stories260K" else request.param
    src = open_model(ref_name)
    tok = Tokenizer.from_str(src.tokenizer_files["tokenizer.json"].decode())
    engine = build_float(src, tmp_path_factory.mktemp(request.param))
    return src, tok, engine, ReferenceModel(src, 1024)


def test_float_logits_match_reference(model):
    _src, tok, engine, ref = model
    text = "It is a truth universally acknowledged, that a single man in possession"
    ids = tok.encode(text).ids[:24]
    check_against_reference(engine, ref, ids)


def test_greedy_tokens_identical(model):
    _src, tok, engine, ref = model
    ids = tok.encode("Once upon a time").ids
    assert greedy_onnx(engine, ids, GREEDY_TOKENS) == ref.greedy(ids, GREEDY_TOKENS)
