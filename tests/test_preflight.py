"""Pre-flight checks: can a device install and run an artifact's runtime?

Device facts are fixtures for the machines in cases C09 and C10
(shared/cases/README.md); the last tests run against this machine and its
installed onnxruntime, so the static tables are checked where they can be.
"""

from __future__ import annotations

import importlib.metadata
import platform
import struct

import pytest

from edgeq.errors import ArtifactError
from edgeq.preflight import (
    _ORT_MAX_ONNX,
    _ort_max_onnx,
    _wheel_problem,
    check_runtime,
    import_smoke_test,
    local_device_facts,
    local_preflight,
    missing_packages,
    parse_version,
    require_runtime,
    version_satisfies,
)

# Raspberry Pi 5 (Cortex-A76, has dot product), 64-bit Raspberry Pi OS.
PI5 = {
    "arch": "aarch64",
    "userland_bits": 64,
    "python": "3.11.2",
    "libc": "glibc 2.36",
    "cpu_flags": ["fp", "asimd", "evtstrm", "aes", "crc32", "asimddp", "asimdhp"],
    "packages": {},
}
# Raspberry Pi 4: Cortex-A72, no asimddp.
PI4_FLAGS = ["fp", "asimd", "evtstrm", "crc32", "cpuid"]

ORT_RUNTIME = {
    "python": ">=3.10",
    "packages": {"onnxruntime": ">=1.18"},
    "onnx": {"opset": 21, "ir_version": 10},
    "arch": "aarch64",
    "isa": [],
}


def device(**changes):
    return {**PI5, **changes}


def runtime(**changes):
    return {**ORT_RUNTIME, **changes}


# -- versions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        ("1.16.3", ">=1.18", False),
        ("1.18.0", ">=1.18", True),
        ("1.18", ">=1.18.0", True),
        ("1.19.2", "==1.19.2", True),
        ("1.19.2", "==1.19", False),
        ("1.19.2", "==1.19.*", True),
        ("1.20.0", "!=1.19.*", True),
        ("1.21.1", ">=1.18,<1.22", True),
        ("1.22.0", ">=1.18,<1.22", False),
        ("1.19.4", "~=1.19.2", True),
        ("1.20.0", "~=1.19.2", False),
        ("3.13.1", ">=3.10", True),
        ("1.16.3+cpu", ">1.16", True),
        ("0.22.1", "", True),
    ],
)
def test_version_satisfies(version, spec, expected):
    assert version_satisfies(version, spec) is expected


def test_unreadable_requirement_is_refused():
    with pytest.raises(ArtifactError) as e:
        version_satisfies("1.18.0", "^1.18")
    assert str(e.value) == (
        "runtime requirement '^1.18' is not a version range edgeq reads; "
        "use forms like '>=1.18' or '==1.19.2'"
    )


def test_parse_version():
    assert parse_version("1.16.3+cpu") == (1, 16, 3)
    assert parse_version("3.11.7 (main, Dec  8 2023)") == (3, 11, 7)
    assert parse_version("dev") is None


# -- C09: opset or IR version too new for the device's onnxruntime ------------


def test_c09_opset_too_new_for_installed_onnxruntime():
    facts = device(packages={"onnxruntime": "1.16.3"})
    assert check_runtime(runtime(packages={"onnxruntime": ">=1.16"}), facts) == [
        (
            "model needs ONNX opset 21 and IR version 10; onnxruntime 1.16.3 on the "
            "device supports up to opset 19 and IR 9: upgrade onnxruntime to >= 1.18 "
            "or rebuild with a lower opset"
        )
    ]


def test_c09_also_reports_the_unmet_requirement():
    facts = device(packages={"onnxruntime": "1.16.3"})
    assert check_runtime(runtime(), facts) == [
        (
            "onnxruntime 1.16.3 on the device does not satisfy the artifact's "
            "requirement onnxruntime>=1.18: pip install 'onnxruntime>=1.18'"
        ),
        (
            "model needs ONNX opset 21 and IR version 10; onnxruntime 1.16.3 on the "
            "device supports up to opset 19 and IR 9: upgrade onnxruntime to >= 1.18 "
            "or rebuild with a lower opset"
        ),
    ]


