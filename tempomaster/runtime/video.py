"""Writing videos: H.264 mp4 through imageio-ffmpeg's ffmpeg, an animated GIF, or lossless PNG frames.

Every writer puts everything under a temporary name beside the target and
renames it into place at the end (tempomaster.atomic_write), so a failed run
(a full disk, ffmpeg failing) never leaves a broken or half-overwritten video:
the previous one stays, and the command stops with one line (OutputError).
A PNG folder is replaced only when tm-run wrote it (its marker file), so a
user's files are never deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..atomic_write import fsync_file, new_staging_dir, output_error, staged_file, swap_in_dir
from ..errors import OutputError


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 as the release: clip((x + 1) * 127.5, 0, 255), truncated.

    Truncated toward zero, not rounded (SPEC 3 step 5): rounding makes about
    half the pixels one level brighter than the release's.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, T, H, W] video, got {tuple(video.shape)}")
    x = ((video.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # float -> uint8 truncates
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


# What `--out` may name: a video file by its suffix, else a folder of PNG frames.
VIDEO_SUFFIXES = (".mp4", ".gif")
# Picture and video suffixes tm-run cannot write: refused, rather than taken as a folder's name.
UNSUPPORTED_SUFFIXES = frozenset(
    {
        ".apng",
        ".avi",
        ".avif",
        ".bmp",
        ".flv",
        ".h264",
        ".h265",
        ".hevc",
        ".jpeg",
        ".jpg",
        ".m2ts",
        ".m4v",
        ".mjpeg",
        ".mkv",
        ".mov",
        ".mpeg",
        ".mpg",
        ".mts",
        ".ogv",
        ".png",
        ".tif",
        ".tiff",
        ".ts",
        ".webm",
        ".webp",
        ".wmv",
        ".y4m",
    }
)

# Written into every PNG folder tm-run makes: only a folder holding it (and nothing but frames) is replaced.
FRAMES_MARKER = ".tm-run-frames.json"
FRAMES_FORMAT = "tempomaster-png-frames"
_FRAME_NAME = re.compile(r"[0-9]{5}\.png")


def is_video_file(path: str | os.PathLike) -> bool:
    """True when `path` names a video file (.mp4, .gif), False for a folder of PNG frames."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def unsupported_suffix(path: str | os.PathLike) -> str | None:
    """The suffix of a picture or video format tm-run does not write, else None."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in UNSUPPORTED_SUFFIXES else None


def foreign_frames_folder(folder: str | os.PathLike) -> str | None:
    """Why the existing `folder` may not be replaced (not one tm-run wrote), or None when it may.

    Ours: a real folder with our marker, holding nothing but the marker and
    frames 00000.png... A file the user put there makes it theirs as well.
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        return None
    if folder.is_symlink() or not folder.is_dir():
        return "exists and is not a folder tm-run wrote"
    marker = folder / FRAMES_MARKER
    try:
        ours = json.loads(marker.read_text(encoding="utf-8")).get("format") == FRAMES_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        return f"exists and holds no {FRAMES_MARKER} of tm-run's, so tm-run did not write it"
    others = sorted(p.name for p in folder.iterdir() if p.name != FRAMES_MARKER and not _is_frame_file(p))
    if others:
        return f"holds files tm-run did not write ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    return None


def _is_frame_file(path: Path) -> bool:
    return bool(_FRAME_NAME.fullmatch(path.name)) and path.is_file() and not path.is_symlink()


def _remove_frames_folder(folder: Path) -> None:
    """Delete what tm-run wrote in `folder` (marker and frames), then the folder if that left it empty."""
    for path in folder.iterdir():
        if path.name == FRAMES_MARKER or _is_frame_file(path):
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else appeared there: not ours to delete


def _ffmpeg_command(size: tuple[int, int], fps: float, quality: int, path: str) -> list[str]:
    """imageio-ffmpeg's own write_frames command: raw RGB on stdin -> H.264 yuv420p."""
    import imageio_ffmpeg

    w, h = size
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-f",
        "rawvideo",
        "-vcodec",
        "rawvideo",
        "-s",
        f"{w}x{h}",
        "-pix_fmt",
        "rgb24",
        "-r",
        str(Fraction(fps).limit_denominator()),
        "-i",
        "-",
        "-an",
        "-vcodec",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        str(int((1 - quality / 10.0) * 51)),
    ]
    if w % 2 or h % 2:  # yuv420p needs even sides: scale up to whole macro blocks, as imageio-ffmpeg does
        cmd += ["-vf", f"scale={-(-w // 16) * 16}:{-(-h // 16) * 16}"]
    return cmd + ["-v", "error", path]


