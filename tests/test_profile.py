"""The profiler's arithmetic, on a controlled clock: every figure, the
warm-up kept apart, 0 and 1 generated tokens, prompts cut by the context
window, the roofline and the best thread counts."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from edgeq_targets.common.profile import (
    ProfileConfig,
    ProfileFailed,
    int_list,
    profile_engine,
    run_children,
)
from edgeq_targets.common.profile_env import MemoryProbe
from edgeq_targets.common.profile_figures import (
    RunTiming,
    best_threads,
    build_prompt,
    context_window,
    fit_to_context,
    memory_warnings,
    rate,
    roofline,
    roofline_pct,
    run_figures,
    summarize,
)
from profile_fakes import FAKE_ENV, FakeClock, FakeEngine, fake_manifest


def profile(gen_tokens=5, prompt_tokens=(10,), repeats=3, manifest=None, **engine):
    clock = FakeClock()
    eng = FakeEngine(clock, **engine)
    cfg = ProfileConfig(
        prompt_tokens=list(prompt_tokens),
        gen_tokens=gen_tokens,
        repeats=repeats,
        bandwidth_gbs=10.0,
        bandwidth_source="test",
    )
    records = profile_engine(
        eng, manifest or fake_manifest(), cfg, clock=clock, env=dict(FAKE_ENV)
    )
    return records, eng


def test_figures_of_one_run():
    # Prompt 10 tokens at 10 ms each; 4 more tokens at 50 ms each.
    t = RunTiming(prompt_tokens=10, start=100.0)
    t.token_times = [100.1, 100.15, 100.2, 100.25, 100.3]
    f = run_figures(t)
    assert f["gen_tokens"] == 5 and f["decode_tokens"] == 4
    assert f["ttft_s"] == pytest.approx(0.1)
    assert f["prefill_tokens_per_s"] == pytest.approx(100.0)
    assert f["decode_s"] == pytest.approx(0.2)
    assert f["decode_tokens_per_s"] == pytest.approx(20.0)
    assert f["e2e_s"] == pytest.approx(0.3)
    assert f["e2e_tokens_per_s"] == pytest.approx(5 / 0.3)


def test_profile_record_with_controlled_clock():
    (rec,), eng = profile()
    s = rec["summary"]
    assert s["ttft_s"]["median"] == pytest.approx(0.1)
    assert s["prefill_tokens_per_s"]["median"] == pytest.approx(100.0)
    assert s["decode_tokens_per_s"]["median"] == pytest.approx(20.0)
    assert s["e2e_tokens_per_s"]["median"] == pytest.approx(5 / 0.3)
    assert s["decode_tokens_per_s"]["n"] == 3
    assert rec["load_s"] == 0.25
    assert [r["decode_tokens"] for r in rec["samples"]] == [4, 4, 4]
    # One warm-up run plus three measured ones, all of 10 + 5 tokens.
    assert eng.calls == [(10, 5)] * 4


def test_warmup_is_reported_apart_and_left_out_of_the_summary():
    (rec,), _ = profile(first_run_extra_s=2.0)
    assert rec["warmup"]["ttft_s"] == pytest.approx(2.1)
    assert rec["summary"]["ttft_s"]["max"] == pytest.approx(0.1)
    assert len(rec["samples"]) == 3


def test_median_min_max_over_repeats():
    runs = [{"decode_tokens_per_s": v} for v in (30.0, 10.0, 20.0, None)]
    s = summarize(runs, ("decode_tokens_per_s",))["decode_tokens_per_s"]
    assert s == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3}
    empty = summarize([{"decode_tokens_per_s": None}], ("decode_tokens_per_s",))
    assert empty["decode_tokens_per_s"]["median"] is None


def test_zero_generated_tokens_give_na_never_negative_or_inf():
    (rec,), _ = profile(gen_tokens=0)
    for run in rec["samples"] + [rec["warmup"]]:
        assert run["gen_tokens"] == 0 and run["decode_tokens"] == 0
        for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert run[key] is None
        assert run["e2e_tokens_per_s"] is None and run["roofline_pct"] is None
    assert rec["summary"]["decode_tokens_per_s"]["median"] is None
    assert any("n/a" in w for w in rec["warnings"])
    json.dumps(rec, allow_nan=False)  # no inf or nan anywhere


def test_one_generated_token_has_ttft_but_no_decode():
    (rec,), _ = profile(gen_tokens=1)
    run = rec["samples"][0]
    assert run["decode_tokens"] == 0
    assert run["ttft_s"] == pytest.approx(0.1)
    assert run["prefill_tokens_per_s"] == pytest.approx(100.0)
    assert run["decode_s"] is None and run["decode_tokens_per_s"] is None
    assert run["e2e_tokens_per_s"] == pytest.approx(10.0)
    assert rec["summary"]["roofline_pct"]["median"] is None
    assert any("1 generated token(s)" in w for w in rec["warnings"])
    json.dumps(rec, allow_nan=False)


@pytest.mark.parametrize(
    "count, seconds", [(5, 0.0), (5, -1.0), (0, 1.0), (5, math.inf), (5, None)]
)
def test_rate_is_na_rather_than_negative_or_infinite(count, seconds):
    assert rate(count, seconds) is None


def test_prompt_cut_by_the_context_window():
    (rec,), eng = profile(
        prompt_tokens=[100], gen_tokens=16, manifest=fake_manifest(context_length=64)
    )
    cfg = rec["config"]
    assert cfg["prompt_tokens"] == 48 and cfg["prompt_tokens_requested"] == 100
    assert cfg["gen_tokens"] == 16 and cfg["context_window"] == 64
    assert eng.calls[0] == (48, 16)
    assert "cut to 48 prompt + 16 generated tokens" in rec["warnings"][0]
    assert "context window of 64" in rec["warnings"][0]


def test_fit_to_context_edges():
    assert fit_to_context(100, 28, 128) == (100, 28, None)
    assert fit_to_context(100, 200, 128)[:2] == (1, 127)
    assert fit_to_context(5000, 10, None) == (5000, 10, None)


def test_context_window_is_capped_by_trained_positions():
    assert context_window(fake_manifest(4096, 2048)) == 2048
    assert context_window(fake_manifest(1024, 2048)) == 1024
    assert context_window({}) is None


def test_prompt_is_deterministic_and_exactly_n_tokens():
    codec = FakeEngine(FakeClock()).tokenizer
    for n in (1, 7, 128, 1000):
        ids = build_prompt(codec, n)
        assert len(ids) == n
        assert ids == build_prompt(codec, n)


def test_roofline_arithmetic():
    manifest = fake_manifest(context_length=4096)
    preds = manifest["plan"]["predictions"]
    roof = roofline(preds, manifest["plan"]["runtime"], 100, 20, 10.0)
    # KV cache: 1000 bytes per position, read at the mean position 110.
    assert roof["kv_bytes_per_token"] == 110_000
    assert roof["bytes_per_token"] == 1_110_000
    assert roof["roofline_tokens_per_s"] == pytest.approx(10e9 / 1_110_000)
    assert roof["predicted_decode_tokens_per_s"] == pytest.approx(0.5 * 10e9 / 1.11e6)
    assert roofline_pct(10e9 / 1_110_000 / 10, roof) == pytest.approx(10.0)
    assert roofline_pct(None, roof) is None
    assert roofline(preds, {}, 1, 1, None)["roofline_tokens_per_s"] is None


def test_record_roofline_pct_per_run():
    (rec,), _ = profile(prompt_tokens=[10], gen_tokens=5)
    roof = rec["roofline"]
    expected = 100 * 20.0 / roof["roofline_tokens_per_s"]
    assert rec["summary"]["roofline_pct"]["median"] == pytest.approx(expected)
    assert roof["bandwidth_source"] == "test"


def _rec(threads, prefill, decode):
    return {
        "config": {"threads": threads},
        "summary": {
            "prefill_tokens_per_s": {"median": prefill},
            "decode_tokens_per_s": {"median": decode},
        },
    }


def test_best_threads_for_prefill_and_decode_separately():
    records = [_rec(1, 100, 20), _rec(2, 190, 31), _rec(4, 350, 29)]
    best = best_threads(records)
    assert best["prefill"]["threads"] == 4
    assert best["decode"]["threads"] == 2
    assert best_threads([_rec(2, 1, 1)]) is None  # nothing to choose from


def test_memory_warning_past_one_and_a_half_times_the_weights():
    plan = {"weights_bytes": 100_000_000}
    dup = {
        "load_rss_bytes": 210_000_000,
        "runtime_peak_bytes_by_phase": {"load": 110_000_000},
    }
    (warning,) = memory_warnings(dup, plan)
    assert "2.1x the weights" in warning and "110.0 MB" in warning
    assert memory_warnings({"load_rss_bytes": 140_000_000}, plan) == []
    # Long prompts grow memory after loading (KV cache, attention): no warning.
    assert memory_warnings({"model_rss_bytes": 900_000_000}, plan) == []
    # A tiny model's fixed overhead (arenas, code) is not duplication.
    assert memory_warnings({"load_rss_bytes": 26e6}, {"weights_bytes": 3e5}) == []


def test_memory_probe_phases_and_sources():
    probe = MemoryProbe(runtime=("own", lambda: 123, lambda: None))
    probe.start()
    probe.stop("load")
    probe.start()
    block = b"\x01" * (64 * 2**20)  # written, so resident (calloc pages are not)
    probe.stop("runs")
    del block
    mem = probe.report(("load", "warmup", "runs"))
    assert mem["rss_source"].startswith("os: ")
    assert mem["peak_rss_bytes_by_phase"]["warmup"] is None
    assert mem["peak_rss_bytes"] >= mem["peak_rss_bytes_by_phase"]["load"]
    if probe.per_phase:  # Linux: each phase has its own peak
        runs = mem["peak_rss_bytes_by_phase"]["runs"]
        assert runs - mem["peak_rss_bytes_by_phase"]["load"] > 32 * 2**20
    assert mem["runtime_source"] == "own" and mem["runtime_peak_bytes"] == 123


def test_thread_sweep_runs_a_fresh_process_per_thread_count():
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw["env"]))
        t = int(cmd[cmd.index("--threads") + 1])
        out = json.dumps({"config": {"threads": t}}) + "\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    records = run_children(["py", "prof"], [1, 4], ["--repeats", "2"], run=fake_run)
    assert [r["config"]["threads"] for r in records] == [1, 4]
    assert calls[1][0] == ["py", "prof", "--threads", "4", "--json", "--repeats", "2"]
    assert calls[1][1]["OMP_NUM_THREADS"] == "4"


def test_thread_sweep_failure_names_the_thread_count():
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "trace\nError: no mlx\n")

    with pytest.raises(ProfileFailed, match="2 threads failed .*Error: no mlx"):
        run_children(["py"], [2], [], run=failing)


def test_int_list():
    assert int_list("1,2,4") == [1, 2, 4]
    for bad in ("", "a,b", "0", "-1"):
        with pytest.raises(Exception, match="not a list of positive integers"):
            int_list(bad)