def test_c09_ir_version_alone_too_new():
    # opset 22 is fine for 1.22, IR 11 is not (measured on the 1.22.1 wheel).
    facts = device(packages={"onnxruntime": "1.22.1"})
    needs = runtime(onnx={"opset": 22, "ir_version": 11})
    assert check_runtime(needs, facts) == [
        (
            "model needs ONNX opset 22 and IR version 11; onnxruntime 1.22.1 on the "
            "device supports up to opset 22 and IR 10: upgrade onnxruntime to >= 1.23 "
            "or rebuild with a lower opset"
        )
    ]


def test_c09_pinned_release_not_yet_installed():
    needs = runtime(packages={"onnxruntime": "==1.16.3"})
    assert check_runtime(needs, device()) == [
        (
            "model needs ONNX opset 21 and IR version 10; onnxruntime 1.16.3 (what pip "
            "installs for onnxruntime==1.16.3) supports up to opset 19 and IR 9: "
            "upgrade onnxruntime to >= 1.18 or rebuild with a lower opset"
        )
    ]


def test_c09_new_enough_runtime_passes():
    facts = device(packages={"onnxruntime": "1.20.1"})
    assert check_runtime(runtime(), facts) == []
    assert check_runtime(runtime(), device()) == []  # pip would pick a new one


def test_release_older_than_the_table():
    facts = device(packages={"onnxruntime": "1.13.1"})
    needs = runtime(packages={"onnxruntime": ""})
    assert check_runtime(needs, facts) == [
        (
            "onnxruntime 1.13.1 on the device is older than any release edgeq knows "
            "(1.14): upgrade onnxruntime"
        )
    ]


# -- C10: the runtime will not install or import on the device ----------------


def test_c10a_armv7l_has_no_wheels():
    facts = device(arch="armv7l", userland_bits=32)
    assert check_runtime(runtime(), facts) == [
        "onnxruntime publishes no armv7l wheels for Python 3.11; use a 64-bit OS"
    ]


def test_c10b_32_bit_userland_on_64_bit_kernel():
    facts = device(userland_bits=32)
    assert check_runtime(runtime(), facts) == [
        (
            "the device runs a 32-bit user space on a 64-bit aarch64 kernel and "
            "onnxruntime publishes no 32-bit wheels; install a 64-bit OS"
        )
    ]


def test_c10c_cortex_a72_lacks_the_tuned_feature():
    facts = device(cpu_flags=PI4_FLAGS)
    assert check_runtime(runtime(isa=["dotprod"]), facts) == [
        (
            "device lacks CPU feature 'dotprod' (asimddp) that this artifact's INT8 "
            "kernels were tuned for; rebuild for a profile without it"
        )
    ]


def test_c10c_release_that_crashes_without_dotprod():
    facts = device(cpu_flags=PI4_FLAGS, packages={"onnxruntime": "1.21.0"})
    assert check_runtime(runtime(), facts) == [
        (
            "onnxruntime 1.21.0 on the device crashes with an illegal instruction on "
            "CPUs without 'dotprod' (asimddp) such as this one "
            "(microsoft/onnxruntime#24112): install onnxruntime >= 1.22 or < 1.21"
        )
    ]
    # The same release is fine where the CPU has dot product (Pi 5).
    assert check_runtime(runtime(), device(packages={"onnxruntime": "1.21.0"})) == []


def test_c10d_pinned_release_has_no_wheel_for_python_3_13():
    facts = device(python="3.13.1")
    needs = runtime(packages={"onnxruntime": "==1.19.2"})
    assert check_runtime(needs, facts) == [
        (
            "onnxruntime==1.19.2 publishes no wheel for Python 3.13.1 (onnxruntime "
            "1.19 has wheels for Python 3.8-3.12): use Python 3.8-3.12 on the device "
            "or rebuild with onnxruntime >= 1.20"
        )
    ]


