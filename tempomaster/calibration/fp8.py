"""FP8 (E4M3) quantized Linear layers of the DiT, in torch and in ONNX.

What TensorRT 11 needs for an FP8 GEMM is explicit quantization in the graph:

    x ──QuantizeLinear(s_x, zp fp8)──DequantizeLinear(s_x)──┐
                                                            MatMul ── Add(bias)
    W_t (FLOAT8E4M3FN initializer) ──DequantizeLinear(s_w)──┘

with s_x = amax(x) / 448 a scalar and s_w = amax(W) / 448 a scalar (or one
per output channel). The scales' dtype is the graph's high-precision dtype
(bf16 by default), which makes the DequantizeLinear outputs that dtype too.

Two torch custom ops carry this through `torch.onnx.export(dynamo=True)`:
their eager implementations are the fake quantization (torch's float8_e4m3fn
cast, saturating as ONNX's QuantizeLinear does) and `ONNX_TRANSLATIONS` maps
them to exactly the nodes above. So one module, `FP8Linear`, is both the
torch fake-quantized layer the quality report runs and what the exporter
turns into the Q/DQ graph; its weight is stored as FP8 (pre-transposed,
[in, out], so the DequantizeLinear feeds the MatMul directly), which halves
the DiT file and the exporting process's memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..dtypes import PRECISION_DTYPES
from .qk_transform import hadamard_pair, transform_qk

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn

# The Linear layers of each transformer block that get FP8 inputs and weights.
BLOCK_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
WEIGHT_SCALES = ("tensor", "channel")
# The attentions of each block whose inputs (q, k, v) can be FP8: the module
# `models.dit.ScaledDotProductAttention` at blocks.N.<kind>.attn.
ATTENTION_KINDS = ("self_attn", "cross_attn")
ATTENTION_INPUTS = ("q", "k", "v")
# What calibration records per attention: the amax of q, k, v and of the
# transformed q and k (`qk_transform.transform_qk`) that FP8Attention
# quantizes in their place by default.
ATTENTION_AMAX = (*ATTENTION_INPUTS, "q_rotated", "k_rotated")
# `--fp8-attention` (FP8 q, k, v into every self-attention) is on by default
# because the quality report passes the rule for it: on the trained toy,
# all-FP8 keeps every held-out prompt that passes unquantized
# (benchmarks/results/fp8_report_toy.json, rerun by benchmarks.fp8_report_toy).
SELF_ATTENTION_DEFAULT = True
BASE_PRECISIONS = PRECISION_DTYPES  # the 16/32-bit dtype an fp8 build keeps outside its Q/DQ

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def quantizable_layers(num_layers: int) -> list[str]:
    """Module names (relative to the DiT) of every block Linear, in execution order."""
    return [f"blocks.{b}.{name}" for b in range(num_layers) for name in BLOCK_LINEARS]


def attention_modules(num_layers: int, kinds: Sequence[str] = ATTENTION_KINDS) -> list[str]:
    """Names (relative to the DiT) of the attentions of `kinds` ("self_attn", "cross_attn"), "blocks.N.<kind>"."""
    return [f"blocks.{b}.{kind}" for b in range(num_layers) for kind in ATTENTION_KINDS if kind in kinds]


def block_of(layer: str) -> int:
    m = _LAYER_RE.match(layer)
    if m is None:
        raise ValueError(f"{layer!r} is not a transformer block layer")
    return int(m.group(1))


def parse_skip_blocks(spec: str | Iterable[int] | None, num_layers: int) -> tuple[int, ...]:
    """ "0,1,28-29" or an iterable of ints -> sorted block indices; negative ints count from the end."""
    from ..errors import UsageError

    if spec is None or spec == "":
        return ()
    items: list[int] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                    items.extend(range(int(lo), int(hi) + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise UsageError(f"--fp8-skip-blocks: {part!r} is not a block index or a range like 0-3") from None
    else:
        items = [int(i) for i in spec]
    out = set()
    for i in items:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise UsageError(f"--fp8-skip-blocks: block {i} does not exist (the DiT has blocks 0..{num_layers - 1})")
        out.add(j)
    return tuple(sorted(out))


# ----------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------


def scale_from_amax(amax: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """amax [] or [out] (per channel) / 448 rounded to `dtype` (the scale the graph stores); never zero or subnormal."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    scale = amax / E4M3_MAX
    # An all-zero input or weight row would give scale 0 (division by zero in
    # QuantizeLinear): any positive scale represents zeros exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp(min=torch.finfo(dtype).tiny).to(dtype)


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (any shape), scale [] or broadcastable to x -> dequant(quant(x)) as ONNX QuantizeLinear/DequantizeLinear (saturate=1) with FLOAT8E4M3FN.

    The division and the product are done in float32 and the result rounded
    once to x's dtype, what a Q/DQ pair computes; torch's float8 cast is
    round-to-nearest-even but not saturating, hence the clamp.
    """
    s = scale.float()
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return (q.float() * s).to(x.dtype)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """W [out, in] -> FP8 W^T [in, out] with W^T / scale (scale scalar or [out]), a slab of rows at a time."""
    out_f, in_f = weight.shape
    result = torch.empty(in_f, out_f, dtype=FP8_DTYPE)
    s = scale.float()
    for i in range(0, out_f, rows):
        block = weight[i : i + rows].float()
        bs = s if s.ndim == 0 else s[i : i + rows, None]
        result[:, i : i + rows] = (block / bs).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).t()
    return result


def dequantize_weight(weight_t8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 [in, out] -> dtype [in, out]: w * scale (per tensor, or per output channel along axis 1)."""
    return (weight_t8.float() * scale.float()).to(dtype)


