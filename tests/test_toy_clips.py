"""The toy's synthetic clips, its measurements, and that its training tasks are the runtime's own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tempomaster.planner import plan_stages
from tempomaster.runtime.video import to_uint8_frames
from tempomaster.toy.clips import (
    COLOURS,
    MOTIONS,
    all_captions,
    caption_vocabulary,
    object_centre,
    object_centroids,
    object_mask,
    parse_caption,
    render_clip,
    sample_clip_spec,
)
from tempomaster.toy.quality import blueprint_psnr, measure_video, psnr


def test_a_clip_is_a_function_of_its_seed():
    a, b = render_clip(sample_clip_spec(123)), render_clip(sample_clip_spec(123))
    assert torch.equal(a, b)
    assert not torch.equal(a, render_clip(sample_clip_spec(124)))
    assert a.shape == (3, 68, 64, 96) and a.dtype == torch.float32
    assert -1.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_render_start_offsets_the_same_motion():
    spec = sample_clip_spec(7)
    whole = render_clip(spec, 20)
    assert torch.equal(render_clip(spec, 8, start=12), whole[:, 12:20])


def test_captions_cover_the_grid_and_parse_back():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 4 * 3 * 6 * 3
    for text in captions:
        named = parse_caption(text)
        from tempomaster.toy.clips import caption

        assert caption(named["colour"], named["shape"], named["motion"], named["background"]) == text
    assert parse_caption("A Blue square, sliding left!") == {
        "colour": "blue",
        "shape": "square",
        "motion": "sliding left",
    }
    assert "circling" in caption_vocabulary() and "sliding" in caption_vocabulary()


def test_fixed_fields_pin_the_spec():
    spec = sample_clip_spec(5, colour="green", motion="sliding up", shape="triangle", background="striped")
    assert (spec.colour, spec.motion, spec.shape, spec.background) == ("green", "sliding up", "triangle", "striped")
    assert spec.caption == "a green triangle sliding up on a striped background"


@pytest.mark.parametrize("seed", range(12))
def test_object_mask_finds_the_rendered_ball_at_its_centre(seed):
    spec = sample_clip_spec(1000 + seed, shape="ball")
    frames = to_uint8_frames(render_clip(spec, 9))
    centroids = object_centroids(frames, spec.colour)
    for i in range(9):
        x, y = object_centre(spec, i)
        # the ball is symmetric: its mask's centroid is its centre, up to pixel coverage
        assert abs(centroids[i, 0] - (x - 0.5)) < 0.6 and abs(centroids[i, 1] - (y - 0.5)) < 0.6
        area = math.pi * spec.half_size**2
        assert 0.6 * area < object_mask(frames[i : i + 1], spec.colour).sum() < 1.3 * area
    for other in COLOURS:
        if other != spec.colour:
            assert object_mask(frames, other).sum() == 0  # greys and the other colours never match


def test_training_clips_are_smooth_and_follow_their_captions():
    """The figures the quality thresholds are set from: 24 fps centroid steps of 3 px at most, motion as captioned."""
    jumps = []
    for seed in range(60):
        spec = sample_clip_spec(2000 + seed, motion=MOTIONS[seed % len(MOTIONS)])
        q = measure_video(to_uint8_frames(render_clip(spec)), spec.caption)
        assert q.presence == 1.0
        assert q.follows_motion in (None, True)
        jumps.append(q.max_jump)
    assert max(jumps) <= 3.0


@pytest.mark.parametrize("motion", MOTIONS)
def test_a_caption_names_one_path(motion):
    """Clips of one motion follow one path up to a few pixels, start to end, and stay inside the frame."""
    tracks = []
    for seed in range(100):
        spec = sample_clip_spec(3000 + seed, motion=motion)
        track = np.array([object_centre(spec, t) for t in range(68)])  # [68, (x, y)]
        r = spec.half_size
        assert (track[:, 0] >= r).all() and (track[:, 0] <= spec.width - r).all()
        assert (track[:, 1] >= r).all() and (track[:, 1] <= spec.height - r).all()
        tracks.append(track)
    tracks = np.stack(tracks)
    spread = np.linalg.norm(tracks - tracks.mean(axis=0), axis=-1)  # each clip's distance from the mean path
    assert np.percentile(spread, 95) <= 8.0, np.percentile(spread, 95)
    assert np.linalg.norm(tracks.mean(axis=0)[1:] - tracks.mean(axis=0)[:-1], axis=-1).sum() >= 30.0  # the path moves


def test_measure_video_on_a_video_without_the_object():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, size=(10, 64, 96, 1), dtype=np.uint8), 3, axis=-1)
    q = measure_video(grey, "a red ball sliding left on a plain background")
    assert q.presence == 0.0 and math.isnan(q.max_jump) and q.follows_motion is False


def test_psnr_by_hand():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # one pixel of 96 off by 255: mse = 255^2 / 96
    assert psnr(a, b) == pytest.approx(10 * math.log10(96))
    final = np.stack([np.full((4, 4, 3), v, np.uint8) for v in range(8)])
    assert blueprint_psnr(final, final[::4], 4) == float("inf")


@pytest.mark.parametrize("round_trip", [False, True])
def test_training_tasks_are_what_the_runtime_builds(round_trip):
    """y of every task as the trainer builds it equals pipeline.condition_latents' y for the runtime's own
    condition videos: on the ground truth's frames, or on the frames `decode_stage` makes of the stage above's
    target latents (what the runtime would condition on had the DiT produced exactly those)."""
    from tempomaster.planner import chunk_condition_video
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import BackendClock, condition_latents, decode_stage, stage0_condition_video
    from tempomaster.toy.config import INTERVALS, STAGE0_FRAMES, build_untrained_toy
    from tempomaster.toy.dit_stage import condition_input
    from tempomaster.toy.tasks import build_clip_tasks, object_latent_cover

    backend = TorchBackend(build_untrained_toy(3))
    clips = [render_clip(sample_clip_spec(99)), render_clip(sample_clip_spec(7))]
    references = [True, False]
    stages_of = [plan_stages(STAGE0_FRAMES, INTERVALS, {0} if r else ()) for r in references]
    rows = build_clip_tasks(
        backend, clips, [np.random.default_rng(s) for s in (0, 1)], references, [round_trip] * 2, encode_batch=3
    )
    assert rows["stage"].tolist() == [0, 0, 1, 1, 2, 2] and rows["clip"].tolist() == [0, 1] * 3
    clock = BackendClock()
    for i, clip in enumerate(clips):
        previous = above = None
        for s, row in ((s, 2 * s + i) for s in range(len(INTERVALS))):
            plan = stages_of[i][s]
            chunk = next(
                c
                for c in plan.chunks
                if torch.equal(c.latent_mask, rows["mask"][row])
                and list(c.rope_positions) == rows["rope"][row].tolist()
            )
            timeline = clip[:, :: plan.interval]
            target = timeline[:, chunk.start : chunk.start + plan.chunk_frames]
            torch.testing.assert_close(rows["x0"][row], backend.vae_encode(target[None])[0].half(), rtol=0, atol=2e-3)
            assert torch.equal(rows["object"][row], object_latent_cover(target))
            if s == 0:
                videos = [stage0_condition_video(plan, {0: clip[:, 0]} if references[i] else {}, 64, 96)]
            else:
                # stage 2's chunk takes all its known frames from the stage-1 chunk trained on
                assert above is not None and all(
                    above.start <= src < above.start + above.num_valid for _, src in chunk.known_frames
                )
                videos = [chunk_condition_video(previous, plan, c)[None] for c in plan.active_chunks]
            y = condition_latents(backend, videos, plan, clock)
            mine = condition_input(rows["mask"][row][None], rows["cond"][row][None].float())
            torch.testing.assert_close(mine[0], y[chunk.index], rtol=0, atol=2e-3)  # float16 storage
            # the frames the next stage conditions on
            previous = timeline.clone()
            if round_trip:
                decoded = decode_stage(backend, backend.vae_encode(target[None]), _one_chunk_stage(plan, chunk), clock)
                assert not torch.equal(decoded, target[:, : chunk.num_valid])
                previous[:, chunk.start : chunk.start + chunk.num_valid] = decoded
            above = chunk


def _one_chunk_stage(plan, chunk):
    """A stage plan of ``chunk`` alone, so `decode_stage` decodes and trims just that chunk."""
    from dataclasses import replace

    return replace(plan, chunks=(chunk,), total_frames=chunk.num_valid)


def test_object_latent_cover_by_hand():
    """A 3x3-pixel red square on grey: in frame 0 at pixels (10..12, 20..22), in frames 5-8 (latent frame 2)
    at (40..42, 60..62) in frame 7 only. Latent pixel (h, w) holds pixels (8h..8h+7, 8w..8w+7); a covered
    latent pixel and its 8 neighbours count."""
    from tempomaster.toy.tasks import object_latent_cover

    frames = torch.full((3, 17, 64, 96), -0.2)
    frames[:, :, ::2, ::3] = 0.4  # grey texture, no colour
    red = torch.tensor([0.8, -0.7, -0.7])[:, None, None]
    frames[:, 0, 10:13, 20:23] = red  # latent (1, 2)
    frames[:, 7, 40:43, 60:63] = red  # latent (5, 7)
    cover = object_latent_cover(frames)
    expected = torch.zeros(5, 8, 12, dtype=torch.bool)
    expected[0, 0:3, 1:4] = True
    expected[2, 4:7, 6:9] = True
    assert torch.equal(cover, expected)
    frames[:, 0, 14:17, 20:23] = red  # rows 14..16 cross into latent row 2
    expected[0, 0:4, 1:4] = True
    assert torch.equal(object_latent_cover(frames), expected)


def test_largest_blob_by_hand():
    from tempomaster.toy.clips import largest_blob

    mask = np.zeros((6, 8), bool)
    mask[0, 0] = True  # a speck
    mask[2:5, 3:6] = True  # a 3x3 block
    mask[5, 6] = True  # touches the block diagonally: 8-connected, so part of it
    blob = largest_blob(mask)
    assert blob.sum() == 10 and not blob[0, 0] and blob[5, 6]
    assert largest_blob(np.zeros((3, 3), bool)).sum() == 0
