"""Lifting a user's video: its frames become a stage's output, and the later stages fill in between.

`tm-run upsample --video in.mp4 --prompt "..."` reads the video (ffmpeg,
through imageio-ffmpeg), resizes and crops every frame to the model's shape
as reference images are (pipeline.cover_resize_center_crop), and takes its
frame rate as one of the build's stage rates (save_fps / interval: 6 and 12
fps at 24): a 6 fps clip is stage 0's output and goes through stages 1 and
2, a 12 fps clip through stage 2. Any other rate is resampled (nearest
frame in time) to the nearest stage rate, said in one line. A stage's input
is 4k + 1 frames (the VAE's causal frame rule), so the last 0..3 input
frames past that are dropped, also said; the output has (frames kept) x
(input interval / output interval) frames, the last ratio - 1 of them after
the last input frame (each chunk's end is pinned to the last known frame).

Every refusal comes before any model loads: not a video, no frames, a rate
that maps to no stage below the output's, and a clip too long for the
memory check.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError

FLAG_VIDEO = "--video"
MIN_INPUT_FRAMES = 5  # one latent frame past the first: the shortest clip a later stage lifts
RATE_TOLERANCE = 2e-3  # relative: 5.994 fps (NTSC's 1000/1001) is taken as 6 without resampling
MAX_PROBE_SECONDS = 60.0


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float
    width: int
    height: int
    frames: int


@dataclass(frozen=True)
class RateMap:
    """How an input rate enters the build's stages."""

    stage: int  # the stage whose output the input becomes (its interval: intervals[stage])
    stage_fps: float
    resampled: bool
    note: str | None  # the one line said when the input is resampled


# ----------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------


def stage_rates(save_fps: float, intervals: Sequence[int]) -> list[float]:
    return [save_fps / i for i in intervals]


def map_rate(fps: float, save_fps: float, intervals: Sequence[int], where: str = FLAG_VIDEO) -> RateMap:
    """The stage an input at `fps` stands for: the stage rate nearest in ratio; refused when that is the
    output's own rate (nothing to lift) or the input is slower than half the lowest stage rate."""
    rates = stage_rates(save_fps, intervals)
    liftable = ", ".join(f"{r:g}" for r in rates[:-1])
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise UsageError(
            f"{where}: the video declares no usable frame rate ({fps!r}); stage rates it can lift: {liftable} fps"
        )
    if fps < rates[0] / 2:
        raise UsageError(
            f"{where}: {fps:g} fps is below half the lowest stage rate ({rates[0]:g} fps): "
            f"no stage maps to it (accepted: about {liftable} fps)"
        )
    stage = min(range(len(rates)), key=lambda s: abs(math.log(fps / rates[s])))
    if stage == len(rates) - 1:
        raise UsageError(
            f"{where}: {fps:g} fps is nearest the output's own {rates[-1]:g} fps: there is nothing to lift "
            f"(accepted: about {liftable} fps)"
        )
    exact = abs(fps / rates[stage] - 1) <= RATE_TOLERANCE
    note = (
        None
        if exact
        else f"{where}: {fps:g} fps resampled to {rates[stage]:g} fps (nearest frame in time), the nearest stage rate"
    )
    return RateMap(stage, rates[stage], not exact, note)


def resample_indices(num_frames: int, fps: float, target_fps: float) -> list[int]:
    """Input frame indices for an even `target_fps` timeline over the clip: frame k at time k / target_fps
    takes the input frame nearest in time, up to the last input frame's time."""
    if num_frames < 1:
        return []
    duration = (num_frames - 1) / fps
    count = int(math.floor(duration * target_fps + 1e-9)) + 1
    return [min(num_frames - 1, int(math.floor(k * fps / target_fps + 0.5))) for k in range(count)]


def usable_frames(count: int) -> int:
    """The most frames of the form 4k + 1 within `count` (0 below 1)."""
    return 0 if count < 1 else (count - 1) // 4 * 4 + 1


def output_stage(to_fps: float | None, rates: Sequence[float], first: int) -> int:
    """The stage whose rate `--to-fps` asks for (default: the last); it must come after stage `first`."""
    if to_fps is None:
        return len(rates) - 1
    for s in range(first + 1, len(rates)):
        if abs(to_fps / rates[s] - 1) <= RATE_TOLERANCE:
            return s
    offered = ", ".join(f"{r:g}" for r in rates[first + 1 :])
    raise UsageError(f"--to-fps {to_fps:g}: this input lifts to {offered} fps")


