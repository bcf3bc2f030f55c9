"""Stage planner against plans worked out by hand from SPEC 3.

Notation in comments: T = previous stage's frames, r = ratio, n = chunks,
L = ((T*r // n + 2) // 4) * 4 + 1, f = (L - 1) // 4 + 1.
Expected known frames are written as {local position: previous-stage frame}.
"""

import pytest
import torch

from tempomaster.planner import (
    chunk_length,
    gather_chunk_frames,
    latent_mask_from_pixel_mask,
    plan_stages,
    reference_output_size,
    round_num_frames,
    trim_stage_frames,
    validate_frame_intervals,
    validate_ref_frames,
    validate_run_config,
    validate_size,
    validate_stage_lists,
)


def known(chunk):
    return dict(chunk.known_frames)


def even_anchors(first_local, last_local, first_src):
    """{p: first_src + k} for p = first_local, first_local + 2, ..., last_local."""
    return {p: first_src + k for k, p in enumerate(range(first_local, last_local + 1, 2))}


def check_chunk_consistency(stage):
    for c in stage.chunks:
        assert len(c.sources) == c.num_frames == stage.chunk_frames
        assert c.pixel_mask.tolist() == [0.0 if s is None else 1.0 for s in c.sources]
        assert c.latent_mask.shape == (4, stage.latent_frames)
        assert torch.equal(c.latent_mask, latent_mask_from_pixel_mask(c.pixel_mask))
        assert all(s is None for s in c.sources[c.num_valid :])


