"""FLOPs of one call of an exported graph, and the DiT's count worked out from its config.

`graph_flops` reads an ONNX file after shape inference (every export runs
it) and counts the multiply-adds of the ops that hold nearly all the work:
MatMul, Gemm, Conv and the fused Attention, 2 FLOPs each. Elementwise ops,
norms and reductions are left out on both sides; they are a few percent of
a DiT's time and none of its FLOPs that matter.

`dit_flops` is the same count from the architecture alone, so the two agree
exactly unless the exported graph does work the model does not ask for.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping

from .onnx_utils import _dims, _eval_dim

COUNTED_OPS = ("MatMul", "Gemm", "Conv", "Attention")


def _load(model):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    return model


def _shape_table(proto, symbols: Mapping[str, int]) -> dict[str, list[int] | None]:
    table: dict[str, list[int] | None] = {}
    for v in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        dims = _dims(v.type)
        if dims is None:
            table[v.name] = None
            continue
        vals = [_eval_dim(d, symbols) for d in dims]
        table[v.name] = None if any(x is None for x in vals) else vals
    for init in proto.graph.initializer:
        table[init.name] = list(init.dims)
    return table


def _attr(node, name: str, default=0):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _attention_flops(node, shape) -> int:
    """QK^T and the weighted sum of V: 2 * B * heads * Lq * Lk * (d_qk + d_v)."""
    q, k, v = (shape(n) for n in node.input[:3])
    if len(q) == 4:  # [B, heads, L, d]
        b, heads, lq, dqk = q
        lk, dv = k[2], v[3]
    else:  # [B, L, heads * d] with the head counts as attributes
        heads = _attr(node, "q_num_heads")
        kv_heads = _attr(node, "kv_num_heads")
        b, lq, width = q
        dqk, lk, dv = width // heads, k[1], v[2] // kv_heads
    return 2 * b * heads * lq * lk * (dqk + dv)


def _static_shapes(proto, symbols):
    """name -> the tensor's static shape once `symbols` are bound; ValueError naming a tensor left open."""
    table = _shape_table(proto, dict(symbols or {}))

    def shape(name: str) -> list[int]:
        dims = table.get(name)
        if dims is None:
            raise ValueError(f"no static shape for tensor {name!r}: give its symbols (e.g. batch=2)")
        return dims

    return shape


def graph_flops(model, symbols: Mapping[str, int] | None = None) -> dict[str, int]:
    """FLOPs per counted op type (and "total") of one call, dynamic axes set by `symbols`.

    `model` is a path or a loaded ModelProto (weights need not be loaded).
    Raises ValueError naming a counted node whose shapes inference left open.
    """
    proto = _load(model)
    shape = _static_shapes(proto, symbols)

    out: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        op = node.op_type
        if op not in COUNTED_OPS:
            continue
        y = shape(node.output[0])
        if op == "MatMul":
            k = shape(node.input[0])[-1]
            flops = 2 * math.prod(y) * k
        elif op == "Gemm":
            a = shape(node.input[0])
            k = a[0] if _attr(node, "transA") else a[1]
            flops = 2 * math.prod(y) * k
        elif op == "Conv":
            w = shape(node.input[1])
            flops = 2 * math.prod(y) * math.prod(w[1:])
        else:
            flops = _attention_flops(node, shape)
        out[op] += flops
    out["total"] = sum(out.values())
    return dict(out)


