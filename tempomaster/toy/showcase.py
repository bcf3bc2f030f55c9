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
from functools import cached_property

import numpy as np

from .quality import VideoQuality, measure_generation

__all__ = ["QUICKSTART_PROMPT", "ToyVideo", "generate_toy_video", "frame_strip"]

QUICKSTART_PROMPT = "a red ball bouncing on a striped background"


@dataclass
class ToyVideo:
    prompt: str
    result: object  # the pipeline's GenerationResult, every stage kept

    @cached_property
    def stages(self) -> list[np.ndarray]:
        """uint8 ``[T, H, W, 3]`` per stage, lowest frame rate first (converted once)."""
        from ..runtime.video import to_uint8_frames

        return [to_uint8_frames(s.frames) for s in self.result.stages]

    @property
    def final(self) -> np.ndarray:
        return self.stages[-1]

    def measure(self) -> VideoQuality:
        return measure_generation(self.result, self.prompt)


def load_backend(preset: str = "toy"):
    """(torch backend, tokenizer) over a preset's own weights, fp32 on the CPU."""
    import torch

    from ..models.sources import load_model_set
    from ..runtime.backends.torch import TorchBackend

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
    """One generation with the request `tm-run generate` builds from these flags, every stage kept."""
    from ..models.presets import get_preset
    from ..runtime.pipeline import generate
    from ..runtime.request import GenerateOptions, build_jobs

    backend, tokenizer = backend if backend is not None else load_backend(preset)
    options = GenerateOptions(prompt=prompt, seed=seed, guidance=guidance, steps=steps, preset=preset)
    (job,) = build_jobs(options, get_preset(preset).defaults)
    return ToyVideo(prompt, generate(backend, tokenizer, job.request, progress=False, keep_stages=True))


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
