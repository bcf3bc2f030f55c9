"""Next-frame-rate stage planner (SPEC 3): stages, chunks, anchors, masks, RoPE positions.

Pure functions of (num_frames, frame_intervals, reference frame indices): no
models, no pixels.  The pipeline reads a ``StagePlan`` per stage and does
what it says:

- stage 0 (largest interval): one chunk of ``num_frames`` frames, reference
  images placed at their frame indices;
- stage s > 0 with interval i and previous interval i' (ratio r = i'/i): the
  previous stage's T decoded frames F become a timeline of T*r frames, F[k]
  at k*r, cut into n = max(4 // i, 1) chunks of L frames; each chunk's first
  and last frame is pinned to F[pos // r]; the last chunk is padded to L and
  the padding is trimmed after decoding so the stage yields exactly T*r
  frames.

Frame positions in a ``ChunkPlan`` are local to the chunk (0..L-1) unless a
field says "stage timeline".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .limits import MAX_FRAME_INTERVAL, MAX_SIDE, MAX_STEPS_PER_STAGE, MAX_VIDEO_FRAMES

__all__ = [
    "VAE_TEMPORAL_FACTOR",
    "SIZE_MULTIPLE",
    "ChunkPlan",
    "StagePlan",
    "round_num_frames",
    "latent_frames",
    "num_chunks_for_interval",
    "chunk_length",
    "latent_mask_from_pixel_mask",
    "rope_positions",
    "plan_stages",
    "gather_chunk_frames",
    "chunk_condition_video",
    "trim_stage_frames",
    "reference_output_size",
    "validate_num_frames",
    "validate_frame_intervals",
    "validate_stage_lists",
    "validate_size",
    "validate_ref_frames",
    "validate_video_length",
    "validate_run_config",
    "video_frame_count",
]

VAE_TEMPORAL_FACTOR = 4  # pixel frames per latent frame (after the first)
SIZE_MULTIPLE = 16  # VAE 8x spatial compression times the DiT's 2x2 patch

# The tm-run options (tempomaster/cli.py) named in validation messages.
FLAG_NUM_FRAMES = "--num-frames"
FLAG_INTERVALS = "--intervals"
FLAG_STEPS = "--steps"
FLAG_SHIFTS = "--shifts"
FLAG_HEIGHT = "--height"
FLAG_WIDTH = "--width"
FLAG_REF = "--image"


# ---------------------------------------------------------------- plan types
@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of a stage: what goes into its condition video and where it sits.

    Fields:
        index:          chunk number c within the stage (its batch row).
        start:          position of its first frame on the stage timeline.
        num_frames:     L, pixel frames including padding (equal for all chunks).
        num_valid:      frames inside the stage's range; ``L - num_valid``
                        trailing frames are padding (only the last chunk has any).
        sources:        length L; entry p says which frame is placed at local
                        frame p: an index into the previous stage's decoded
                        frames (stage > 0) or a reference-image frame index
                        (stage 0, where it equals p); None for an empty frame.
        pixel_mask:     float32 ``[L]``: 1 where ``sources`` is not None.
        latent_mask:    float32 ``[4, f]``: ``pixel_mask`` folded as SPEC step 2
                        does (first frame repeated 4 times, then groups of 4);
                        broadcast it over (h, w) to get the 4 mask channels of y.
        rope_positions: length f: temporal RoPE position of each latent frame,
                        ``(c * f + j) * interval`` on the final-rate timeline.
    """

    index: int
    start: int
    num_frames: int
    num_valid: int
    sources: tuple[int | None, ...]
    pixel_mask: torch.Tensor
    latent_mask: torch.Tensor
    rope_positions: tuple[int, ...]

    @property
    def padding(self) -> int:
        """Trailing empty frames added so the chunk has L frames."""
        return self.num_frames - self.num_valid

    @property
    def known_frames(self) -> tuple[tuple[int, int], ...]:
        """``(local position, source index)`` for every known frame."""
        return tuple((p, s) for p, s in enumerate(self.sources) if s is not None)


