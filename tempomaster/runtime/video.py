"""Writing videos: H.264 mp4 through imageio-ffmpeg, or lossless PNG frames.

Both writers put everything under a temporary name beside the target and
rename it into place at the end, so a failed run never leaves a broken or
half-overwritten video.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 as the release: clip((x + 1) * 127.5, 0, 255), truncated.

    Truncated toward zero, not rounded (SPEC 3 step 5): rounding makes about
    half the pixels one level brighter than the release's.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, T, H, W] video, got {tuple(video.shape)}")
    x = ((video.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # float -> uint8 truncates
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _take_umask(path: str | os.PathLike, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; the finished output gets the mode any other new file would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float, quality: int = 8) -> Path:
    """H.264 (yuv420p) mp4 at `fps`; frames [T, H, W, 3] uint8."""
    import imageio_ffmpeg

    path = Path(path)
    t, h, w, _ = frames.shape
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            tmp,
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=quality,
            macro_block_size=1 if (w % 2 == 0 and h % 2 == 0) else 16,
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        _take_umask(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_png_frames(frames: np.ndarray, folder: str | os.PathLike) -> Path:
    """Lossless frames 00000.png, 00001.png, ... in `folder` (replaced as a whole)."""
    from PIL import Image

    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"{i:05d}.png")
        _take_umask(tmp, directory=True)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_video_frames(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Frames [T, H, W, 3] uint8 and fps of an mp4 or a PNG folder (fps 0 for folders)."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(path.glob("*.png"))
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), 0.0
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
        return write_mp4(data, path, fps) if path.suffix.lower() == ".mp4" else write_png_frames(data, path)

    written = [write(result.video.frames, final, result.video.fps)]
    if save_stages:
        for stage, path in zip(result.stages[:-1], stage_paths):
            written.append(write(stage.frames, path, stage.fps))
    return written
