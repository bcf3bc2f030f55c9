"""FP8 calibration on the next-frame-rate trajectory and the fp8 (Q/DQ) export.

Library entry points (the CLI's `tm-export calibrate` and `tm-export
onnx|build --precision fp8` call these):

- `calibrate(models, shape, out_dir, ...)` -> BUILD/calibration/{amax.json, weight_amax.safetensors, report.json}
- `export_fp8_onnx(models, shape, out_dir, ...)` -> an fp8 build (manifest "precision": "fp8")
- `load_calibration(path)`, `quality_report(...)`, `format_report(report)`

Modules import lazily: `import tempomaster.calibration` loads nothing heavy.
"""

from __future__ import annotations

__all__ = ["calibrate", "export_fp8_onnx", "load_calibration", "quality_report", "format_report"]


def __getattr__(name):
    if name in ("calibrate", "load_calibration"):
        from . import collect

        return getattr(collect, name)
    if name == "export_fp8_onnx":
        from .export import export_fp8_onnx

        return export_fp8_onnx
    if name in ("quality_report", "format_report"):
        from . import report

        return getattr(report, name)
    raise AttributeError(name)
