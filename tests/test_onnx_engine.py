"""The device-side runner (targets/onnxruntime/ort_engine.py) on an artifact
folder built from stories260K: greedy and sampled generation, stop strings,
end of sequence, threads, chat templates, and its import boundary."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from edgeq_targets.common.engine import GenerationConfig, load_engine
from test_reference import ONCE, STORIES

from edgeq.backends import onnx_backend as ob
from edgeq.devices import get_device
from edgeq.planner import PlanRequest, make_plan

RUNNER = Path(__file__).parents[1] / "targets/onnxruntime/ort_engine.py"


def make_artifact(src, folder: Path, bits: int = 16, device="rpi5-8gb", **plan_kw):
    """model files + tokenizer + a minimal manifest: what load_engine needs."""
    req = PlanRequest(target="onnxruntime", bits=bits, **plan_kw)
    plan = make_plan(src, get_device(device), req)
    ob.build(src, plan, folder)
    for name, data in src.tokenizer_files.items():
        (folder / name).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({"target": "onnxruntime"}))
    return folder


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from edgeq.models import open_model

    src = open_model(str(STORIES))
    return make_artifact(src, tmp_path_factory.mktemp("stories"))


def text_of(engine, prompt: str, cfg: GenerationConfig) -> str:
    ids = engine.encode_prompt(prompt, chat=False)
    return prompt + "".join(t.text for t in engine.generate(ids, cfg))


def test_greedy_story(stories):
    engine = load_engine(stories, threads=1)
    out = text_of(engine, "Once upon a time", GenerationConfig(max_tokens=64))
    assert out.startswith(ONCE)
    stats = engine.last_stats
    assert stats.prompt_tokens == 5 and stats.generated_tokens == 64
    assert stats.finish_reason == "length"
    assert stats.start <= stats.first_token <= stats.end


def test_sampling_is_seeded(stories):
    engine = load_engine(stories, threads=1)
    cfg = {"max_tokens": 24, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    a = text_of(engine, "Once upon a time", GenerationConfig(seed=1, **cfg))
    b = text_of(engine, "Once upon a time", GenerationConfig(seed=1, **cfg))
    c = text_of(engine, "Once upon a time", GenerationConfig(seed=2, **cfg))
    assert a == b
    assert a != c


def test_stop_string_cuts_the_text(stories):
    engine = load_engine(stories, threads=1)
    cfg = GenerationConfig(max_tokens=64, stop=["Lily"])
    out = text_of(engine, "Once upon a time", cfg)
    assert out == "Once upon a time, there was a little girl named "
    assert engine.last_stats.finish_reason == "stop"


def test_end_of_sequence_stops(stories):
    """Greedy stories260K runs on past 400 tokens without an end token, so
    the 10th generated token is declared the end token for this check."""
    engine = load_engine(stories, threads=1)
    ids = engine.encode_prompt("Once upon a time", chat=False)
    first = list(engine.generate(ids, GenerationConfig(max_tokens=10)))
    engine.tokenizer.eos_ids = {first[-1].id}
    tokens = list(engine.generate(ids, GenerationConfig(max_tokens=64)))
    assert [t.id for t in tokens] == [t.id for t in first]
    assert tokens[-1].finish_reason == "stop" and tokens[-1].text == ""


def test_thread_count_and_no_spinning(stories):
    engine = load_engine(stories, threads=2)
    so = engine.session.get_session_options()
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert engine.load_seconds > 0


def test_chat_template_is_applied(tmp_path):
    """SmolLM2's own template; the runner renders it with jinja2."""
    from edgeq_targets.common.engine import TextCodec

    from edgeq.models import open_model

    src = open_model("smollm2-135m")
    for name, data in src.tokenizer_files.items():
        (tmp_path / name).write_bytes(data)
    codec = TextCodec(tmp_path)
    ids = codec.encode_prompt("Hi", chat=True)
    text = codec.tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_runner_imports_only_what_ships():
    """ort_engine.py may import onnxruntime, numpy, tokenizers (via the
    common engine) and the standard library, never edgeq."""
    tree = ast.parse(RUNNER.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    allowed = {
        "onnxruntime",
        "numpy",
        "edgeq_targets",
        "__future__",
        "json",
        "os",
        "time",
        "pathlib",
        "resource",
    }
    assert modules <= allowed, modules - allowed
