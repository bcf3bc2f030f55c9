"""CFG and APG against a direct float64 transcription of SPEC 2."""

import math

import pytest
import torch

from tempomaster.runtime.guidance import (
    APGState,
    cfg_denoised,
    guided_velocity,
    project,
    rescale_per_frame,
)

SHAPE = (2, 4, 3, 6, 5)  # [B, C, F, H, W]


# ---------------------------------------------------------------- transcription
def spec_cfg(z, vc, vu, timestep, w):
    t = timestep / 1000
    dc, du = z - t * vc, z - t * vu
    d = du + w * (dc - du)
    return (z - d) / (t + 1e-8)


class SpecAPG:
    """SPEC 2, line by line, float64, explicit loops over batch and frame."""

    def __init__(self):
        self.m = None

    def __call__(self, z, vc, vu, timestep, w):
        t = timestep / 1000
        dc, du = z - t * vc, z - t * vu
        delta = dc - du
        self.m = delta.clone() if self.m is None else delta + (-0.5) * self.m
        delta = self.m.clone()
        self.clipped = 0
        for b in range(delta.shape[0]):
            for f in range(delta.shape[2]):
                n = math.sqrt(float((delta[b, :, f] ** 2).sum()))
                if n > 27:
                    self.clipped += 1
                delta[b, :, f] = delta[b, :, f] * min(1.0, 27 / (n + 1e-8))
        out = torch.empty_like(delta)
        for b in range(delta.shape[0]):
            a, u = delta[b].flatten(), dc[b].flatten()
            u = u / u.norm()
            par = (a @ u) * u
            out[b] = (a - par + 0.0 * par).view_as(delta[b])
        d = dc + (w - 1) * out
        return (z - d) / (t + 1e-8)


def rand(g, scale=1.0, dtype=torch.float64):
    return (torch.randn(SHAPE, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- CFG
def test_cfg_matches_spec():
    g = torch.Generator().manual_seed(10)
    z, vc, vu = rand(g), rand(g), rand(g)
    out = guided_velocity(z, vc, vu, 833.3, 5.0, use_apg=False)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, spec_cfg(z, vc, vu, 833.3, 5.0), rtol=1e-12, atol=1e-12)


def test_cfg_float32_and_bf16_keep_dtype():
    g = torch.Generator().manual_seed(11)
    z, vc, vu = rand(g), rand(g), rand(g)
    ref = spec_cfg(z, vc, vu, 600.0, 4.0)
    out32 = guided_velocity(z.float(), vc.float(), vu.float(), 600.0, 4.0, use_apg=False)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    zb, vcb, vub = z.bfloat16(), vc.bfloat16(), vu.bfloat16()
    outb = guided_velocity(zb, vcb, vub, 600.0, 4.0, use_apg=False)
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(
        outb.double(), spec_cfg(zb.double(), vcb.double(), vub.double(), 600.0, 4.0), rtol=1e-2, atol=1e-2
    )


def test_cfg_denoised_formula():
    g = torch.Generator().manual_seed(12)
    dc, du = rand(g), rand(g)
    torch.testing.assert_close(cfg_denoised(dc, du, 3.0), du + 3.0 * (dc - du))


def test_scale_one_is_cond_velocity_without_uncond():
    g = torch.Generator().manual_seed(13)
    z, vc = rand(g), rand(g)
    state = APGState()
    assert guided_velocity(z, vc, None, 500.0, 1.0, use_apg=True, state=state) is vc
    assert state.running_average is None  # momentum untouched


# ---------------------------------------------------------------- APG
@pytest.mark.parametrize("v_scale, expect_clipping", [(1.0, False), (8.0, True)])
def test_apg_matches_spec_over_steps(v_scale, expect_clipping):
    g = torch.Generator().manual_seed(20 + int(v_scale))
    state, spec = APGState(), SpecAPG()
    any_clipped = 0
    for timestep in [1000.0, 900.0, 750.0, 500.0]:  # several steps: momentum matters
        z, vc, vu = rand(g), rand(g, v_scale), rand(g, v_scale)
        out = guided_velocity(z, vc, vu, timestep, 8.0, use_apg=True, state=state)
        ref = spec(z, vc, vu, timestep, 8.0)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        any_clipped += spec.clipped
    # The two cases really exercise both sides of the threshold.
    assert (any_clipped > 0) == expect_clipping


def test_apg_momentum_is_used():
    # Same inputs, second step: with momentum the result differs from a fresh state.
    g = torch.Generator().manual_seed(30)
    z, vc, vu = rand(g), rand(g), rand(g)
    z2, vc2, vu2 = rand(g), rand(g), rand(g)
    state = APGState()
    guided_velocity(z, vc, vu, 900.0, 8.0, True, state)
    second = guided_velocity(z2, vc2, vu2, 800.0, 8.0, True, state)
    fresh = guided_velocity(z2, vc2, vu2, 800.0, 8.0, True, APGState())
    assert not torch.allclose(second, fresh)
    t = 0.9
    torch.testing.assert_close(
        state.running_average, ((z2 - 0.8 * vc2) - (z2 - 0.8 * vu2)) - 0.5 * ((z - t * vc) - (z - t * vu))
    )


def test_apg_state_reset():
    g = torch.Generator().manual_seed(31)
    steps = [(rand(g), rand(g, 3.0), rand(g, 3.0), ts) for ts in (1000.0, 700.0, 400.0)]
    state = APGState()
    first = [guided_velocity(z, vc, vu, ts, 8.0, True, state) for z, vc, vu, ts in steps]
    assert state.running_average is not None
    state.reset()
    assert state.running_average is None
    again = [guided_velocity(z, vc, vu, ts, 8.0, True, state) for z, vc, vu, ts in steps]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_apg_float32_and_bf16():
    g = torch.Generator().manual_seed(32)
    state32, spec = APGState(), SpecAPG()
    for ts in (1000.0, 800.0):
        z, vc, vu = rand(g), rand(g, 6.0), rand(g, 6.0)
        out = guided_velocity(z.float(), vc.float(), vu.float(), ts, 8.0, True, state32)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), spec(z, vc, vu, ts, 8.0), rtol=1e-4, atol=1e-4)
    zb = rand(g).bfloat16()
    assert guided_velocity(zb, zb, rand(g).bfloat16(), 500.0, 8.0, True, APGState()).dtype == torch.bfloat16


