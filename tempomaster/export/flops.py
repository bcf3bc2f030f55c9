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
from typing import Mapping

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


def graph_flops(model, symbols: Mapping[str, int] | None = None) -> dict[str, int]:
    """FLOPs per counted op type (and "total") of one call, dynamic axes set by `symbols`.

    `model` is a path or a loaded ModelProto (weights need not be loaded).
    Raises ValueError naming a counted node whose shapes inference left open.
    """
    proto = _load(model)
    table = _shape_table(proto, dict(symbols or {}))

    def shape(name: str) -> list[int]:
        dims = table.get(name)
        if dims is None:
            raise ValueError(f"no static shape for tensor {name!r}: give its symbols (e.g. batch=2)")
        return dims

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


def dit_flops(cfg, batch: int, latent_frames: int, latent_height: int, latent_width: int, text_len: int = 512) -> dict[str, int]:
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
        + linear(b * t, cfg.text_dim, d) + linear(b * t, d, d)  # text embedding
        + linear(1, cfg.freq_dim, d) + linear(1, d, d) + linear(1, d, 6 * d)  # time embedding, projection
    )
    block_linear = (
        4 * linear(b * tokens, d, d)  # self-attention q, k, v, o
        + 2 * linear(b * tokens, d, d) + 2 * linear(b * t, d, d)  # cross-attention q, o / k, v
        + linear(b * tokens, d, f) + linear(b * tokens, f, d)  # FFN
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
