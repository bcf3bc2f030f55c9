"""Flow-match schedule against values derived by hand from SPEC 2."""

import pytest
import torch

from tempomaster.runtime.schedule import (
    StageSchedule,
    euler_step,
    flow_match_sigmas,
    model_timestep,
    sigmas_to_timesteps,
)


def test_sigmas_n2_shift5_by_hand():
    # linspace(1, 0, 3)[:-1] = [1, 0.5]; 5*0.5 / (1 + 4*0.5) = 2.5/3 = 5/6
    sigmas = flow_match_sigmas(2, 5.0)
    assert sigmas.dtype == torch.float64
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 5.0 / 6.0], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        sigmas_to_timesteps(sigmas), torch.tensor([1000.0, 2500.0 / 3.0], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_sigmas_n4_shift3_by_hand():
    # [1, .75, .5, .25] -> 3u/(1+2u): 1, 2.25/2.5 = .9, 1.5/2 = .75, .75/1.5 = .5
    sched = StageSchedule.create(4, 3.0)
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(sched.timesteps, 1000 * expected, rtol=0, atol=1e-12)
    assert len(sched) == sched.num_steps == 4
    assert [sched.sigma_next(i) for i in range(4)] == pytest.approx([0.9, 0.75, 0.5, 0.0], abs=1e-15)
    assert sched.sigma(1) == pytest.approx(0.9)
    assert sched.timestep(3) == pytest.approx(500.0)
    with pytest.raises(IndexError):
        sched.sigma_next(4)


def test_shift_one_is_plain_linspace():
    torch.testing.assert_close(flow_match_sigmas(5, 1.0), torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))


def test_float32_option_matches_reference_construction():
    # The reference: torch.linspace in float32, then the shift in float32.
    u = torch.linspace(1.0, 0.0, 51)[:-1]
    ref = 5 * u / (1 + (5 - 1) * u)
    assert torch.equal(flow_match_sigmas(50, 5.0, dtype=torch.float32), ref)
    torch.testing.assert_close(flow_match_sigmas(50, 5.0).float(), ref, rtol=2e-7, atol=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_steps(bad):
    with pytest.raises(ValueError):
        flow_match_sigmas(bad, 3.0)


def test_bad_shift():
    with pytest.raises(ValueError):
        flow_match_sigmas(4, 0.0)


def test_euler_step_value_and_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    v = torch.randn(2, 3, 4, generator=g)
    out = euler_step(x, v, 0.9, 0.75)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.double() + v.double() * (0.75 - 0.9)).float())

    # bf16 in, bf16 out; the update is formed in float32 and rounded once.
    xb, vb = x.bfloat16(), v.bfloat16()
    outb = euler_step(xb, vb, 0.9, 0.75)
    assert outb.dtype == torch.bfloat16
    assert torch.equal(outb, (xb.float() + vb.float() * (0.75 - 0.9)).bfloat16())

    # float64 stays float64 exactly.
    xd, vd = x.double(), v.double()
    assert torch.equal(euler_step(xd, vd, 0.5, 0.0), xd + vd * (0.0 - 0.5))


def test_full_loop_reaches_x0_for_straight_flow():
    # For z = sigma*noise + (1-sigma)*x0 the exact velocity is noise - x0, so
    # Euler integration from sigma = 1 to 0 lands exactly on x0.
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, generator=g, dtype=torch.float64)
    noise = torch.randn(8, generator=g, dtype=torch.float64)
    sched = StageSchedule.create(7, 3.0)
    z = noise.clone()
    for i in range(len(sched)):
        z = euler_step(z, noise - x0, sched.sigma(i), sched.sigma_next(i))
    torch.testing.assert_close(z, x0)


def test_model_timestep_bf16_rounding_is_selectable():
    # bf16 spacing in [512, 1024) is 4: 750 is a tie -> even mantissa -> 752;
    # 833.33 -> 832; 900 and 1000 are representable.
    for t, rounded in [(750.0, 752.0), (2500.0 / 3.0, 832.0), (900.0, 900.0), (1000.0, 1000.0)]:
        on = model_timestep(t, torch.bfloat16, cast_to_model_dtype=True)
        off = model_timestep(t, torch.bfloat16, cast_to_model_dtype=False)
        assert on.dtype == off.dtype == torch.float32 and on.shape == (1,)
        assert on.item() == rounded
        assert off.item() == pytest.approx(t, rel=1e-7)
    # A tensor input and a float32 model dtype: no rounding either way.
    t = torch.tensor(750.0, dtype=torch.float64)
    assert model_timestep(t, torch.float32, True).item() == 750.0
