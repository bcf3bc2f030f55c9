"""The generation shape a build serves, and what it implies for each graph."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.presets import Preset

VAE_SPATIAL = 8
VAE_TEMPORAL = 4


@dataclass(frozen=True)
class ExportShape:
    """height x width pixels, num_frames (stage 0, rounded up to 4k+1), frame intervals."""

    height: int
    width: int
    num_frames: int
    intervals: tuple[int, ...]

    @classmethod
    def from_preset(cls, preset: Preset, height=None, width=None, num_frames=None, intervals=None) -> ExportShape:
        d = preset.defaults
        return cls(
            height=int(height if height is not None else d.height),
            width=int(width if width is not None else d.width),
            num_frames=int(num_frames if num_frames is not None else d.num_frames),
            intervals=tuple(int(i) for i in (intervals if intervals is not None else d.frame_intervals)),
        )

    def validate(self) -> None:
        from ..planner import (
            validate_frame_intervals,
            validate_num_frames,
            validate_size,
        )

        validate_size(self.height, self.width)
        validate_num_frames(self.num_frames)
        validate_frame_intervals(self.intervals)

    def request_fields(self) -> dict:
        """The GenerationRequest fields this shape fixes: height, width, num_frames, frame_intervals."""
        return {
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "frame_intervals": tuple(self.intervals),
        }

    @property
    def latent_height(self) -> int:
        return self.height // VAE_SPATIAL

    @property
    def latent_width(self) -> int:
        return self.width // VAE_SPATIAL

    def stages(self):
        from ..planner import plan_stages

        return plan_stages(self.num_frames, self.intervals)

    def stage_summary(self) -> list[dict]:
        """Per stage: interval, chunks (the DiT batch before cond/uncond), pixel and latent frames per chunk."""
        return [
            {
                "interval": s.interval,
                "chunks": s.num_chunks,
                "chunk_frames": s.chunk_frames,
                "latent_frames": s.latent_frames,
            }
            for s in self.stages()
        ]

    def dit_latent_frames(self) -> list[int]:
        """The distinct latent-frame counts the DiT must take (one for the release's configs)."""
        return sorted({s["latent_frames"] for s in self.stage_summary()})

    def as_dict(self) -> dict:
        stages = self.stage_summary()
        return {
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "intervals": list(self.intervals),
            "latent_height": self.latent_height,
            "latent_width": self.latent_width,
            "stages": stages,
            "dit_latent_frames": sorted({s["latent_frames"] for s in stages}),
            "max_chunks": max(s["chunks"] for s in stages),
        }


# TensorRT: the volume of any one tensor must stay below 2^31 elements
# (the same limit export/onnx_utils.largest_batch applies to the ONNX graph).
TRT_MAX_ELEMENTS = 2**31 - 1
MAX_BATCH_CAP = 1024


def dit_elements_per_item(dit_cfg, shape: ExportShape, text_len: int = 512) -> dict[str, int]:
    """Elements per batch item of the DiT's largest tensors, sized from the configs alone.

    The tensors `largest_batch` finds in an exported dit.onnx, at the largest
    latent frame count the build serves: the concatenated [x | y] input
    (in_dim channels), token activations (dim), the FFN hidden layer
    (ffn_dim), the unpatchified head output, and the text path (text_len
    tokens of text_dim, then dim). Attention scores are not graph tensors
    (ONNX `Attention` is one fused TensorRT layer).
    """
    f = max(shape.dit_latent_frames())
    h, w = shape.latent_height, shape.latent_width
    pt, ph, pw = dit_cfg.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    return {
        "x|y": dit_cfg.in_dim * f * h * w,
        "tokens x dim": tokens * dit_cfg.dim,
        "tokens x ffn_dim": tokens * dit_cfg.ffn_dim,
        "head output": tokens * dit_cfg.out_dim * pt * ph * pw,
        "text x text_dim": text_len * dit_cfg.text_dim,
        "text x dim": text_len * dit_cfg.dim,
    }


def estimate_dit_max_batch(dit_cfg, shape: ExportShape, text_len: int = 512) -> int:
    """The DiT's safe batch without exporting it: what the manifest's `max_batch` will say.

    Lets a build be planned (profiles, memory) for a 14B model on a machine
    that cannot export it; tests check it against real exports.
    """
    per_item = max(dit_elements_per_item(dit_cfg, shape, text_len).values())
    return min(MAX_BATCH_CAP, TRT_MAX_ELEMENTS // per_item)
