"""The step cache's decision rule (MagCache) on hand-derived values, its curves, and its checks."""

import math

import numpy as np
import pytest
import torch

from tempomaster.runtime.step_cache import (
    MagnitudeCurve,
    MagnitudeRecorder,
    StepCachePolicy,
    check_thresholds,
    load_curves,
    magnitude_ratios,
    save_curves,
    skip_plan,
    stage_thresholds,
    token_norms,
)

F, T = False, True


def test_skip_plan_accumulates_the_error_from_the_last_computed_step():
    # 10 steps, retention 0.2: steps 0 and 1 always computed, step 9 (the last) too.
    # gamma 0.9 from step 2 on; threshold 0.25:
    #   step 2: ratio 0.9, error 0.1 < 0.25 -> skip; step 3: ratio 0.81, error 0.1 + 0.19 = 0.29 -> compute, reset;
    #   the pattern repeats: skip 4, compute 5, skip 6, compute 7, skip 8; step 9 is the last.
    ratios = np.array([[1.0, 1.0] + [0.9] * 8])
    assert skip_plan(ratios, 0.25, max_skips=2, retention=0.2) == (F, F, T, F, T, F, T, F, T, F)
    # threshold 0.5: step 4 has ratio 0.729, error 0.29 + 0.271 = 0.561 >= 0.5 -> compute
    assert skip_plan(ratios, 0.5, max_skips=2, retention=0.2) == (F, F, T, T, F, T, T, F, T, F)
    # max_skips 1 bounds the run of skips whatever the error
    assert skip_plan(ratios, 0.5, max_skips=1, retention=0.2) == (F, F, T, F, T, F, T, F, T, F)


def test_skip_plan_first_steps_last_step_and_off():
    ratios = np.ones((1, 6))  # no change at all: every skippable step may be skipped
    assert skip_plan(ratios, 0.1, max_skips=10, retention=0.5) == (F, F, F, T, T, F)
    # at least one step is computed whatever the retention
    assert skip_plan(ratios, 0.1, max_skips=10, retention=0.0) == (F, T, T, T, T, F)
    assert skip_plan(ratios, 0.0, max_skips=10, retention=0.0) == (F,) * 6
    assert skip_plan(ratios, 0.1, max_skips=0, retention=0.0) == (F,) * 6
    assert skip_plan(np.ones((1, 1)), 0.5) == (F,) and skip_plan(np.ones((1, 2)), 0.5, retention=0.0) == (F, F)


def test_one_decision_for_both_branches():
    cond = [1.0, 1.0] + [0.9] * 8
    steady = np.array([cond, [1.0] * 10])  # uncond unchanged: cond decides alone
    assert skip_plan(steady, 0.25, retention=0.2) == skip_plan(np.array([cond]), 0.25, retention=0.2)
    # uncond at 0.7: its error 0.3 >= 0.25 at every skippable step, so neither branch is skipped
    drifting = np.array([cond, [1.0, 1.0] + [0.7] * 8])
    assert skip_plan(drifting, 0.25, retention=0.2) == (F,) * 10


def test_curve_ratios_at_the_calibrated_schedule_and_others():
    sigmas = (1.0, 0.75, 0.5, 0.25)
    logs = (0.0, math.log(0.9), math.log(0.8), math.log(0.5))
    curve = MagnitudeCurve(sigmas, (logs, logs))
    np.testing.assert_allclose(curve.ratios(sigmas, 2), [[1.0, 0.9, 0.8, 0.5]] * 2, rtol=1e-12)
    # half the steps: one step spans two calibrated ones, gamma = 0.9 * 0.8
    np.testing.assert_allclose(curve.ratios((1.0, 0.5), 1), [[1.0, 0.72]], rtol=1e-12)
    # between calibrated sigmas: the log-magnitude is linear in sigma, 0.625 is half of 0.75 -> 0.5
    np.testing.assert_allclose(curve.ratios((1.0, 0.625), 1), [[1.0, 0.9 * math.sqrt(0.8)]], rtol=1e-12)
    # below the last calibrated sigma: the last segment's slope, 0.125 is half a segment past 0.25
    np.testing.assert_allclose(curve.ratios((0.25, 0.125), 1), [[1.0, math.sqrt(0.5)]], rtol=1e-12)
    with pytest.raises(ValueError, match="branch"):
        MagnitudeCurve(sigmas, (logs,)).ratios(sigmas, 2)
    with pytest.raises(ValueError, match="descending"):
        MagnitudeCurve((0.5, 1.0), ((0.0, 0.0),))


