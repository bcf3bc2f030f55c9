"""Wan2.1 video diffusion transformer in TempoMaster's image-to-video layout.

Parameter names are those of `wan_video_dit_bf16.bin` (the DiffSynth-Studio /
Wan2.1 layout), so a release checkpoint loads with `load_state_dict` as it is.

Differences from the reference implementation, all for export:
- RoPE is applied with real cos/sin tables that the caller passes in
  (`tempomaster.rope.rope_table`), never complex numbers, and positions are not capped at 1024.
- The sinusoidal timestep embedding is computed in float32, not float64.
- One timestep is shared by the whole batch.

Optionally (``sequence_parallel=``, off by default) the forward runs
Ulysses-style on several processes: each holds a slice of every sequence's
tokens, and around every self-attention an all-to-all swaps token shards for
head shards and back.  Off, nothing in the computation changes.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel_plan import balanced_shares
from .presets import DiTConfig

# ----------------------------------------------------------------------------
# Sequence parallel (Ulysses)
# ----------------------------------------------------------------------------


class SequenceParallel:
    """This process's place in a group that shares every sequence's tokens.

    Rank i of the group holds tokens ``bounds(L)[i]`` (balanced, consecutive)
    and, inside self-attention, heads ``[i*H/d, (i+1)*H/d)`` of all L tokens.
    Token shards may be uneven; heads must divide evenly.
    """

    def __init__(self, group, rank: int, size: int, tokens: int | None = None):
        self.group, self.rank, self.size = group, rank, size
        self.tokens = tokens  # every sequence's full token count, once the forward knows it

    def for_tokens(self, tokens: int) -> SequenceParallel:
        bound = copy.copy(self)  # keeps a subclass (e.g. one that watches the exchanges)
        bound.tokens = tokens
        return bound

    def bounds(self, tokens: int) -> list[tuple[int, int]]:
        return balanced_shares(tokens, self.size)

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's consecutive slice of ``t`` along ``dim``: [B, L, ...] -> [B, L_i, ...] for dim=1."""
        start, stop = self.bounds(t.shape[dim])[self.rank]
        return t.narrow(dim, start, stop - start)

    def tokens_to_heads(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """[..., B, L_i, H, D] (my tokens, all heads) -> [..., B, L, H/d, D] (all tokens, my heads)."""
        import torch.distributed as dist

        d, lead = self.size, x.shape[:-4]
        b, li, h, hd = x.shape[-4:]
        if h % d:
            raise ValueError(f"sequence parallel over {d} ranks needs the head count ({h}) divisible by {d}")
        lengths = [stop - start for start, stop in self.bounds(tokens)]
        # Destination j gets heads j*H/d..: put the head-group axis first so each destination's block is contiguous.
        send = x.reshape(*lead, b, li, d, h // d, hd).movedim(-3, 0).contiguous()
        per_token = send[0].numel() // li
        recv = x.new_empty(per_token * tokens)
        dist.all_to_all_single(
            recv, send.reshape(-1), [per_token * n for n in lengths], [per_token * li] * d, group=self.group
        )
        parts = [
            p.reshape(*lead, b, n, h // d, hd) for p, n in zip(recv.split([per_token * n for n in lengths]), lengths)
        ]
        return torch.cat(parts, dim=-3)

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H/d, D] (all tokens, my heads) -> [B, L_i, H, D] (my tokens, all heads)."""
        import torch.distributed as dist

        d = self.size
        b, tokens, hl, hd = x.shape
        lengths = [stop - start for start, stop in self.bounds(tokens)]
        mine = lengths[self.rank]
        per_token = b * hl * hd
        # Destination j gets its tokens: concatenated in token order, each block [B, L_j, H/d, D].
        send = torch.cat([p.reshape(-1) for p in x.split(lengths, dim=1)])
        recv = x.new_empty(d * per_token * mine)
        dist.all_to_all_single(recv, send, [per_token * mine] * d, [per_token * n for n in lengths], group=self.group)
        # Source i sent heads i*H/d..: [d, B, L_i, H/d, D] -> [B, L_i, H, D]
        return recv.reshape(d, b, mine, hl, hd).movedim(0, 2).reshape(b, mine, d * hl, hd)

    def gather_tokens(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """[B, L_i, C] on every rank -> [B, L, C] on every rank."""
        import torch.distributed as dist

        lengths = [stop - start for start, stop in self.bounds(tokens)]
        longest = max(lengths)
        # all_gather needs equal sizes: pad each shard to the longest, cut after.
        padded = F.pad(x, (0, 0, 0, longest - x.shape[1])).contiguous()
        pieces = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(pieces, padded, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(pieces, lengths)], dim=1)


# ----------------------------------------------------------------------------
# Rotary positions (the cos/sin tables come from tempomaster.rope)
# ----------------------------------------------------------------------------


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1), as Wan's complex view does.

    x: [B, L, heads, head_dim]; cos, sin: [B, L, head_dim // 2] (float32).
    """
    b, l, n, d = x.shape
    pairs = x.float().reshape(b, l, n, d // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    rotated = torch.stack([even * c - odd * s, even * s + odd * c], dim=-1)
    return rotated.reshape(b, l, n, d).type_as(x)


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] -> [B, dim] as cat(cos, sin), computed in float32 (exportable)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    freqs = torch.pow(10000.0, -exponent)
    args = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim], normalised in float32, returned in x's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    # Statistics in float32 whatever the model dtype.
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).type_as(x)


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(head_dim)) v over [B, L, heads, head_dim] inputs, [B, L, heads, head_dim] out.

    A module of its own (no parameters, so checkpoints are unchanged) because
    it is where the attention's inputs can be seen and replaced: calibration
    records the amax of q, k and v with a pre-hook on it, and the FP8 export
    swaps it for `calibration.fp8.FP8Attention`, which quantizes all three.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Lq, heads, head_dim], k, v [B, Lk, heads, head_dim] -> [B, Lq, heads, head_dim]."""
        b, lq, heads, head_dim = q.shape
        if torch.onnx.is_in_onnx_export():
            # The ONNX Attention node in its 3D form ([B, L, heads * head_dim], head counts as
            # attributes): no Transpose nodes around it. onnxruntime's CPU kernel runs it 2x faster
            # than the 4D form between Transposes (cross-attention at [8, 12 | 512, 12 x 128]), and
            # TensorRT's ONNX parser permutes 3D inputs to its own layout itself (its Attention
            # importer says so; never run here: no GPU).
            out = torch.onnx.ops.attention(
                q.flatten(2), k.flatten(2), v.flatten(2), q_num_heads=heads, kv_num_heads=heads
            )[0]
            return out.view(b, lq, heads, head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


class _Attention(nn.Module):
    """q/k/v/o projections with RMSNorm over the whole width on q and k."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn = ScaledDotProductAttention()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # [B, L, dim] -> [B, L, heads, head_dim]
        return t.view(t.shape[0], t.shape[1], self.num_heads, -1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [B, L, heads, head_dim] each -> [B, L, dim] through o
        return self.o(self.attn(q, k, v).flatten(2))


class SelfAttention(_Attention):
    def forward(
        self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, sp: SequenceParallel | None = None
    ) -> torch.Tensor:
        """x [B, L, dim], rope_cos/rope_sin [B, L, head_dim/2] float32 -> [B, L, dim].

        With ``sp``, L is this rank's token shard L_i and the attention still sees all L tokens.
        """
        q = apply_rope(self._heads(self.norm_q(self.q(x))), rope_cos, rope_sin)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), rope_cos, rope_sin)
        v = self._heads(self.v(x))
        if sp is None:
            return self._attend(q, k, v)
        # The norms (over the whole width) and RoPE are per token: done on the token shard.
        # Attention needs every token: swap to a head shard, attend, swap back.
        q, k, v = sp.tokens_to_heads(torch.stack([q, k, v]), sp.tokens).unbind(0)
        out = sp.heads_to_tokens(self.attn(q, k, v))
        return self.o(out.flatten(2))