@dataclass(frozen=True)
class StagePlan:
    """One stage of next-frame-rate generation.

    Fields:
        index:          stage number s (0 = lowest frame rate).
        interval:       frame interval i of this stage (24/i fps at save_fps 24).
        prev_interval:  the previous stage's interval i'; None for stage 0.
        ratio:          r = i' / i (frames per previous frame); 1 for stage 0.
        input_frames:   T, frames the previous stage produced; 0 for stage 0.
        total_frames:   frames this stage outputs after trimming (T * r; stage 0:
                        num_frames).
        num_chunks:     n, the DiT batch size of the stage.
        chunk_frames:   L, pixel frames per chunk (4k + 1).
        latent_frames:  f = (L - 1) // 4 + 1, latent frames per chunk.
        chunks:         the n ``ChunkPlan`` in timeline order.
    """

    index: int
    interval: int
    prev_interval: int | None
    ratio: int
    input_frames: int
    total_frames: int
    num_chunks: int
    chunk_frames: int
    latent_frames: int
    chunks: tuple[ChunkPlan, ...]

    @property
    def active_chunks(self) -> tuple[ChunkPlan, ...]:
        """The chunks holding at least one frame of the stage, a prefix of ``chunks``.

        A chunk of nothing but padding (e.g. [2,1] at 5 frames: 10 frames in 4
        chunks of 5) decodes to frames that are trimmed anyway, and no
        attention crosses chunks, so it never goes through the DiT or the VAE.
        """
        return tuple(c for c in self.chunks if c.num_valid > 0)

    @property
    def padded_frames(self) -> int:
        """Frames the active chunks decode to together (n_active * L)."""
        return len(self.active_chunks) * self.chunk_frames

    @property
    def trim_frames(self) -> int:
        """Frames to drop from the end of the concatenated decoded chunks."""
        return self.padded_frames - self.total_frames

    def latent_shape(self, height: int, width: int, channels: int = 16) -> tuple[int, int, int, int, int]:
        """Shape of the stage's noise / latents: ``[n, channels, f, height/8, width/8]``."""
        return (self.num_chunks, channels, self.latent_frames, height // 8, width // 8)

    def pixel_masks(self) -> torch.Tensor:
        """float32 ``[n, L]``: every chunk's pixel mask stacked."""
        return torch.stack([c.pixel_mask for c in self.chunks])

    def latent_masks(self, active_only: bool = False) -> torch.Tensor:
        """float32 ``[n, 4, f]``: every chunk's (or every active chunk's) latent mask stacked."""
        chunks = self.active_chunks if active_only else self.chunks
        return torch.stack([c.latent_mask for c in chunks])

    def rope_table(self, active_only: bool = False) -> torch.Tensor:
        """int64 ``[n, f]``: every chunk's (or every active chunk's) temporal RoPE positions."""
        chunks = self.active_chunks if active_only else self.chunks
        return torch.tensor([c.rope_positions for c in chunks], dtype=torch.int64)


# ---------------------------------------------------------------- small pieces
def round_num_frames(num_frames: int) -> int:
    """Round up to the next 4k + 1 (the causal VAE maps 4k + 1 frames to k + 1 latents)."""
    validate_num_frames(num_frames)
    return (num_frames + 2) // 4 * 4 + 1


def latent_frames(pixel_frames: int) -> int:
    """Latent frames for ``pixel_frames`` = 4k + 1 pixel frames: k + 1."""
    if pixel_frames < 1 or pixel_frames % VAE_TEMPORAL_FACTOR != 1:
        raise ValueError(f"pixel frame count must be 4k+1, got {pixel_frames}")
    return (pixel_frames - 1) // VAE_TEMPORAL_FACTOR + 1


def num_chunks_for_interval(interval: int) -> int:
    """n = max(4 // interval, 1): more chunks at higher frame rates (SPEC 3)."""
    return max(4 // interval, 1)


def chunk_length(total_frames: int, num_chunks: int) -> int:
    """L = ((total // n + 2) // 4) * 4 + 1, grown by 4 until n chunks cover ``total_frames``.

    The reference formula alone can fall short of the total when ``total`` is
    not a multiple of n (it cannot for the intervals the release documents,
    but e.g. [3, 1] at 13 frames gives 39 frames in 4 chunks of 9); the
    reference would then drop the tail.  We grow L instead.
    """
    length = (total_frames // num_chunks + 2) // 4 * 4 + 1
    while num_chunks * length < total_frames:
        length += VAE_TEMPORAL_FACTOR
    return length


def latent_mask_from_pixel_mask(pixel_mask: torch.Tensor) -> torch.Tensor:
    """Fold a pixel-frame mask ``[..., L]`` into the latent mask ``[..., 4, f]`` (SPEC 3 step 2).

    The first pixel frame owns a whole latent frame in the causal VAE, so its
    mask is repeated 4 times; the following frames fold in groups of 4.
    Entry ``[k, j]`` is ``mask[0]`` for j = 0 and ``mask[4j + k - 3]`` after.
    """
    length = pixel_mask.shape[-1]
    f = latent_frames(length)
    first = pixel_mask[..., :1].expand(*pixel_mask.shape[:-1], VAE_TEMPORAL_FACTOR)
    expanded = torch.cat([first, pixel_mask[..., 1:]], dim=-1)  # [..., 4f]
    return expanded.reshape(*pixel_mask.shape[:-1], f, VAE_TEMPORAL_FACTOR).transpose(-1, -2).contiguous()


def rope_positions(chunk_index: int, latent_frames_per_chunk: int, interval: int) -> tuple[int, ...]:
    """Temporal RoPE positions ``(c * f + j) * interval`` for j in 0..f-1 (SPEC 3 step 4).

    All stages share one timeline at the final rate, so stage 0 sits at 0, 4,
    8, ... for interval 4 and the interval-1 chunks tile it.  No upper limit
    (the reference's table stops at 1024).
    """
    base = chunk_index * latent_frames_per_chunk
    return tuple((base + j) * interval for j in range(latent_frames_per_chunk))


def _chunk(index, start, length, valid, sources, f, interval) -> ChunkPlan:
    mask = torch.tensor([0.0 if s is None else 1.0 for s in sources], dtype=torch.float32)
    return ChunkPlan(
        index=index,
        start=start,
        num_frames=length,
        num_valid=valid,
        sources=tuple(sources),
        pixel_mask=mask,
        latent_mask=latent_mask_from_pixel_mask(mask),
        rope_positions=rope_positions(index, f, interval),
    )


# ---------------------------------------------------------------- planning
def plan_stage0(num_frames: int, interval: int, ref_frames: Iterable[int] = ()) -> StagePlan:
    """Stage 0: one chunk of ``num_frames`` (4k + 1) frames, reference images at their indices."""
    refs = validate_ref_frames(ref_frames, num_frames)
    f = latent_frames(num_frames)
    sources = [p if p in refs else None for p in range(num_frames)]
    chunk = _chunk(0, 0, num_frames, num_frames, sources, f, interval)
    return StagePlan(
        index=0,
        interval=interval,
        prev_interval=None,
        ratio=1,
        input_frames=0,
        total_frames=num_frames,
        num_chunks=1,
        chunk_frames=num_frames,
        latent_frames=f,
        chunks=(chunk,),
    )


def plan_next_stage(index: int, input_frames: int, prev_interval: int, interval: int) -> StagePlan:
    """Stage ``index`` > 0: raise the frame rate of ``input_frames`` frames from ``prev_interval`` to ``interval``.

    Known frames on the stage timeline (T*r frames):
    - anchors: previous frame k at position k*r, for every k;
    - pins: each chunk's first and last frame get F[pos // r], the nearest
      known frame at or before them.  The last chunk's end runs past the
      timeline when it is padded; its pin then goes on the timeline's last
      real frame, T*r - 1, holding F[T - 1] -- exactly what the reference
      does (and what it does when chunks tile exactly, since its last frame
      is T*r - 1 anyway).  Padding frames are empty (mask 0) and trimmed.
    """
    ratio = prev_interval // interval
    total = input_frames * ratio
    n = num_chunks_for_interval(interval)
    length = chunk_length(total, n)
    f = latent_frames(length)

    def source_at(pos: int) -> int | None:
        return pos // ratio if pos % ratio == 0 else None

    chunks = []
    for c in range(n):
        start = c * length
        valid = max(0, min(length, total - start))
        sources: list[int | None] = [source_at(start + p) for p in range(valid)] + [None] * (length - valid)
        if valid > 0:
            sources[0] = start // ratio
            sources[valid - 1] = (start + valid - 1) // ratio
        chunks.append(_chunk(c, start, length, valid, sources, f, interval))
    return StagePlan(
        index=index,
        interval=interval,
        prev_interval=prev_interval,
        ratio=ratio,
        input_frames=input_frames,
        total_frames=total,
        num_chunks=n,
        chunk_frames=length,
        latent_frames=f,
        chunks=tuple(chunks),
    )


def plan_stages(
    num_frames: int,
    frame_intervals: Sequence[int],
    ref_frames: Iterable[int] = (),
) -> list[StagePlan]:
    """The whole plan: one ``StagePlan`` per interval, largest interval first.

    ``num_frames`` is rounded up to 4k + 1 first; ``ref_frames`` (a set, or a
    dict keyed by frame index) are stage-0 pixel frame indices in
    ``[0, rounded num_frames)``.  Each later stage plans on the previous
    stage's trimmed output, so every stage's input is exactly T frames.
    """
    intervals = validate_frame_intervals(frame_intervals)
    validate_video_length(num_frames, intervals)
    frames = round_num_frames(num_frames)
    stages = [plan_stage0(frames, intervals[0], ref_frames)]
    for s in range(1, len(intervals)):
        stages.append(plan_next_stage(s, stages[-1].total_frames, intervals[s - 1], intervals[s]))
    return stages


# ---------------------------------------------------------------- applying a plan to frames
def gather_chunk_frames(frames: torch.Tensor, stage: StagePlan) -> torch.Tensor:
    """Build the stage's condition videos from the previous stage's frames.

    ``frames``: ``[..., T, H, W]`` with time at dim -3 (e.g. ``[C, T, H, W]``),
    T = ``stage.input_frames``.  Returns ``[n, ..., L, H, W]``: zeros with
    each chunk's known frames copied in.
    """
    if stage.index == 0:
        raise ValueError("stage 0 conditions on reference images, not on previous frames")
    if frames.shape[-3] != stage.input_frames:
        raise ValueError(f"stage {stage.index} expects {stage.input_frames} input frames, got {frames.shape[-3]}")
    out = frames.new_zeros((stage.num_chunks, *frames.shape[:-3], stage.chunk_frames, *frames.shape[-2:]))
    for chunk in stage.chunks:
        for pos, src in chunk.known_frames:
            out[chunk.index, ..., pos, :, :] = frames[..., src, :, :]
    return out


def chunk_condition_video(frames: torch.Tensor, stage: StagePlan, chunk: ChunkPlan) -> torch.Tensor:
    """One chunk's condition video from the previous stage's frames ``[..., T, H, W]``: ``[..., L, H, W]``.

    Zeros with the chunk's known frames copied in; built one chunk at a time
    so a long video never holds every chunk's pixels at once.
    """
    if stage.index == 0:
        raise ValueError("stage 0 conditions on reference images, not on previous frames")
    if frames.shape[-3] != stage.input_frames:
        raise ValueError(f"stage {stage.index} expects {stage.input_frames} input frames, got {frames.shape[-3]}")
    out = frames.new_zeros((*frames.shape[:-3], stage.chunk_frames, *frames.shape[-2:]))
    for pos, src in chunk.known_frames:
        out[..., pos, :, :] = frames[..., src, :, :]
    return out


def trim_stage_frames(frames: torch.Tensor, stage: StagePlan) -> torch.Tensor:
    """Cut the concatenated decoded active chunks (time at dim -3) to ``stage.total_frames``.

    frames [..., padded_frames, H, W] (e.g. pixels [3, T, H, W]) -> [..., total_frames, H, W].

    The reference keeps the last chunk's padding frames; we drop them.
    """
    if frames.shape[-3] != stage.padded_frames:
        raise ValueError(f"stage {stage.index} decodes to {stage.padded_frames} frames, got {frames.shape[-3]}")
    return frames.narrow(-3, 0, stage.total_frames)


def reference_output_size(height: int, width: int, image_height: int, image_width: int) -> tuple[int, int]:
    """Output (height, width) with a reference image: area ``height*width``, the image's aspect ratio.

    Each side is rounded to the nearest multiple of 16 (Python ``round``, as
    the reference), and at least 16.
    """
    area = height * width
    aspect = image_height / image_width
    new_h = int(round(math.sqrt(area * aspect) / SIZE_MULTIPLE)) * SIZE_MULTIPLE
    new_w = int(round(math.sqrt(area / aspect) / SIZE_MULTIPLE)) * SIZE_MULTIPLE
    return max(new_h, SIZE_MULTIPLE), max(new_w, SIZE_MULTIPLE)


# ---------------------------------------------------------------- validation
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_num_frames(num_frames: int) -> int:
    if not _is_int(num_frames) or not 1 <= num_frames <= MAX_VIDEO_FRAMES:
        raise ValueError(
            f"{FLAG_NUM_FRAMES} must be an integer in [1, {MAX_VIDEO_FRAMES}] (rounded up to 4k+1), got {num_frames!r}"
        )
    return num_frames


def video_frame_count(num_frames: int, frame_intervals: Sequence[int]) -> int:
    """Frames of the finished video, by arithmetic alone: each stage multiplies the previous one's
    frames by its interval ratio, so stage 0's (4k + 1) frames x first interval / last interval."""
    return round_num_frames(num_frames) * frame_intervals[0] // frame_intervals[-1]


def validate_video_length(num_frames: int, frame_intervals: Sequence[int]) -> int:
    """The finished video's frame count, refused past ``MAX_VIDEO_FRAMES`` before anything is planned."""
    validate_frame_intervals(frame_intervals)
    frames = video_frame_count(num_frames, frame_intervals)
    if frames > MAX_VIDEO_FRAMES:
        raise ValueError(
            f"{FLAG_NUM_FRAMES} {num_frames} with {FLAG_INTERVALS} {','.join(map(str, frame_intervals))} makes a video "
            f"of {frames} frames; at most {MAX_VIDEO_FRAMES} are accepted"
        )
    return frames


def validate_frame_intervals(frame_intervals: Sequence[int]) -> list[int]:
    """Strictly descending positive integers, each dividing the one before (e.g. 4,2,1 / 4,1 / 2,1)."""
    accepted = "positive integers, strictly descending, each dividing the previous one (e.g. 4,2,1 or 4,1 or 2,1)"
    intervals = list(frame_intervals)
    if not intervals or not all(_is_int(i) and i >= 1 for i in intervals):
        raise ValueError(f"{FLAG_INTERVALS} must be {accepted}; got {intervals}")
    if max(intervals) > MAX_FRAME_INTERVAL:
        raise ValueError(f"{FLAG_INTERVALS} values must be at most {MAX_FRAME_INTERVAL}; got {intervals}")
    for prev, cur in zip(intervals, intervals[1:]):
        if not cur < prev or prev % cur != 0:
            raise ValueError(f"{FLAG_INTERVALS} must be {accepted}; got {intervals} ({prev} then {cur})")
    return intervals


def validate_stage_lists(
    frame_intervals: Sequence[int], steps_per_stage: Sequence[int], shift_per_stage: Sequence[float]
) -> None:
    """One positive step count and one positive shift per interval."""
    n = len(frame_intervals)
    steps, shifts = list(steps_per_stage), list(shift_per_stage)
    if len(steps) != n:
        raise ValueError(f"{FLAG_STEPS} needs one value per frame interval ({n}), got {len(steps)}: {steps}")
    if len(shifts) != n:
        raise ValueError(f"{FLAG_SHIFTS} needs one value per frame interval ({n}), got {len(shifts)}: {shifts}")
    if not all(_is_int(s) and 1 <= s <= MAX_STEPS_PER_STAGE for s in steps):
        raise ValueError(f"{FLAG_STEPS} must be integers in [1, {MAX_STEPS_PER_STAGE}], got {steps}")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in shifts):
        raise ValueError(f"{FLAG_SHIFTS} must be numbers > 0, got {shifts}")


def validate_size(height: int, width: int) -> None:
    for flag, value in ((FLAG_HEIGHT, height), (FLAG_WIDTH, width)):
        if not _is_int(value) or not SIZE_MULTIPLE <= value <= MAX_SIDE or value % SIZE_MULTIPLE != 0:
            raise ValueError(
                f"{flag} must be a positive multiple of {SIZE_MULTIPLE}, at most {MAX_SIDE}, got {value!r}"
            )


def validate_ref_frames(ref_frames: Iterable[int], num_frames: int) -> frozenset[int]:
    """Reference frame indices (a set or the keys of a dict) within ``[0, num_frames)``."""
    refs = frozenset(ref_frames)
    for idx in sorted(refs, key=repr):
        if not _is_int(idx) or not 0 <= idx < num_frames:
            raise ValueError(
                f"{FLAG_REF} frame index must be an integer in [0, {num_frames - 1}] "
                f"(the stage-0 clip has {num_frames} frames), got {idx!r}"
            )
    return refs


def validate_run_config(
    num_frames: int,
    height: int,
    width: int,
    frame_intervals: Sequence[int],
    steps_per_stage: Sequence[int],
    shift_per_stage: Sequence[float],
    ref_frames: Iterable[int] = (),
) -> None:
    """All the checks at once, before any model is loaded."""
    validate_num_frames(num_frames)
    validate_size(height, width)
    validate_video_length(num_frames, frame_intervals)
    validate_stage_lists(frame_intervals, steps_per_stage, shift_per_stage)
    validate_ref_frames(ref_frames, round_num_frames(num_frames))
