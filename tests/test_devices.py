"""Tests for device profiles: devices.toml, validation, detect, `edgeq devices`."""

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from edgeq import devices
from edgeq.cli import app
from edgeq.devices import (
    CpuInfo,
    DeviceProfile,
    detect,
    get_device,
    load_devices,
    parse_cpuinfo,
    parse_sysctl,
)
from edgeq.errors import DeviceError

SHIPPED = Path(__file__).resolve().parents[1] / "devices.toml"

# A valid entry as TOML source text per field, so a test can break one field.
VALID = {
    "description": '"Raspberry Pi 5, 8 GB"',
    "cpu": '"Broadcom BCM2712, 4x Cortex-A76"',
    "ram_gb": "8",
    "usable_fraction": "0.75",
    "bandwidth_gbs": "17.07",
    "arch": '"arm64"',
    "isa": '["neon", "dotprod", "fp16"]',
    "cores": "4",
    "os": '"linux"',
    "target": '"onnxruntime"',
    "python": '"3.11"',
}


def entry(name: str = "rpi5-8gb", **fields: str | None) -> str:
    """TOML text of one entry: VALID, with fields replaced (None: removed)."""
    merged = {**VALID, **fields}
    body = "".join(f"{k} = {v}\n" for k, v in merged.items() if v is not None)
    return f"[{name}]\n{body}"


@pytest.fixture(autouse=True)
def user_file(tmp_path, monkeypatch) -> Path:
    """Point the user devices file into tmp_path, so no test reads ~/.config."""
    path = tmp_path / "config" / "devices.toml"
    monkeypatch.setenv("EDGEQ_USER_DEVICES", str(path))
    monkeypatch.delenv("EDGEQ_DEVICES", raising=False)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- The shipped devices.toml ----------------------------------------------

REQUIRED_NAMES = {
    "macbook-air-m1-8gb",
    "macbook-air-m1-16gb",
    "macbook-air-m2-8gb",
    "macbook-air-m2-16gb",
    "macbook-pro-m3-pro-18gb",
    "macbook-pro-m3-max-36gb",
    "macbook-pro-m3-max-64gb",
    "mac-mini-m4-16gb",
    "macbook-pro-m4-max-64gb",
    "rpi4-4gb",
    "rpi4-8gb",
    "rpi5-4gb",
    "rpi5-8gb",
    "rpi5-16gb",
    "jetson-orin-nano-8gb",
    "intel-n100-16gb",
    "x86-server-avx512-vnni",
}


def test_shipped_file_has_the_required_devices():
    shipped = load_devices()
    assert REQUIRED_NAMES <= set(shipped)
    assert all(d.source == SHIPPED for d in shipped.values())


def test_shipped_figures():
    shipped = load_devices()
    pi = shipped["rpi5-8gb"]
    assert (pi.ram_gb, pi.bandwidth_gbs, pi.cores) == (8, 17.07, 4)
    assert (pi.arch, pi.os, pi.target) == ("arm64", "linux", "onnxruntime")
    assert pi.isa == ("neon", "dotprod", "fp16")
    assert shipped["rpi4-8gb"].isa == ("neon",)

    m2 = shipped["macbook-air-m2-16gb"]
    assert (m2.ram_gb, m2.bandwidth_gbs, m2.target) == (16, 100, "mlx")
    assert "i8mm" in m2.isa and "i8mm" not in shipped["macbook-air-m1-16gb"].isa
    assert shipped["macbook-air-m1-8gb"].bandwidth_gbs == 68.25
    assert shipped["macbook-pro-m3-max-36gb"].bandwidth_gbs == 300
    assert shipped["macbook-pro-m3-max-64gb"].bandwidth_gbs == 400
    assert shipped["macbook-pro-m4-max-64gb"].bandwidth_gbs == 546

    jetson = shipped["jetson-orin-nano-8gb"]
    assert (jetson.cores, jetson.bandwidth_gbs) == (6, 68)
    assert shipped["intel-n100-16gb"].isa == ("avx2", "avx_vnni")
    assert "avx512_vnni" in shipped["x86-server-avx512-vnni"].isa


