"""`edgeq deploy`: model + device -> a verified artifact folder and archive.

check (device, target, model, plan fits) -> build into a temporary folder
(weights, tokenizer, runner) -> smoke test -> quality gate -> manifest ->
rename into place -> reproducible .tar.gz. Nothing is left half-written:
a failure at any step removes the temporary folder.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeq import __version__
from edgeq.backends import TARGETS, check_device_can_run, load_backend
from edgeq.errors import EdgeqError, TargetError

log = logging.getLogger(__name__)

SMOKE_PROMPT = "Explain quantization in one sentence."


@dataclass
class DeployRequest:
    model: str
    device: str
    target: str | None = None
    out: Path | None = None
    force: bool = False
    bits: int | None = None
    group_size: int | None = None
    target_bpw: float | None = None
    context_length: int = 4096
    plan_path: Path | None = None
    smoke_tokens: int = 16
    max_ppl_increase: float | None = None
    quality_gate: bool = True
    archive: bool = True
    tie_embeddings: bool | None = None


@dataclass
class DeployResult:
    folder: Path
    archive: Path | None
    manifest: dict
    plan: object
    smoke_text: str = ""
    timings: dict = field(default_factory=dict)


def default_out(model_ref: str, device: str) -> Path:
    name = Path(model_ref).stem if ("/" in model_ref or "." in model_ref) else model_ref
    return Path("dist") / f"{name.lower()}-{device}"


def prepare(req: DeployRequest, say=None):
    """Everything that can fail cheaply, before any heavy work."""
    say = say or (lambda step, detail="": None)
    from edgeq.devices import get_device
    from edgeq.fsutil import check_output_location
    from edgeq.models import open_model
    from edgeq.plan import Plan
    from edgeq.planner import PlanRequest, check_fits, make_plan

    device = get_device(req.device)
    target = req.target or device.target
    check_device_can_run(target, device)
    out = Path(req.out) if req.out else default_out(req.model, device.name)
    if out.exists() and not req.force:
        raise EdgeqError(
            f"output '{out}' already exists; pass --force to replace it or "
            "choose another --out"
        )
    check_output_location(out)
    if req.context_length < 1:
        raise EdgeqError(f"--context must be >= 1 tokens, got {req.context_length}")
    _check_not_overwriting_input(out, req)
    source = open_model(req.model, tie=req.tie_embeddings)
    preq = PlanRequest(
        target=target, bits=req.bits, group_size=req.group_size,
        context_length=req.context_length,
    )  # fmt: skip
    if req.target_bpw is not None:
        preq.target_bpw = req.target_bpw
        # Measuring sensitivity takes minutes the first time (then cached).
        preq.progress = lambda done, total, name: say("tensor", f"sensitivity {name}")
    if req.plan_path:
        plan = Plan.load(req.plan_path)
        _check_replayed_plan(plan, source, target, device)
    else:
        plan = make_plan(source, device, preq)
    check_fits(plan, device, source, preq)
    return device, target, out, source, plan


def _check_not_overwriting_input(out: Path, req: DeployRequest) -> None:
    """--force replaces earlier artifacts only: never the model being read, a
    folder holding it, or anything that is not an edgeq artifact."""
    if not out.exists() and not out.is_symlink():
        return
    src = Path(req.model).expanduser()
    if src.exists():
        src, dst = src.resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise EdgeqError(
                f"--out {out} is the model being read or holds it; choose another --out"
            )
    if not (out.is_dir() and (out / "manifest.json").is_file()):
        raise EdgeqError(
            f"--out {out} exists and is not an edgeq artifact; --force replaces "
            "only artifacts: remove it yourself or choose another --out"
        )


def _check_replayed_plan(plan, source, target, device) -> None:
    from edgeq.planner import predict

    if plan.target != target:
        raise TargetError(
            f"--plan: the plan is for target '{plan.target}' but the device "
            f"'{device.name}' is built with '{target}'; pass --target {plan.target}"
        )
    try:
        from edgeq.planner import validate_against
    except ImportError:  # older planner without the check
        validate_against = None
    if validate_against:
        validate_against(plan, source)
    predict(plan, source.config, device)


def deploy(req: DeployRequest, progress=None) -> DeployResult:
    """Build, check and package; `progress(step, detail)` reports steps."""
    from edgeq import artifact
    from edgeq.fsutil import atomic_output_dir, disk_full_as_error

    say = progress or (lambda step, detail="": None)
    t0 = time.perf_counter()
    device, target, out, source, plan = prepare(req, say)
    backend = load_backend(target)
    timings = {}
    # atomic_output_dir makes the parent folders, refusing with one line.
    with atomic_output_dir(out, force=req.force) as tmp, disk_full_as_error(out):
        say("build", f"{len(plan.tensors)} tensors")
        backend.build(source, plan, tmp, progress=lambda name: say("tensor", name))
        for fname, data in source.tokenizer_files.items():
            (tmp / fname).write_bytes(data)
        artifact.copy_runner(tmp, target)
        timings["build_s"] = round(time.perf_counter() - t0, 2)

        say("smoke", "loading and generating")
        backend.smoke_check(tmp)
        measured = _smoke_run(tmp, target, plan, req.smoke_tokens)
        measured.update(_quality(req, tmp, source, plan, say))
        timings.update(measured.pop("_timing"))
        # Durations differ build to build; the archive must not.
        for key in [k for k in measured if k == "seconds" or k.endswith("_s")]:
            timings[f"quality_{key}"] = measured.pop(key)
        info = _manifest_info(source, device, target, plan, backend, measured)
        manifest = artifact.write_manifest(tmp, info)
    archive_path = None
    if req.archive:
        archive_path = out.parent / (out.name + ".tar.gz")
        say("archive", str(archive_path))
        try:
            artifact.pack(out, archive_path)
        except BaseException:
            # The folder is the new, verified build; an archive of an older
            # build left beside it would not match it.
            archive_path.unlink(missing_ok=True)
            raise
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    return DeployResult(
        out, archive_path, manifest, plan, measured.get("smoke_text", ""), timings
    )


def _smoke_run(folder: Path, target: str, plan, max_tokens: int) -> dict:
    """Load the artifact with its own runner code and generate a little."""
    from edgeq_targets.common.engine import GenerationConfig, load_engine

    engine = load_engine(folder, target=target, verify=False)
    ids = engine.encode_prompt(SMOKE_PROMPT)
    text = "".join(
        t.text for t in engine.generate(ids, GenerationConfig(max_tokens=max_tokens))
    )
    s = engine.last_stats
    if s.generated_tokens == 0:
        raise TargetError(f"{folder}: the smoke test generated no tokens")
    span = s.end - s.first_token
    decode = (s.generated_tokens - 1) / span if span > 0 else None
    # Timings stay out of the manifest: they differ run to run and the
    # archive must be byte-reproducible. Greedy text does not.
    timing = {
        "load_s": round(engine.load_seconds, 3),
        "host_decode_tokens_per_s": round(decode, 2) if decode else None,
        "host": f"{platform.machine()} {platform.system()}",
    }
    return {
        "smoke_prompt": SMOKE_PROMPT,
        "smoke_text": text,
        "smoke_tokens": s.generated_tokens,
        "_timing": timing,
    }


def _quality(req, folder, source, plan, say) -> dict:
    if not req.quality_gate:
        return {"quality_gate": "skipped (--no-quality-gate)"}
    try:
        from edgeq.evaluate import run_quality_gate
    except ImportError:
        return {"quality_gate": "not available"}
    say("quality", "perplexity vs the float model")
    return run_quality_gate(folder, source, plan, req.max_ppl_increase)


def _manifest_info(source, device, target, plan, backend, measured) -> dict:
    requirements = backend.runtime_requirements(plan, device)
    requirements.setdefault("packages", dict(TARGETS[target].runner_packages))
    requirements.setdefault("python", ">=3.10")
    requirements.setdefault("arch", device.arch)
    return {
        "model": source.describe(),
        "target": target,
        "device": {"name": device.name, "profile": device.to_dict()},
        "plan": plan.to_dict(),
        "runtime": requirements,
        "predicted": plan.predictions,
        "measured": measured,
        "edgeq_version": __version__,
    }
