"""`tm-export build` as a library call: checkpoints -> ONNX (plain, or calibrated FP8) -> TensorRT plans.

    export_and_build(out=BUILD, precision="bf16", preset=..., checkpoints=..., ...)
        exports the ONNX exactly as `tm-export onnx` does (for fp8: calibrates
        and writes the Q/DQ graphs as `tm-export onnx --precision fp8`),
        records the engine options asked for, then builds the plans
        (`engines.builder.build_engines`).

It sits above export, calibration and engines so that engines never imports
calibration: the choice between the two ONNX writers is made here.
On a machine without TensorRT or without a CUDA GPU everything before the
engine step is done and kept; `tm-export build --resume BUILD` on a GPU
machine finishes the job (`engines.build.resume_build`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .engines.build import ENGINE_REQUEST_KEY, BuildResult, check_engine_precision
from .engines.builder import EngineOptions, build_engines
from .errors import UsageError, print_to_stderr


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
    log: Callable[[str], None] = print_to_stderr,
    tile: bool = False,
    fp8: Mapping[str, object] | None = None,
) -> BuildResult:
    """The ONNX export of `tm-export onnx` (same inputs), then the TensorRT plans.

    graphs: a subset of the build's graphs (default all; `tm-run` needs all).
    """
    from .export.build import export_onnx, load_models_for_export, parse_graph_names
    from .export.shapes import ExportShape
    from .export.t5 import T5_PRECISION_FOR
    from .export.target import prepare_target

    check_engine_precision(precision)
    options = options.validate()
    prepare_target(Path(out).absolute())  # before any model loads: a refusal costs nothing
    if precision == "fp8":
        return _fp8_export_and_build(
            out,
            options,
            fp8 or {},
            log=log,
            progress=progress,
            preset=preset,
            checkpoints=checkpoints,
            config=config,
            random_weights=random_weights,
            height=height,
            width=width,
            num_frames=num_frames,
            intervals=intervals,
            opset=opset,
            t5_precision=t5_precision,
            graphs=graphs,
        )
    t5_precision = t5_precision or T5_PRECISION_FOR[precision]
    graphs = parse_graph_names(graphs)
    if intervals is not None:
        intervals = tuple(int(i) for i in intervals)
    t0 = time.perf_counter()
    models = load_models_for_export(
        preset=preset,
        checkpoints=Path(checkpoints) if checkpoints else None,
        config=Path(config) if config else None,
        precision=precision,
        t5_precision=t5_precision,
        random_weights=random_weights,
        graphs=graphs,
    )
    shape = ExportShape.from_preset(models.preset, height, width, num_frames, intervals)
    try:
        shape.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    log(f"[I] exporting ONNX ({precision}, t5 {t5_precision}) to {out}")
    manifest = export_onnx(
        models,
        precision,
        shape,
        out,
        opset=opset,
        t5_precision=t5_precision,
        graphs=graphs,
        copy=False,
        progress=progress,
        extra={"random_weights": bool(random_weights), ENGINE_REQUEST_KEY: options.as_dict()},
        tile=tile,
    )
    del models
    onnx_seconds = time.perf_counter() - t0
    log(f"[I] ONNX: {len(manifest['graphs'])} graphs in {onnx_seconds:.1f}s")
    t1 = time.perf_counter()
    section = build_engines(out, options, graphs=graphs, log=log)
    return BuildResult(Path(out), precision, onnx_seconds, time.perf_counter() - t1, section)


def _fp8_export_and_build(
    out, options: EngineOptions, fp8: Mapping[str, object], *, log, progress, **source
) -> BuildResult:
    """The calibrated FP8 ONNX (calibration.export.fp8_build), then the plans: TensorRT 11 reads FP8 from the Q/DQ nodes."""
    from .calibration.export import fp8_build
    from .export.build import describe_fp8

    if fp8.get("twin"):
        raise UsageError(
            "--fp8-twin is an fp32-based graph for onnxruntime checks, not for TensorRT engines; use tm-export onnx"
        )
    t0 = time.perf_counter()
    log(f"[I] calibrating and exporting the FP8 ONNX to {out}")
    manifest = fp8_build(out, progress=progress, extra={ENGINE_REQUEST_KEY: options.as_dict()}, **source, **fp8)
    onnx_seconds = time.perf_counter() - t0
    log(f"[I] ONNX: {len(manifest['graphs'])} graphs in {onnx_seconds:.1f}s")
    log(f"[I] {describe_fp8(manifest)}")
    t1 = time.perf_counter()
    section = build_engines(out, options, graphs=source.get("graphs"), log=log)
    return BuildResult(Path(out), "fp8", onnx_seconds, time.perf_counter() - t1, section)