def test_macs_prefer_mlx_and_everything_else_onnxruntime():
    for d in load_devices().values():
        is_mac = d.os == "macos"
        assert d.target == ("mlx" if is_mac else "onnxruntime"), d.name


def test_every_shipped_entry_cites_its_source():
    lines = SHIPPED.read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert len(headers) >= 14
    for i in headers:
        assert lines[i - 1].startswith("#"), f"{lines[i]} has no comment above"


def test_profile_units():
    pi = get_device("rpi5-8gb")
    assert pi.usable_memory_bytes == 6 * 2**30  # 8 GiB x 0.75
    assert pi.bandwidth_bytes_per_s == 17.07e9
    assert pi.expected_decode_efficiency == 0.60


def test_decode_efficiency_from_the_profile_wins(tmp_path):
    path = write(tmp_path / "d.toml", entry(decode_efficiency="0.8"))
    assert load_devices(path)["rpi5-8gb"].expected_decode_efficiency == 0.8


# --- Validation --------------------------------------------------------------

ISA_LIST = "avx2, avx512f, avx512_vnni, avx_vnni, neon, dotprod, i8mm, sve, fp16, bf16"
MLX_ONLY_ON_MACS = (
    "field 'target' is 'mlx', which runs only on Apple Silicon "
    "(os 'macos', arch 'arm64'); use 'onnxruntime'"
)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ramgb": "8"}, "unknown field 'ramgb'; did you mean 'ram_gb'?"),
        ({"zzz": "1"}, "unknown field 'zzz'; remove it"),
        ({"cores": None}, "field 'cores' is missing"),
        ({"cores": '"4"'}, "field 'cores' must be a positive integer, got '4'"),
        ({"cores": "4.0"}, "field 'cores' must be a positive integer, got 4.0"),
        ({"cores": "true"}, "field 'cores' must be a positive integer, got True"),
        ({"ram_gb": "0"}, "field 'ram_gb' must be a positive number, got 0"),
        ({"ram_gb": '"8"'}, "field 'ram_gb' must be a positive number, got '8'"),
        ({"ram_gb": "inf"}, "field 'ram_gb' must be a positive number, got inf"),
        (
            {"usable_fraction": "1.5"},
            "field 'usable_fraction' must be a number in (0, 1], got 1.5",
        ),
        (
            {"usable_fraction": "0"},
            "field 'usable_fraction' must be a number in (0, 1], got 0",
        ),
        (
            {"bandwidth_gbs": "-3"},
            "field 'bandwidth_gbs' must be a positive number, got -3",
        ),
        (
            {"description": '""'},
            "field 'description' must be a non-empty string, got ''",
        ),
        (
            {"arch": '"aarch64"'},
            "field 'arch' must be one of 'arm64', 'x86_64', got 'aarch64'",
        ),
        (
            {"os": '"windows"'},
            "field 'os' must be one of 'macos', 'linux', got 'windows'",
        ),
        (
            {"target": '"llama.cpp"'},
            "field 'target' must be one of 'mlx', 'onnxruntime', got 'llama.cpp'",
        ),
        ({"isa": '"neon"'}, "field 'isa' must be a list of strings, got 'neon'"),
        (
            {"isa": '["neon", "avx512"]'},
            f"field 'isa' has unknown flag 'avx512'; known flags: {ISA_LIST}",
        ),
        (
            {"isa": '["neon", "avx2"]'},
            "field 'isa' has 'avx2', an x86_64 feature, but arch is 'arm64'",
        ),
        ({"target": '"mlx"'}, MLX_ONLY_ON_MACS),
        (
            {"target": '"mlx"', "os": '"macos"', "arch": '"x86_64"', "isa": "[]"},
            MLX_ONLY_ON_MACS,
        ),
        (
            {"decode_efficiency": "1.2"},
            "field 'decode_efficiency' must be a number in (0, 1], got 1.2",
        ),
        ({"python": "3.11"}, "field 'python' must be a version like '3.11', got 3.11"),
        (
            {"runtime": "{ onnxruntime = 1 }"},
            (
                "field 'runtime' must be a table of version specifiers, "
                "e.g. { onnxruntime = '>=1.18' }, got {'onnxruntime': 1}"
            ),
        ),
    ],
)
def test_invalid_field(tmp_path, fields, message):
    path = write(tmp_path / "devices.toml", entry(**fields))
    with pytest.raises(DeviceError) as e:
        load_devices(path)
    assert str(e.value) == f"{path}: device 'rpi5-8gb': {message}"


