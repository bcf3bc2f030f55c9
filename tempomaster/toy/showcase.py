"""Generate with a small preset in-process, measure the video, and draw a strip of its frames.

`generate_toy_video()` with no arguments makes the quick start's video
(`tm-run generate --prompt QUICKSTART_PROMPT`: the same preset defaults and
seed 0). `benchmarks/toy_showcase.py` draws the README's strip with it and
the quality tests measure it. The strip has one row per stage:
the 6 fps blueprint, the 12 fps stage and the final 24 fps video, each from
its first frame, so the top row spans four times the time of the bottom one.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from .quality import VideoQuality, measure_video

__all__ = ["QUICKSTART_PROMPT", "ToyVideo", "generate_toy_video", "frame_strip"]

QUICKSTART_PROMPT = "a red ball bouncing on a striped background"


@dataclass
class ToyVideo:
    prompt: str
    stages: list[np.ndarray]  # uint8 [T, H, W, 3] per stage, lowest frame rate first
    intervals: tuple[int, ...]
    seconds: float

    @property
    def final(self) -> np.ndarray:
        return self.stages[-1]

    def measure(self) -> VideoQuality:
        ratio = self.intervals[0] // self.intervals[-1]
        return measure_video(self.final, self.prompt, blueprint=self.stages[0], ratio=ratio)


def load_backend(preset: str = "toy", threads: int | None = None):
    """(torch backend, tokenizer) over a preset's own weights, fp32 on the CPU."""
    import torch

    from ..models.sources import load_model_set
    from ..runtime.backends.torch import TorchBackend

    if threads is not None:
        torch.set_num_threads(threads)
    models = load_model_set(preset, None, None, torch.float32)
    return TorchBackend(models), models.tokenizer


def generate_toy_video(
    prompt: str = QUICKSTART_PROMPT,
    seed: int = 0,
    guidance: float | None = None,
    preset: str = "toy",
    steps: tuple[int, ...] | None = None,
    backend=None,
) -> ToyVideo:
    """One generation at the preset's defaults (those tm-run generate uses), every stage kept."""
    from ..models.presets import get_preset
    from ..runtime.pipeline import GenerationRequest, generate
    from ..runtime.video import to_uint8_frames

    d = get_preset(preset).defaults
    if backend is None:
        backend, tokenizer = load_backend(preset)
    else:
        backend, tokenizer = backend
    request = GenerationRequest(
        prompt=prompt, height=d.height, width=d.width, num_frames=d.num_frames,
        frame_intervals=d.frame_intervals, steps_per_stage=steps or d.steps_per_stage,
        shift_per_stage=d.shift_per_stage, guidance_scale=d.guidance_scale if guidance is None else guidance,
        use_apg=d.use_apg, seed=seed, save_fps=d.save_fps,
    )
    result = generate(backend, tokenizer, request, progress=False, keep_stages=True)
    return ToyVideo(prompt, [to_uint8_frames(s.frames) for s in result.stages], tuple(d.frame_intervals), result.seconds)


def frame_strip(stages: list[np.ndarray], columns: int = 12, scale: int = 2, gap: int = 4):
    """A PIL image: one row per stage, its first ``columns`` frames, scaled up ``scale`` times."""
    from PIL import Image

    h, w = stages[0].shape[1:3]
    width = columns * w * scale + (columns - 1) * gap
    height = len(stages) * h * scale + (len(stages) - 1) * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for r, frames in enumerate(stages):
        for c, frame in enumerate(frames[:columns]):
            tile = Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (c * (w * scale + gap), r * (h * scale + gap)))
    return canvas