# ----------------------------------------------------------------------------
# Reading the video
# ----------------------------------------------------------------------------


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_video(path: Path) -> VideoInfo:
    """Frame rate, size and frame count of `path` (ffmpeg's header, then a decode count); one-line refusals."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{FLAG_VIDEO}: {path} is not a file")
    try:
        info = subprocess.run(
            [_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
            capture_output=True,
            timeout=MAX_PROBE_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise UsageError(f"{FLAG_VIDEO}: {path}: ffmpeg did not read its header in {MAX_PROBE_SECONDS:g} s") from None
    text = info.stderr.decode("utf-8", "replace")
    if "Input #0" not in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        why = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1]) if lines else "no message"
        raise UsageError(f"{FLAG_VIDEO}: {path} is not a video ffmpeg can read ({why})")
    stream = re.search(r"Stream #\S+.*?: Video: (.*)", text)
    if stream is None:
        raise UsageError(f"{FLAG_VIDEO}: {path} holds no video stream: no frames to lift")
    size = re.search(r"\b(\d{1,6})x(\d{1,6})\b", stream.group(1))
    rate = re.search(r"([\d.]+)(k?) fps", stream.group(1)) or re.search(r"([\d.]+)(k?) tbr", stream.group(1))
    fps = float(rate.group(1)) * (1000 if rate.group(2) else 1) if rate else float("nan")
    frames = _count_frames(path)
    if frames == 0 or size is None:
        raise UsageError(f"{FLAG_VIDEO}: {path} holds no frames")
    return VideoInfo(path, fps, int(size.group(1)), int(size.group(2)), frames)


def _count_frames(path: Path) -> int:
    import imageio_ffmpeg

    try:
        frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError, ValueError):
        return 0
    return int(frames)


def read_frames(path: Path, indices: Sequence[int], height: int, width: int):
    """float32 [3, len(indices), H, W] in [-1, 1]: the input frames at `indices` (ascending, repeats allowed),
    each resized and cropped to H x W as reference images are; decoding stops after the last one needed."""
    import imageio_ffmpeg
    import numpy as np
    import torch
    from PIL import Image

    from .pipeline import cover_resize_center_crop

    out = torch.empty(3, len(indices), height, width)
    wanted: dict[int, list[int]] = {}
    for k, index in enumerate(indices):
        wanted.setdefault(index, []).append(k)
    last = max(indices)
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        w, h = meta["size"]
        for i, buf in enumerate(reader):
            if i in wanted:
                frame = cover_resize_center_crop(
                    Image.fromarray(np.frombuffer(buf, np.uint8).reshape(h, w, 3)), height, width
                )
                for k in wanted[i]:
                    out[:, k] = frame
            if i >= last:
                break
        else:
            raise UsageError(f"{FLAG_VIDEO}: {path} ended after {i + 1 if wanted else 0} frames, before frame {last}")
    except OSError as err:
        raise UsageError(f"{FLAG_VIDEO}: cannot decode {path} ({str(err).splitlines()[0]})") from None
    finally:
        reader.close()
    return out


# ----------------------------------------------------------------------------
# The request
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LiftPlan:
    """What upsample runs: the request (stages from the input's on), the input frames to read, the stop."""

    request: object  # GenerationRequest whose stage 0 is the input's stage
    indices: tuple[int, ...]  # input frames, in order, that become the first stage's output
    stop_after: int  # the last stage to run, in the request's numbering
    rate: RateMap
    dropped: int  # frames past the last 4k + 1


def plan_lift(full_request, info: VideoInfo, to_fps: float | None) -> LiftPlan:
    """The later stages of `full_request` (the build's intervals, steps, shifts) with the input as the
    output of the stage its rate maps to."""
    intervals = tuple(full_request.frame_intervals)
    rate = map_rate(info.fps, full_request.save_fps, intervals)
    indices = resample_indices(info.frames, info.fps, rate.stage_fps) if rate.resampled else list(range(info.frames))
    keep = usable_frames(len(indices))
    if keep < MIN_INPUT_FRAMES:
        raise UsageError(
            f"{FLAG_VIDEO}: {info.path} has {len(indices)} frame(s) at {rate.stage_fps:g} fps; "
            f"at least {MIN_INPUT_FRAMES} are needed"
        )
    last = output_stage(to_fps, stage_rates(full_request.save_fps, intervals), rate.stage)
    k = rate.stage
    request = replace(
        full_request,
        num_frames=keep,
        frame_intervals=intervals[k:],
        steps_per_stage=tuple(full_request.steps_per_stage)[k:],
        shift_per_stage=tuple(full_request.shift_per_stage)[k:],
        ref_images={},
    )
    try:
        request.validate()
    except ValueError as err:
        raise UsageError(f"{FLAG_VIDEO}: {info.path}: {err}") from None
    return LiftPlan(request, tuple(indices[:keep]), last - k, rate, len(indices) - keep)


def lift(backend, tokenizer, plan: LiftPlan, frames, progress: bool = False, keep_stages: bool = False):
    """Run the stages after the input's: the pipeline resumed with the input frames as stage 0's output."""
    from .pipeline import StageResume, generate

    return generate(
        backend,
        tokenizer,
        plan.request,
        progress=progress,
        keep_stages=keep_stages,
        stop_after=plan.stop_after,
        resume=StageResume(0, frames),
    )


# ----------------------------------------------------------------------------
# tm-run upsample
# ----------------------------------------------------------------------------


@dataclass
class UpsampleOptions:
    """`tm-run upsample`: the video, the target rate, and generate's options for the rest (prompt, model,
    steps per build stage, seed, device, --out)."""

    video: Path
    to_fps: float | None
    generate: object  # GenerateOptions; its num_frames, images and prompts are not used


def run_upsample(options: UpsampleOptions, echo=print):
    """Check everything (the output, the video, its rate, the memory), then load the models and lift it."""
    import time

    from .backends.factory import backend_factory
    from .memory import check_fits, check_video_fits, estimate_peak_memory
    from .outputs import GenerateReport, check_writable, output_targets, summarise
    from .request import Job, available_cores, build_jobs, preset_defaults, resolve_device, resolve_dtype
    from .video import write_result

    gen = options.generate
    if gen.prompts is not None or gen.images:
        raise UsageError("upsample lifts one video with one --prompt: --prompts and --image are not taken")
    defaults, preset, manifest = preset_defaults(gen)
    (job,) = build_jobs(gen, defaults)
    info = probe_video(options.video)
    plan = plan_lift(job.request, info, options.to_fps)
    stages_run = plan.stop_after + 1
    final, stage_paths = output_targets(gen.out, job.name, False, stages_run)
    # the first stage is the input itself: --save-stages writes the stages made here, before the last
    made = stage_paths[1:] if gen.save_stages else []
    check_writable(gen.out, [final, *made])
    where = f"{FLAG_VIDEO} {info.path} ({len(plan.indices)} frames at {plan.rate.stage_fps:g} fps)"
    device = resolve_device(gen.device)
    runs_graphs = manifest is not None and gen.backend != "torch"
    dtype = resolve_dtype(gen, device, manifest.precision if runs_graphs else None)
    check_video_fits(plan.request, where=where)
    check_fits(estimate_peak_memory(preset, plan.request, dtype=dtype, device=device, manifest=manifest), where=where)
    if plan.rate.note:
        echo(plan.rate.note)
    if plan.dropped:
        echo(
            f"{FLAG_VIDEO}: a stage's input is 4k + 1 frames: the last {plan.dropped} of {len(plan.indices) + plan.dropped} dropped"
        )

    import torch

    threads = gen.threads or available_cores()
    torch.set_num_threads(threads)
    frames = read_frames(info.path, plan.indices, plan.request.height, plan.request.width)
    backend, tokenizer = backend_factory(gen, dtype, threads)(torch.device(device))
    if hasattr(backend, "check_request"):
        backend.check_request(
            plan.request.height, plan.request.width, plan.request.num_frames, plan.request.frame_intervals
        )
    result = lift(backend, tokenizer, plan, frames, progress=gen.progress, keep_stages=gen.save_stages)
    start = time.perf_counter()
    written = write_result(result, final, made, gen.save_stages)
    lifted = Job(name=job.name, request=plan.request)
    text = summarise(lifted, result, written, backend.name, time.perf_counter() - start)
    text += f"\n  lifted {len(plan.indices)} input frames at {plan.rate.stage_fps:g} fps from {info.path}"
    echo(text)
    return GenerateReport(lines=[text], written=written)
