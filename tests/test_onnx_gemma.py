"""Gemma 3 270M (real GGUF): sliding-window and global layers, q/k norms,
GELU-tanh, scaled embeddings, 1 + w norms. The float ONNX graph against the
numpy reference step by step, and greedy generation token for token.

Tolerance: max |logit difference| <= 2e-3 (logits reach ~130 here;
measured 4.5e-4). The sliding window itself (512) is checked on a tiny
random Gemma with a window of 4 in tests/test_onnx_graph.py; here a prompt
longer than the window would cost minutes.
"""

from __future__ import annotations

import pytest
from test_onnx_models import build_float, greedy_onnx

from edgeq.reference import ReferenceModel

ATOL = 2e-3


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tokenizers import Tokenizer

    from edgeq.models import open_model

    src = open_model("gemma3-270m")
    tok = Tokenizer.from_str(src.tokenizer_files["tokenizer.json"].decode())
    engine = build_float(src, tmp_path_factory.mktemp("gemma"))
    return src, tok, engine, ReferenceModel(src, 1024)


def test_float_logits_match_reference(gemma):
    import numpy as np

    _src, tok, engine, ref = gemma
    ids = tok.encode("The capital of France is Paris. The capital of Italy").ids
    assert np.abs(engine.logits(ids) - ref.forward(ids)).max() <= ATOL
    cache, rcache = engine.new_cache(), ref.new_cache()
    worst = np.abs(engine.forward(ids[:1], cache) - ref.forward(ids[:1], rcache)).max()
    for i in ids[1:]:
        step = np.abs(engine.forward([i], cache) - ref.forward([i], rcache)).max()
        worst = max(worst, step)
    assert worst <= ATOL


def test_greedy_tokens_identical(gemma):
    _src, tok, engine, ref = gemma
    ids = tok.encode("Once upon a time").ids
    assert greedy_onnx(engine, ids, 64) == ref.greedy(ids, 64)