# ---------------------------------------------------------------- 109 frames, [4, 2, 1]
def test_109_frames_4_2_1():
    s0, s1, s2 = plan_stages(109, [4, 2, 1])

    # Stage 0: one chunk of 109 frames = 28 latent frames, RoPE 0, 4, ..., 108.
    assert (s0.num_chunks, s0.chunk_frames, s0.latent_frames, s0.total_frames) == (1, 109, 28, 109)
    assert s0.trim_frames == 0 and s0.ratio == 1 and s0.prev_interval is None
    assert s0.chunks[0].rope_positions == tuple(range(0, 109, 4))
    assert known(s0.chunks[0]) == {}  # text-to-video: nothing known, mask all 0
    assert s0.chunks[0].latent_mask.sum() == 0

    # Stage 1: T = 109, r = 2 -> 218 frames, n = 2, L = (109 + 2)//4*4 + 1 = 109, f = 28.
    assert (s1.input_frames, s1.ratio, s1.total_frames) == (109, 2, 218)
    assert (s1.num_chunks, s1.chunk_frames, s1.latent_frames) == (2, 109, 28)
    assert s1.padded_frames == 218 and s1.trim_frames == 0
    c0, c1 = s1.chunks
    assert (c0.start, c1.start) == (0, 109)
    assert c0.padding == c1.padding == 0
    # chunk 0 = timeline 0..108: anchors at even positions F[0..54]; ends are anchors.
    assert known(c0) == even_anchors(0, 108, 0)
    # chunk 1 = timeline 109..217: 109 pinned to F[54]; timeline 110..216 (local
    # 1..107 odd) anchors F[55..108]; 217 pinned to F[217 // 2] = F[108].
    assert known(c1) == {0: 54, **even_anchors(1, 107, 55), 108: 108}
    # RoPE (c*28 + j)*2: chunk 0 at 0..54, chunk 1 at 56..110.
    assert c0.rope_positions == tuple(range(0, 55, 2))
    assert c1.rope_positions == tuple(range(56, 111, 2))

    # Stage 2: T = 218, r = 2 -> 436 frames (18 s at 24 fps), n = 4, L = 109, f = 28.
    assert (s2.input_frames, s2.total_frames, s2.num_chunks, s2.chunk_frames, s2.latent_frames) == (
        218,
        436,
        4,
        109,
        28,
    )
    assert s2.trim_frames == 0
    assert [c.start for c in s2.chunks] == [0, 109, 218, 327]
    assert known(s2.chunks[0]) == even_anchors(0, 108, 0)
    assert known(s2.chunks[1]) == {0: 54, **even_anchors(1, 107, 55), 108: 108}  # 109 -> F54, 217 -> F108
    assert known(s2.chunks[2]) == even_anchors(0, 108, 109)  # 218 = 2*109 ... 326 = 2*163
    assert known(s2.chunks[3]) == {0: 163, **even_anchors(1, 107, 164), 108: 217}  # 327 -> F163, 435 -> F217
    # RoPE c*28 + j: the 24 fps chunks tile 0..111 without the 1024 cap mattering.
    for c in range(4):
        assert s2.chunks[c].rope_positions == tuple(range(28 * c, 28 * c + 28))
    for s in (s0, s1, s2):
        check_chunk_consistency(s)

    # Each chunk is 28 x 30 x 52 = 43,680 tokens at 480x832.
    n, ch, f, h, w = s2.latent_shape(480, 832)
    assert (n, ch, f, h, w) == (4, 16, 28, 60, 104)
    assert f * (h // 2) * (w // 2) == 43_680


def test_stage1_latent_mask_pattern_109():
    # Stage 1 chunk 0: known at every even pixel frame.  Latent entry [k, j]
    # is m[0] for j = 0, else m[4j + k - 3]: odd for k = 0, 2 -> 0; even for
    # k = 1, 3 -> 1.
    s1 = plan_stages(109, [4, 2, 1])[1]
    expected = torch.tensor([[1] + [0] * 27, [1] * 28, [1] + [0] * 27, [1] * 28], dtype=torch.float32)
    assert torch.equal(s1.chunks[0].latent_mask, expected)
    assert s1.latent_masks().shape == (2, 4, 28)
    assert s1.pixel_masks().shape == (2, 109)


# ---------------------------------------------------------------- 109 frames, [4, 1]
def test_109_frames_4_1():
    s0, s1 = plan_stages(109, [4, 1])
    assert s0.chunks[0].rope_positions == tuple(range(0, 109, 4))
    # T = 109, r = 4 -> 436, n = 4, L = 109, f = 28.
    assert (s1.ratio, s1.total_frames, s1.num_chunks, s1.chunk_frames, s1.latent_frames) == (4, 436, 4, 109, 28)
    assert s1.trim_frames == 0
    assert [c.start for c in s1.chunks] == [0, 109, 218, 327]

    def every4(first_local, last_local, first_src):
        return {p: first_src + k for k, p in enumerate(range(first_local, last_local + 1, 4))}

    # chunk 0: 0..108, anchors 0, 4, ..., 108 -> F[0..27].
    assert known(s1.chunks[0]) == every4(0, 108, 0)
    # chunk 1: 109..217: 109 -> F[27]; 112..216 (local 3..107) -> F[28..54]; 217 -> F[54].
    assert known(s1.chunks[1]) == {0: 27, **every4(3, 107, 28), 108: 54}
    # chunk 2: 218..326: 218 -> F[54]; 220..324 (local 2..106) -> F[55..81]; 326 -> F[81].
    assert known(s1.chunks[2]) == {0: 54, **every4(2, 106, 55), 108: 81}
    # chunk 3: 327..435: 327 -> F[81]; 328..432 (local 1..105) -> F[82..108]; 435 -> F[108].
    assert known(s1.chunks[3]) == {0: 81, **every4(1, 105, 82), 108: 108}
    for c in range(4):
        assert s1.chunks[c].rope_positions == tuple(range(28 * c, 28 * c + 28))
    check_chunk_consistency(s1)


# ---------------------------------------------------------------- 109 frames, [2, 1]: padding + trim
def test_109_frames_2_1_pads_and_trims():
    s0, s1 = plan_stages(109, [2, 1])
    assert (s0.chunk_frames, s0.latent_frames) == (109, 28)
    assert s0.chunks[0].rope_positions == tuple(range(0, 55, 2))
    # T = 109, r = 2 -> 218, n = 4, 218 // 4 = 54, L = (56 // 4)*4 + 1 = 57, f = 15.
    # 4 * 57 = 228 frames decoded: 10 padding frames in the last chunk, trimmed.
    assert (s1.total_frames, s1.num_chunks, s1.chunk_frames, s1.latent_frames) == (218, 4, 57, 15)
    assert (s1.padded_frames, s1.trim_frames) == (228, 10)
    assert [c.start for c in s1.chunks] == [0, 57, 114, 171]
    assert [c.num_valid for c in s1.chunks] == [57, 57, 57, 47]
    assert [c.padding for c in s1.chunks] == [0, 0, 0, 10]
    # chunk 0: 0..56, anchors even -> F[0..28] (56 = 2*28 is both anchor and pin).
    assert known(s1.chunks[0]) == even_anchors(0, 56, 0)
    # chunk 1: 57..113: 57 -> F[28]; 58..112 (local 1..55 odd) -> F[29..56]; 113 -> F[56].
    assert known(s1.chunks[1]) == {0: 28, **even_anchors(1, 55, 29), 56: 56}
    # chunk 2: 114..170: anchors F[57..85], both ends are anchors.
    assert known(s1.chunks[2]) == even_anchors(0, 56, 57)
    # chunk 3: 171..217 valid (local 0..46), 218..227 padding.  171 -> F[85];
    # 172..216 (local 1..45 odd) -> F[86..108]; the chunk end runs past the
    # timeline, so the end pin goes on its last real frame 217 (local 46) -> F[108].
    assert known(s1.chunks[3]) == {0: 85, **even_anchors(1, 45, 86), 46: 108}
    assert s1.chunks[3].sources[47:] == (None,) * 10
    # RoPE c*15 + j: 0..14, 15..29, 30..44, 45..59.
    for c in range(4):
        assert s1.chunks[c].rope_positions == tuple(range(15 * c, 15 * c + 15))
    check_chunk_consistency(s1)


# ---------------------------------------------------------------- 81 frames, [4, 2, 1]
def test_81_frames_4_2_1():
    s0, s1, s2 = plan_stages(81, [4, 2, 1])
    # Stage 0: 81 frames = 21 latent frames at 0, 4, ..., 80.
    assert (s0.chunk_frames, s0.latent_frames) == (81, 21)
    assert s0.chunks[0].rope_positions == tuple(range(0, 81, 4))
    # Stage 1: 162 frames, n = 2, L = (81 + 2)//4*4 + 1 = 81, f = 21.
    assert (s1.total_frames, s1.num_chunks, s1.chunk_frames, s1.latent_frames, s1.trim_frames) == (162, 2, 81, 21, 0)
    assert [c.start for c in s1.chunks] == [0, 81]
    assert known(s1.chunks[0]) == even_anchors(0, 80, 0)
    assert known(s1.chunks[1]) == {0: 40, **even_anchors(1, 79, 41), 80: 80}  # 81 -> F40, 161 -> F80
    assert s1.chunks[0].rope_positions == tuple(range(0, 41, 2))
    assert s1.chunks[1].rope_positions == tuple(range(42, 83, 2))
    # Stage 2: 324 frames, n = 4, L = 81, f = 21.
    assert (s2.total_frames, s2.num_chunks, s2.chunk_frames, s2.latent_frames, s2.trim_frames) == (324, 4, 81, 21, 0)
    assert [c.start for c in s2.chunks] == [0, 81, 162, 243]
    assert known(s2.chunks[2]) == even_anchors(0, 80, 81)  # 162 = 2*81 ... 242 = 2*121
    assert known(s2.chunks[3]) == {0: 121, **even_anchors(1, 79, 122), 80: 161}  # 243 -> F121, 323 -> F161
    for c in range(4):
        assert s2.chunks[c].rope_positions == tuple(range(21 * c, 21 * c + 21))


# ---------------------------------------------------------------- stage 0 refs, rounding, pieces
def test_stage0_reference_frames_and_rounding():
    # 100 frames round up to 101 = 4*25 + 1; refs at frames 0 and 100.
    (s0,) = plan_stages(100, [4], {0: "first.png", 100: "last.png"})
    assert s0.chunk_frames == 101 and s0.latent_frames == 26
    assert known(s0.chunks[0]) == {0: 0, 100: 100}
    lm = s0.chunks[0].latent_mask
    # frame 0 -> whole latent column 0; frame 100 = 4*25 + 3 - 3 -> [3, 25].
    assert lm[:, 0].tolist() == [1, 1, 1, 1]
    assert lm[:, 25].tolist() == [0, 0, 0, 1]
    assert lm.sum() == 5
    with pytest.raises(ValueError, match="--image"):
        plan_stages(100, [4], {101})


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 5), (4, 5), (5, 5), (6, 9), (108, 109), (109, 109), (110, 113)])
def test_round_num_frames(n, expected):
    assert round_num_frames(n) == expected


