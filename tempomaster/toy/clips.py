"""Synthetic training clips for the toy TempoMaster: one coloured object moving over a plain background.

Every clip is a pure function of its `ClipSpec`, and `sample_clip_spec(seed)`
draws a spec from a seed, so a clip is fully determined by one integer on
every machine. A clip is rendered at 24 fps as float32 ``[3, T, H, W]`` in
[-1, 1] (the runtime's pixel convention) with a caption from a small
template vocabulary:

    "a {colour} {shape} {motion} on a {background} background"

Objects are saturated colours and backgrounds are grey, so the object can be
found in a generated frame by colour alone (`object_mask`); the quality tests
and the trainer use the same functions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "SHAPES",
    "MOTIONS",
    "BACKGROUNDS",
    "CLIP_FPS",
    "ClipSpec",
    "caption",
    "all_captions",
    "caption_vocabulary",
    "parse_caption",
    "sample_clip_spec",
    "render_clip",
    "object_mask",
    "largest_blob",
    "object_centroids",
    "max_centroid_speed",
]

CLIP_FPS = 24

# Saturated object colours (RGB 0..255), far from every grey the backgrounds use.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 200, 55),
    "blue": (40, 70, 235),
    "yellow": (235, 215, 30),
}
SHAPES = ("ball", "square", "triangle")
MOTIONS = ("bouncing", "sliding left", "sliding right", "sliding up", "sliding down", "circling")
BACKGROUNDS = ("plain", "gradient", "striped")

# Each motion follows one path, up to a few pixels of jitter: a caption names a single trajectory,
# not a family of them. With start points drawn across the frame (as the first toy was trained),
# the toy DiT drew the average of a caption's paths: two copies of the object cross-fading
# between the family's start and end points, or drifting sideways (docs/toy.md).
_HALF_SIZE = (8.0, 10.0)  # object half-size in pixels at the toy's 64x96
_JITTER = 3.0  # pixels either way around a path's start or centre line
_SPEED_SCALE = (0.95, 1.0)  # a slide covers this share of the frame, margin to margin, in 68 frames
_CIRCLE_RADIUS = (17.0, 19.0)
# Frames per turn: 0.95-1.15 px per frame, a sideways slide's speed (1.0-1.1; up/down 0.5-0.6).
# At 66-70 (1.5-1.8 px per frame, up to ~29 px per stage-0 latent frame) the toys trained on it
# drew circling blueprints that stepped 17-24 px at 6 fps.
_CIRCLE_PERIOD = (104.0, 112.0)
_CIRCLE_PHASE = 0.2  # radians either way around 0 (the turn starts at the centre's right)
_BOUNCE_HEIGHT = (24.0, 28.0)
_BOUNCE_PERIOD = (31.0, 33.0)  # frames per bounce
_BOUNCE_PHASE = 0.15  # the first arc starts this close to the floor (radians)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip. Positions and sizes are in pixels of a ``height x width`` frame."""

    colour: str
    shape: str
    motion: str
    background: str
    half_size: float
    # motion parameters: a start point and, by motion, a speed, radius/period or height/period
    x0: float
    y0: float
    speed: float
    radius: float
    period: float
    phase: float
    grey_a: float  # background greys in [0, 1]
    grey_b: float
    stripe_period: float
    height: int = 64
    width: int = 96

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.motion, self.background)


def caption(colour: str, shape: str, motion: str, background: str) -> str:
    return f"a {colour} {shape} {motion} on a {background} background"


def all_captions() -> list[str]:
    return [caption(c, s, m, b) for c in COLOURS for s in SHAPES for m in MOTIONS for b in BACKGROUNDS]


def caption_vocabulary() -> list[str]:
    """Every word a caption can hold."""
    words = {"a", "on", "background"}
    for group in (COLOURS, SHAPES, MOTIONS, BACKGROUNDS):
        for item in group:
            words.update(item.split())
    return sorted(words)


