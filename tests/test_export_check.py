"""`tm-export check`: two builds' graphs on onnxruntime, the same random inputs, judged by polygraphy's Comparator.

The builds here hold a real (small) ONNX DiT stand-in each; the reference build is the same graph, or the same
graph with its weight rounded as a 16-bit or fp8 export would round it, or a wrong one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_tensorrt_plans import _manifest

from tempomaster.build_format import manifest_text
from tempomaster.cli import export_main
from tempomaster.engines.check import Tolerance, check_build, error_stats, random_feeds, tolerance_for
from tempomaster.engines.manifest import load_manifest

pytest.importorskip("polygraphy")
W = np.random.default_rng(21).standard_normal((8, 8)).astype(np.float32)


def _build(root: Path, weight: np.ndarray, precision: str = "fp32") -> Path:
    """The synthetic build with its `dit` a real graph: velocity = tanh(x @ weight) + 0 * timestep."""
    _manifest(root)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["velocity"])],
        "dit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("velocity", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    blob = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    (root / "onnx").mkdir(exist_ok=True)
    (root / "onnx" / "dit.onnx").write_bytes(blob)
    data = json.loads((root / "manifest.json").read_text())
    data["precision"] = precision
    data["graphs"]["dit"].update(
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
        outputs=[{"name": "velocity", "dtype": "float32", "shape": ["batch", 8]}],
    )
    data["files"]["onnx/dit.onnx"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (root / "manifest.json").write_text(manifest_text(data))
    return root


def test_same_graph_passes_and_a_wrong_one_fails(tmp_path):
    build = _build(tmp_path / "a", W)
    same = _build(tmp_path / "b", W.copy())
    [result] = check_build(build, graphs=["dit"], reference=same, log=lambda _l: None)
    assert result.passed and result.outputs["velocity"]["max_abs"] == 0.0
    wrong = _build(tmp_path / "c", W + 0.5)
    [result] = check_build(build, graphs=["dit"], reference=wrong, log=lambda _l: None)
    assert not result.passed and result.outputs["velocity"]["max_abs"] > 0.05


def test_errors_are_measured_against_an_independent_reference(tmp_path):
    """The printed statistics equal numpy's on the same draw; a bf16-rounded weight passes the bf16 tolerance."""
    import torch

    rounded = torch.from_numpy(W).to(torch.bfloat16).float().numpy()
    build = _build(tmp_path / "bf16", rounded, precision="bf16")
    ref = _build(tmp_path / "fp32", W)
    [result] = check_build(build, graphs=["dit"], reference=ref, seed=4, log=lambda _l: None)
    assert result.tolerance == tolerance_for("bf16", "fp32", "onnxruntime")
    x = random_feeds(load_manifest(build), "dit", 4)["x"].astype(np.float64)
    want = error_stats(np.tanh(x @ rounded.astype(np.float64)), np.tanh(x @ W.astype(np.float64)))
    got = result.outputs["velocity"]
    for k in ("max_abs", "mean_abs", "max_rel", "mean_rel"):
        assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-6), k
    assert 0 < got["mean_abs"] < 1e-2 and result.passed
    # the same numbers judged by a tolerance they exceed fail
    [strict] = check_build(
        build,
        graphs=["dit"],
        reference=ref,
        seed=4,
        tolerance=Tolerance("max", 1e-6, 1e-6, "test"),
        log=lambda _l: None,
    )
    assert not strict.passed


def test_the_command_prints_per_output_errors_and_exits_non_zero_on_failure(tmp_path, capsys):
    build = _build(tmp_path / "a", W)
    same = _build(tmp_path / "b", W.copy())
    wrong = _build(tmp_path / "c", -W)
    assert export_main(["check", str(build), "--graphs", "dit", "--reference", str(same)]) == 0
    out = capsys.readouterr().out
    assert "dit: ok" in out and "velocity" in out and "max abs 0.000e+00" in out
    assert export_main(["check", str(build), "--graphs", "dit", "--reference", str(wrong)]) == 1
    out = capsys.readouterr().out
    assert "dit: FAILED" in out and "1 of 1 graph(s) failed" in out
    assert export_main(["check", str(build), "--graphs", "dit"]) == 2  # onnxruntime needs a reference
    assert "--reference" in capsys.readouterr().err


@pytest.mark.slow
def test_the_fp8_twin_dit_against_the_fp32_dit(tmp_path, tiny_models):
    """Real tiny exports: the fp32 DiT, and the fp8 export's fp32-based twin (same Q/DQ, runs on onnxruntime's CPU)."""
    from tempomaster.calibration.export import FP8Options, fp8_build
    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape
    from tempomaster.export.source import ExportSource

    fp32 = tmp_path / "fp32"
    export_onnx(
        tiny_models,
        "fp32",
        ExportShape(32, 48, 9, (4, 2, 1)),
        fp32,
        preset_name="tiny",
        progress=False,
        copy=True,
        graphs=["dit"],
    )
    twin = tmp_path / "twin"
    fp8_build(
        twin,
        ExportSource(preset="tiny", height=32, width=48, num_frames=9, intervals=(4, 2, 1), graphs=["dit"]),
        FP8Options(calib_steps=(2, 1, 1), report_prompts=0, twin=True),
        progress=False,
    )
    [result] = check_build(twin, graphs=["dit"], reference=fp32, log=lambda _l: None)
    stats = result.outputs["velocity"]
    print("fp8 twin vs fp32 DiT:", stats)
    assert result.tolerance.stat == "mean" and "FP8" in result.tolerance.why
    assert stats["mean_abs"] > 0  # FP8 rounding shows
    assert result.passed, stats