def test_invalid_device_name(tmp_path):
    path = write(tmp_path / "devices.toml", entry("RPi5"))
    with pytest.raises(DeviceError) as e:
        load_devices(path)
    assert str(e.value) == (
        f"{path}: device 'RPi5': names may use only lowercase letters, digits and '-'"
    )


def test_entry_that_is_not_a_table(tmp_path):
    path = write(tmp_path / "devices.toml", "version = 1\n" + entry())
    with pytest.raises(DeviceError) as e:
        load_devices(path)
    assert str(e.value) == (
        f"{path}: device 'version': must be a table of fields ([version]), got 1"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[rpi5-8gb]\nram_gb = \n", "invalid TOML at line 2, column 10: Invalid value"),
        (
            "[rpi5-8gb\n",
            (
                "invalid TOML at line 1, column 10: "
                "Expected ']' at the end of a table declaration"
            ),
        ),
        (
            '[rpi5-8gb]\ndescription = "Pi\n',
            "invalid TOML at line 2, column 18: Illegal character '\\n'",
        ),
        (
            '[rpi5-8gb]\ndescription = "Pi',
            "invalid TOML at line 2 (end of file): Unterminated string",
        ),
    ],
)
def test_invalid_toml(tmp_path, text, message):
    path = write(tmp_path / "devices.toml", text)
    with pytest.raises(DeviceError) as e:
        load_devices(path)
    assert str(e.value) == f"{path}: {message}"


def test_missing_shipped_file(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("EDGEQ_DEVICES", str(missing))
    with pytest.raises(DeviceError) as e:
        load_devices()
    assert str(e.value) == (
        f"{missing}: device profiles file not found; "
        "set EDGEQ_DEVICES to a devices.toml"
    )


def test_errors_in_the_user_file_name_the_user_file(user_file):
    write(user_file, entry("my-pi", bandwidth_gbs="0"))
    with pytest.raises(DeviceError) as e:
        load_devices()
    assert str(e.value) == (
        f"{user_file}: device 'my-pi': field 'bandwidth_gbs' "
        "must be a positive number, got 0"
    )


def test_user_entries_add_to_and_replace_shipped_ones(user_file):
    write(user_file, entry("rpi5-8gb", bandwidth_gbs="11.5") + entry("my-pi"))
    loaded = load_devices()
    assert loaded["rpi5-8gb"].bandwidth_gbs == 11.5
    assert loaded["rpi5-8gb"].source == user_file
    assert loaded["my-pi"].cores == 4
    assert loaded["rpi4-4gb"].source == SHIPPED


def test_unknown_device_suggests_close_names():
    with pytest.raises(DeviceError) as e:
        get_device("rpi5-8g")
    assert str(e.value) == (
        "unknown device 'rpi5-8g'; did you mean 'rpi5-8gb', 'rpi5-4gb', "
        "'rpi4-8gb'? `edgeq devices` lists them all, `edgeq devices detect` "
        "profiles this machine"
    )


def test_unknown_device_without_close_names():
    with pytest.raises(DeviceError) as e:
        get_device("toaster")
    assert str(e.value) == (
        "unknown device 'toaster'; `edgeq devices` lists them all, "
        "`edgeq devices detect` profiles this machine"
    )


# --- Detection -------------------------------------------------------------

PI5_CPUINFO = (
    "".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
        "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\n"
        "CPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
        for i in range(4)
    )
    + "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
)

XEON_CPUINFO = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\n"
    "model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 "
    "avx_vnni avx512_fp16 amx_int8\n\n"
)

