"""What a calibration costs: DiT FLOPs of its generations, and GPU time projected from a stated throughput.

A calibration video is a whole next-frame-rate generation: per stage,
`steps` DiT calls over every active chunk, cond and uncond (guidance on).
Its FLOPs are those of `export.flops.dit_flops` per sequence, summed over
the schedule `parallel_plan.plan_schedule` gives one device. The VAE and
umT5 are left out (a few percent of a video).

The projection divides by a stated throughput: an H100's dense BF16
tensor-core peak (989 TFLOP/s, SXM) times an efficiency of 40%, about what
a large DiT forward reaches in bf16 (attention at 43,680 tokens and GEMMs of
width 5120). Both numbers are printed with every projection, so the figure
can be redone for another GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..export.shapes import ExportShape

GPU_NAME = "H100 dense BF16"
GPU_PEAK_FLOPS = 989e12
GPU_EFFICIENCY = 0.40
REFERENCE_PRESET = "tempomaster-14b"


@dataclass(frozen=True)
class CalibrationCost:
    preset: str
    shape: str  # as the user reads it: "480x832, 109 frames"
    videos: int  # calibration prompts, one generation each
    steps_per_stage: tuple[int, ...]
    forwards_per_video: int  # DiT forwards of one sequence (chunk x cond/uncond)
    flops_per_video: float

    @property
    def flops(self) -> float:
        return self.videos * self.flops_per_video

    def gpu_seconds(self, peak: float = GPU_PEAK_FLOPS, efficiency: float = GPU_EFFICIENCY) -> float:
        return self.flops / (peak * efficiency)

    def describe(self) -> str:
        hours = self.gpu_seconds() / 3600
        return (
            f"{self.preset} at {self.shape}: {self.videos} videos x steps {','.join(map(str, self.steps_per_stage))} "
            f"= {self.videos * self.forwards_per_video} DiT forwards, {self.flops / 1e18:.2f} EFLOP, "
            f"{hours:.2f} GPU-hours projected ({GPU_NAME} {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s x "
            f"{GPU_EFFICIENCY:.0%} efficiency)"
        )


def video_flops(
    cfg, shape: ExportShape, steps_per_stage: Sequence[int], guidance_scale: float, text_len: int
) -> tuple[int, float]:
    """(DiT forwards of one sequence, DiT FLOPs) of one whole generation of `shape` on one device.

    cfg: the DiTConfig; text_len: context tokens (512 for umT5).
    """
    from ..export.flops import dit_flops
    from ..parallel_plan import plan_schedule

    plan = plan_schedule(
        devices=1,
        num_heads=cfg.num_heads,
        num_frames=shape.num_frames,
        frame_intervals=shape.intervals,
        steps_per_stage=steps_per_stage,
        guidance_scale=guidance_scale,
        height=shape.height,
        width=shape.width,
        patch_size=cfg.patch_size,
    )
    pt, ph, pw = cfg.patch_size
    lh, lw = shape.latent_height, shape.latent_width
    flops = 0.0
    for stage in plan.stages:
        latent_frames = stage.tokens * pt // ((lh // ph) * (lw // pw))
        per_sequence = dit_flops(cfg, 1, latent_frames, lh, lw, text_len)["total"]
        flops += stage.steps * stage.sequences * per_sequence
    return plan.single_device_forwards, flops


def calibration_cost(
    preset, *, videos: int, steps_per_stage: Sequence[int] | None = None, shape: ExportShape | None = None
) -> CalibrationCost:
    """The cost of calibrating `preset` (a Preset) on `videos` generations; shape and steps default to the preset's."""
    d = preset.defaults
    shape = shape or ExportShape.from_preset(preset)
    steps = tuple(steps_per_stage or d.steps_per_stage[: len(shape.intervals)])
    forwards, flops = video_flops(preset.dit, shape, steps, d.guidance_scale, preset.t5.text_len)
    described = f"{shape.height}x{shape.width}, {shape.num_frames} frames"
    return CalibrationCost(preset.name, described, videos, steps, forwards, flops)


def scaled_steps(steps: Sequence[int], fraction: float) -> tuple[int, ...]:
    """Steps per stage times `fraction`, rounded up, at least 1 (a calibration set's step budget)."""
    import math

    return tuple(max(1, math.ceil(s * fraction - 1e-9)) for s in steps)


def describe_projection(preset, dit_cfg, shape, steps: Sequence[int], videos: int, set_name: str) -> str:
    """What `calibrate` prints before it starts: this calibration's cost, and the same set on the 14B model."""
    from dataclasses import replace

    from ..models.presets import get_preset

    here = calibration_cost(replace(preset, dit=dit_cfg), videos=videos, steps_per_stage=steps, shape=shape)
    reference = get_preset(REFERENCE_PRESET)
    fraction = sum(steps) / sum(preset.defaults.steps_per_stage[: len(steps)])
    ref = calibration_cost(
        reference, videos=videos, steps_per_stage=scaled_steps(reference.defaults.steps_per_stage, fraction)
    )
    return (
        f"calibration ({set_name} set): {videos} videos x steps {','.join(map(str, steps))}, "
        f"{here.videos * here.forwards_per_video} DiT forwards here; the same set on {ref.describe()}"
    )
