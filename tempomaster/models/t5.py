"""umT5-XXL text encoder (the encoder half only), in Wan2.1's layout.

Architecture (Wan2.1's `T5Encoder` with `shared_pos=False`, i.e. umT5):

    x = token_embedding(ids)                                  # [B, L, dim]
    for each block:
        x = x + attn(norm1(x), mask, pos_bias=block's own relative bias)
        x = x + ffn(norm2(x))
    x = norm(x)
    x[mask == 0] = 0                                          # SPEC section 3

- norm: T5 RMS norm, x * rsqrt(mean(x^2) + eps) computed in fp32, then weight.
- attention: no 1/sqrt(head_dim) scaling (T5 folds it into the weights);
  scores + relative position bias + large negative on padded keys.
- relative position bias: per block, bidirectional T5 bucketing
  (num_buckets, max_distance 128).
- ffn: fc2(fc1(x) * gelu_tanh(gate.0(x))).
- no biases anywhere.

State dict keys are exactly those of `models_t5_umt5-xxl-enc-bf16.pth`:

    token_embedding.weight                      [vocab, dim]
    blocks.N.norm1.weight                       [dim]
    blocks.N.attn.{q,k,v}.weight                [dim_attn, dim]
    blocks.N.attn.o.weight                      [dim, dim_attn]
    blocks.N.norm2.weight                       [dim]
    blocks.N.ffn.gate.0.weight                  [dim_ffn, dim]
    blocks.N.ffn.fc1.weight                     [dim_ffn, dim]
    blocks.N.ffn.fc2.weight                     [dim, dim_ffn]
    blocks.N.pos_embedding.embedding.weight     [num_buckets, num_heads]
    norm.weight                                 [dim]

Precision policy: the encoder runs in fp32 or bf16 only. umT5-XXL activations
exceed the fp16 range (the reference clamps them to +-65504, which changes the
result), so fp16 is refused rather than silently clamped: `check_t5_dtype`
raises for any other dtype. It guards the constructor's `dtype`,
`UMT5Encoder.to(...)`, `.half()` and `.type(...)` (which raise before touching
any weight), and `forward`, which catches every other route to fp16/fp64
weights (`load_state_dict(assign=True)`, a parent module's `.half()`).

The forward has no data-dependent Python control flow, so it can be exported
with `torch.onnx.export(..., dynamo=True)` with dynamic batch and length.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .presets import T5Config

__all__ = [
    "T5_DTYPES",
    "check_t5_dtype",
    "relative_position_bucket",
    "T5LayerNorm",
    "T5Attention",
    "T5FeedForward",
    "T5RelativeEmbedding",
    "T5SelfAttentionBlock",
    "UMT5Encoder",
    "wan_t5_to_transformers",
]

# Relative positions at or beyond this distance share the last bucket (umT5).
MAX_DISTANCE = 128

T5_DTYPES = (torch.float32, torch.bfloat16)


def check_t5_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return `dtype` if the umT5 encoder may run in it; raise otherwise.

    fp16 is refused: umT5-XXL hidden states overflow fp16 (values far above
    65504), so an fp16 encoder gives inf/NaN or clamped, wrong embeddings.
    """
    if dtype == torch.float16:
        raise ValueError(
            "umT5 encoder cannot run in float16: its activations overflow the "
            "fp16 range. Use torch.float32 or torch.bfloat16."
        )
    if dtype not in T5_DTYPES:
        raise ValueError(f"umT5 encoder dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int, max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bidirectional T5 bucketing of relative positions (key - query).

    rel_pos: integer tensor of any shape (e.g. [L, L]) -> int64 buckets in [0, num_buckets), same shape.

    Half the buckets are for keys after the query, half for keys before it.
    Within each half, distances below num_buckets // 4 get their own bucket and
    larger ones share log-spaced buckets up to max_distance.
    """
    num_buckets = num_buckets // 2
    buckets = (rel_pos > 0).long() * num_buckets  # direction
    rel_pos = rel_pos.abs()

    max_exact = num_buckets // 2
    # Clamp below at max_exact so log() never sees 0; those entries take the
    # exact branch of the `where` anyway. Same arithmetic order as T5.
    rel_pos_large = (
        max_exact
        + (
            torch.log(rel_pos.clamp(min=max_exact).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    rel_pos_large = rel_pos_large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, rel_pos_large)


class T5LayerNorm(nn.Module):
    """T5 RMS norm: no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] -> [B, L, dim] in the weight's dtype."""
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.type_as(self.weight)


