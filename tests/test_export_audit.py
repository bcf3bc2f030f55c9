"""Op audit against TensorRT's ONNX parser table, and the largest-batch rule."""

import json

import onnx
import pytest
from export_helpers import build
from onnx import TensorProto, helper

from tempomaster.export.onnx_utils import TRT_MAX_ELEMENTS, largest_batch
from tempomaster.export.op_audit import OpAuditError, audit_file, audit_files, audit_model, load_table, supported_ops


def test_table_records_its_source():
    table = load_table()
    src = table["source"]
    assert "onnx-tensorrt" in src["repository"] and src["file"] == "docs/operators.md"
    assert src["tensorrt_version"] == "10.15"
    ops = supported_ops()
    for op in ("Attention", "RMSNormalization", "LayerNormalization", "Gelu", "Conv", "MatMul", "Resize"):
        assert op in ops
    assert table["operators"]["NonZero"]["supported"] is True
    assert table["operators"]["Col2Im"]["supported"] is False


def test_exported_graphs_pass():
    d = build("fp32")
    manifest = json.loads((d / "manifest.json").read_text())
    results = audit_files([d / g["file"] for g in manifest["graphs"].values()])
    for r in results:
        print(f"{r.graph}: {len(r.ops)} op types: {', '.join(r.ops)}")
        assert r.ok and r.opset == 23
    assert manifest["op_audit"]["ok"] is True


def _graph_with(op_type, domain=""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node(op_type, ["h"], ["y"], domain=domain)]
    opsets = [helper.make_opsetid("", 23)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets)


def test_made_up_op_fails(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(_graph_with("FrobnicateTensor"), path)
    r = audit_file(path)
    assert not r.ok and "FrobnicateTensor" in r.unsupported and "Relu" not in r.unsupported
    with pytest.raises(OpAuditError, match="bad: FrobnicateTensor"):
        audit_files([path])


def test_unsupported_and_custom_domain_ops_fail():
    r = audit_model(_graph_with("Col2Im"))
    assert "Col2Im" in r.unsupported and "unsupported" in r.unsupported["Col2Im"]
    r = audit_model(_graph_with("Gelu", domain="com.microsoft"))
    assert "com.microsoft::Gelu" in r.unsupported


def _activation_graph(shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


def test_largest_batch_14b_ffn():
    """The 14B FFN activation: 43,680 tokens x 13,824 per chunk -> at most 3 chunks per call."""
    best, largest = largest_batch(_activation_graph(["batch", 43680, 13824]))
    assert best == 3 and largest["elements_per_item"] == 43680 * 13824
    assert 3 * 43680 * 13824 <= TRT_MAX_ELEMENTS < 4 * 43680 * 13824


def test_largest_batch_symbols_and_fixed_tensors():
    best, _ = largest_batch(_activation_graph(["batch", "frames", 4096]), symbol_sizes={"frames": 4096})
    assert best == TRT_MAX_ELEMENTS // (4096 * 4096) == 127
    best, _ = largest_batch(_activation_graph(["2*batch", 4096, 4096]))
    assert best == TRT_MAX_ELEMENTS // (2 * 4096 * 4096) == 63
