"""No bf16 Resize reaches TensorRT: the bf16 VAE decoder exports its nearest 2x in fp32 between casts, and the
op audit reports a bf16 Resize in any graph."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tempomaster.export.op_audit import audit_model, bf16_resize_nodes
from tempomaster.models.vae import Upsample2x


def _resize_graph(elem: int):
    scales = numpy_helper.from_array(torch.tensor([1.0, 1.0, 2.0, 2.0]).numpy(), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="nearest")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", elem, [1, 4, 3, 5])],
        [helper.make_tensor_value_info("y", elem, [1, 4, 6, 10])],
        [scales],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_the_audit_reports_a_bf16_resize_and_passes_an_fp32_one():
    assert bf16_resize_nodes(_resize_graph(TensorProto.BFLOAT16)) == ["up"]
    result = audit_model(_resize_graph(TensorProto.BFLOAT16), "vae_decoder")
    assert not result.ok and "no bf16 Resize (1 node(s): up)" in result.unsupported["Resize(bfloat16)"]
    assert audit_model(_resize_graph(TensorProto.FLOAT), "vae_decoder").ok


def test_upsampling_between_casts_gives_the_same_bits():
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    plain = Upsample2x()
    cast = Upsample2x()
    cast.resize_dtype = torch.float32
    a, b = plain(x), cast(x)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    assert torch.equal(a[:, :, ::2, ::2], x) and torch.equal(a[:, :, 1::2, 1::2], x)


@pytest.mark.slow
def test_an_exported_bf16_vae_decoder_holds_no_bf16_resize(tmp_path, tiny_models):
    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape

    out = tmp_path / "bf16"
    graphs = ("vae_decoder_first", "vae_decoder")
    manifest = export_onnx(
        tiny_models,
        "bf16",
        ExportShape(32, 48, 9, (4, 2, 1)),
        out,
        preset_name="tiny",
        progress=False,
        copy=True,
        graphs=graphs,
    )
    assert manifest["op_audit"]["ok"]
    for name in graphs:
        model = onnx.load(str(out / manifest["graphs"][name]["file"]), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert "Resize" in ops  # the upsampling is still a Resize ...
        assert bf16_resize_nodes(model) == []  # ... on fp32 data
    assert all(
        m.resize_dtype is None for m in tiny_models.vae.modules() if isinstance(m, Upsample2x)
    )  # the copy, not the caller's