BIG_LITTLE_CPUINFO = "".join(
    f"processor\t: {i}\nFeatures\t: fp asimd asimddp i8mm bf16 sve\n"
    f"CPU implementer\t: 0x41\nCPU part\t: {part}\n\n"
    for i, part in enumerate(["0xd05", "0xd05", "0xd0b"])
)

M2_SYSCTL = """\
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_FP16: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.AdvSIMD: 1
hw.optional.avx2_0: 0
machdep.cpu.brand_string: Apple M2
"""


def test_parse_cpuinfo():
    assert parse_cpuinfo(PI5_CPUINFO) == CpuInfo(
        "4x Cortex-A76", ("neon", "dotprod", "fp16")
    )
    assert parse_cpuinfo(XEON_CPUINFO) == CpuInfo(
        "Intel(R) Xeon(R) Platinum 8480+",
        ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fp16", "bf16"),
    )
    assert parse_cpuinfo(BIG_LITTLE_CPUINFO) == CpuInfo(
        "2x Cortex-A55 + 1x Cortex-A76",
        ("neon", "dotprod", "i8mm", "sve", "bf16"),
    )


def test_parse_sysctl():
    assert parse_sysctl(M2_SYSCTL) == CpuInfo(
        "Apple M2", ("neon", "dotprod", "i8mm", "fp16", "bf16")
    )
    m1 = M2_SYSCTL.replace("FEAT_I8MM: 1", "FEAT_I8MM: 0").replace("M2", "M1")
    assert parse_sysctl(m1) == CpuInfo("Apple M1", ("neon", "dotprod", "fp16", "bf16"))


def test_detect_writes_a_profile_that_loads_back(user_file):
    profile = detect(buffer_mb=8, max_seconds=0.2)

    assert profile.name == devices.default_device_name()
    assert profile.bandwidth_gbs > 0
    assert profile.source == user_file
    assert profile.ram_gb == round(psutil.virtual_memory().total / 2**30, 1)
    assert profile.cores >= 1
    expected_arch = "arm64" if platform.machine() in ("arm64", "aarch64") else "x86_64"
    assert profile.arch == expected_arch
    if sys.platform == "linux":
        assert (profile.os, profile.target) == ("linux", "onnxruntime")

    assert load_devices()[profile.name] == profile
    lines = user_file.read_text().splitlines()
    header = lines.index(f"[{profile.name}]")
    today = datetime.date.today().isoformat()
    assert (
        f"# measured by edgeq devices detect on {today}" in lines[header - 2 : header]
    )


def test_detect_replaces_its_entry_and_keeps_the_others(user_file):
    mine = "# my own board, measured with STREAM\n" + entry("my-pi")
    write(
        user_file,
        mine
        + "\n# old\n"
        + entry("bench-box", cores="2")
        + "\n"
        + mine.replace("my-pi", "my-pi-2"),
    )

    detect(name="bench-box", buffer_mb=8, max_seconds=0.1)
    detect(name="bench-box", buffer_mb=8, max_seconds=0.1)

    text = user_file.read_text()
    assert text.startswith(mine + "\n# measured by edgeq devices detect")
    assert text.endswith("\n\n" + mine.replace("my-pi", "my-pi-2"))
    assert text.count("[bench-box]") == 1
    assert "# old" not in text
    loaded = load_devices()
    assert loaded["bench-box"].cores != 2 or psutil.cpu_count(logical=False) == 2
    assert loaded["my-pi"].bandwidth_gbs == 17.07
    assert loaded["my-pi-2"].bandwidth_gbs == 17.07


def test_detect_rejects_a_bad_name(user_file):
    with pytest.raises(DeviceError) as e:
        detect(name="My Box", buffer_mb=8)
    assert str(e.value) == (
        "--name 'My Box': names may use only lowercase letters, digits and '-'"
    )
    assert not user_file.exists()


def test_detect_leaves_an_unreadable_user_file_alone(user_file):
    write(user_file, "[my-pi\n")
    with pytest.raises(DeviceError) as e:
        detect(buffer_mb=8, max_seconds=0.1)
    assert str(e.value) == (
        f"{user_file}: invalid TOML at line 1, column 7: "
        "Expected ']' at the end of a table declaration"
    )
    assert user_file.read_text() == "[my-pi\n"


