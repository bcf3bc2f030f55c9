"""Wan2.1 video diffusion transformer in TempoMaster's image-to-video layout.

Parameter names are those of `wan_video_dit_bf16.bin` (the DiffSynth-Studio /
Wan2.1 layout), so a release checkpoint loads with `load_state_dict` as it is.

Differences from the reference implementation, all for export:
- RoPE is applied with real cos/sin tables that the caller passes in
  (`tempomaster.rope.rope_table`), never complex numbers, and positions are not capped at 1024.
- The sinusoidal timestep embedding is computed in float32, not float64.
- One timestep is shared by the whole batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .presets import DiTConfig


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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    # Statistics in float32 whatever the model dtype.
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).type_as(x)


class _Attention(nn.Module):
    """q/k/v/o projections with RMSNorm over the whole width on q and k."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
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
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class SelfAttention(_Attention):
    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        q = apply_rope(self._heads(self.norm_q(self.q(x))), rope_cos, rope_sin)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), rope_cos, rope_sin)
        return self._attend(q, k, self._heads(self.v(x)))


class CrossAttention(_Attention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x, context, t_mod, rope_cos, rope_sin):
        # t_mod: [B, 6, dim] -> six [B, 1, dim] modulation vectors.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation.to(t_mod.dtype) + t_mod
        ).chunk(6, dim=1)
        h = _layer_norm(x, self.norm1) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attn(h, rope_cos, rope_sin)
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
        self.blocks = nn.ModuleList(
            DiTBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers)
        )
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        # [B, in_dim, f, h, w] -> [B, f*(h/2)*(w/2), dim], tokens ordered (frame, row, column).
        return self.patch_embedding(x).flatten(2).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        # [B, L, out_dim*pt*ph*pw] (channels last inside a patch) -> [B, out_dim, f, h, w]
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
    ) -> torch.Tensor:
        """Velocity for a batch of chunks.

        x: [B, 16, f, h, w] noisy latents; y: [B, 20, f, h, w] mask + condition
        latents; timestep: [1] (or [B], all equal) float; context: [B, 512, text_dim];
        rope_cos, rope_sin: [B, f*(h/2)*(w/2), head_dim/2] float32.
        Returns [B, 16, f, h, w] in the model dtype.
        """
        dtype = self.dtype
        pt, ph, pw = self.cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        b = x.shape[0]

        t_emb = sinusoidal_embedding(timestep.reshape(-1)[:1], self.cfg.freq_dim).to(dtype)
        t = self.time_embedding(t_emb)  # [1, dim]
        t_mod = self.time_projection(t).unflatten(1, (6, self.cfg.dim))  # [1, 6, dim]
        ctx = self.text_embedding(context.to(dtype))

        tokens = self.patchify(torch.cat([x, y], dim=1).to(dtype))
        for block in self.blocks:
            tokens = block(tokens, ctx, t_mod, rope_cos, rope_sin)
        out = self.head(tokens, t.expand(b, -1))
        return self.unpatchify(out, grid)
