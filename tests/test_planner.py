"""The planner: plan documents, shape fallbacks (case C04), rules and
overrides, the memory model and refusals, predictions, and the check that
each target stores what the plan says."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeq.devices import get_device
from edgeq.errors import EdgeqError, PlanError, TargetError
from edgeq.models.config import ModelConfig
from edgeq.models.source import TensorInfo, expected_shapes
from edgeq.plan import Plan, validate_against
from edgeq.planner import PlanRequest, check_fits, kv_cache_bytes, make_plan, plan_model
from edgeq.reference import RandomSource
from tests.conftest import STORIES_GGUF

MAC = "macbook-air-m2-16gb"
X86 = "x86-server-avx512-vnni"


def llama(**kw) -> ModelConfig:
    base = {
        "architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "vocab_size": 256, "max_position_embeddings": 512,
    }  # fmt: skip
    return ModelConfig(**{**base, **kw})


class ShapeSource:
    """Config and tensor shapes only: enough for the planner (no weights)."""

    def __init__(self, cfg: ModelConfig, name: str = "shapes"):
        self.config, self.name = cfg, name
        self._infos = [
            TensorInfo(n, tuple(s), "F16") for n, s in expected_shapes(cfg).items()
        ]

    def infos(self):
        return self._infos

    def describe(self):
        params = sum(i.numel for i in self._infos)
        return {"name": self.name, "source": "none", "source_sha256": "",
                "parameters": params}  # fmt: skip


@pytest.fixture(scope="module")
def stories():
    from edgeq.models import open_model

    return open_model(str(STORIES_GGUF))


# -- C04: shapes the group size does not divide -----------------------------------


def c04_config(**kw) -> ModelConfig:
    """Hidden 96, intermediate 176: width 96 fits group 32 but not 64; the
    down projection's 176 fits neither."""
    return llama(hidden_size=96, num_heads=4, num_kv_heads=2, head_dim=24,
                 intermediate_size=176, vocab_size=256, **kw)  # fmt: skip