def test_glibc_too_old_for_every_matching_release():
    facts = device(libc="glibc 2.26")
    assert check_runtime(runtime(), facts) == [
        (
            "onnxruntime>=1.18 publishes no wheel for glibc 2.26 (onnxruntime "
            "1.18-1.28 needs glibc >= 2.27; onnxruntime 1.29-1.32 needs glibc >= "
            "2.28): upgrade the device's OS or rebuild with onnxruntime 1.15-1.16"
        )
    ]


def test_musl_has_no_wheels():
    facts = device(libc="musl 1.2.4")
    assert check_runtime(runtime(), facts) == [
        (
            "onnxruntime publishes no wheels for musl libc (musl 1.2.4); use a "
            "glibc-based OS such as Debian or Raspberry Pi OS"
        )
    ]


def test_wheel_checks_skip_an_installed_runtime():
    # Built from source on musl: installed, so no wheel is needed.
    facts = device(libc="musl 1.2.4", packages={"onnxruntime": "1.20.1"})
    assert check_runtime(runtime(), facts) == []


# -- architecture, Python, ISA, other packages ------------------------------


def test_artifact_built_for_another_arch():
    facts = device(arch="x86_64", cpu_flags=["sse4_2", "avx2"])
    assert check_runtime(runtime(), facts) == [
        (
            "artifact is built for aarch64 but the device is x86_64: "
            "rebuild it for this device's profile"
        )
    ]


def test_mlx_artifact_on_apple_silicon_arm64_alias():
    mlx = {"python": ">=3.10", "packages": {"mlx-lm": ">=0.22"}, "arch": "aarch64"}
    mac = {
        "arch": "arm64",
        "userland_bits": 64,
        "python": "3.12.4",
        "libc": "",
        "system": "darwin",
        "cpu_flags": ["neon", "dotprod", "fp16"],
        "packages": {"mlx-lm": "0.22.1", "mlx": "0.25.0"},
    }
    assert check_runtime(mlx, mac) == []
    old = {**mac, "packages": {"mlx_lm": "0.20.0"}}
    assert check_runtime(mlx, old) == [
        (
            "mlx-lm 0.20.0 on the device does not satisfy the artifact's requirement "
            "mlx-lm>=0.22: pip install 'mlx-lm>=0.22'"
        )
    ]


def test_python_too_old_for_the_artifact():
    facts = device(python="3.9.2", packages={"onnxruntime": "1.19.2"})
    assert check_runtime(runtime(), facts) == [
        (
            "artifact needs Python >=3.10 but the device has Python 3.9.2: "
            "install a matching Python"
        )
    ]


def test_x86_without_vnni():
    facts = device(arch="x86_64", cpu_flags=["sse4_2", "avx2", "avx512f"])
    needs = runtime(arch="x86_64", isa=["avx2", "avx512_vnni"])
    assert check_runtime(needs, facts) == [
        (
            "device lacks CPU feature 'avx512_vnni' that this artifact's INT8 kernels "
            "were tuned for; rebuild for a profile without it"
        )
    ]


def test_unknown_cpu_flags_skip_feature_checks():
    facts = device(cpu_flags=None, packages={"onnxruntime": "1.21.0"})
    assert check_runtime(runtime(isa=["dotprod"]), facts) == []


def test_require_runtime_joins_reasons_in_one_line():
    facts = device(python="3.9.2", cpu_flags=PI4_FLAGS, packages={})
    with pytest.raises(ArtifactError) as e:
        require_runtime(runtime(isa=["dotprod"]), facts, "artifact dist/x.tar.gz")
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        "artifact dist/x.tar.gz cannot run on this device: artifact needs Python "
        ">=3.10 but the device has Python 3.9.2: install a matching Python; "
        "device lacks CPU feature 'dotprod' (asimddp) that this artifact's INT8 "
        "kernels were tuned for; rebuild for a profile without it"
    )


