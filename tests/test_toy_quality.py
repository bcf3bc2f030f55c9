"""Quality of the shipped toy preset, measured on the videos it generates (not on internals).

Each bound is also shown to fail on the random-weight `tiny` preset at the
same settings, so the test can tell a trained model from an untrained one.

Bounds (the training clips are in tests/test_toy_clips.py):
- presence: the prompt's colour is found in at least 90% of the 68 final frames;
- smoothness: the object's centroid moves at most JUMP_BOUND_PX between
  consecutive 24 fps frames. The training clips never move it more than
  3 px per frame (the fastest bounce); generated objects have ragged edges
  that shake the centroid by a pixel or two, so the bound is twice that;
- motion: "sliding left" moves the centroid at least 8 px left over the clip;
- blueprint: the final video at the blueprint's times (every 4th frame)
  stays within BLUEPRINT_PSNR_DB of the 6 fps blueprint: later stages keep
  the frames they were given, up to the VAE's round trip;
- guidance: the prompt's object covers more pixels with guidance 5 than
  with 1 (no guidance), over several seeds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from tempomaster.toy.showcase import QUICKSTART_PROMPT, generate_toy_video, load_backend

PRESENCE_BOUND = 0.9
JUMP_BOUND_PX = 6.0
MOTION_BOUND_PX = 8.0
BLUEPRINT_PSNR_DB = 24.0

CASES = (
    (QUICKSTART_PROMPT, 0),
    ("a blue square sliding left on a plain background", 1),
    ("a green triangle circling on a gradient background", 2),
)
SLIDING_LEFT = "a yellow ball sliding left on a gradient background"
GUIDANCE_SEEDS = (3, 4, 5)


def _runs(preset: str) -> dict:
    backend = load_backend(preset, threads=None)
    runs = {(prompt, seed): generate_toy_video(prompt, seed, backend=backend, preset=preset) for prompt, seed in CASES}
    runs[(SLIDING_LEFT, 0)] = generate_toy_video(SLIDING_LEFT, 0, backend=backend, preset=preset)
    for seed in GUIDANCE_SEEDS:
        for guidance in (1.0, 5.0):
            runs[("guidance", seed, guidance)] = generate_toy_video(
                "a red square sliding right on a striped background", seed, guidance, backend=backend, preset=preset
            )
    return {key: video.measure() for key, video in runs.items()}


@pytest.fixture(scope="module")
def toy():
    return _runs("toy")


@pytest.fixture(scope="module")
def tiny():
    return _runs("tiny")


def presence_ok(q) -> bool:
    return q.presence >= PRESENCE_BOUND


def smooth_ok(q) -> bool:
    return not math.isnan(q.max_jump) and q.max_jump <= JUMP_BOUND_PX


def blueprint_ok(q) -> bool:
    return q.blueprint_psnr >= BLUEPRINT_PSNR_DB


def guidance_ok(runs) -> bool:
    with_guidance = sum(runs[("guidance", s, 5.0)].object_pixels for s in GUIDANCE_SEEDS)
    without = sum(runs[("guidance", s, 1.0)].object_pixels for s in GUIDANCE_SEEDS)
    return with_guidance > without


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].split(" on ")[0])
def test_the_prompted_object_is_present(toy, case):
    q = toy[case]
    assert presence_ok(q), q


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].split(" on ")[0])
def test_the_object_moves_smoothly(toy, case):
    q = toy[case]
    assert smooth_ok(q), q


def test_sliding_left_moves_left(toy):
    q = toy[(SLIDING_LEFT, 0)]
    assert q.follows_motion, q
    assert q.displacement[0] <= -MOTION_BOUND_PX


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].split(" on ")[0])
def test_the_final_video_keeps_its_blueprint(toy, case):
    q = toy[case]
    assert blueprint_ok(q), q


def test_guidance_helps(toy):
    assert guidance_ok(toy), {k: v.object_pixels for k, v in toy.items() if k[0] == "guidance"}


def test_random_weights_fail_every_bound(tiny):
    """The same measurements on the random `tiny` preset: each bound rejects it."""
    cases = [tiny[c] for c in CASES]
    assert not any(presence_ok(q) for q in cases)
    assert not any(smooth_ok(q) for q in cases)
    assert not tiny[(SLIDING_LEFT, 0)].follows_motion
    assert not any(blueprint_ok(q) for q in cases)
    assert not guidance_ok(tiny)


def test_the_measurements_are_deterministic(toy):
    again = generate_toy_video(*CASES[0]).measure()
    assert again == toy[CASES[0]]
    assert np.isfinite(again.blueprint_psnr)