# ----------------------------------------------------------------------------
# Custom ops: eager = fake quantization, ONNX = Q/DQ nodes
# ----------------------------------------------------------------------------


@torch.library.custom_op("tempomaster::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (any shape), scale [] (per tensor) -> x through E4M3; one QuantizeLinear/DequantizeLinear pair in ONNX."""
    return fake_quant(x, scale)


@fp8_qdq.register_fake
def _fp8_qdq_fake(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("tempomaster::fp8_dq", mutates_args=())
def fp8_dq(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight [in, out] float8_e4m3fn, scale [] or [out] -> weight * scale in scale's dtype; one DequantizeLinear."""
    return dequantize_weight(weight, scale, scale.dtype)


@fp8_dq.register_fake
def _fp8_dq_fake(weight, scale):
    return torch.empty(weight.shape, dtype=scale.dtype, device=weight.device)


def _onnx_qdq(x, scale):
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset23 as op

    zero = op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn), name="fp8_zero"))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero, saturate=1), scale, zero)


def _onnx_dq(weight, scale):
    from onnxscript import opset23 as op

    # A 1-D scale is per output channel: axis 1 of the [in, out] weight.
    # (onnxscript traces this once per call with concrete ranks.)
    if len(scale.shape) == 1:
        return op.DequantizeLinear(weight, scale, axis=1)
    return op.DequantizeLinear(weight, scale)


ONNX_TRANSLATIONS = {
    torch.ops.tempomaster.fp8_qdq.default: _onnx_qdq,
    torch.ops.tempomaster.fp8_dq.default: _onnx_dq,
}