def test_c04_fallbacks_are_listed_with_their_cost():
    plan = make_plan(ShapeSource(c04_config()), get_device(MAC), PlanRequest("mlx"))
    q = plan.tensor("model.layers.0.self_attn.q_proj.weight")
    assert (q.bits, q.group_size, q.reason) == (4, 32, "shape-fallback")
    assert "not a multiple of 64" in q.note and "MB" in q.note
    down = plan.tensor("model.layers.1.mlp.down_proj.weight")
    assert (down.bits, down.group_size, down.reason) == (16, None, "shape-fallback")
    # The note states the size cost: 96x176 in 16-bit vs 4-bit with group 64.
    cost = 96 * 176 * 2 - (96 * 176 // 2 + 96 * 3 * 4)
    assert f"+{cost / 1e6:.3f} MB" in down.note
    assert any("down_proj" in w and "16-bit" in w for w in plan.warnings)
    assert plan.tensor("model.embed_tokens.weight").group_size == 32


def test_c04_onnxruntime_falls_back_to_per_channel_int8():
    plan = make_plan(
        ShapeSource(c04_config()), get_device(X86), PlanRequest("onnxruntime", bits=4)
    )
    down = plan.tensor("model.layers.0.mlp.down_proj.weight")
    assert (down.bits, down.group_size, down.reason) == (8, None, "shape-fallback")
    assert "8-bit per-channel" in down.note


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_c04_gqa_and_mqa_head_dim_56(kv_heads):
    """8 heads of head_dim 56 (hidden 448): k/v project 448 -> 112 (GQA) or
    56 (MQA). Group 128 does not divide 448: group 64; KV cache from the
    real head count and head_dim."""
    cfg = llama(hidden_size=448, num_heads=8, num_kv_heads=kv_heads, head_dim=56,
                intermediate_size=1024)  # fmt: skip
    req = PlanRequest("mlx", group_size=128, context_length=1000)
    plan = make_plan(ShapeSource(cfg), get_device(MAC), req)
    k = plan.tensor("model.layers.0.self_attn.k_proj.weight")
    assert k.shape == [56 * kv_heads, 448] and k.group_size == 64
    assert plan.tensor("model.layers.0.mlp.down_proj.weight").group_size == 128
    assert plan.predictions["kv_cache_bytes"] == 2 * 2 * kv_heads * 56 * 1000 * 2


@pytest.mark.parametrize(
    "cfg",
    [c04_config(), llama(hidden_size=448, num_heads=8, num_kv_heads=1, head_dim=56,
                         intermediate_size=1024, num_layers=1)],
    ids=["hidden96-ffn176", "mqa-56"],
)  # fmt: skip
def test_c04_mlx_builds_every_fallback_and_keeps_the_plan(tmp_path, cfg):
    """No raw quantizer exception: the MLX backend builds the plan and the
    artifact stores exactly what it says."""
    from edgeq.backends import mlx_backend

    src = RandomSource(cfg, seed=2)
    plan = make_plan(src, get_device(MAC), PlanRequest("mlx"))
    mlx_backend.build(src, plan, tmp_path)
    assert mlx_backend.read_back(tmp_path) == {
        t.name: (t.bits, t.group_size) for t in plan.tensors
    }


# -- rules, overrides, warnings ---------------------------------------------------


def test_low_bits_warn_and_tables_keep_four_bits(stories):
    plan = make_plan(stories, get_device(MAC), PlanRequest("mlx", bits=3))
    assert any("gibberish" in w for w in plan.warnings)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        t = plan.tensor(name)
        assert (t.bits, t.reason) == (4, "rule") and "at least 4 bits" in t.note
    assert plan.tensor("model.layers.0.self_attn.q_proj.weight").bits == 3
    assert any("at least 4 bits" in r for r in plan.defaults["rules"])


def test_tied_table_is_one_tensor_with_one_precision():
    src = RandomSource(llama(tie_word_embeddings=True))
    plan = make_plan(src, get_device(MAC), PlanRequest("mlx", bits=2))
    names = [t.name for t in plan.tensors]
    assert "lm_head.weight" not in names
    emb = plan.tensor("model.embed_tokens.weight")
    assert emb.bits == 4 and "output head" in emb.note
    assert any("tied" in r for r in plan.defaults["rules"])


def test_overrides_pin_tensors_and_bad_ones_name_the_flag(stories):
    req = PlanRequest("mlx", overrides=["*.down_proj.weight=16", "lm_head.weight=8/32"])
    plan = make_plan(stories, get_device(MAC), req)
    head = plan.tensor("lm_head.weight")
    assert (head.bits, head.group_size, head.reason) == (8, 32, "user-override")
    assert plan.tensor("model.layers.3.mlp.down_proj.weight").reason == "user-override"
    for bad, msg in [
        ("lm_head.weight", "PATTERN=BITS"),
        ("lm_head.weight=5", "PATTERN=BITS"),
        ("nothing.*=8", "no weight matrix matches"),
        ("*.down_proj.weight=4/64", "cannot be stored"),
    ]:
        with pytest.raises(PlanError, match=msg):
            make_plan(stories, get_device(MAC), PlanRequest("mlx", overrides=[bad]))


def test_bad_flags_are_one_line_errors():
    src = ShapeSource(llama())
    with pytest.raises(PlanError, match="--bits 5: the mlx target stores"):
        make_plan(src, get_device(MAC), PlanRequest("mlx", bits=5))
    with pytest.raises(PlanError, match="--bits 3: the onnxruntime target"):
        make_plan(src, get_device(X86), PlanRequest("onnxruntime", bits=3))
    with pytest.raises(PlanError, match="--group-size 48"):
        make_plan(src, get_device(MAC), PlanRequest("mlx", group_size=48))


def test_a_target_the_device_cannot_run_is_refused():
    with pytest.raises(
        TargetError, match="--target mlx cannot run on device 'rpi5-4gb'"
    ):
        plan_model(str(STORIES_GGUF), "rpi5-4gb", PlanRequest(target="mlx"))


# -- memory model, refusals, predictions -----------------------------------------


def test_memory_model_adds_weights_kv_activations_and_overhead():
    cfg = llama(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                head_dim=32, intermediate_size=512, vocab_size=1000)  # fmt: skip
    plan = make_plan(ShapeSource(cfg), get_device("rpi5-8gb"),
                     PlanRequest("onnxruntime", context_length=2048))  # fmt: skip
    p = plan.predictions
    assert p["kv_cache_bytes"] == 4 * 2 * 2 * 32 * 2048 * 2
    total = (p["weights_bytes"] + p["kv_cache_bytes"] + p["activation_bytes"]
             + p["runtime_overhead_bytes"])  # fmt: skip
    assert p["peak_memory_bytes"] == total and p["fits"]
    # Roofline: bandwidth x efficiency / bytes read per token.
    dev = get_device("rpi5-8gb")
    want = (
        dev.bandwidth_gbs * 1e9 * p["decode_efficiency"] / p["decode_bytes_per_token"]
    )
    assert p["decode_tokens_per_s"] == pytest.approx(want, rel=1e-3)
    assert p["decode_tokens_per_s_full_context"] < p["decode_tokens_per_s"]


def test_gemma_sliding_layers_keep_only_their_window():
    cfg = SimpleNamespace(num_kv_heads=1, head_dim=256, num_layers=6,
                          sliding_window=512, layer_is_sliding=lambda i: i % 6 != 5)  # fmt: skip
    assert kv_cache_bytes(cfg, 32768) == 2 * 256 * 2 * (5 * 512 + 32768)


def billion_llama(hidden, layers, ffn) -> ShapeSource:
    return ShapeSource(llama(hidden_size=hidden, num_layers=layers, num_heads=32,
                             num_kv_heads=8, head_dim=hidden // 32,
                             intermediate_size=ffn, vocab_size=128256), "big")  # fmt: skip


def test_refusal_names_the_closest_plan_that_fits():
    """A Llama-3.2-3B-shaped model at INT8 and 8192 tokens needs 4.75 GB; an rpi4-4gb has
    3.2 GB usable: refused before any work, naming 4-bit."""
    src = billion_llama(3072, 28, 8192)
    dev = get_device("rpi4-4gb")
    req = PlanRequest("onnxruntime", context_length=8192)
    plan = make_plan(src, dev, req)
    assert not plan.predictions["fits"]
    with pytest.raises(PlanError, match=r"closest plan that fits: --bits 4 \(") as e:
        check_fits(plan, dev, src, req)
    assert "rpi4-4gb" in str(e.value) and "\n" not in str(e.value)


def test_refusal_says_when_no_plan_fits():
    """A 14B-shaped model: even 2-bit at 256 tokens is over 3.2 GB."""
    src = billion_llama(5120, 40, 13824)
    dev = get_device("rpi4-4gb")
    req = PlanRequest("onnxruntime")
    with pytest.raises(PlanError, match="no plan fits, not even 2-bit"):
        check_fits(make_plan(src, dev, req), dev, src, req)


def test_max_memory_caps_usable_memory_and_can_suggest_a_shorter_context():
    src = ShapeSource(llama(num_layers=8, hidden_size=512, num_heads=8,
                            num_kv_heads=8, head_dim=64, intermediate_size=1024))  # fmt: skip
    dev = get_device("rpi5-8gb")
    req = PlanRequest(
        "onnxruntime", context_length=65536, max_memory_bytes=1_200_000_000
    )
    plan = make_plan(src, dev, req)
    p = plan.predictions
    assert p["usable_memory_bytes"] == 1_200_000_000 and p["memory_capped"]
    with pytest.raises(PlanError, match=r"--context 32768 \(") as e:
        check_fits(plan, dev, src, req)
    assert "(--max-memory)" in str(e.value)


# -- plan documents and replay ------------------------------------------------------


def test_plan_round_trips_and_validates_against_its_model(stories, tmp_path):
    plan = make_plan(stories, get_device(MAC), PlanRequest("mlx"))
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    validate_against(again, stories)

    wrong = json.loads(plan.to_json())
    wrong["tensors"][0]["shape"] = [256, 64]
    with pytest.raises(PlanError, match="has shape \\[256, 64\\] in the plan"):
        validate_against(Plan.from_dict(wrong), stories)
    other = make_plan(
        RandomSource(llama(num_layers=6)), get_device(MAC), PlanRequest("mlx")
    )
    with pytest.raises(PlanError, match="not in model 'stories260K'"):
        validate_against(other, stories)
    missing = json.loads(plan.to_json())
    missing["tensors"] = missing["tensors"][1:]
    with pytest.raises(PlanError, match="missing from the plan"):
        validate_against(Plan.from_dict(missing), stories)


@pytest.mark.parametrize(
    "doc, msg",
    [("[]", "expected a JSON object"), ('{"format": "x"}', "not an edgeq plan"),
     ("{nope", "not valid JSON")],
)  # fmt: skip
def test_bad_plan_files_are_one_line_errors(tmp_path, doc, msg):
    path = tmp_path / "p.json"
    path.write_text(doc)
    with pytest.raises(PlanError, match=msg):
        Plan.load(path)


# -- both targets store what the plan says ---------------------------------------


def _mixed_overrides():
    return ["*.layers.0.self_attn.*=8", "*.layers.1.mlp.*=16", "lm_head.weight=8"]


@pytest.mark.parametrize("target", ["mlx", "onnxruntime"])
@pytest.mark.parametrize("model", ["stories260K", "tiny-mixed", "stories-bpw"])
def test_artifact_stores_exactly_the_plan(
    tmp_path, monkeypatch, stories, target, model
):
    """Each target compiles the plan its planner makes; reading the artifact
    back gives every tensor's bits and group as planned (mixed per-tensor
    bits included, from overrides and from --target-bpw)."""
    from edgeq.backends import load_backend

    backend = load_backend(target)
    if not hasattr(backend, "read_back"):
        pytest.skip(f"the {target} backend has no read_back yet")
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    if model == "stories260K":
        src, req = stories, PlanRequest(target)
    elif model == "stories-bpw":
        bpw = 6.9 if target == "mlx" else 5.5
        src, req = stories, PlanRequest(target, target_bpw=bpw)
    else:
        src = RandomSource(llama(num_layers=3), seed=5)
        req = PlanRequest(target, bits=4, overrides=_mixed_overrides())
    plan = make_plan(src, get_device(MAC if target == "mlx" else X86), req)
    if model != "stories260K":
        assert len({(t.bits, t.group_size) for t in plan.tensors}) >= 3
    out = tmp_path / "artifact"
    out.mkdir()
    backend.build(src, plan, out)
    stored = backend.read_back(out)
    assert stored == {t.name: (t.bits, t.group_size) for t in plan.tensors}


# -- the command line ---------------------------------------------------------------


def test_cli_plan_table_json_and_out(tmp_path):
    from edgeq.cli import app

    out = tmp_path / "plan.json"
    r = CliRunner().invoke(
        app, ["plan", str(STORIES_GGUF), "--device", MAC, "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "shape-fallback" in r.output and "mlp.down_proj" in r.output
    assert "bits per weight" in r.output and "tokens/s predicted" in r.output
    assert Plan.load(out).target == "mlx"
    r = CliRunner().invoke(app, ["plan", str(STORIES_GGUF), "-d", "rpi5-4gb", "--json"])
    doc = json.loads(r.stdout)
    assert doc["target"] == "onnxruntime" and doc["predictions"]["fits"]


@pytest.mark.parametrize(
    "args, msg",
    [(["--max-memory", "200MB"], "no plan fits, not even 2-bit"),
     (["--max-memory", "lots"], "--max-memory 'lots'"),
     (["--target", "mlx"], "cannot run on device"),
     (["--bits", "7"], "--bits 7")],
)  # fmt: skip
def test_cli_plan_refusals_are_one_line(args, msg):
    from edgeq.cli import app

    r = CliRunner().invoke(app, ["plan", str(STORIES_GGUF), "-d", "rpi5-4gb", *args])
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and msg in last
    assert "Traceback" not in r.output


def test_parse_size():
    from edgeq.cli.plan import parse_size

    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("512 mb") == 512_000_000
    assert parse_size("300") == 300
    with pytest.raises(EdgeqError):
        parse_size("2 parsecs")


def test_predictions_use_the_device_bandwidth():
    src = ShapeSource(llama())
    slow = make_plan(src, get_device("rpi4-4gb"), PlanRequest("onnxruntime"))
    fast = make_plan(src, get_device("rpi5-4gb"), PlanRequest("onnxruntime"))
    ratio = (
        fast.predictions["decode_tokens_per_s"]
        / slow.predictions["decode_tokens_per_s"]
    )
    assert ratio == pytest.approx(17.07 / 12.8, rel=0.01)
    assert np.isfinite(slow.predictions["roofline_tokens_per_s"])
