"""DiT -> dit.onnx.

Graph (B = batch of chunks, cond and uncond halves included; f latent frames,
h x w latent pixels, L = f*(h/2)*(w/2) tokens, D = head_dim / 2):

    inputs   x         [B, 16, f, h, w]     precision dtype
             y         [B, 20, f, h, w]     precision dtype (mask 4 + condition 16)
             timestep  [1]                  float32 (one timestep for the batch)
             context   [B, text_len, text_dim]   precision dtype
             rope_cos  [B, L, D]            float32
             rope_sin  [B, L, D]            float32
    outputs  velocity  [B, 16, f, h, w]     precision dtype

B is dynamic ("batch"). h and w are fixed by the build. f is fixed when every
stage of the configured generation has the same latent frame count (the
release's configs: 28 for 109 frames with [4,2,1]); otherwise it is dynamic
("frames", with L = frames*(h/2)*(w/2) derived from it) over the stages'
range, which TensorRT covers with one optimisation profile.

Precision: weights and activations in the graph's dtype; norm statistics,
RoPE and the sinusoidal timestep embedding in float32 (as `models/dit.py`
computes them).
"""

from __future__ import annotations

import torch

from ..dtypes import PRECISION_DTYPES
from ..rope import batched_rope_table
from .onnx_utils import GraphSpec, cast_module
from .shapes import ExportShape

INPUT_NAMES = ("x", "y", "timestep", "context", "rope_cos", "rope_sin")
OUTPUT_NAMES = ("velocity",)


class DiTGraph(torch.nn.Module):
    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, x, y, timestep, context, rope_cos, rope_sin):
        return self.dit(x, y, timestep, context, rope_cos, rope_sin)


def dit_example_inputs(
    cfg,
    batch: int,
    frames: int,
    h: int,
    w: int,
    dtype: torch.dtype,
    text_len: int = 512,
    generator: torch.Generator | None = None,
    timestep: float = 500.0,
) -> tuple:
    g = generator
    x = torch.randn(batch, cfg.out_dim, frames, h, w, generator=g).to(dtype)
    y = torch.randn(batch, cfg.in_dim - cfg.out_dim, frames, h, w, generator=g).to(dtype)
    t = torch.tensor([timestep], dtype=torch.float32)
    context = torch.randn(batch, text_len, cfg.text_dim, generator=g).to(dtype)
    pt, ph, pw = cfg.patch_size
    positions = [[(c * frames + j) * 1 for j in range(frames // pt)] for c in range(batch)]
    cos, sin = batched_rope_table(positions, h // ph, w // pw, cfg.head_dim)
    return x, y, t, context, cos, sin


def dit_spec(dit, precision: str, shape: ExportShape, text_len: int = 512, copy: bool = True) -> GraphSpec:
    dtype = PRECISION_DTYPES[precision]
    cfg = dit.cfg
    model = cast_module(dit, dtype, copy=copy).eval()
    frames = shape.dit_latent_frames()
    h, w = shape.latent_height, shape.latent_width
    pt, ph, pw = cfg.patch_size
    if h % ph or w % pw:
        raise ValueError(f"latent size {h}x{w} is not divisible by the DiT patch {ph}x{pw}")
    tokens_per_frame = (h // ph) * (w // pw)
    dynamic = {name: {0: "batch"} for name in ("x", "y", "context", "rope_cos", "rope_sin")}
    derived = {}
    ranges = {"batch": (1, 1024)}
    sizes = {}
    example_frames = frames[-1]
    if len(frames) > 1:
        for name in ("x", "y"):
            dynamic[name][2] = "frames"
        for name in ("rope_cos", "rope_sin"):
            derived[name] = {1: ("frames", tokens_per_frame // 1)}
        ranges["frames"] = (frames[0], frames[-1])
        sizes["frames"] = frames[-1]
    args = dit_example_inputs(cfg, 2, example_frames, h, w, dtype, text_len)
    return GraphSpec(
        name="dit",
        module=DiTGraph(model),
        args=args,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        precision=precision,
        dynamic_axes=dynamic,
        derived_axes=derived,
        symbol_ranges=ranges,
        symbol_sizes=sizes,
        meta={
            "latent_frames": frames,
            "latent_height": h,
            "latent_width": w,
            "tokens_per_chunk": [f // pt * tokens_per_frame for f in frames],
            "text_len": text_len,
            "dynamic_frames": len(frames) > 1,
        },
    )