def test_latent_mask_by_hand():
    m = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.float32)
    # [m0]*4 + m[1:] = 1111 0000 0101 -> rows of 4, transposed.
    expected = torch.tensor([[1, 0, 0], [1, 0, 1], [1, 0, 0], [1, 0, 1]], dtype=torch.float32)
    assert torch.equal(latent_mask_from_pixel_mask(m), expected)
    assert latent_mask_from_pixel_mask(torch.stack([m, 1 - m])).shape == (2, 4, 3)
    with pytest.raises(ValueError):
        latent_mask_from_pixel_mask(torch.zeros(8))


def test_chunk_length_grows_to_cover():
    assert chunk_length(218, 4) == 57
    # 39 frames in 4 chunks: the formula gives (9 + 2)//4*4 + 1 = 9, 36 < 39 -> 13.
    assert chunk_length(39, 4) == 13
    stages = plan_stages(13, [3, 1])
    assert stages[1].total_frames == 39 and stages[1].chunk_frames == 13
    # chunk 3 starts at 39: nothing but padding, so it is not decoded and nothing is trimmed
    assert [c.num_valid for c in stages[1].chunks] == [13, 13, 13, 0]
    assert len(stages[1].active_chunks) == 3 and stages[1].trim_frames == 0


def test_tiny_clip_has_fully_padded_chunks():
    # 1 frame at [2, 1]: 2 frames, 4 chunks of 1 frame; chunks 2, 3 are all padding.
    s1 = plan_stages(1, [2, 1])[1]
    assert (s1.total_frames, s1.chunk_frames, len(s1.active_chunks), s1.trim_frames) == (2, 1, 2, 0)
    assert [known(c) for c in s1.chunks] == [{0: 0}, {0: 0}, {}, {}]


