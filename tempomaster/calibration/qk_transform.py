"""Exact transforms of attention's q and k that shrink what FP8 rounding does to the softmax.

E4M3 rounds every element to ~2^-4 of its own size whatever the per-tensor
scale, so the error of a logit q k^T is sum_d (dq_d k_d + q_d dk_d): large
where q and k are large on the same few channels, which the DiT's normed
and RoPE'd q and k are (on the trained toy the largest channel's RMS is
5-11x the median's). Two changes that leave softmax(q k^T) v as it was
before rounding, applied between the attention's inputs and its Q/DQ:

- `smooth_keys`: k minus its mean over the tokens. q (k_j - m)^T =
  q k_j^T - q m^T, and q m^T is the same for every key j of a query's row,
  which the softmax cancels (SageAttention, arXiv 2410.02367, sec. 3). Exact
  for any m, so the mean's own rounding costs nothing; no attention mask
  (the DiT's attentions have none).
- `hadamard_pair`: q H_q and k H_k with H_q H_k^T = I, Sylvester Hadamard
  matrices of +-1 scaled by powers of two, so the product is exactly the
  identity in any float dtype. The rotation spreads a few large channels
  over all of them ("incoherent processing", FlashAttention-3, arXiv
  2407.08608, sec. 3.3): sum_d q_d^2 k_d^2, what the rounding error grows
  with, drops towards |q|^2 |k|^2 / head_dim.

Measured on the trained toy (benchmarks/results/fp8_attention_probe_toy.json):
FP8 q, k, v in every self-attention move its velocity by 1.47% as they
are, 1.33% with k smoothed, 0.80% smoothed and rotated (FP8 Linears and
attention together: 3.00%, 2.92%, 2.70%; the Linears alone 2.57%).
"""

from __future__ import annotations

import torch


def smooth_keys(k: torch.Tensor, token_dim: int = -2) -> torch.Tensor:
    """k [B, heads, L, head_dim] (tokens along `token_dim`) minus its mean over the tokens, per sequence, head and channel."""
    return k - k.mean(dim=token_dim, keepdim=True)


def _sylvester(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix of +-1 (n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_pair(head_dim: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_q, H_k), [head_dim, head_dim] each, with H_q @ H_k.T == I exactly.

    Block-diagonal Sylvester Hadamard matrices over the largest power of two
    n dividing head_dim (all of it for the DiTs: 128, 32), scaled by
    2^-ceil(log2(n)/2) for q and 2^-floor(log2(n)/2) for k: H H^T = n I, and
    both factors are powers of two, exact in bf16 and fp16 too.
    """
    n = head_dim & -head_dim  # the largest power of two dividing head_dim
    log2 = n.bit_length() - 1
    block = _sylvester(n)
    h = torch.block_diag(*([block] * (head_dim // n)))
    return (h * 2.0 ** -((log2 + 1) // 2)).to(dtype), (h * 2.0 ** -(log2 // 2)).to(dtype)


def transform_qk(
    q: torch.Tensor, k: torch.Tensor, h_q: torch.Tensor, h_k: torch.Tensor, token_dim: int = -2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q H_q, (k - mean_tokens k) H_k) for q [B, heads, Lq, head_dim], k [B, heads, Lk, head_dim], same shapes out."""
    return torch.matmul(q, h_q), torch.matmul(smooth_keys(k, token_dim), h_k)
