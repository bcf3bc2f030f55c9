"""`tm-export build`: checkpoints -> ONNX -> TensorRT plans, in one build directory.

    export_and_build(out=BUILD, precision="bf16", preset=..., checkpoints=..., ...)
        exports the ONNX exactly as `tm-export onnx` does, records the engine
        options asked for, then builds the plans (`builder.build_engines`).
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import ManifestError, UsageError
from .builder import EngineOptions, _stderr, build_engines
from .manifest import MANIFEST_FILE, load_manifest, verify_files

# The one place that says which precisions an engine build accepts.
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
FP8_READY = True  # the calibrated FP8 export (calibration.export) writes the ONNX side of fp8
ENGINE_REQUEST_KEY = "engine_request"


def check_engine_precision(precision: str) -> str:
    """UsageError (one line) for a precision the engine build cannot serve yet."""
    if precision not in ENGINE_PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    if precision == "fp8" and not FP8_READY:
        raise UsageError("--precision fp8: FP8 engines are not available yet (they need the calibrated FP8 export); use fp16 or bf16")
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
        lines = [f"{self.build_dir}: {len(self.engines['plans'])} TensorRT plan(s), precision {self.precision}, "
                 f"TensorRT {self.engines['tensorrt_version']} on {self.engines['gpu']} "
                 f"(compute capability {self.engines['compute_capability']}), engines built in {self.engine_seconds:.1f}s"
                 + (f", ONNX exported in {self.onnx_seconds:.1f}s" if self.onnx_seconds is not None else " (ONNX reused)")]
        for name, p in self.engines["plans"].items():
            prof = p["profile"]
            frames = f" frames {'/'.join(map(str, prof['frames']))}" if prof.get("frames") else ""
            flags = [k for k in ("stripped", "weight_streaming", "version_compatible") if p.get(k)]
            if p.get("hardware_compat") not in (None, "none"):
                flags.append(f"hardware_compat {p['hardware_compat']}")
            lines.append(f"  {name:18s} {p['bytes'] / 2**20:10.1f} MiB  batch {'/'.join(map(str, prof['batch']))}{frames}"
                         f"  {p['build_seconds']:.1f}s{('  ' + ', '.join(flags)) if flags else ''}")
        return "\n".join(lines)


def export_and_build(
    *,
    out: str | os.PathLike,
    precision: str = "bf16",
    preset: str | None = None,
    checkpoints: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    random_weights: bool = False,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    intervals: Sequence[int] | None = None,
    opset: int = 23,
    t5_precision: str | None = None,
    graphs: Sequence[str] | None = None,
    options: EngineOptions = EngineOptions(),
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
    tile: bool = False,
    fp8: Mapping[str, object] | None = None,
) -> BuildResult:
    """The ONNX export of `tm-export onnx` (same inputs), then the TensorRT plans.

    graphs: a subset of the build's graphs (default all; `tm-run` needs all).
    """
    from ..export.build import export_onnx, load_models_for_export, parse_graph_names
    from ..export.shapes import ExportShape
    from ..export.t5 import T5_PRECISION_FOR
    from ..export.target import prepare_target

    check_engine_precision(precision)
    options = options.validate()
    prepare_target(Path(out).absolute())  # before any model loads: a refusal costs nothing
    if precision == "fp8":
        return _fp8_export_and_build(out, options, fp8 or {}, log=log, progress=progress, preset=preset,
                                     checkpoints=checkpoints, config=config, random_weights=random_weights,
                                     height=height, width=width, num_frames=num_frames, intervals=intervals,
                                     opset=opset, t5_precision=t5_precision, graphs=graphs)
    t5_precision = t5_precision or T5_PRECISION_FOR[precision]
    graphs = parse_graph_names(graphs)
    if intervals is not None:
        intervals = tuple(int(i) for i in intervals)
    t0 = time.perf_counter()
    models = load_models_for_export(
        preset=preset, checkpoints=Path(checkpoints) if checkpoints else None, config=Path(config) if config else None,
        precision=precision, t5_precision=t5_precision, random_weights=random_weights, graphs=graphs,
    )
    shape = ExportShape.from_preset(models.preset, height, width, num_frames, intervals)
    try:
        shape.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    log(f"[I] exporting ONNX ({precision}, t5 {t5_precision}) to {out}")
    manifest = export_onnx(
        models, precision, shape, out, opset=opset, t5_precision=t5_precision, graphs=graphs, copy=False, progress=progress,
        extra={"random_weights": bool(random_weights), ENGINE_REQUEST_KEY: options.as_dict()}, tile=tile,
    )
    del models
    onnx_seconds = time.perf_counter() - t0
    log(f"[I] ONNX: {len(manifest['graphs'])} graphs in {onnx_seconds:.1f}s")
    t1 = time.perf_counter()
    section = build_engines(out, options, graphs=graphs, log=log)
    return BuildResult(Path(out), precision, onnx_seconds, time.perf_counter() - t1, section)


def _fp8_export_and_build(out, options: EngineOptions, fp8: Mapping[str, object], *, log, progress, **source) -> BuildResult:
    """The calibrated FP8 ONNX (calibration.export.fp8_build), then the plans: TensorRT 11 reads FP8 from the Q/DQ nodes."""
    from ..calibration.export import describe_fp8, fp8_build

    if fp8.get("twin"):
        raise UsageError("--fp8-twin is an fp32-based graph for onnxruntime checks, not for TensorRT engines; use tm-export onnx")
    t0 = time.perf_counter()
    log(f"[I] calibrating and exporting the FP8 ONNX to {out}")
    manifest = fp8_build(out, progress=progress, extra={ENGINE_REQUEST_KEY: options.as_dict()}, **source, **fp8)
    onnx_seconds = time.perf_counter() - t0
    log(f"[I] ONNX: {len(manifest['graphs'])} graphs in {onnx_seconds:.1f}s")
    log(f"[I] {describe_fp8(manifest)}")
    t1 = time.perf_counter()
    section = build_engines(out, options, graphs=source.get("graphs"), log=log)
    return BuildResult(Path(out), "fp8", onnx_seconds, time.perf_counter() - t1, section)


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
    log: Callable[[str], None] = _stderr,
) -> BuildResult:
    """Build the plans of an ONNX build made earlier (`tm-export build` stopped at exit 3, or `tm-export onnx`).

    options None: those recorded when the build was exported (the defaults
    if none were), with `overrides` (EngineOptions field -> value, e.g. the
    engine flags given with --resume) applied on top.
    """
    manifest = load_manifest(build_dir)
    where = Path(build_dir) / MANIFEST_FILE
    if manifest.precision not in ENGINE_PRECISIONS:  # the build's field, not a flag the user gave
        raise ManifestError(f"{where}: precision {manifest.precision!r} has no TensorRT engines "
                            f"(they are built for {', '.join(ENGINE_PRECISIONS)})")
    verify_files(manifest)  # the ONNX (and tokenizer) exactly as exported, before anything else
    if overrides:
        unknown = sorted(set(overrides) - set(EngineOptions.__dataclass_fields__))
        if unknown:
            raise UsageError(f"unknown engine options {unknown}; known: {', '.join(EngineOptions.__dataclass_fields__)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        replace(EngineOptions(), **overrides).validate()  # a bad flag is named as the flag
    if options is None:
        options = _recorded_options(manifest, where, set(overrides or ()))
    if overrides:
        options = replace(options, **overrides)
    t1 = time.perf_counter()
    section = build_engines(build_dir, options, log=log)
    return BuildResult(Path(build_dir), manifest.precision, None, time.perf_counter() - t1, section)
