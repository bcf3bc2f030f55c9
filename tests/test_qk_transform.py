"""The exact q/k transforms ahead of FP8 attention: same attention unquantized, less FP8 error.

References: float64 torch attention of the untransformed inputs; Hadamard
matrices built by Kronecker products here; ml_dtypes-free E4M3 rounding
through torch's float8 cast (checked against ml_dtypes in test_fp8.py).
"""

import math

import numpy as np
import pytest
import torch

from tempomaster.calibration.qk_transform import hadamard_pair, smooth_keys, transform_qk


def _attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _fp8(x):
    """Per-tensor E4M3 round trip at amax / 448."""
    s = x.abs().max() / 448
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) * s


def _inputs(seed, batch=2, heads=3, tokens=200, dim=64, offset=6.0, outliers=4):
    """q, k, v [B, heads, L, dim]; k with a large per-channel offset all tokens share, q and k with a few
    large channels in common (what the DiT's normed, RoPE'd q and k look like)."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.ones(dim)
    gain[torch.randperm(dim, generator=g)[:outliers]] = 8.0
    q = torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64) * gain / 4
    k = torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64) * gain / 4
    k = k + offset * torch.randn(batch, heads, 1, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("head_dim", [128, 64, 32, 96, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hadamard_pair_is_exactly_inverse(head_dim, dtype):
    h_q, h_k = hadamard_pair(head_dim, dtype)
    assert h_q.dtype == h_k.dtype == dtype and h_q.shape == (head_dim, head_dim)
    # the product in float64 of the stored values: exactly the identity, whatever the dtype
    assert torch.equal(h_q.double() @ h_k.double().T, torch.eye(head_dim, dtype=torch.float64))
    # a +-1 Hadamard (Kronecker construction), block-diagonal over the largest power of two dividing head_dim
    n = head_dim & -head_dim
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    want = np.kron(np.eye(head_dim // n), h)
    assert np.array_equal(np.sign(h_q.double().numpy()), want) and np.array_equal(np.sign(h_k.double().numpy()), want)


def test_transform_leaves_attention_unchanged():
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    q, k, v = _inputs(seed)
    ref = _attention(q, k, v)
    smoothed = _attention(q, smooth_keys(k), v)
    assert smoothed.sub(ref).abs().max() < 1e-12, seed
    h_q, h_k = hadamard_pair(q.shape[-1], torch.float64)
    qt, kt = transform_qk(q, k, h_q, h_k)
    assert _attention(qt, kt, v).sub(ref).abs().max() < 1e-12, seed
    # [B, L, heads, dim] (what the recorder sees): the same transform along token_dim=1
    qt1, kt1 = transform_qk(q.transpose(1, 2), k.transpose(1, 2), h_q, h_k, token_dim=1)
    assert torch.allclose(qt1.transpose(1, 2), qt, rtol=0, atol=1e-12)
    assert torch.allclose(kt1.transpose(1, 2), kt, rtol=0, atol=1e-12)
    # and the smoothed keys have no token mean left
    assert smooth_keys(k).mean(-2).abs().max() < 1e-12


def test_transform_shrinks_fp8_error():
    """FP8 q, k: smoothing alone, then smoothing and rotation, each cut the attention-output error."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    q, k, v = (t.float() for t in _inputs(seed))
    ref = _attention(q, k, v)

    def err(q2, k2):
        return float((_attention(_fp8(q2), _fp8(k2), v) - ref).norm() / ref.norm())

    plain = err(q, k)
    smoothed = err(q, smooth_keys(k))
    h_q, h_k = hadamard_pair(q.shape[-1])
    rotated = err(*transform_qk(q, k, h_q, h_k))
    print(f"seed {seed}: FP8 attention error plain {plain:.4f}, smoothed {smoothed:.4f}, rotated {rotated:.4f}")
    assert smoothed < 0.8 * plain, (seed, plain, smoothed)
    assert rotated < 0.8 * smoothed, (seed, smoothed, rotated)


def test_fp8_attention_module_matches_transformed_reference():
    """FP8Attention: the transformed q, k at their scales, v as is, in the [B, L, heads, dim] interface."""
    from tempomaster.calibration.fp8 import FP8Attention

    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    q, k, v = (t.float() for t in _inputs(seed, dim=32))
    h_q, h_k = hadamard_pair(32)
    qt, kt = q @ h_q, (k - k.mean(-2, keepdim=True)) @ h_k
    amax = {
        "q": float(q.abs().max()),
        "k": float(k.abs().max()),
        "v": float(v.abs().max()),
        "q_rotated": float(qt.abs().max()),
        "k_rotated": float(kt.abs().max()),
    }
    module = FP8Attention.from_amax(amax, torch.float32, head_dim=32, scale_dtype=torch.float32)
    out = module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    want = _attention(_fp8(qt), _fp8(kt), _fp8(v))
    assert (out.double() - want).abs().max() < 1e-5, seed
    plain = FP8Attention.from_amax(amax, torch.float32, head_dim=32, scale_dtype=torch.float32, qk_transform=False)
    out_plain = plain(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert (out_plain.double() - _attention(_fp8(q), _fp8(k), _fp8(v))).abs().max() < 1e-5, seed
