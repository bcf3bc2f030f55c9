"""Which quantized layers of a plan run in FP8: the ONNX's Q/DQ GEMMs against TensorRT's engine inspector.

An FP8 ONNX asks for FP8 with a DequantizeLinear in front of a MatMul / Gemm
(or an Attention); TensorRT may still pick a 16-bit kernel for some of them
(per-channel weight scales it cannot fuse, shapes without an FP8 tactic).
Only the built engine knows: `IEngineInspector.get_engine_information(JSON)`
on a plan built with detailed profiling verbosity lists every engine layer
with its name, the ONNX nodes it came from ("Metadata") and, per input, a
"Format/Datatype" string such as "Row major linear FP8 format"; the chosen
kernel's "TacticName" names its types too. A quantized ONNX node counts as
FP8 when the engine layer that holds it reads an FP8 input or runs an FP8
(e4m3) kernel. Pure functions over those two documents: no TensorRT here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

QUANTIZED_OPS = ("MatMul", "Gemm", "Attention")
_FP8_MARKS = ("fp8", "e4m3", "float8")


def quantized_nodes(model) -> list[str]:
    """Names of the MatMul / Gemm / Attention nodes fed by a DequantizeLinear (the FP8 export's GEMMs)."""
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in QUANTIZED_OPS and any(produced_by.get(i) == "DequantizeLinear" for i in node.input)
    ]


def quantized_nodes_of_file(onnx_path: Path) -> list[str]:
    import onnx

    return quantized_nodes(onnx.load(str(onnx_path), load_external_data=False))


def _layer_text(layer: Mapping) -> str:
    return f"{layer.get('Name', '')} {layer.get('Metadata', '')}"


def layer_is_fp8(layer: Mapping) -> bool:
    """An engine layer reading an FP8 tensor or running an FP8 kernel."""
    formats = [str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", ()) if isinstance(t, Mapping)]
    text = " ".join(formats + [str(layer.get("TacticName", ""))]).lower()
    return any(mark in text for mark in _FP8_MARKS)


def fp8_layer_report(engine_info: Mapping, quantized: Iterable[str]) -> dict:
    """{"quantized", "fp8", "not_fp8", "not_found"}: each quantized ONNX node by the engine layer holding it."""
    layers = [layer for layer in engine_info.get("Layers", ()) if isinstance(layer, Mapping)]
    report = {"quantized": 0, "fp8": [], "not_fp8": [], "not_found": []}
    for node in quantized:
        report["quantized"] += 1
        holders = [layer for layer in layers if node and node in _layer_text(layer)]
        if not holders:
            report["not_found"].append(node)  # fused away past recognition: neither claimed FP8 nor 16-bit
        elif any(layer_is_fp8(layer) for layer in holders):
            report["fp8"].append(node)
        else:
            report["not_fp8"].append(node)
    return report


def report_warning(graph: str, report: Mapping) -> str | None:
    """One warning line when quantized GEMMs of `graph` do not run in FP8, else None."""
    missed = report.get("not_fp8") or []
    if not missed:
        return None
    shown = ", ".join(missed[:3]) + (", ..." if len(missed) > 3 else "")
    return (
        f"[W] {graph}: {len(missed)} of {report['quantized']} FP8-quantized layers run in 16-bit in the plan "
        f"(TensorRT chose no FP8 kernel): {shown}"
    )


def describe_report(graph: str, report: Mapping | None) -> str:
    """A line for `tm-export inspect` / the build summary."""
    if not report or not report.get("quantized"):
        return f"{graph}: no FP8-quantized layers"
    parts = [f"{len(report['fp8'])} of {report['quantized']} FP8-quantized layers run in FP8"]
    if report["not_fp8"]:
        parts.append(
            f"{len(report['not_fp8'])} in 16-bit ({', '.join(report['not_fp8'][:5])}{', ...' if len(report['not_fp8']) > 5 else ''})"
        )
    if report["not_found"]:
        parts.append(f"{len(report['not_found'])} not named by any engine layer")
    return f"{graph}: " + "; ".join(parts)
