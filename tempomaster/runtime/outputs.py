"""Where `tm-run generate` writes its videos, whether it may, and the summary it prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .request import Job
from .video import VIDEO_SUFFIXES, foreign_frames_folder, is_video_file, unsupported_suffix


def output_targets(out: Path, job_name: str, several: bool, num_stages: int) -> tuple[Path, list[Path]]:
    """(final video path, a path for each stage but the last) for `--out` as a video file or a directory.

    The last stage is the video itself: `--save-stages` does not write it twice.
    """
    if is_video_file(out):
        stem = f"{out.stem}_{job_name}" if several else out.stem
        final = out.with_name(stem + out.suffix)
        return final, [out.with_name(f"{stem}_stage{s}{out.suffix}") for s in range(num_stages - 1)]
    final = out / job_name
    return final, [out / f"{job_name}_stage{s}" for s in range(num_stages - 1)]


def check_writable(out: Path, targets: Sequence[Path] = ()) -> None:
    """Refuse an --out that cannot be written, before anything is computed; leaves nothing on disk.

    A PNG folder that exists is replaced only when tm-run wrote it; anything
    else there (a user's folder, a user's file in our folder) is refused.
    """
    suffix = unsupported_suffix(out)
    if suffix is not None:
        raise UsageError(
            f"--out {out}: tm-run does not write {suffix} files; give a path ending in "
            f"{' or '.join(VIDEO_SUFFIXES)}, or a directory for PNG frames"
        )
    is_file = is_video_file(out)
    if is_file and out.is_dir():
        raise UsageError(
            f"--out: {out} is an existing directory; give an {' or '.join(VIDEO_SUFFIXES)} path "
            f"or a directory without such a suffix"
        )
    if not is_file and out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory (accepted: a video file or a directory)")
    for target in targets:
        if is_file and target.is_dir():
            raise UsageError(f"--out: {target} is an existing directory, where a video would be written")
        problem = None if is_file else foreign_frames_folder(target)
        if problem is not None:
            raise UsageError(f"--out: {target} {problem}: refusing to replace it; move it away or choose another --out")
    from ..atomic_write import check_writable_folder

    check_writable_folder(out.parent if is_file else out)


@dataclass
class GenerateReport:
    lines: list[str]
    written: list[Path]


def _skipped(count: int, cached: bool) -> str:
    """The step cache's share of a summary line: the steps that reused a DiT output; nothing with the cache off."""
    return f", {count} skipped (step cache)" if cached else ""


def summarise(job: Job, result, written: list[Path], backend_name: str, write_seconds: float) -> str:
    video = result.video
    cached = getattr(job.request, "step_cache", None) is not None
    lines = [
        f"[{job.name}] {video.num_frames} frames {result.width}x{result.height} at {video.fps:g} fps -> {written[0]}",
    ]
    stage_files = list(written[1:]) + [written[0]] if len(written) > 1 else [None] * len(result.stages)
    for stage, path in zip(result.stages, stage_files):
        where = f" -> {path}" if path is not None else ""
        lines.append(
            f"  stage {stage.index}: interval {stage.interval}, {stage.num_frames} frames at {stage.fps:g} fps, "
            f"{stage.seconds:.2f} s, {stage.dit_calls} DiT calls (batch {stage.dit_batch})"
            f"{_skipped(stage.dit_skipped, cached)}{where}"
        )
    overhead = result.seconds - result.backend_seconds
    lines.append(
        f"  backend {backend_name}: {result.seconds:.2f} s total, {result.backend_seconds:.2f} s in backend calls, "
        f"{overhead:.2f} s runtime overhead ({100 * overhead / max(result.seconds, 1e-9):.1f}%), "
        f"writing {write_seconds:.2f} s"
    )
    lines.append(
        f"  DiT calls: {result.dit_calls}{_skipped(result.dit_skipped, cached)} "
        f"(the reference makes {result.reference_dit_calls} for these settings)"
    )
    return "\n".join(lines)
