"""Generations as calibration and the quality report run them: the requests, and a DiT answered by another function.

Both the amax collection (collect.py) and the quality report (report.py)
drive the runtime's own sampling loop (`generate`, whose step callback says
which stage and step each DiT call belonged to), so the DiT sees exactly the
inputs of a real next-frame-rate generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..runtime.backends.base import BackendWrapper
from .prompts import CalibrationPrompt


class VelocityOverride(BackendWrapper):
    """The wrapped backend with its DiT answered by `velocity_fn` (e.g. a fake-quantized twin of the DiT)."""

    def __init__(self, inner, velocity_fn):
        super().__init__(inner)
        self.name = f"{inner.name}+override"
        self.velocity_fn = velocity_fn

    @torch.inference_mode()
    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        return self.velocity_fn(x, y, timestep, context, rope_cos, rope_sin)


def fit_image(path: Path, height: int, width: int):
    """A reference image cropped to the build's aspect and size, so the generation keeps the build's shape."""
    from PIL import Image, ImageOps

    from ..reference_images import open_reference_image

    return ImageOps.fit(open_reference_image(path, "--calib-prompts"), (width, height), Image.LANCZOS)


def make_request(prompt: CalibrationPrompt, shape, preset, steps: Sequence[int], seed: int):
    from ..runtime.pipeline import GenerationRequest

    d = preset.defaults
    images = {k: fit_image(p, shape.height, shape.width) for k, p in prompt.images.items()}
    return GenerationRequest(
        prompt=prompt.prompt,
        ref_images=images,
        **shape.request_fields(),
        steps_per_stage=tuple(steps),
        shift_per_stage=tuple(d.shift_per_stage[: len(shape.intervals)]),
        guidance_scale=d.guidance_scale,
        use_apg=d.use_apg,
        seed=seed,
    )
