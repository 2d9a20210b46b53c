"""Coverage-guided fuzzing of the readers of untrusted files, with atheris.

    pip install atheris
    python bench/fuzz_readers.py --seconds 300            # every reader in turn
    python bench/fuzz_readers.py gguf -max_total_time=60   # one, libFuzzer flags

The property is tests/test_fuzz.py's: a reader succeeds or raises
EdgeqError. Anything else, a run past 10 s (-timeout) or more than 3 GB
resident (-rss_limit_mb) is a finding: libFuzzer writes the input to
`crash-*`, `timeout-*` or `oom-*` in the work folder and the run stops.
Each target starts from a corpus of valid files written here, so the fuzzer
begins inside the format rather than at random bytes. The work folder
(default $TMPDIR/edgeq-fuzz) keeps the corpus between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("safetensors", "gguf", "config", "manifest", "archive", "devices", "fleet")


# -- seeds: one valid file per target --------------------------------------------


def write_seeds(target: str, folder: Path) -> None:
    """Valid inputs for `target` in `folder` (the fuzzer's starting corpus)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers_models import (
        random_tensors,
        save_safetensors,
        tiny_config,
        write_gguf_model,
    )

    folder.mkdir(parents=True, exist_ok=True)
    small = tiny_config(hidden_size=8, head_dim=4, intermediate_size=8,
                        vocab_size=8, num_hidden_layers=1)  # fmt: skip
    if target == "safetensors":
        save_safetensors(folder / "seed", random_tensors(small))
    elif target == "gguf":
        write_gguf_model(folder / "seed", hidden=8, heads=2, ffn=8, vocab=8)
    elif target == "config":
        for arch in ("llama", "qwen2", "qwen3", "gemma3"):
            (folder / arch).write_text(json.dumps(tiny_config(arch)))
    elif target == "manifest":
        sys.path.insert(0, str(REPO / "tests"))
        from test_fuzz import MANIFEST

        (folder / "seed").write_text(json.dumps(MANIFEST, indent=1))
    elif target == "archive":
        from edgeq import artifact

        with tempfile.TemporaryDirectory() as tmp:
            art = Path(tmp) / "art"
            (art / "runner").mkdir(parents=True)
            (art / "model.onnx").write_bytes(b"onnx" * 50)
            (art / "runner/run.py").write_text("print('hi')\n")
            artifact.write_manifest(art, {"target": "onnxruntime", "runtime": {}})
            artifact.pack(art, folder / "seed")
    elif target == "devices":
        (folder / "seed").write_bytes((REPO / "devices.toml").read_bytes())
    elif target == "fleet":
        (folder / "seed").write_bytes((REPO / "examples/fleet.toml").read_bytes())


# -- one input through one reader --------------------------------------------------


def make_harness(target: str, scratch: Path):
    """TestOneInput(data) for `target`, reading through a scratch file."""
    import atheris

    with atheris.instrument_imports():
        import gguf  # noqa: F401 - its reader parses what the walk let through

        from edgeq import artifact, preflight
        from edgeq.devices import load_devices
        from edgeq.errors import EdgeqError
        from edgeq.models.config import config_from_hf
        from edgeq.models.gguf_file import GGUFModel
        from edgeq.models.safetensors_io import SafetensorsFile

        if target == "fleet":
            from edgeq.fleet.config import load_fleet

    path = scratch / "input"
    facts = {"arch": "aarch64", "userland_bits": 64, "python": "3.11.2",
             "libc": "glibc 2.36", "packages": {"onnxruntime": "1.20.1"},
             "cpu_flags": ["fp", "asimd", "asimddp"]}  # fmt: skip

    def read(data: bytes) -> None:
        if target == "config":
            try:
                raw = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                return
            config_from_hf(raw)
            return
        if target == "manifest":
            manifest = artifact._parse_manifest("fuzz", data)
            preflight.check_runtime(manifest["runtime"], facts)
            return
        path.write_bytes(data)
        if target == "safetensors":
            f = SafetensorsFile(path)
            for name in f.entries:
                f.read(name)
        elif target == "gguf":
            m = GGUFModel(path)
            for name in m.tensor_names():
                m.read(name)
        elif target == "archive":
            try:
                artifact.verify(path)
            finally:
                out = scratch / "out"
                try:
                    artifact.safe_extract(path, out)
                except EdgeqError:
                    pass
                import shutil

                shutil.rmtree(out, ignore_errors=True)
        elif target == "devices":
            load_devices(path=REPO / "devices.toml", user_path=path)
        elif target == "fleet":
            load_fleet(path)

    def test_one_input(data: bytes) -> None:
        try:
            read(data)
        except EdgeqError as e:
            if "\n" in str(e):
                raise AssertionError("an error message of more than one line") from e

    return test_one_input


def fuzz_one(target: str, work: Path, libfuzzer_args: list[str]) -> None:
    """Run atheris on one target in this process (libFuzzer owns argv)."""
    import atheris

    corpus = work / target / "corpus"
    if not corpus.exists() or not any(corpus.iterdir()):
        # In a child: importing edgeq here, before instrument_imports, would
        # leave it without coverage feedback.
        cmd = [sys.executable, __file__, target, "--seeds-only", "--work", str(work)]
        subprocess.run(cmd, check=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"edgeq-fuzz-{target}-"))
    harness = make_harness(target, scratch)
    os.chdir(work / target)  # crash-*, timeout-*, oom-* land here
    argv = [sys.argv[0], *libfuzzer_args, "-timeout=10", "-rss_limit_mb=3072",
            str(corpus)]  # fmt: skip
    atheris.Setup(argv, harness)
    atheris.Fuzz()


def run_all(seconds: int, work: Path) -> int:
    """Each target in a child process for `seconds`; prints a summary."""
    findings = 0
    for target in TARGETS:
        (work / target).mkdir(parents=True, exist_ok=True)
        before = set((work / target).glob("*-*"))
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, target, f"-max_total_time={seconds}",
             "-print_final_stats=1", "--work", str(work)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        took = time.monotonic() - start
        new = sorted(p.name for p in set((work / target).glob("*-*")) - before)
        runs = next(
            (line.split(":")[-1].strip() for line in proc.stderr.splitlines()
             if line.startswith("stat::number_of_executed_units")),
            "?",
        )  # fmt: skip
        findings += len(new)
        status = "finding: " + ", ".join(new) if new else "no finding"
        print(f"{target:12} {took:6.0f} s  {runs:>8} inputs  {status}", flush=True)
        if new:
            print("\n".join(proc.stderr.splitlines()[-30:]), file=sys.stderr)
    return 1 if findings else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", nargs="?", choices=TARGETS)
    parser.add_argument("--seconds", type=int, default=120, help="per target")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeq-fuzz"
    )
    parser.add_argument("--seeds-only", action="store_true", help=argparse.SUPPRESS)
    args, libfuzzer_args = parser.parse_known_args()
    args.work = args.work.resolve()
    if args.seeds_only:
        write_seeds(args.target, args.work / args.target / "corpus")
        return 0
    if args.target:
        fuzz_one(args.target, args.work, libfuzzer_args)
        return 0
    return run_all(args.seconds, args.work)


if __name__ == "__main__":
    sys.exit(main())
