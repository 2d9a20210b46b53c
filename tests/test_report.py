"""`edgeq profile compare`: rows, a real PNG, an HTML page with the table,
markdown with the chart beside it."""

from __future__ import annotations

import struct

import pytest
from edgeq_targets.common.profile import ProfileConfig, profile_engine
from profile_fakes import FAKE_ENV, FakeClock, FakeEngine, fake_manifest
from typer.testing import CliRunner

from edgeq import report
from edgeq.cli import app
from edgeq.profile import ProfileError, append_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(device: str, target: str, gen_tokens: int = 4) -> list[dict]:
    clock = FakeClock()
    manifest = fake_manifest()
    manifest["target"] = target
    cfg = ProfileConfig(
        prompt_tokens=[10], gen_tokens=gen_tokens, repeats=2, bandwidth_gbs=10.0
    )
    env = {**FAKE_ENV, "device": {"name": device}}
    recs = profile_engine(FakeEngine(clock), manifest, cfg, clock=clock, env=env)
    for rec in recs:
        rec["memory"] = {"peak_rss_bytes": 300e6, "weights_bytes": 1e6}
    return recs


@pytest.fixture
def rows():
    recs = _records("rpi5-8gb", "onnxruntime") + _records("local-vm", "mlx")
    recs += _records("local-vm", "mlx", gen_tokens=1)  # decode n/a
    return report.comparison_rows(recs)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_rows_carry_measured_and_predicted(rows):
    row = rows[0]
    assert row["device"] == "rpi5-8gb" and row["target"] == "onnxruntime"
    assert row["decode"] == pytest.approx(20.0)
    assert row["decode_predicted"] == pytest.approx(0.5 * 10e9 / 1_012_000)
    assert row["peak_rss_mb"] == pytest.approx(300.0)
    assert rows[2]["decode"] is None
    assert report.cell(rows[2], "decode", "{:.1f}") == "n/a"


def test_png_chart(rows, tmp_path):
    (path,) = report.write_report(rows, tmp_path / "chart.png")
    data = path.read_bytes()
    width, height = _png_size(data)
    assert width > 800 and height > 400
    assert len(data) > 20_000  # two panels of bars and labels, not a blank


def test_html_page_has_table_and_inline_chart(rows, tmp_path):
    (path,) = report.write_report(rows, tmp_path / "report.html")
    page = path.read_text()
    assert "<table>" in page and "<th>decode tok/s</th>" in page
    assert "<td>rpi5-8gb</td>" in page and "<td>n/a</td>" in page
    assert "data:image/png;base64," in page
    assert "decode predicted" in page


def test_markdown_with_chart_beside(rows, tmp_path):
    md, png = report.write_report(rows, tmp_path / "report.md")
    text = md.read_text()
    assert text.splitlines()[2].startswith("| model | device |")
    assert "![tokens/s and memory](report.png)" in text
    _png_size(png.read_bytes())


def test_nothing_to_compare(tmp_path):
    with pytest.raises(ProfileError, match="no records to compare"):
        report.write_report([], tmp_path / "r.html")


def test_cli_compare_writes_html_and_prints_a_table(tmp_path):
    a = append_jsonl(tmp_path / "a.jsonl", _records("rpi5-8gb", "onnxruntime"))
    b = append_jsonl(tmp_path / "b.jsonl", _records("local-vm", "mlx"))
    runner = CliRunner()
    out = tmp_path / "r.html"
    result = runner.invoke(
        app, ["profile", "compare", str(a), str(b), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "2 records" in result.output and out.stat().st_size > 10_000
    result = runner.invoke(app, ["profile", "compare", str(a)])
    assert result.exit_code == 0
    assert "| fake-model | rpi5-8gb | onnxruntime |" in result.output