def _encode_mp4(frames: np.ndarray, tmp: Path, fps: float, quality: int) -> str | None:
    """Run ffmpeg into `tmp`; None on success, else its last error line.

    ffmpeg runs here rather than through imageio_ffmpeg.write_frames, which
    ignores ffmpeg's exit code (a full disk while writing the trailer passed
    as success) and lets ffmpeg print straight onto the user's terminal.
    """
    t, h, w, _ = frames.shape
    cmd = _ffmpeg_command((w, h), fps, quality, str(tmp))
    # its own session: Ctrl-C reaches tm-run alone, which stops ffmpeg below
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, err = proc.communicate(memoryview(np.ascontiguousarray(frames)).cast("B"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        return None
    # ffmpeg's last line says why ("Error closing file: No space left on device"), after a "[out#0/mp4 @ 0x...]" tag
    lines = [re.sub(r"^\[[^\]]*\]\s*", "", line.strip()) for line in err.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return f"ffmpeg failed (exit code {proc.returncode}): {lines[-1] if lines else 'no message'}"


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float, quality: int = 8) -> Path:
    """H.264 (yuv420p) mp4 at `fps`; frames [T, H, W, 3] uint8. A failure keeps the previous file (OutputError)."""
    path = Path(path)
    with staged_file(path, suffix=".mp4") as tmp:  # ffmpeg picks the container by the suffix
        failure = _encode_mp4(frames, tmp, fps, quality)
        if failure is not None:
            raise output_error(path, failure)
    return path


def write_gif(frames: np.ndarray, path: str | os.PathLike, fps: float) -> Path:
    """An animated GIF (Pillow; 256 colours a frame, looping) at `fps`, to the GIF's 10 ms resolution."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(frame) for frame in frames]
    with staged_file(path, suffix=".gif") as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0)
    return path


def write_png_frames(frames: np.ndarray, folder: str | os.PathLike, fps: float | None = None) -> Path:
    """Lossless frames 00000.png, 00001.png, ... in `folder`, with the marker that makes it tm-run's.

    Written into a fresh folder beside it, then swapped in; an existing folder
    is replaced only when it is one tm-run wrote (`foreign_frames_folder`),
    and only its frames and marker are then deleted.
    """
    from PIL import Image

    folder = Path(folder)
    problem = foreign_frames_folder(folder)
    if problem is not None:
        raise OutputError(f"{folder} {problem}: refusing to replace it; move it away or choose another --out")
    staging = new_staging_dir(folder)
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(staging / f"{i:05d}.png")
        marker = {"format": FRAMES_FORMAT, "format_version": 1, "frames": len(frames), "fps": fps}
        (staging / FRAMES_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        for path in staging.iterdir():
            fsync_file(path)
        aside = swap_in_dir(staging, folder)
    except OSError as err:
        raise output_error(folder, err) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # our own fresh folder, never the user's
    if aside is not None:
        _remove_frames_folder(aside)
    return folder


def read_video_frames(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Frames [T, H, W, 3] uint8 and fps of an mp4, a GIF or a PNG folder (fps 0 for folders)."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(path.glob("*.png"))
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), 0.0
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as gif:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
            duration = gif.info.get("duration") or 0
        return np.stack(frames), 1000.0 / duration if duration else 0.0
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames), float(meta["fps"])


def write_result(result, final: Path, stage_paths: list[Path], save_stages: bool) -> list[Path]:
    """A generation's video at `final`, and each earlier stage at its path when `save_stages`."""

    def write(frames, path: Path, fps: float) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = to_uint8_frames(frames)
        suffix = path.suffix.lower()
        if suffix == ".mp4":
            return write_mp4(data, path, fps)
        if suffix == ".gif":
            return write_gif(data, path, fps)
        return write_png_frames(data, path, fps)

    written = [write(result.video.frames, final, result.video.fps)]
    if save_stages:
        for stage, path in zip(result.stages[:-1], stage_paths):
            written.append(write(stage.frames, path, stage.fps))
    return written