def test_magnitude_ratios_are_means_of_per_pixel_norm_ratios():
    # one chunk, 2 channels, 1 frame, 1x2 pixels; cond then uncond on the batch axis (a guided call)
    first = torch.tensor([[3.0, 0.0], [4.0, 1.0]]).reshape(1, 2, 1, 1, 2)  # norms 5, 1
    second = torch.tensor([[0.0, 2.0], [10.0, 0.0]]).reshape(1, 2, 1, 1, 2)  # norms 10, 2
    v0, v1 = torch.cat([first, 2 * first]), torch.cat([second, second])
    norms = [token_norms(v0, 2), token_norms(v1, 2)]
    assert norms[0].shape == (2, 1, 1, 1, 2)
    # cond: mean(10/5, 2/1) = 2; uncond: mean(10/10, 2/2) = 1
    np.testing.assert_allclose(magnitude_ratios(norms), [[1.0, 2.0], [1.0, 1.0]])


class _Event:
    def __init__(self, stage, step, num_steps, sigma, velocity):
        self.stage, self.step, self.num_steps, self.sigma, self.velocity = stage, step, num_steps, sigma, velocity


def test_recorder_averages_log_gamma_over_runs():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    base = torch.randn(2, 3, 2, 2, 2, generator=g)
    recorder = MagnitudeRecorder(branches=2)
    # run 1 doubles the velocity each step, run 2 halves it: the geometric mean of gamma is 1
    for factor in (2.0, 0.5):
        for step, sigma in enumerate((1.0, 0.6, 0.3)):
            recorder(_Event(0, step, 3, sigma, base * factor**step))
    (curve,) = recorder.curves()
    assert curve.sigmas == (1.0, 0.6, 0.3)
    np.testing.assert_allclose(curve.log_gammas, [[0.0, 0.0, 0.0]] * 2, atol=1e-12)
    one_run = MagnitudeRecorder(branches=2)
    for step, sigma in enumerate((1.0, 0.6, 0.3)):
        one_run(_Event(0, step, 3, sigma, base * 2.0**step))
    np.testing.assert_allclose(one_run.curves()[0].log_gammas, [[0.0, math.log(2), math.log(2)]] * 2, rtol=1e-12)


def test_recorder_refuses_a_cached_run():
    event = _Event(0, 0, 2, 1.0, torch.ones(2, 1, 1, 1, 1))
    event.skipped = True
    with pytest.raises(ValueError, match="uncached"):
        MagnitudeRecorder()(event)


def test_policy_plans_each_stage_with_its_threshold():
    sigmas = tuple(np.linspace(1.0, 0.1, 10).tolist())
    flat = MagnitudeCurve(sigmas, ((0.0,) * 10, (0.0,) * 10))
    policy = StepCachePolicy((0.0, 0.1), (flat, flat), max_skips=2, retention=0.2)
    assert policy.plan(0, sigmas, guided=True) == (F,) * 10
    assert policy.plan(1, sigmas, guided=True) == (F, F, T, T, F, T, T, F, T, F)
    with pytest.raises(ValueError, match="curves for 1"):
        StepCachePolicy((0.1, 0.1), (flat,))


@pytest.mark.parametrize(
    "values,count,match",
    [
        ((0.1, 0.2), 3, "2 value"),
        ((0.1, float("nan"), 0.1), 3, "finite"),
        ((0.1, -0.01, 0.1), 3, r"\[0, 1\]"),
        ((0.1, 1.5, 0.1), 3, r"\[0, 1\]"),
        ((0.1, float("inf"), 0.1), 3, "finite"),
    ],
)
def test_bad_thresholds_are_refused(values, count, match):
    with pytest.raises(ValueError, match=match):
        check_thresholds(values, count)


def test_named_policies_cover_any_stage_count():
    assert len(stage_thresholds("safe", 2)) == 2 and len(stage_thresholds("fast", 5)) == 5
    assert stage_thresholds("safe", 1) == stage_thresholds("safe", 3)[:1]


def test_curves_round_trip_and_a_bad_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(5)
    logs = torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.01
    logs[:, 0] = 0
    curve = MagnitudeCurve((1.0, 0.7, 0.4, 0.1), tuple(tuple(row) for row in logs.tolist()))
    path = save_curves(tmp_path / "curves.json", [curve, curve], {"prompts": ["x"]})
    assert load_curves(path) == (curve, curve)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "tempomaster-magnitude-curves", "stages": [{"sigmas": [1.0]}]}')
    with pytest.raises(ValueError, match=r"bad.json: stages\[0\]"):
        load_curves(bad)
    with pytest.raises(ValueError, match="missing.json"):
        load_curves(tmp_path / "missing.json")