class FP8Linear(nn.Module):
    """A Linear with FP8 input (per-tensor scale) and FP8 weight (per-tensor or per-channel scale).

    Buffers: `weight_t8` FLOAT8E4M3FN [in, out]; `weight_scale` [] or [out];
    `input_scale` []; `bias` [out]. Scales and bias are in the layer's
    high-precision dtype; the output is in the input's dtype.
    """

    def __init__(
        self, weight_t8: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor, bias: torch.Tensor | None
    ):
        super().__init__()
        self.in_features, self.out_features = weight_t8.shape
        self.register_buffer("weight_t8", weight_t8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        input_amax: float,
        weight_amax: torch.Tensor,
        dtype: torch.dtype,
        scale_dtype: torch.dtype | None = None,
    ) -> FP8Linear:
        """weight_amax: a scalar (per-tensor) or [out] (per-channel).

        scale_dtype: the dtype the scales are rounded to (default `dtype`); an
        fp32 twin of a bf16 graph rounds them to bf16 so both hold the same
        scales and the same FP8 weight bytes.
        """
        rounding = scale_dtype or dtype
        w_scale = scale_from_amax(weight_amax, rounding).to(dtype)
        x_scale = scale_from_amax(input_amax, rounding).to(dtype)
        w8 = quantize_weight(linear.weight.detach(), w_scale)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype).clone()
        return cls(w8, w_scale, x_scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]: Q/DQ on x, the FP8 weight dequantized, then the GEMM TensorRT fuses."""
        w = fp8_dq(self.weight_t8, self.weight_scale)
        out = torch.matmul(fp8_qdq(x, self.input_scale), w)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        kind = "tensor" if self.weight_scale.ndim == 0 else "channel"
        return f"in={self.in_features}, out={self.out_features}, weight_scale={kind}, dtype={self.input_scale.dtype}"


class FP8Attention(nn.Module):
    """Attention with FP8 (E4M3) q, k and v: one per-tensor scale each, amax / 448.

    Replaces `models.dit.ScaledDotProductAttention` (same [B, L, heads, dim]
    interface). The quantize/dequantize pair sits after the transpose to
    [B, heads, L, dim], so in the graph each DequantizeLinear feeds the ONNX
    `Attention` node directly. With `qk_transform` (the default) q and k
    are `qk_transform.transform_qk`'s before their Q/DQ: k less its token
    mean (ReduceMean, Sub), then both rotated by a Hadamard pair (MatMul by
    a constant) whose product is the identity, which leaves the attention as
    it was and halves the FP8 error of q and k; `q_scale`, `k_scale` are
    then the transformed tensors' amax / 448.

    Why Q/DQ around the `Attention` node and not ModelOpt's decomposed
    pattern: TensorRT documents two ways to a fused attention (docs "Fused
    Attention", TensorRT 11.5: method 1, the IAttention layer, recommended;
    method 2, MatMul-Softmax-MatMul that the builder must recognise). The
    ONNX parser maps `Attention` (opset 23) to IAttention (onnx-tensorrt
    onnxOpImporters.cpp, DEFINE_BUILTIN_OP_IMPORTER(Attention)); ModelOpt's
    FP8 export instead decomposes attention and adds a fixed 1/448 Q/DQ on the
    softmax output for the "MHA v2" fusion (NVIDIA/Model-Optimizer PR 1289,
    modelopt/onnx/export/fp8_exporter.py). With 43,680 tokens per chunk a
    decomposed graph that the builder does not fuse materialises
    B x 40 heads x 43,680^2 scores (~150 GB in bf16 per sequence at 14B):
    unbuildable, whereas IAttention stays one fused kernel whatever its input
    precision. What the standard `Attention` importer cannot express is the
    softmax-output (normalization) quantize scale; TensorRT's custom op
    `TRT_QuantizedAttention` (Attention-23 plus a 5th input,
    normalization_quantize_scale, onnx-tensorrt docs/TRT_custom_ops.md) does.
    This graph quantizes q, k and v only, which onnxruntime can run and check;
    the softmax output stays in the base precision.
    """

    def __init__(
        self,
        q_scale: torch.Tensor,
        k_scale: torch.Tensor,
        v_scale: torch.Tensor,
        head_dim: int,
        qk_transform: bool = True,
    ):
        super().__init__()
        self.qk_transform = qk_transform
        self.register_buffer("q_scale", q_scale)
        self.register_buffer("k_scale", k_scale)
        self.register_buffer("v_scale", v_scale)
        if qk_transform:
            h_q, h_k = hadamard_pair(head_dim, q_scale.dtype)
            self.register_buffer("h_q", h_q)
            self.register_buffer("h_k", h_k)

    @classmethod
    def from_amax(
        cls,
        amax: Mapping[str, float],
        dtype: torch.dtype,
        head_dim: int,
        scale_dtype: torch.dtype | None = None,
        qk_transform: bool = True,
    ) -> FP8Attention:
        """amax: {"q", "k", "v"} ({"q_rotated", "k_rotated", "v"} for `qk_transform`); scales rounded to `scale_dtype`."""
        rounding = scale_dtype or dtype
        keys = ("q_rotated", "k_rotated", "v") if qk_transform else ATTENTION_INPUTS
        scales = [scale_from_amax(float(amax[n]), rounding).to(dtype) for n in keys]
        return cls(*scales, head_dim=head_dim, qk_transform=qk_transform)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Lq, heads, head_dim], k, v [B, Lk, heads, head_dim] -> [B, Lq, heads, head_dim]."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.qk_transform:
            q, k = transform_qk(q, k, self.h_q, self.h_k)
        q = fp8_qdq(q, self.q_scale)
        k = fp8_qdq(k, self.k_scale)
        v = fp8_qdq(v, self.v_scale)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"q/k/v FP8 per-tensor, qk_transform={self.qk_transform}, dtype={self.q_scale.dtype}"


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    mod = root
    for p in parts[:-1]:
        mod = getattr(mod, p) if not p.isdigit() else mod[int(p)]
    return mod, parts[-1]


def _set_child(parent: nn.Module, attr: str, child: nn.Module) -> None:
    if attr.isdigit():
        parent[int(attr)] = child
    else:
        setattr(parent, attr, child)


@torch.no_grad()
def quantize_dit(
    dit: nn.Module,
    layers: Mapping[str, Mapping],
    dtype: torch.dtype,
    weight_scale: str = "tensor",
    skip_blocks: Sequence[int] = (),
    per_channel: Mapping[str, torch.Tensor] | None = None,
    copy: bool = True,
    scale_dtype: torch.dtype | None = None,
    attention: Mapping[str, Mapping[str, float]] | None = None,
    attention_kinds: Sequence[str] = (),
    qk_transform: bool = True,
) -> nn.Module:
    """The DiT with every block Linear (outside `skip_blocks`) replaced by an FP8Linear.

    attention_kinds: the attentions ("self_attn", "cross_attn") whose q, k, v
    become FP8 too (`FP8Attention`), with amax from `attention`:
    "blocks.N.<kind>" -> {"q", "k", "v", "q_rotated", "k_rotated"} (the
    calibration's attention_table). qk_transform: quantize the transformed q
    and k (`qk_transform.transform_qk`, exact) at the "q_rotated" and
    "k_rotated" amax, or q and k themselves at "q" and "k".

    layers: name -> {"input_amax": float, "weight_amax": float} (amax.json's
    "layers"). per_channel: name -> [out] weight amax, needed for
    weight_scale="channel". The rest of the model is cast to `dtype`.
    copy=False converts `dit` in place, one layer at a time, so the
    high-precision weight of each layer is freed as its FP8 copy is made
    (a 14B DiT never holds both). scale_dtype: see `FP8Linear.from_linear`.
    """
    import copy as _copy

    if weight_scale not in WEIGHT_SCALES:
        raise ValueError(f"weight_scale must be one of {WEIGHT_SCALES}, got {weight_scale!r}")
    model = _copy.deepcopy(dit) if copy else dit
    skip = set(skip_blocks)
    names = quantizable_layers(len(model.blocks))
    missing = [n for n in names if block_of(n) not in skip and n not in layers]
    if missing:
        raise KeyError(f"the calibration has no amax for {len(missing)} layer(s), e.g. {missing[0]}")
    for name in names:
        if block_of(name) in skip:
            continue
        parent, attr = _parent(model, name)
        linear = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
        rec = layers[name]
        if weight_scale == "channel":
            if per_channel is None or name not in per_channel:
                raise KeyError(f"per-channel weight amax missing for {name}")
            w_amax = torch.as_tensor(per_channel[name], dtype=torch.float32)
        else:
            w_amax = torch.tensor(float(rec["weight_amax"]))
        _set_child(parent, attr, FP8Linear.from_linear(linear, float(rec["input_amax"]), w_amax, dtype, scale_dtype))
        del linear
    unknown = set(attention_kinds) - set(ATTENTION_KINDS)
    if unknown:
        raise ValueError(f"attention_kinds: {sorted(unknown)} not among {ATTENTION_KINDS}")
    for name in attention_modules(len(model.blocks), attention_kinds):
        if block_of(name) in skip:
            continue
        if attention is None or name not in attention:
            raise KeyError(f"the calibration has no q/k/v amax for {name}")
        module = model.get_submodule(name)
        module.attn = FP8Attention.from_amax(
            attention[name], dtype, model.cfg.head_dim, scale_dtype, qk_transform=qk_transform
        )
    # Everything left (embeddings, modulation, norms, head, skipped blocks) in the high precision.
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for mod in model.modules():
        for key, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype not in (dtype, FP8_DTYPE):
                mod._buffers[key] = buf.to(dtype)
    return model.eval()


def fp8_layers(model: nn.Module) -> dict[str, FP8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def fp8_attentions(model: nn.Module) -> dict[str, FP8Attention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Attention)}