class CrossAttention(_Attention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] attends to context [B, text_len, dim] (already embedded) -> [B, L, dim]."""
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        return self._attend(q, k, self._heads(self.v(context)))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, context, t_mod, rope_cos, rope_sin, sp: SequenceParallel | None = None):
        """x [B, L, dim], context [B, text_len, dim], t_mod [1 or B, 6, dim], rope [B, L, head_dim/2] -> [B, L, dim]."""
        # t_mod -> six [1 or B, 1, dim] modulation vectors.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation.to(t_mod.dtype) + t_mod
        ).chunk(6, dim=1)
        h = _layer_norm(x, self.norm1) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * (
            self.self_attn(h, rope_cos, rope_sin) if sp is None else self.self_attn(h, rope_cos, rope_sin, sp)
        )
        x = x + self.cross_attn(_layer_norm(x, self.norm3), context)
        h = _layer_norm(x, self.norm2) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * self.ffn(h)
        return x


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], t [B, dim] (time embedding) -> [B, L, out_dim * pt*ph*pw]."""
        shift, scale = (self.modulation.to(t.dtype) + t[:, None, :]).chunk(2, dim=1)
        return self.head(_layer_norm(x, self.norm) * (1 + scale) + shift)


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"DiT dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim, f, h, w] -> [B, f*(h/2)*(w/2), dim], tokens ordered (frame, row, column)."""
        return self.patch_embedding(x).flatten(2).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """x [B, L, out_dim*pt*ph*pw] (channels last inside a patch) -> [B, out_dim, f, h, w].

        ``grid`` is the token grid (f/pt, h/ph, w/pw), L = its product.
        """
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        sequence_parallel: SequenceParallel | None = None,
        timestep_per_sample: bool = False,
    ) -> torch.Tensor:
        """Velocity for a batch of chunks.

        x: [B, 16, f, h, w] noisy latents; y: [B, 20, f, h, w] mask + condition
        latents; timestep: [1] (or [B], all equal) float; context: [B, text_len, text_dim];
        rope_cos, rope_sin: [B, f*(h/2)*(w/2), head_dim/2] float32.
        Returns [B, 16, f, h, w] in the model dtype.

        With ``sequence_parallel`` every process of its group passes the same
        full inputs and gets the same full output; each computes the blocks
        for its own token shard only.

        ``timestep_per_sample`` (training only): ``timestep`` is ``[B]`` with
        one value per chunk instead of one value for the whole batch.
        """
        dtype = self.dtype
        pt, ph, pw = self.cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        b = x.shape[0]

        steps = timestep.reshape(-1) if timestep_per_sample else timestep.reshape(-1)[:1]
        t_emb = sinusoidal_embedding(steps, self.cfg.freq_dim).to(dtype)
        t = self.time_embedding(t_emb)  # [1 or B, dim]
        t_mod = self.time_projection(t).unflatten(1, (6, self.cfg.dim))  # [1 or B, 6, dim]
        ctx = self.text_embedding(context.to(dtype))

        tokens = self.patchify(torch.cat([x, y], dim=1).to(dtype))
        sp = sequence_parallel
        if sp is None:
            for block in self.blocks:
                tokens = block(tokens, ctx, t_mod, rope_cos, rope_sin)
            out = self.head(tokens, t.expand(b, -1))
            return self.unpatchify(out, grid)
        total = tokens.shape[1]
        sp = sp.for_tokens(total)
        tokens, rope_cos, rope_sin = sp.shard(tokens), sp.shard(rope_cos), sp.shard(rope_sin)
        for block in self.blocks:
            tokens = block(tokens, ctx, t_mod, rope_cos, rope_sin, sp)
        out = sp.gather_tokens(self.head(tokens, t.expand(b, -1)), total)
        return self.unpatchify(out, grid)