def dit_flops(
    cfg, batch: int, latent_frames: int, latent_height: int, latent_width: int, text_len: int = 512
) -> dict[str, int]:
    """The DiT's MatMul/Gemm/Conv/Attention FLOPs for one call, from `models/dit.py`'s structure.

    L = tokens per chunk, T = text tokens, D = width, F = FFN width:
    patch embedding (a conv over in_dim x patch), text embedding (two linears
    on T tokens), time embedding and projection (once per call: one timestep
    for the batch), per block self-attention (q, k, v, o on L tokens and
    L x L attention), cross-attention (q, o on L tokens, k, v on T tokens,
    L x T attention) and the FFN, then the head.
    """
    pt, ph, pw = cfg.patch_size
    b, d, f, t = batch, cfg.dim, cfg.ffn_dim, text_len
    tokens = (latent_frames // pt) * (latent_height // ph) * (latent_width // pw)
    patch = pt * ph * pw
    linear = lambda rows, n_in, n_out: 2 * rows * n_in * n_out  # noqa: E731
    embed = (
        linear(b * tokens, cfg.in_dim * patch, d)  # patch embedding conv
        + linear(b * t, cfg.text_dim, d)
        + linear(b * t, d, d)  # text embedding
        + linear(1, cfg.freq_dim, d)
        + linear(1, d, d)
        + linear(1, d, 6 * d)  # time embedding, projection
    )
    block_linear = (
        4 * linear(b * tokens, d, d)  # self-attention q, k, v, o
        + 2 * linear(b * tokens, d, d)
        + 2 * linear(b * t, d, d)  # cross-attention q, o / k, v
        + linear(b * tokens, d, f)
        + linear(b * tokens, f, d)  # FFN
    )
    block_attention = 2 * b * tokens * tokens * 2 * d + 2 * b * tokens * t * 2 * d
    head = linear(b * tokens, d, cfg.out_dim * patch)
    linear_total = embed + cfg.num_layers * block_linear + head
    attention_total = cfg.num_layers * block_attention
    return {
        "linear": linear_total,  # MatMul + Gemm + Conv
        "attention": attention_total,
        "total": linear_total + attention_total,
        "tokens": tokens,
    }


# ----------------------------------------------------------------------------
# FP8 and 16-bit shares
# ----------------------------------------------------------------------------


def _fp8_operands(proto) -> set[str]:
    """Tensors that are the output of a DequantizeLinear of FP8 data (an FP8 initializer or a QuantizeLinear to FP8)."""
    import onnx

    fp8_inits = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    zero_points = {}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zero_points[node.output[0]] = node.input[2]
    out = set()
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        if src in fp8_inits or zero_points.get(src) in fp8_inits:
            out.add(node.output[0])
    return out


def graph_flops_split(model, symbols: Mapping[str, int] | None = None) -> dict[str, int]:
    """One call's FLOPs split by the precision of their operands: {"fp8", "high_precision", "total"} (+ per kind).

    A MatMul/Gemm counts as FP8 when both its inputs are DequantizeLinear
    outputs of FP8 data (the Q/DQ GEMM TensorRT fuses). An Attention node is
    two matrix products: softmax(Q K^T) counts as FP8 when Q and K are, the
    product with V only when V is FP8 and so is the softmax output, which the
    standard `Attention` node cannot quantize: in these graphs it is 16-bit.
    """
    proto = _load(model)
    shape = _static_shapes(proto, symbols)
    fp8 = _fp8_operands(proto)

    out: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        op = node.op_type
        if op not in COUNTED_OPS:
            continue
        if op == "Attention":
            q, k, v = (shape(n) for n in node.input[:3])
            total = _attention_flops(node, shape)
            dqk = q[-1] if len(q) == 4 else None
            dv = v[-1] if len(v) == 4 else None
            qk = total * dqk // (dqk + dv) if dqk is not None else total // 2
            pv = total - qk
            qk_fp8 = node.input[0] in fp8 and node.input[1] in fp8
            out["attention_fp8" if qk_fp8 else "attention_high_precision"] += qk
            out["attention_high_precision"] += pv
            continue
        flops = graph_flops_node(node, shape)
        both_fp8 = op in ("MatMul", "Gemm") and node.input[0] in fp8 and node.input[1] in fp8
        out["linear_fp8" if both_fp8 else "linear_high_precision"] += flops
    out["fp8"] = out["linear_fp8"] + out["attention_fp8"]
    out["high_precision"] = out["linear_high_precision"] + out["attention_high_precision"]
    out["total"] = out["fp8"] + out["high_precision"]
    return dict(out)


def graph_flops_node(node, shape) -> int:
    """FLOPs of one MatMul, Gemm or Conv node (2 per multiply-add)."""
    y = shape(node.output[0])
    if node.op_type == "MatMul":
        return 2 * math.prod(y) * shape(node.input[0])[-1]
    if node.op_type == "Gemm":
        a = shape(node.input[0])
        return 2 * math.prod(y) * (a[0] if _attr(node, "transA") else a[1])
    if node.op_type == "Conv":
        return 2 * math.prod(y) * math.prod(shape(node.input[1])[1:])
    raise ValueError(f"{node.op_type} is not a MatMul, Gemm or Conv")


def dit_flops_split(
    cfg,
    batch: int,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    text_len: int = 512,
    *,
    fp8_linears: bool = True,
    self_attention: bool = True,
    cross_attention: bool = False,
    skip_blocks: int = 0,
) -> dict[str, int]:
    """`dit_flops` split into FP8 and 16-bit the way `graph_flops_split` reads an fp8 graph.

    FP8: the block Linears (outside `skip_blocks` blocks) and the Q K^T product
    of the quantized attentions; 16-bit: embeddings, head, the softmax x V
    product, unquantized attentions and skipped blocks, and the q and k
    rotations each quantized attention adds ahead of its Q/DQ
    (`calibration.qk_transform`: [tokens, head_dim] x [head_dim, head_dim]
    per head), which the total counts on top of `dit_flops`.
    """
    pt, ph, pw = cfg.patch_size
    b, d, f, t = batch, cfg.dim, cfg.ffn_dim, text_len
    tokens = (latent_frames // pt) * (latent_height // ph) * (latent_width // pw)
    total = dit_flops(cfg, batch, latent_frames, latent_height, latent_width, text_len)
    layers = cfg.num_layers - skip_blocks
    block_linear = 2 * b * (6 * tokens * d * d + 2 * t * d * d + 2 * tokens * d * f)
    self_qk = 2 * b * tokens * tokens * d  # Q K^T of self-attention (all heads)
    cross_qk = 2 * b * tokens * t * d
    fp8 = layers * (
        (block_linear if fp8_linears else 0) + (self_qk if self_attention else 0) + (cross_qk if cross_attention else 0)
    )
    # q over the tokens, k over the tokens (self) or the text (cross): 2 x rows x dim x head_dim each
    rotations = (
        layers
        * 2
        * b
        * d
        * cfg.head_dim
        * ((2 * tokens if self_attention else 0) + (tokens + t if cross_attention else 0))
    )
    whole = total["total"] + rotations
    return {"fp8": fp8, "high_precision": whole - fp8, "total": whole, "tokens": tokens}


def format_flops(flops: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= size:
            return f"{flops / size:.3f} {unit}"
    return f"{flops / 1e6:.3f} MFLOP"


def format_flops_split(split: Mapping[str, int]) -> str:
    share = split["fp8"] / split["total"] if split["total"] else 0.0
    return (
        f"{format_flops(split['total'])} per call: FP8 {format_flops(split['fp8'])} ({share:.1%}), "
        f"16-bit {format_flops(split['high_precision'])} ({1 - share:.1%})"
    )
