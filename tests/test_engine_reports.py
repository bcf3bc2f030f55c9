"""The build's reports that need no GPU: the FP8 layer report read off an engine inspector's JSON, and the timing
cache's failures named and survived.

The inspector JSON here is written by the test in the shape TensorRT's detailed `get_engine_information(JSON)`
gives ("Layers": [{"Name", "LayerType", "Inputs": [{"Format/Datatype"}], "TacticName", "Metadata"}]); the
ONNX is a real graph made with onnx.helper.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tempomaster.engines import builder
from tempomaster.engines.layer_report import (
    describe_report,
    fp8_layer_report,
    layer_is_fp8,
    quantized_nodes,
    report_warning,
)


def _fp8_graph():
    """x -> Q -> DQ -> MatMul(q_proj, weight DQ) ; x -> MatMul(plain) ; both -> Add."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2")
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="x_dq"),
        helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], name="w_q"),
        helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="w_dq"),
        helper.make_node("MatMul", ["xd", "wd"], ["a"], name="/blocks.0/q/MatMul"),
        helper.make_node("MatMul", ["x", "w2"], ["b"], name="/head/MatMul"),
        helper.make_node("MatMul", ["xd", "w2"], ["c"], name="/blocks.0/k/MatMul"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="add"),
        helper.make_node("Add", ["ab", "c"], ["y"], name="add2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [w, w2, scale, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model


def _layer(name, fmt, tactic="", metadata=""):
    return {
        "Name": name,
        "LayerType": "CaskGemmMatrixMultiply",
        "Metadata": metadata,
        "TacticName": tactic,
        "Inputs": [{"Name": "in", "Location": "Device", "Dimensions": [2, 8], "Format/Datatype": fmt}],
        "Outputs": [
            {
                "Name": "out",
                "Location": "Device",
                "Dimensions": [2, 8],
                "Format/Datatype": "Row major linear BF16 format",
            }
        ],
    }


def test_quantized_gemms_are_those_fed_by_a_dequantize():
    assert quantized_nodes(_fp8_graph()) == ["/blocks.0/q/MatMul", "/blocks.0/k/MatMul"]


def test_fp8_report_names_the_layers_tensorrt_left_in_16_bit():
    info = {
        "Layers": [
            _layer("x_q + /blocks.0/q/MatMul", "Row major linear FP8 format", "sm90_xmma_gemm_e4m3e4m3_bf16"),
            _layer(
                "myelin_1",
                "Row major linear BF16 format",
                "sm90_xmma_gemm_bf16bf16",
                metadata="[ONNX Layer: /blocks.0/k/MatMul]",
            ),
            _layer("/head/MatMul", "Row major linear BF16 format"),
        ],
        "Bindings": ["x", "y"],
    }
    assert layer_is_fp8(info["Layers"][0]) and not layer_is_fp8(info["Layers"][1])
    assert layer_is_fp8(_layer("g", "Row major linear BF16 format", "sm90_gemm_e4m3_tn"))  # the kernel says FP8
    report = fp8_layer_report(info, quantized_nodes(_fp8_graph()))
    assert report == {"quantized": 2, "fp8": ["/blocks.0/q/MatMul"], "not_fp8": ["/blocks.0/k/MatMul"], "not_found": []}
    warning = report_warning("dit", report)
    assert warning.startswith("[W] dit: 1 of 2 FP8-quantized layers run in 16-bit") and "/blocks.0/k/MatMul" in warning
    assert "1 of 2 FP8-quantized layers run in FP8; 1 in 16-bit" in describe_report("dit", report)
    # a node no engine layer names is reported as such, not counted either way
    gone = fp8_layer_report({"Layers": []}, ["/blocks.0/q/MatMul"])
    assert gone["not_found"] == ["/blocks.0/q/MatMul"] and report_warning("dit", gone) is None
    assert describe_report("t5", {"quantized": 0}) == "t5: no FP8-quantized layers"


class _Config:
    """A builder config's two timing-cache calls, refusing a cache blob as TensorRT does for another GPU's."""

    def __init__(self, accept_saved: bool):
        self.accept_saved, self.set = accept_saved, []

    def create_timing_cache(self, blob):
        return ("cache", bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = cache[1] == b"" or self.accept_saved
        if ok:
            self.set.append(cache[1])
        return ok


def test_a_refused_timing_cache_is_named_and_replaced_by_a_fresh_one(tmp_path):
    lines = []
    path = tmp_path / "timing.cache"
    cfg = _Config(accept_saved=False)
    builder._use_timing_cache(cfg, b"\x01\x02", path, lines.append)
    assert cfg.set == [b""]  # went on with a fresh cache
    assert len(lines) == 1 and str(path) in lines[0] and "fresh cache" in lines[0]
    cfg, lines = _Config(accept_saved=True), []
    builder._use_timing_cache(cfg, b"\x01\x02", path, lines.append)
    assert cfg.set == [b"\x01\x02"] and lines == []


def test_an_unreadable_timing_cache_is_named_and_skipped(tmp_path):
    lines = []
    folder = tmp_path / "timing.cache"
    folder.mkdir()  # a folder where the cache file should be: reading fails
    assert builder._read_timing_cache(folder, lines.append) == b""
    assert len(lines) == 1 and str(folder) in lines[0] and "unreadable" in lines[0]
    assert builder._read_timing_cache(tmp_path / "none.cache", lines.append) == b"" and len(lines) == 1


def test_inspect_prints_each_plans_fp8_layers(tmp_path, capsys):
    import json

    from test_tensorrt_plans import _manifest

    from tempomaster.build_format import manifest_text
    from tempomaster.cli import export_main

    build = tmp_path / "b"
    _manifest(build)
    data = json.loads((build / "manifest.json").read_text())
    data["engines"]["plans"]["dit"]["fp8_layers"] = {
        "quantized": 3,
        "fp8": ["a", "b"],
        "not_fp8": ["c"],
        "not_found": [],
    }
    (build / "manifest.json").write_text(manifest_text(data))
    assert export_main(["inspect", str(build)]) == 0
    out = capsys.readouterr().out
    assert "dit: 2 of 3 FP8-quantized layers run in FP8; 1 in 16-bit (c)" in out
    assert "t5: no FP8-quantized layers" in out
    assert export_main(["inspect", str(tmp_path / "missing")]) == 2
