"""Counters on the exported DiT graph: fused attention, no float64, bounded casts, no shape arithmetic
in fixed-shape graphs, and FLOPs of one call equal to the count worked out from the architecture.

Each check is also shown to fail on a graph exported with a deliberate regression.
"""

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from export_helpers import MICRO, build, micro_models, micro_shape

from tempomaster.export.dit import dit_spec
from tempomaster.export.flops import dit_flops, graph_flops
from tempomaster.export.onnx_utils import export_graph
from tempomaster.models import dit as dit_module
from tempomaster.models.presets import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore")

FLOAT64 = onnx.TensorProto.DOUBLE
# Today's Cast nodes in an fp16 / bf16 DiT graph (the baseline): 3 outside the blocks (input cast,
# timestep embedding, head) and 10 per block (norm statistics, RoPE, LayerNorm in float32 and back).
CASTS_OUTSIDE, CASTS_PER_BLOCK = 3, 10
# Ops that compute shapes at run time: none may be left once every dimension is fixed.
SHAPE_OPS = ("Shape", "Size")


def load(path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def op_counts(proto) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in proto.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def float64_uses(proto) -> list[str]:
    """Every tensor, initializer, constant or cast of the graph that is float64."""
    found = [f"initializer {t.name}" for t in proto.graph.initializer if t.data_type == FLOAT64]
    for v in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        if v.type.tensor_type.elem_type == FLOAT64:
            found.append(f"tensor {v.name}")
    for node in proto.graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT64:
                found.append(f"Cast {node.name}")
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT64:
                found.append(f"{node.op_type} {node.name}")
    return found


def export_dit(dit, precision: str, shape, out: Path, fixed: bool = False) -> Path:
    spec = dit_spec(dit, precision, shape, copy=True)
    if fixed:  # every dimension static, the batch included (what a fixed-shape engine is built from)
        spec.dynamic_axes, spec.derived_axes = {}, {}
    export_graph(spec, out)
    return out / "dit.onnx"


@pytest.fixture(scope="module")
def tiny_dit_graph(tiny_build):
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    g = manifest["graphs"]["dit"]
    return load(tiny_build / g["file"]), g["meta"]


# ----------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------


def test_tiny_dit_graph_structure(tiny_dit_graph, tiny_models):
    proto, _ = tiny_dit_graph
    ops = op_counts(proto)
    assert ops.get("Attention") == 2 * tiny_models.dit.cfg.num_layers == 4
    assert "Softmax" not in ops
    assert float64_uses(proto) == []
    assert "Cast" not in ops  # fp32: nothing to cast
    # the 3D form of Attention (heads as attributes): no Transpose feeds or reads any Attention node
    heads = tiny_models.dit.cfg.num_heads
    producer = {o: n for n in proto.graph.node for o in n.output}
    for node in (n for n in proto.graph.node if n.op_type == "Attention"):
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs.get("q_num_heads") == attrs.get("kv_num_heads") == heads
        assert all(producer[i].op_type != "Transpose" for i in node.input[:3] if i in producer)
        assert all(node.output[0] not in n.input or n.op_type != "Transpose" for n in proto.graph.node)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_count_per_block(precision):
    proto = load(build(precision, ("dit",)) / "onnx" / "dit.onnx")
    ops = op_counts(proto)
    layers = MICRO.dit.num_layers
    assert ops.get("Attention") == 2 * layers
    assert float64_uses(proto) == []
    assert 0 < ops["Cast"] <= CASTS_OUTSIDE + CASTS_PER_BLOCK * layers, ops["Cast"]


def test_fixed_shape_graph_has_no_shape_ops(tmp_path):
    path = export_dit(micro_models().dit, "fp32", micro_shape(), tmp_path, fixed=True)
    ops = op_counts(load(path))
    assert not [op for op in SHAPE_OPS if op in ops], ops
    # the check can fail: the dynamic-batch graph still reads its batch with Shape
    dynamic = op_counts(load(build("fp32", ("dit",)) / "onnx" / "dit.onnx"))
    assert any(op in dynamic for op in SHAPE_OPS)


def _decomposed_attend(self, q, k, v):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return self.o((weights @ v).transpose(1, 2).flatten(2))


def test_decomposed_attention_is_caught(tmp_path, monkeypatch):
    """Regression: attention written out as matmul + softmax, which TensorRT cannot fuse as one layer."""
    monkeypatch.setattr(dit_module._Attention, "_attend", _decomposed_attend)
    proto = load(export_dit(micro_models().dit, "fp32", micro_shape(), tmp_path))
    ops = op_counts(proto)
    assert ops.get("Attention", 0) != 2 * MICRO.dit.num_layers
    assert "Softmax" in ops


# ----------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 8])
def test_tiny_dit_flops_match_the_architecture(tiny_dit_graph, tiny_models, batch):
    """The tiny build's DiT (32x48 pixels: 4x6 latents, 3 latent frames) at the stage plan's batches."""
    proto, meta = tiny_dit_graph
    cfg = tiny_models.dit.cfg
    frames = meta["latent_frames"][0]
    want = dit_flops(cfg, batch, frames, meta["latent_height"], meta["latent_width"])
    got = graph_flops(proto, {"batch": batch})
    assert got["Attention"] == want["attention"]
    assert got["total"] == pytest.approx(want["total"], rel=0.01)
    assert got["total"] == want["total"]  # in fact exact
    # by hand at batch 2: 18 tokens, 512 text tokens, width 64, FFN 128, two blocks
    if batch == 2:
        assert want["tokens"] == 18 and want["total"] == 62_853_120


def _padded_attend(self, q, k, v):
    """Regression: self- and cross-attention padded to 64 query tokens (e.g. for a kernel's tile size)."""
    pad = (-q.shape[1]) % 64 or 64
    q = F.pad(q, (0, 0, 0, 0, 0, pad))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return self.o(out.transpose(1, 2)[:, : q.shape[1] - pad].flatten(2))


def test_added_work_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(dit_module._Attention, "_attend", _padded_attend)
    proto = load(export_dit(micro_models().dit, "fp32", micro_shape(), tmp_path))
    shape = micro_shape()
    want = dit_flops(MICRO.dit, 2, 3, shape.latent_height, shape.latent_width)
    got = graph_flops(proto, {"batch": 2})
    assert got["total"] > 1.01 * want["total"]


def test_wan_1_3b_dit_flops_match_the_architecture(tmp_path):
    """wan-1.3b's block at the release shape (480x832, 109 frames: 28 x 60 x 104 latents, batch 2).

    Exported with one block and random weights (the 30-block graph needs 5 GiB of
    weights); every block is the same module, so the count of the full model is
    the embedding and head plus 30 times the block checked here.
    """
    from tempomaster.export.shapes import ExportShape

    cfg = replace(PRESETS["wan-1.3b"].dit, num_layers=1)
    torch.manual_seed(5)
    dit = dit_module.WanDiT(cfg).eval()
    shape = ExportShape(height=480, width=832, num_frames=109, intervals=(4, 2, 1))
    path = export_dit(dit, "fp32", shape, tmp_path)
    del dit
    got = graph_flops(load(path), {"batch": 2})
    want = dit_flops(cfg, 2, 28, 60, 104)
    assert want["tokens"] == 28 * 30 * 52
    assert got["total"] == pytest.approx(want["total"], rel=0.01)
    assert got["Attention"] == want["attention"]
    full = dit_flops(PRESETS["wan-1.3b"].dit, 2, 28, 60, 104)
    block = want["total"] - dit_flops(replace(cfg, num_layers=0), 2, 28, 60, 104)["total"]
    assert full["total"] == want["total"] + 29 * block
    print(f"wan-1.3b, one DiT call at batch 2, 480x832x28 latents: {full['total'] / 1e12:.1f} TFLOP")