def test_python_without_wheels_lists_each_range():
    needs = runtime(python=None, packages={"onnxruntime": ">=1.15"})
    assert check_runtime(needs, device(python="3.7.3")) == [
        (
            "onnxruntime>=1.15 publishes no wheel for Python 3.7.3 (onnxruntime "
            "1.15-1.16 has wheels for Python 3.8-3.11; onnxruntime 1.17-1.19 has "
            "wheels for Python 3.8-3.12; onnxruntime 1.20-1.23 has wheels for Python "
            "3.10-3.13; onnxruntime 1.24-1.32 has wheels for Python 3.11-3.14): use "
            "Python 3.8-3.14 on the device or rebuild with onnxruntime 1.14"
        )
    ]


def test_missing_packages():
    needs = {"packages": {"onnxruntime": ">=1.18", "tokenizers": ">=0.19"}}
    facts = device(packages={"tokenizers": "0.20.0"})
    assert missing_packages(needs, facts) == ["onnxruntime>=1.18"]


# -- import smoke test: a crash in the child is a reason, not our crash ------


def test_import_smoke_test_reports_sigill():
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    assert import_smoke_test("onnxruntime", code=crash) == (
        "importing onnxruntime killed Python with SIGILL (Illegal instruction): "
        "this build uses CPU instructions the device lacks; install a build made "
        "for this CPU"
    )


def test_import_smoke_test_reports_import_error():
    assert import_smoke_test("edgeq-no-such-module") == (
        "importing edgeq-no-such-module failed with exit code 1: "
        "ModuleNotFoundError: No module named 'edgeq_no_such_module'"
    )


def test_import_smoke_test_times_out():
    slow = "import time; time.sleep(10)"
    assert import_smoke_test("mlx-lm", code=slow, timeout_s=0.5) == (
        "importing mlx-lm did not finish within 0.5 s"
    )


def test_import_smoke_test_passes_for_a_real_import():
    assert import_smoke_test("json") is None


def test_import_smoke_test_refuses_code_in_a_package_name():
    with pytest.raises(ValueError):
        import_smoke_test("os; os.system('true')")


# -- this machine: real facts, real onnxruntime --------------------------------


def test_local_device_facts_describe_this_machine():
    facts = local_device_facts()
    assert facts["arch"] == platform.machine().lower()
    assert facts["userland_bits"] == struct.calcsize("P") * 8
    assert facts["python"] == platform.python_version()
    assert facts["system"] == platform.system().lower()
    assert facts["packages"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
    if facts["system"] == "linux":
        name, version = platform.libc_ver()
        assert facts["libc"] == f"{name} {version}"
        assert facts["cpu_flags"] and all(
            isinstance(f, str) for f in facts["cpu_flags"]
        )


def test_this_machine_passes_preflight_for_its_own_runtime():
    ort = importlib.metadata.version("onnxruntime")
    needs = runtime(
        packages={"onnxruntime": f">={ort}"},
        arch=platform.machine().lower(),
        onnx={"opset": 17, "ir_version": 8},
    )
    assert local_preflight(needs) == []


def test_opset_table_matches_installed_onnxruntime():
    """The table's row for the installed release is what it really loads."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    def loads(opset: int, ir: int) -> bool:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = ir
        try:
            ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        except Fail:
            return False
        return True

    version = parse_version(ort.__version__)
    if version[:2] not in _ORT_MAX_ONNX:
        pytest.skip(f"onnxruntime {ort.__version__} has no row of its own to check")
    max_opset, max_ir = _ort_max_onnx(version)
    assert loads(max_opset, 7) and not loads(max_opset + 1, 7)
    assert loads(14, max_ir) and not loads(14, max_ir + 1)


def test_wheel_table_covers_installed_onnxruntime():
    facts = local_device_facts()
    version = parse_version(importlib.metadata.version("onnxruntime"))
    assert _wheel_problem(version, facts) is None
