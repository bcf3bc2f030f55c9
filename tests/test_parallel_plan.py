"""The schedule planner against numbers worked out by hand for the release defaults.

Release defaults: 109 frames, intervals [4, 2, 1], steps [50, 32, 32],
guidance on, 40 heads, 480x832.  Chunks per stage: 1, 2, 4, so sequences
per step (x cond/uncond): 2, 4, 8.  Every stage's chunk has 109 frames
(stage 1: 218 frames in 2 chunks of L = (109 + 2) // 4 * 4 + 1 = 109; stage 2:
436 in 4 of 109), i.e. f = 28 latent frames of 30 x 52 tokens = 43680 tokens.
One device: 50*2 + 32*4 + 32*8 = 484 forwards in 50 + 32 + 32 = 114 DiT calls.
"""

import json
from fractions import Fraction

import pytest

from tempomaster.parallel_plan import format_schedule, place_sequences, plan_schedule, plan_video_groups

RELEASE = dict(
    num_heads=40,
    num_frames=109,
    frame_intervals=(4, 2, 1),
    steps_per_stage=(50, 32, 32),
    guidance_scale=8.0,
    height=480,
    width=832,
)


def release(devices, sp=True, **kw):
    return plan_schedule(devices=devices, sequence_parallel=sp, **RELEASE, **kw)


def test_one_device():
    plan = release(1)
    assert [s.sequences for s in plan.stages] == [2, 4, 8]
    assert [s.tokens for s in plan.stages] == [43680] * 3
    assert [s.calls_per_rank() for s in plan.stages] == [[50], [32], [32]]  # 114 DiT calls
    assert plan.single_device_forwards == 484 and plan.sequential_forwards == 484
    assert plan.idle_fraction == 0 and plan.speedup == 1


# Without sequence parallel the step lasts ceil(S / P) forwards:
#   P=2: 50*1 + 32*2 + 32*4 = 242     P=4: 50*1 + 32*1 + 32*2 = 146     P=8: 50 + 32 + 32 = 114
# With it, S < P sequences get d = P / S ranks each (d divides 40):
#   P=4: stage 0 2 groups x 2 -> 50 * 1/2 = 25; then 32 + 64 -> 121
#   P=8: stage 0 2 x 4 -> 12.5, stage 1 4 x 2 -> 16, stage 2 8 x 1 -> 32 -> 60.5 = 484 / 8
@pytest.mark.parametrize(
    "devices, sp, per_stage, total",
    [
        (2, False, [50, 64, 128], 242),
        (4, False, [50, 32, 64], 146),
        (8, False, [50, 32, 32], 114),
        (2, True, [50, 64, 128], 242),
        (4, True, [25, 32, 64], 121),
        (8, True, [12.5, 16, 32], 60.5),
    ],
)
def test_release_defaults_sequential_forwards(devices, sp, per_stage, total):
    plan = release(devices, sp)
    assert [float(s.sequential_forwards) for s in plan.stages] == per_stage
    assert float(plan.sequential_forwards) == total
    assert plan.speedup == pytest.approx(484 / total)


def test_release_defaults_eight_devices_placement_and_idle():
    plain = release(8, sp=False)
    # 2 sequences on 8 ranks: ranks 0 and 1 work, 6 idle (75 %); then 4 of 8 (50 %); then none idle
    assert [float(s.placement.idle_fraction) for s in plain.stages] == [0.75, 0.5, 0.0]
    assert [s.placement.groups for s in plain.stages] == [2, 4, 8]
    assert plain.stages[0].forwards_per_rank() == [50, 50, 0, 0, 0, 0, 0, 0]
    assert plain.stages[0].calls_per_rank() == [50, 50, 0, 0, 0, 0, 0, 0]
    # 484 forwards of work over 8 x 114 forward times
    assert plain.idle_fraction == pytest.approx(1 - 484 / (8 * 114))
    assert plain.speedup == pytest.approx(4.2456, abs=1e-4)

    sp = release(8)
    assert [(s.placement.groups, s.placement.sp_degree) for s in sp.stages] == [(2, 4), (4, 2), (8, 1)]
    assert sp.stages[0].forwards_per_rank() == [Fraction(25, 2)] * 8
    assert sp.stages[1].forwards_per_rank() == [16] * 8
    assert sp.stages[0].placement.group_ranks(1) == (4, 5, 6, 7)
    assert sp.stages[0].placement.sequences_of(5) == (1, 2)  # rank 5 shares the uncond sequence
    assert sp.idle_fraction == 0 and sp.speedup == pytest.approx(8.0)


def test_four_devices_idle_and_projected_seconds():
    plain = release(4, sp=False, forward_seconds=2.0)
    assert [float(s.placement.idle_fraction) for s in plain.stages] == [0.5, 0.0, 0.0]
    assert plain.idle_fraction == pytest.approx(1 - 484 / (4 * 146))
    assert plain.seconds() == pytest.approx(292.0)
    sp = release(4, forward_seconds=2.0)
    assert sp.seconds() == pytest.approx(242.0)
    data = json.loads(json.dumps(sp.to_json()))
    assert data["stages"][0]["placement"] == [{"ranks": [0, 1], "sequences": [0]}, {"ranks": [2, 3], "sequences": [1]}]
    assert data["stages"][2]["forwards_per_rank"] == [64.0] * 4
    assert data["stages"][0]["seconds"] == pytest.approx(50.0)
    assert data["sequential_forwards"] == 121.0 and data["single_device_forwards"] == 484
    text = format_schedule(sp)
    assert "121 sequential forwards" in text and "242.0 s" in text


def test_placement_rules():
    # 8 sequences on 6 ranks: 2 groups x 3 would not divide 40 heads; 3 groups x 2 -> ceil(8/3)/2 = 1.5 < ceil(8/6) = 2
    p = place_sequences(8, 6, 40)
    assert (p.groups, p.sp_degree, p.step_forwards) == (3, 2, Fraction(3, 2))
    assert p.shares == ((0, 3), (3, 6), (6, 8))
    # 12 heads (wan-1.3b), 2 sequences on 16 ranks: d = 8 does not divide 12; d = 6 -> 12 ranks busy
    p = place_sequences(2, 16, 12)
    assert (p.groups, p.sp_degree, p.step_forwards) == (2, 6, Fraction(1, 6))
    assert p.idle_fraction == Fraction(1, 4)
    # a sequence cannot be cut finer than its tokens
    assert place_sequences(1, 8, 40, tokens=4).sp_degree == 4
    assert place_sequences(2, 8, 40, sequence_parallel=False).sp_degree == 1


def test_no_guidance_halves_the_sequences():
    plan = plan_schedule(devices=4, sequence_parallel=True, **{**RELEASE, "guidance_scale": 1.0})
    assert [s.sequences for s in plan.stages] == [1, 2, 4]
    assert [s.placement.sp_degree for s in plan.stages] == [4, 2, 1]
    assert float(plan.sequential_forwards) == 50 / 4 + 32 / 2 + 32 == 60.5


def test_video_groups():
    assert plan_video_groups(3, 4) == [(0, 1), (2,), (3,)]
    assert plan_video_groups(2, 8) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert plan_video_groups(5, 2) == [(0,), (1,)]


def test_bad_values_name_the_flag():
    with pytest.raises(ValueError, match="--devices"):
        release(0)
    with pytest.raises(ValueError, match="--forward-seconds"):
        release(2, forward_seconds=0.0)
    with pytest.raises(ValueError, match="--steps"):
        plan_schedule(devices=2, **{**RELEASE, "steps_per_stage": (50, 32)})
