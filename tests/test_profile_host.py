"""`edgeq profile` on the host: JSONL schema round trip, CSV, the local
device's bandwidth, the thread suggestion and every user-facing error."""

from __future__ import annotations

import json

import pytest
from edgeq_targets.common.profile import ProfileConfig, profile_engine
from profile_fakes import FAKE_ENV, FakeClock, FakeEngine, fake_manifest
from typer.testing import CliRunner

from edgeq import profile as lib
from edgeq.cli import app
from edgeq.profile import ProfileError


@pytest.fixture
def records():
    clock = FakeClock()
    cfg = ProfileConfig(prompt_tokens=[10, 20], gen_tokens=4, repeats=2)
    recs = profile_engine(
        FakeEngine(clock), fake_manifest(), cfg, clock=clock, env=dict(FAKE_ENV)
    )
    for rec in recs:
        rec["env"]["edgeq_version"] = "0.1.0"
    return recs


@pytest.fixture(autouse=True)
def no_user_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_USER_DEVICES", str(tmp_path / "user-devices.toml"))


def test_jsonl_round_trip(records, tmp_path):
    path = tmp_path / "results" / "r.jsonl"
    lib.append_jsonl(path, records[:1])
    lib.append_jsonl(path, records[1:])  # appends, never rewrites
    assert lib.read_jsonl(path) == records
    assert len(path.read_text().splitlines()) == 2


def test_schema_names_the_missing_or_wrong_field(records, tmp_path):
    rec = json.loads(json.dumps(records[0]))
    del rec["roofline"]["bytes_per_token"]
    with pytest.raises(ProfileError, match=r"field 'roofline'.bytes_per_token"):
        lib.validate_record(rec)
    rec = json.loads(json.dumps(records[0]))
    rec["config"]["warmup"] = "yes"
    with pytest.raises(ProfileError, match=r"config'.warmup has the wrong type"):
        lib.validate_record(rec)
    with pytest.raises(ProfileError, match="expected 'edgeq.profile/1'"):
        lib.validate_record({**records[0], "schema": "other/9"})


def test_read_jsonl_errors_name_file_and_line(records, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ProfileError, match=r"r.jsonl:2: not JSON"):
        lib.read_jsonl(path)
    with pytest.raises(ProfileError, match="not found; pass a file made by --save"):
        lib.read_jsonl(tmp_path / "missing.jsonl")


def test_csv_one_row_per_record(records):
    lines = lib.to_csv(records).splitlines()
    assert len(lines) == 3
    header = lines[0].split(",")
    for column in ("summary.decode_tokens_per_s.median", "config.threads", "load_s"):
        assert column in header
    assert not any(c.startswith("samples") for c in header)


def test_local_device_reuses_a_detected_profile(tmp_path, monkeypatch):
    from edgeq import devices

    calls = []
    monkeypatch.setattr(
        devices, "measure_bandwidth_gbs", lambda *a, **k: calls.append(1) or 12.34
    )
    first = lib.local_device()
    assert first["bandwidth_gbs"] == 12.3 and "measured now" in first["origin"]
    assert lib.local_device(measure=False)["bandwidth_gbs"] is None
    assert len(calls) == 1

    devices.detect(name=devices.default_device_name(), max_seconds=0.1, buffer_mb=8)
    found = lib.local_device()
    assert found["origin"] == "edgeq devices detect" and len(calls) == 2
    named = lib.local_device("rpi5-8gb")
    assert named["bandwidth_gbs"] == devices.get_device("rpi5-8gb").bandwidth_gbs


def test_thread_suggestion_is_toml():
    import tomllib

    best = {"prefill": {"threads": 4}, "decode": {"threads": 2}}
    text = lib.thread_suggestion(best, {"name": "local-x"})
    assert tomllib.loads(text) == {"threads": {"prefill": 4, "decode": 2}}
    assert "[local-x]" in text
    assert lib.thread_suggestion(None, {}) is None


runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["profile", "{tmp}"], "no manifest.json; pass an artifact folder"),
        (["profile", "{art}", "--prompt-tokens", "ab"], "--prompt-tokens 'ab'"),
        (["profile", "{art}", "--threads", "0"], "--threads '0': expected positive"),
        (["profile", "{art}", "--json", "--csv"], "--json and --csv: choose one"),
        (["profile", "{art}", "--repeats", "0"], "--repeats 0: must be at least 1"),
        (["profile", "compare", "{tmp}/no.jsonl"], "no.jsonl: not found"),
        (["profile", "compare", "{ok}", "--out", "{tmp}/r.pdf"], "use a .html, .md"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path, records):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps(fake_manifest()))
    ok = lib.append_jsonl(tmp_path / "ok.jsonl", records)
    argv = [a.format(tmp=tmp_path, art=art, ok=ok) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ")


def test_cli_profile_alone_shows_help():
    result = runner.invoke(app, ["profile"])
    assert "compare" in result.output and "run" in result.output
