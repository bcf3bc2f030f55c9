"""What a generated toy video shows, measured on its frames alone.

The prompt names a colour and a motion (`clips.parse_caption`); the object
is found in each frame by that colour (`clips.object_mask`), and its
centroid track says whether it moved as asked and how smoothly. The final
video is also compared with its own 6 fps blueprint at the blueprint's
frames: next-frame-rate prediction keeps those frames (up to the VAE's
round trip).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .clips import max_centroid_speed, object_centroids, object_mask, parse_caption

__all__ = ["VideoQuality", "measure_video", "measure_generation", "psnr", "blueprint_psnr", "MOTION_AXES"]

# The coordinate and the sign of its change that each sliding motion asks for ((x, y) image coordinates).
MOTION_AXES = {
    "sliding left": (0, -1),
    "sliding right": (0, 1),
    "sliding up": (1, -1),
    "sliding down": (1, 1),
}


@dataclass(frozen=True)
class VideoQuality:
    colour: str
    motion: str | None
    frames: int
    presence: float  # share of frames in which the colour is found
    object_pixels: float  # mean matching pixels per frame
    max_jump: float  # largest centroid step between consecutive frames (px); NaN if never found twice in a row
    displacement: tuple[float, float]  # (dx, dy) from the first to the last frame where it was found
    blueprint_psnr: float | None  # dB, final frames at the blueprint's times vs the blueprint

    @property
    def follows_motion(self) -> bool | None:
        """Whether a sliding motion went the asked way by at least 8 pixels (None for other motions)."""
        if self.motion not in MOTION_AXES:
            return None
        axis, sign = MOTION_AXES[self.motion]
        return bool(sign * self.displacement[axis] >= 8.0)

    def as_dict(self) -> dict:
        return {**asdict(self), "follows_motion": self.follows_motion}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of one shape."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def blueprint_psnr(final: np.ndarray, blueprint: np.ndarray, ratio: int) -> float:
    """PSNR of the final frames ``[T*ratio, H, W, 3]`` taken every ``ratio`` frames against the blueprint ``[T, H, W, 3]``."""
    picked = final[::ratio][: len(blueprint)]
    return psnr(picked, blueprint[: len(picked)])


def measure_video(frames: np.ndarray, prompt: str, blueprint: np.ndarray | None = None, ratio: int = 4) -> VideoQuality:
    """Measure uint8 frames ``[T, H, W, 3]`` against what ``prompt`` asks for."""
    named = parse_caption(prompt)
    if "colour" not in named:
        raise ValueError(f"prompt {prompt!r} names none of the toy's colours")
    colour = named["colour"]
    mask = object_mask(frames, colour)
    centroids = object_centroids(frames, colour)
    found = ~np.isnan(centroids[:, 0])
    if found.any():
        first, last = np.flatnonzero(found)[[0, -1]]
        displacement = tuple(float(v) for v in centroids[last] - centroids[first])
    else:
        displacement = (float("nan"), float("nan"))
    return VideoQuality(
        colour=colour,
        motion=named.get("motion"),
        frames=int(frames.shape[0]),
        presence=float(found.mean()),
        object_pixels=float(mask.sum(axis=(1, 2)).mean()),
        max_jump=max_centroid_speed(centroids),
        displacement=displacement,
        blueprint_psnr=None if blueprint is None else blueprint_psnr(frames, blueprint, ratio),
    )


def measure_generation(result, prompt: str) -> VideoQuality:
    """`measure_video` of a `pipeline.GenerationResult` kept with all its stages: its final video against its blueprint."""
    from ..runtime.video import to_uint8_frames

    first, last = result.stages[0], result.stages[-1]
    return measure_video(
        to_uint8_frames(last.frames),
        prompt,
        blueprint=to_uint8_frames(first.frames),
        ratio=first.interval // last.interval,
    )