def test_apg_needs_state_and_fresh_shape():
    g = torch.Generator().manual_seed(33)
    z, vc, vu = rand(g), rand(g), rand(g)
    with pytest.raises(ValueError):
        guided_velocity(z, vc, vu, 500.0, 8.0, use_apg=True, state=None)
    with pytest.raises(ValueError):
        guided_velocity(z, vc, None, 500.0, 8.0, use_apg=False)
    state = APGState()
    guided_velocity(z, vc, vu, 500.0, 8.0, True, state)
    with pytest.raises(ValueError, match="fresh APGState"):
        guided_velocity(z[:1], vc[:1], vu[:1], 400.0, 8.0, True, state)


# ---------------------------------------------------------------- pieces
def test_rescale_per_frame():
    g = torch.Generator().manual_seed(40)
    delta = rand(g, 10.0)  # per-slice norm ~ 10*sqrt(120) ~ 110 > 27
    delta[0, :, 1] *= 0.01  # one slice well under the threshold
    out = rescale_per_frame(delta, 27.0)
    norms = out.pow(2).sum(dim=(1, 3, 4)).sqrt()
    assert torch.all(norms <= 27.0 + 1e-9)
    torch.testing.assert_close(out[0, :, 1], delta[0, :, 1], rtol=0, atol=0)
    torch.testing.assert_close(norms[1, 0], torch.tensor(27.0, dtype=torch.float64))
    assert rescale_per_frame(delta, 0.0) is delta


def test_project_per_batch_item():
    g = torch.Generator().manual_seed(41)
    v0, v1 = rand(g), rand(g)
    par, orth = project(v0, v1)
    torch.testing.assert_close(par + orth, v0)
    for b in range(SHAPE[0]):
        assert abs(float((orth[b] * v1[b]).sum())) < 1e-9
        # parallel is a multiple of v1[b]
        k = float((par[b] * v1[b]).sum() / (v1[b] * v1[b]).sum())
        torch.testing.assert_close(par[b], k * v1[b])
    p32, o32 = project(v0.float(), v1.float())
    assert p32.dtype == o32.dtype == torch.float32