def test_long_video_rope_past_1024():
    s = plan_stages(401, [4, 1])
    assert s[1].chunks[-1].rope_positions[-1] == 4 * 101 - 1  # 101 latent frames per chunk
    assert s[0].chunks[0].rope_positions[-1] == 400
    s = plan_stages(1201, [4, 2, 1])
    assert max(s[2].rope_table().flatten().tolist()) > 1024


def test_gather_and_trim():
    stages = plan_stages(109, [2, 1])
    s1 = stages[1]
    frames = torch.arange(109, dtype=torch.float32).view(1, 109, 1, 1).expand(3, 109, 2, 2)  # value = frame index
    cond = gather_chunk_frames(frames, s1)
    assert cond.shape == (4, 3, 57, 2, 2)
    for c in s1.chunks:
        for p, src in enumerate(c.sources):
            expected = 0.0 if src is None else float(src)
            assert torch.all(cond[c.index, :, p] == expected)
    decoded = torch.randn(3, 228, 2, 2)
    assert trim_stage_frames(decoded, s1).shape == (3, 218, 2, 2)
    with pytest.raises(ValueError):
        gather_chunk_frames(frames[:, :100], s1)
    with pytest.raises(ValueError):
        trim_stage_frames(decoded[:, :218], s1)


def test_reference_output_size():
    assert reference_output_size(480, 832, 480, 832) == (480, 832)
    # Square image: sqrt(480*832) = 631.95 -> 631.95/16 = 39.497 -> 39*16 = 624.
    assert reference_output_size(480, 832, 1000, 1000) == (624, 624)
    # Portrait image: height and width swap.
    assert reference_output_size(480, 832, 832, 480) == (832, 480)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("good", [[4, 2, 1], [4, 1], [2, 1], [4], [8, 4, 2, 1], [6, 3], [4, 2]])
def test_valid_intervals(good):
    assert validate_frame_intervals(good) == good


@pytest.mark.parametrize("bad", [[], [1, 2], [4, 4, 1], [4, 3], [3, 2, 1], [4, 0], [4, 2.0], [-2, -4]])
def test_invalid_intervals(bad):
    with pytest.raises(ValueError, match="--intervals"):
        validate_frame_intervals(bad)


def test_stage_lists():
    validate_stage_lists([4, 2, 1], [50, 32, 32], [5, 3, 3.5])
    with pytest.raises(ValueError, match="--steps"):
        validate_stage_lists([4, 2, 1], [50, 32], [5, 3, 3])
    with pytest.raises(ValueError, match="--shifts"):
        validate_stage_lists([4, 1], [50, 32], [5, 3, 3])
    with pytest.raises(ValueError, match="--steps"):
        validate_stage_lists([4, 1], [50, 0], [5, 3])
    with pytest.raises(ValueError, match="--shifts"):
        validate_stage_lists([4, 1], [50, 30], [5, 0])


def test_size_num_frames_refs():
    validate_size(480, 832)
    with pytest.raises(ValueError, match="--height"):
        validate_size(490, 832)
    with pytest.raises(ValueError, match="--width"):
        validate_size(480, 0)
    with pytest.raises(ValueError, match="--num-frames"):
        plan_stages(0, [4, 2, 1])
    with pytest.raises(ValueError, match="--image"):
        validate_ref_frames({-1}, 109)
    assert validate_ref_frames({0: "a", 108: "b"}, 109) == {0, 108}
    validate_run_config(109, 480, 832, [4, 2, 1], [50, 32, 32], [5, 3, 3], {0, 108})
    # Past 109 but within the rounded clip (110 -> 113) is fine.
    validate_run_config(110, 480, 832, [4, 1], [50, 32], [5, 3], {112})
    with pytest.raises(ValueError, match="--image"):
        validate_run_config(110, 480, 832, [4, 1], [50, 32], [5, 3], {113})
