"""Generations as calibration and the quality report run them: the requests, and a backend that locates each DiT call.

Both the amax collection (collect.py) and the quality report (report.py)
drive the runtime's own sampling loop through these, so the DiT sees exactly
the inputs of a real next-frame-rate generation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .prompts import CalibrationPrompt


class TrackingBackend:
    """Wraps a backend: maps each DiT call to its (stage, step) and reports it before the call.

    The pipeline makes exactly one DiT call per step (cond and uncond batched),
    so the call count within one video locates the stage. `on_call(stage,
    step, args)` runs first and may return the velocity itself; else
    `velocity_fn` (when given) or the inner backend answers. Duck-typed to the
    runtime's Backend (the pipeline only calls its four methods and reads
    `info`), so this layer does not subclass the runtime.
    """

    name = "calibration"

    def __init__(self, inner, steps_per_stage: Sequence[int], on_call=None, velocity_fn=None):
        self.inner = inner
        self.info = inner.info
        self.device = inner.device
        self.steps = list(steps_per_stage)
        self.on_call = on_call
        self.velocity_fn = velocity_fn
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def position(self, call: int) -> tuple[int, int]:
        for stage, n in enumerate(self.steps):
            if call < n:
                return stage, call
            call -= n
        raise RuntimeError(f"DiT call {self.calls} past the {sum(self.steps)} steps of the request")

    def encode_text(self, ids, mask):
        return self.inner.encode_text(ids, mask)

    @torch.inference_mode()
    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        stage, step = self.position(self.calls)
        self.calls += 1
        args = (x, y, timestep, context, rope_cos, rope_sin)
        if self.on_call is not None:
            out = self.on_call(stage, step, args)
            if out is not None:
                return out
        if self.velocity_fn is not None:
            return self.velocity_fn(*args)
        return self.inner.velocity(*args)

    def vae_encode(self, video):
        return self.inner.vae_encode(video)

    def vae_decode(self, latents):
        return self.inner.vae_decode(latents)


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
        height=shape.height,
        width=shape.width,
        num_frames=shape.num_frames,
        frame_intervals=tuple(shape.intervals),
        steps_per_stage=tuple(steps),
        shift_per_stage=tuple(d.shift_per_stage[: len(shape.intervals)]),
        guidance_scale=d.guidance_scale,
        use_apg=d.use_apg,
        seed=seed,
    )