def parse_caption(text: str) -> dict[str, str]:
    """The colour, shape, motion and background a prompt names (those it names; others absent)."""
    text = " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())
    found = {}
    for key, group in (("colour", COLOURS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        for item in group:
            if f" {item} " in f" {text} ":
                found[key] = item
    for motion in sorted(MOTIONS, key=len, reverse=True):
        if motion in text:
            found["motion"] = motion
            break
    return found


def sample_clip_spec(seed: int, height: int = 64, width: int = 96, **fixed) -> ClipSpec:
    """A random spec from ``seed`` (numpy's PCG64); ``fixed`` pins any of colour/shape/motion/background."""
    rng = np.random.default_rng(seed)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    colour = fixed.get("colour") or pick(list(COLOURS))
    shape = fixed.get("shape") or pick(SHAPES)
    motion = fixed.get("motion") or pick(MOTIONS)
    background = fixed.get("background") or pick(BACKGROUNDS)
    half = float(rng.uniform(*_HALF_SIZE))
    margin = half + 2.0
    jitter = lambda: float(rng.uniform(-_JITTER, _JITTER))  # noqa: E731
    centre_x, centre_y = width / 2.0 + jitter(), height / 2.0 + jitter()
    radius, period, phase = 0.0, 0.0, 0.0
    if motion in ("sliding left", "sliding right"):
        # from one side to the other: the speed is set by the travel
        speed = float(rng.uniform(*_SPEED_SCALE)) * (width - 2.0 * margin - _JITTER) / 67.0
        start = width - margin - abs(jitter())
        x0, y0 = (start, centre_y) if motion == "sliding left" else (width - start, centre_y)
    elif motion in ("sliding up", "sliding down"):
        speed = float(rng.uniform(*_SPEED_SCALE)) * (height - 2.0 * margin - _JITTER) / 67.0
        start = height - margin - abs(jitter())
        x0, y0 = (centre_x, start) if motion == "sliding up" else (centre_x, height - start)
    elif motion == "circling":
        speed = 0.0
        radius = min(float(rng.uniform(*_CIRCLE_RADIUS)), height / 2.0 - margin - _JITTER)
        period = float(rng.uniform(*_CIRCLE_PERIOD))
        phase = float(rng.uniform(-_CIRCLE_PHASE, _CIRCLE_PHASE))
        x0, y0 = centre_x, centre_y
    else:  # bouncing: y0 is the floor, radius the height of an arc
        speed = 0.0
        x0, y0 = centre_x, float(height - margin)
        radius = min(float(rng.uniform(*_BOUNCE_HEIGHT)), y0 - margin)
        period = float(rng.uniform(*_BOUNCE_PERIOD))
        phase = float(rng.uniform(0.0, _BOUNCE_PHASE))
    grey_a, grey_b = (float(v) for v in rng.uniform(0.25, 0.75, size=2))
    if background != "plain" and abs(grey_a - grey_b) < 0.2:
        grey_b = grey_a + 0.25 if grey_a < 0.5 else grey_a - 0.25
    return ClipSpec(
        colour=colour,
        shape=shape,
        motion=motion,
        background=background,
        half_size=half,
        x0=x0,
        y0=y0,
        speed=speed,
        radius=radius,
        period=period,
        phase=phase,
        grey_a=grey_a,
        grey_b=grey_b,
        stripe_period=float(rng.uniform(10.0, 20.0)),
        height=height,
        width=width,
    )


def object_centre(spec: ClipSpec, frame: float) -> tuple[float, float]:
    """(x, y) of the object's centre at 24 fps frame ``frame``."""
    t = float(frame)
    if spec.motion == "sliding left":
        return spec.x0 - spec.speed * t, spec.y0
    if spec.motion == "sliding right":
        return spec.x0 + spec.speed * t, spec.y0
    if spec.motion == "sliding up":
        return spec.x0, spec.y0 - spec.speed * t
    if spec.motion == "sliding down":
        return spec.x0, spec.y0 + spec.speed * t
    if spec.motion == "circling":
        angle = spec.phase + 2.0 * math.pi * t / spec.period
        return spec.x0 + spec.radius * math.cos(angle), spec.y0 + spec.radius * math.sin(angle)
    # bouncing: |sin| arcs off the floor
    lift = spec.radius * abs(math.sin(math.pi * t / spec.period + spec.phase))
    return spec.x0, spec.y0 - lift


def _background(spec: ClipSpec) -> np.ndarray:
    h, w = spec.height, spec.width
    if spec.background == "plain":
        grey = np.full((h, w), spec.grey_a, dtype=np.float32)
    elif spec.background == "gradient":
        ramp = np.linspace(spec.grey_a, spec.grey_b, w, dtype=np.float32)
        grey = np.broadcast_to(ramp, (h, w)).copy()
    else:  # striped: vertical bands
        cols = np.arange(w, dtype=np.float32)
        band = (np.floor(cols / (spec.stripe_period / 2.0)) % 2).astype(np.float32)
        grey = np.broadcast_to(np.where(band > 0, spec.grey_b, spec.grey_a), (h, w)).astype(np.float32)
    return np.repeat(grey[None], 3, axis=0)


def _coverage(spec: ClipSpec, cx: float, cy: float) -> np.ndarray:
    """Anti-aliased [H, W] coverage of the object (4x4 supersampling)."""
    ss = 4
    offs = (np.arange(ss, dtype=np.float32) + 0.5) / ss
    ys = (np.arange(spec.height, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1)
    xs = (np.arange(spec.width, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1)
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    r = spec.half_size
    if spec.shape == "ball":
        inside = dx * dx + dy * dy <= r * r
    elif spec.shape == "square":
        inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    else:  # triangle pointing up: base at cy + r/2, apex at cy - r
        top, base = -r, r * 0.6
        in_y = (dy >= top) & (dy <= base)
        half_width = (dy - top) / (base - top) * r
        inside = in_y & (np.abs(dx) <= half_width)
    return inside.reshape(spec.height, ss, spec.width, ss).mean(axis=(1, 3), dtype=np.float32)


def render_clip(spec: ClipSpec, num_frames: int = 68, start: int = 0) -> torch.Tensor:
    """Frames ``start .. start + num_frames - 1`` at 24 fps: float32 ``[3, T, H, W]`` in [-1, 1]."""
    background = _background(spec)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float32)[:, None, None] / 255.0
    frames = np.empty((3, num_frames, spec.height, spec.width), dtype=np.float32)
    for i in range(num_frames):
        cx, cy = object_centre(spec, start + i)
        a = _coverage(spec, cx, cy)[None]
        frames[:, i] = background * (1.0 - a) + colour * a
    return torch.from_numpy(frames * 2.0 - 1.0)


# ---------------------------------------------------------------------------
# Measuring a video (used by the quality tests on generated output)
# ---------------------------------------------------------------------------


def object_mask(frames: np.ndarray | torch.Tensor, colour: str, tolerance: float = 0.3) -> np.ndarray:
    """Boolean ``[T, H, W]``: pixels of ``colour`` in uint8 frames ``[T, H, W, 3]``.

    A pixel belongs to the object when its chroma (RGB minus its own mean)
    is within ``tolerance`` (in 0..1 units, Euclidean) of the colour's
    chroma and it is saturated; the greys of every background have zero
    chroma, so they never match.
    """
    rgb = np.asarray(frames, dtype=np.float32) / 255.0
    target = np.asarray(COLOURS[colour], dtype=np.float32) / 255.0
    chroma = rgb - rgb.mean(axis=-1, keepdims=True)
    target_chroma = target - target.mean()
    distance = np.linalg.norm(chroma - target_chroma, axis=-1)
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    return (distance < tolerance) & (saturation > 0.25)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean ``[H, W]`` mask (ties: the first found in raster order)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, stack = [], [start]
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def object_centroids(frames: np.ndarray | torch.Tensor, colour: str, min_pixels: int = 12) -> np.ndarray:
    """float ``[T, 2]`` (x, y) centroid of the largest blob of the colour per frame; NaN where it has fewer than ``min_pixels``.

    The largest blob is the object: a stray speck of the colour elsewhere
    would otherwise pull the centroid of the whole mask across the frame.
    """
    mask = object_mask(frames, colour)
    t, h, w = mask.shape
    out = np.full((t, 2), np.nan)
    ys, xs = np.mgrid[0:h, 0:w]
    for i in range(t):
        m = largest_blob(mask[i])
        if int(m.sum()) >= min_pixels:
            out[i] = (xs[m].mean(), ys[m].mean())
    return out


def max_centroid_speed(centroids: np.ndarray) -> float:
    """Largest centroid jump (pixels) between consecutive frames where both were found."""
    steps = np.linalg.norm(np.diff(centroids, axis=0), axis=1)
    steps = steps[~np.isnan(steps)]
    return float(steps.max()) if steps.size else float("nan")