def test_default_device_name(monkeypatch):
    monkeypatch.setattr(devices.socket, "gethostname", lambda: "Ana's MacBook.local")
    assert devices.default_device_name() == "local-ana-s-macbook"


def test_library_import_is_light():
    # `edgeq --help` must stay fast: numpy, psutil and rich load on use only.
    code = (
        "import sys, edgeq.devices, edgeq.cli.devices; "
        "print(sorted({'numpy', 'psutil', 'rich'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert out.stdout.strip() == "[]", out.stderr


# --- CLI -------------------------------------------------------------------

runner = CliRunner()


def test_cli_list_json():
    result = runner.invoke(app, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    listed = {d["name"]: d for d in json.loads(result.stdout)}
    assert REQUIRED_NAMES <= set(listed)
    assert listed["rpi5-8gb"]["bandwidth_gbs"] == 17.07
    assert listed["rpi5-8gb"]["isa"] == ["neon", "dotprod", "fp16"]


def test_cli_list_table():
    result = runner.invoke(app, ["devices"])
    assert result.exit_code == 0, result.output
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()
        if line.strip()
    }
    assert rows["rpi5-8gb"][:6] == [
        "rpi5-8gb",
        "onnxruntime",
        "8",
        "6.0",
        "17.07",
        "arm64",
    ]
    assert rows["macbook-air-m2-16gb"][:6] == [
        "macbook-air-m2-16gb",
        "mlx",
        "16",
        "10.4",
        "100",
        "arm64",
    ]


def test_cli_show():
    result = runner.invoke(app, ["devices", "show", "rpi5-8gb"])
    assert result.exit_code == 0, result.output
    assert "Broadcom BCM2712, 4x Cortex-A76" in result.stdout
    assert "17.07" in result.stdout
    assert "6.0 GiB" in result.stdout


def test_cli_show_json():
    result = runner.invoke(app, ["devices", "show", "rpi5-8gb", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == get_device("rpi5-8gb").to_dict()


def test_cli_detect(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "measure_bandwidth_gbs", lambda *a, **k: 12.5)
    out = tmp_path / "box.toml"
    result = runner.invoke(
        app, ["devices", "detect", "--name", "box", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Measuring memory bandwidth" in result.stderr
    assert (
        result.stdout.splitlines()[-1]
        == f"Measured 12.5 GB/s; wrote device 'box' to {out}"
    )
    assert load_devices(user_path=out)["box"].bandwidth_gbs == 12.5


def test_cli_detect_json(tmp_path, monkeypatch, user_file):
    monkeypatch.setattr(devices, "measure_bandwidth_gbs", lambda *a, **k: 12.5)
    result = runner.invoke(app, ["devices", "detect", "--name", "box", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert (shown["name"], shown["bandwidth_gbs"]) == ("box", 12.5)
    assert shown["source"] == str(user_file)
    assert get_device("box") == DeviceProfile(**{**shown, "isa": tuple(shown["isa"])})


def test_cli_unknown_device_is_one_error_line():
    result = runner.invoke(app, ["devices", "show", "rpi5-8g"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: unknown device 'rpi5-8g'; did you mean 'rpi5-8gb', 'rpi5-4gb', "
        "'rpi4-8gb'? `edgeq devices` lists them all, `edgeq devices detect` "
        "profiles this machine\n"
    )


def test_intel_mac_reports_vnni_through_leaf7_features():
    from edgeq.devices import parse_sysctl

    text = (
        "machdep.cpu.brand_string: Intel(R) Core(TM) i7-1068NG7 CPU @ 2.30GHz\n"
        "machdep.cpu.leaf7_features: RDWRFSGS TSC_THREAD_OFFSET SGX BMI1 AVX2 "
        "FDPEO SMEP BMI2 ERMS INVPCID FPU_CSDS AVX512F AVX512DQ AVX512VNNI\n"
    )
    info = parse_sysctl(text)
    assert "avx2" in info.isa and "avx512_vnni" in info.isa and "avx512f" in info.isa
    assert "neon" not in info.isa
