"""`tm-export build`'s engine side: the plans of a build directory whose ONNX is there.

(`tempomaster.toolchain.export_and_build` exports the ONNX, plain or
calibrated FP8, then calls into here.)

    resume_build(BUILD)
        reuses the ONNX already there (every file checked against the
        manifest's sha256 first: a changed file is refused) and builds the
        plans, with the options recorded at export unless new ones are given.

On a machine without TensorRT or without a CUDA GPU everything before the
engine step is done and kept; MissingDependencyError (exit code 3) then says
what is missing and that `tm-export build --resume BUILD` on a GPU machine
finishes the job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ManifestError, UsageError, print_to_stderr
from .builder import EngineOptions, build_engines
from .manifest import MANIFEST_FILE, load_manifest, verify_files

# The one place that says which precisions an engine build accepts.
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
FP8_READY = True  # the calibrated FP8 export (tempomaster.toolchain) writes the ONNX side of fp8
ENGINE_REQUEST_KEY = "engine_request"


def check_engine_precision(precision: str) -> str:
    """UsageError (one line) for a precision the engine build cannot serve yet."""
    if precision not in ENGINE_PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    if precision == "fp8" and not FP8_READY:
        raise UsageError(
            "--precision fp8: FP8 engines are not available yet (they need the calibrated FP8 export); use fp16 or bf16"
        )
    return precision


@dataclass
class BuildResult:
    build_dir: Path
    precision: str
    onnx_seconds: float | None  # None when resumed
    engine_seconds: float
    engines: dict

    def summary(self) -> str:
        """What `tm-export build` prints when it is done: one line per plan."""
        lines = [
            f"{self.build_dir}: {len(self.engines['plans'])} TensorRT plan(s), precision {self.precision}, "
            f"TensorRT {self.engines['tensorrt_version']} on {self.engines['gpu']} "
            f"(compute capability {self.engines['compute_capability']}), engines built in {self.engine_seconds:.1f}s"
            + (f", ONNX exported in {self.onnx_seconds:.1f}s" if self.onnx_seconds is not None else " (ONNX reused)")
        ]
        for name, p in self.engines["plans"].items():
            prof = p["profile"]
            frames = f" frames {'/'.join(map(str, prof['frames']))}" if prof.get("frames") else ""
            flags = [k for k in ("stripped", "weight_streaming", "version_compatible") if p.get(k)]
            if p.get("hardware_compat") not in (None, "none"):
                flags.append(f"hardware_compat {p['hardware_compat']}")
            lines.append(
                f"  {name:18s} {p['bytes'] / 2**20:10.1f} MiB  batch {'/'.join(map(str, prof['batch']))}{frames}"
                f"  {p['build_seconds']:.1f}s{('  ' + ', '.join(flags)) if flags else ''}"
            )
            if p.get("fp8_layers"):
                from .layer_report import describe_report

                lines.append(f"    {describe_report(name, p['fp8_layers'])}")
        return "\n".join(lines)


def _recorded_options(manifest, where: Path, overridden: set[str]) -> EngineOptions:
    """The engine options the build was exported with; a bad recorded value is named as the manifest's field."""
    recorded = manifest.data.get(ENGINE_REQUEST_KEY)
    if recorded is not None and not isinstance(recorded, dict):
        raise ManifestError(f"{where}: {ENGINE_REQUEST_KEY} must be an object, got {type(recorded).__name__}")
    options = EngineOptions.from_dict({k: v for k, v in (recorded or {}).items() if k not in overridden})
    try:
        return options.validate(name=lambda field: f"{where}: {ENGINE_REQUEST_KEY}.{field}")
    except UsageError as err:
        raise ManifestError(str(err)) from None


def resume_build(
    build_dir: str | os.PathLike,
    options: EngineOptions | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
    log: Callable[[str], None] = print_to_stderr,
) -> BuildResult:
    """Build the plans of an ONNX build made earlier (`tm-export build` stopped at exit 3, or `tm-export onnx`).

    options None: those recorded when the build was exported (the defaults
    if none were), with `overrides` (EngineOptions field -> value, e.g. the
    engine flags given with --resume) applied on top.
    """
    manifest = load_manifest(build_dir)
    where = Path(build_dir) / MANIFEST_FILE
    if manifest.precision not in ENGINE_PRECISIONS:  # the build's field, not a flag the user gave
        raise ManifestError(
            f"{where}: precision {manifest.precision!r} has no TensorRT engines "
            f"(they are built for {', '.join(ENGINE_PRECISIONS)})"
        )
    verify_files(manifest)  # the ONNX (and tokenizer) exactly as exported, before anything else
    if overrides:
        unknown = sorted(set(overrides) - set(EngineOptions.__dataclass_fields__))
        if unknown:
            raise UsageError(
                f"unknown engine options {unknown}; known: {', '.join(EngineOptions.__dataclass_fields__)}"
            )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        replace(EngineOptions(), **overrides).validate()  # a bad flag is named as the flag
    if options is None:
        options = _recorded_options(manifest, where, set(overrides or ()))
    if overrides:
        options = replace(options, **overrides)
    t1 = time.perf_counter()
    section = build_engines(build_dir, options, log=log)
    return BuildResult(Path(build_dir), manifest.precision, None, time.perf_counter() - t1, section)