class T5Attention(nn.Module):
    """Multi-head self-attention without 1/sqrt(d) scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        assert dim_attn % num_heads == 0
        super().__init__()
        self.dim = dim
        self.dim_attn = dim_attn
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads

        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """
        x:         [B, L, dim]
        attn_bias: [B, N, L, L] relative position bias + key padding bias
        """
        b, l, n, c = x.size(0), x.size(1), self.num_heads, self.head_dim

        # [B, L, dim] -> [B, N, L, C]
        q = self.q(x).view(b, l, n, c).transpose(1, 2)
        k = self.k(x).view(b, l, n, c).transpose(1, 2)
        v = self.v(x).view(b, l, n, c).transpose(1, 2)

        # scores [B, N, L, L]; softmax in fp32
        attn = torch.matmul(q, k.transpose(-1, -2)) + attn_bias
        attn = attn.float().softmax(dim=-1).type_as(v)

        # [B, N, L, C] -> [B, L, dim_attn] -> [B, L, dim]
        x = torch.matmul(attn, v).transpose(1, 2).reshape(b, l, n * c)
        return self.o(x)


class T5FeedForward(nn.Module):
    """Gated-GELU FFN: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.dim = dim
        self.dim_ffn = dim_ffn
        # `gate.0` is the checkpoint's name: Sequential(Linear, GELU-tanh).
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] -> [B, L, dim_ffn] -> [B, L, dim]."""
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeEmbedding(nn.Module):
    """Learned bias per (relative-position bucket, head)."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = MAX_DISTANCE):
        super().__init__()
        self.num_buckets = num_buckets
        self.num_heads = num_heads
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] int64 -> bias [1, N, L, L] (N heads)."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5SelfAttentionBlock(nn.Module):
    """One encoder block with its own relative position bias (umT5)."""

    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = T5LayerNorm(dim, eps)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5LayerNorm(dim, eps)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """
        x:         [B, L, dim]
        buckets:   [L, L] relative position buckets
        mask_bias: [B, 1, 1, L] 0 on real keys, large negative on padding
        """
        attn_bias = self.pos_embedding(buckets).type_as(x) + mask_bias  # [B, N, L, L]
        x = x + self.attn(self.norm1(x), attn_bias)
        x = x + self.ffn(self.norm2(x))
        return x


class UMT5Encoder(nn.Module):
    """umT5 encoder: ids [B, L] int64, mask [B, L] int64 -> [B, L, dim].

    Embeddings of padded positions (mask == 0) are zero in the output.
    `dtype` must be fp32 or bf16 (see `check_t5_dtype`). Weights are torch's
    default init; real weights come from `load_state_dict`.
    """

    def __init__(self, cfg: T5Config, dtype: torch.dtype = torch.float32):
        check_t5_dtype(dtype)
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(
            [
                T5SelfAttentionBlock(cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads, cfg.num_buckets, cfg.eps)
                for _ in range(cfg.num_layers)
            ]
        )
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)
        # Built in fp32 on the current default device; for the real size build
        # under `with torch.device("meta"):` and load with assign=True.
        if dtype != torch.float32:
            nn.Module.to(self, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    # -- precision guard: every way of casting the module goes through here --
    def to(self, *args, **kwargs):
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype.is_floating_point:
            check_t5_dtype(dtype)
        return super().to(*args, **kwargs)

    def half(self):
        check_t5_dtype(torch.float16)  # always raises
        return super().half()

    def type(self, dst_type):
        if isinstance(dst_type, torch.dtype):
            check_t5_dtype(dst_type)
        return super().type(dst_type)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        ids:  [B, L] int64 token ids
        mask: [B, L] int64, 1 for real tokens (incl. EOS), 0 for padding
        returns [B, L, dim] in the module's dtype, zero where mask == 0
        """
        check_t5_dtype(self.dtype)  # static (weight dtype), not data-dependent
        dtype = self.dtype
        seq_len = ids.size(1)

        # relative position (key - query) -> bucket, shared by all blocks
        pos = torch.arange(seq_len, device=ids.device)
        buckets = relative_position_bucket(
            pos.unsqueeze(0) - pos.unsqueeze(1), self.cfg.num_buckets, MAX_DISTANCE
        )  # [L, L]

        # padded keys get the most negative finite value of the dtype
        keep = mask.to(dtype).view(mask.size(0), 1, 1, seq_len)  # [B, 1, 1, L]
        mask_bias = (1.0 - keep) * torch.finfo(dtype).min

        x = self.token_embedding(ids)  # [B, L, dim]
        for block in self.blocks:
            x = block(x, buckets, mask_bias)
        x = self.norm(x)

        # zero the embeddings past each row's real length
        return x * mask.to(x.dtype).unsqueeze(-1)


def wan_t5_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan2.1 umT5 encoder state dict to transformers' `UMT5EncoderModel`.

    Used by the tests as an independent oracle. Returns a new dict; tensors are
    shared, not copied, and keep their shapes (both layouts store Linear weights
    as [out, in]). `shared.weight` and `encoder.embed_tokens.weight` both
    get the token embedding (transformers ties them).
    """
    block_map = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            if rest not in block_map:
                raise KeyError(f"unexpected umT5 key {key!r}")
            out[f"encoder.block.{idx}.{block_map[rest]}"] = value
        else:
            raise KeyError(f"unexpected umT5 key {key!r}")
    return out
