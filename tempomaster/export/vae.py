"""VAE -> four causal step graphs with explicit caches.

The Wan VAE is causal in time: each temporal convolution sees the last frames
of the previous step through a cache. `models/vae.py` makes that cache a flat
list of fixed-shape tensors; here every cache tensor is a graph input
(`cache_in_NN`) and its successor a graph output (`cache_out_NN`, same shape
and dtype), so an engine runs a chunk of any length by chaining calls and
feeding each call's `cache_out_*` to the next call's `cache_in_*`.

The first step differs (the temporal resamplers skip `time_conv`; the encoder
takes one frame, the decoder emits one frame), so there are two graphs per
direction, with identical inputs and outputs except the frame count:

    vae_encoder_first  frames [B,3,1,H,W]  + caches -> latents [B,16,1,H/8,W/8] + caches
    vae_encoder        frames [B,3,4,H,W]  + caches -> latents [B,16,1,H/8,W/8] + caches
    vae_decoder_first  latents [B,16,1,h,w] + caches -> frames [B,3,1,8h,8w]    + caches
    vae_decoder        latents [B,16,1,h,w] + caches -> frames [B,3,4,8h,8w]    + caches

Run a clip of 1+4k frames as: zero caches -> `*_first` on the first frame
(or latent frame), then the other graph once per 4-frame group (or per latent
frame). A zero cache is exactly "nothing before" (Wan's causal zero padding),
so `*_first` takes caches too; some of them it ignores. Latents are the
normalised ones the DiT sees; decoded frames are not clamped (the runtime
clamps to [-1, 1] as `WanVAE.decode` does). Batch is dynamic, H and W fixed
per build. Cache shapes and the layer each belongs to are recorded in the
manifest (`meta.caches`).

A tiled build (`export_onnx(..., tile=True)`) exports these graphs at the
tile's shape instead (240x416 pixels for the release's tiling at 480x832):
the runtime feeds them one tile at a time and blends the tiles on the host
(`models.vae_tiling`). Where the last tile of an axis is cut at the frame's
edge, that tile shape gets its own four graphs, named with a `_HxW` suffix
(latent units); the manifest's `tiling` block lists them.
"""

from __future__ import annotations

import torch

from ..dtypes import PRECISION_DTYPES
from ..models.vae import Upsample2x
from .onnx_utils import GraphSpec, cast_module
from .shapes import ExportShape


def cache_names(n: int) -> tuple[list[str], list[str]]:
    return [f"cache_in_{i:02d}" for i in range(n)], [f"cache_out_{i:02d}" for i in range(n)]


class _VAEStep(torch.nn.Module):
    """One causal step as a graph: (input, caches...) -> (output, new caches...)."""

    def __init__(self, vae, first: bool):
        super().__init__()
        self.vae = vae
        self.first = first


class VAEEncoderStep(_VAEStep):
    def forward(self, frames, caches):  # the graph's input names come from these arguments
        latents, new = self.vae.encoder_step(frames, list(caches), self.first)
        return latents, *new


class VAEDecoderStep(_VAEStep):
    def forward(self, latents, caches):
        frames, new = self.vae.decoder_step(latents, list(caches), self.first)
        return frames, *new


def _cache_list(shapes, batch: int, dtype) -> list[torch.Tensor]:
    # Example caches only carry shapes (torch.export traces with fake
    # tensors): broadcast views of one scalar, so that a full-resolution
    # cache set (GBs at 480x832) is never allocated.
    return [torch.zeros((), dtype=dtype).expand((batch,) + tuple(s[1:])) for _, s in shapes]


def vae_specs(vae, precision: str, shape: ExportShape, copy: bool = True, suffix: str = "") -> list[GraphSpec]:
    """The four step graphs at shape's height x width (a tiled build passes
    one tile's shape, and a suffix naming it when the build has several)."""
    dtype = PRECISION_DTYPES[precision]
    model = cast_module(vae, dtype, copy=copy).eval()
    if dtype == torch.bfloat16:
        # TensorRT has no bf16 Resize: the decoder's nearest 2x runs in fp32 between casts (same values)
        for m in model.modules():
            if isinstance(m, Upsample2x):
                m.resize_dtype = torch.float32
    height, width = shape.height, shape.width
    h, w = shape.latent_height, shape.latent_width
    z = model.z_dim
    batch = 2
    specs = []
    enc_shapes = model.encoder_cache_shapes(1, height, width)
    dec_shapes = model.decoder_cache_shapes(1, h, w)
    for direction, shapes in (("encoder", enc_shapes), ("decoder", dec_shapes)):
        n = len(shapes)
        cin, cout = cache_names(n)
        caches_meta = [
            {"input": i, "output": o, "layer": layer, "shape": ["batch", *s[1:]]}
            for i, o, (layer, s) in zip(cin, cout, shapes)
        ]
        for first in (True, False):
            name = f"vae_{direction}{'_first' if first else ''}{suffix}"
            if direction == "encoder":
                t = 1 if first else model.temporal_ratio
                x = torch.randn(batch, 3, t, height, width).clamp(-1, 1).to(dtype)
                module = VAEEncoderStep(model, first)
                main_in, main_out = "frames", "latents"
                out_frames = 1
            else:
                x = torch.randn(batch, z, 1, h, w).to(dtype)
                module = VAEDecoderStep(model, first)
                main_in, main_out = "latents", "frames"
                out_frames = 1 if first else model.temporal_ratio
            args = (x, _cache_list(shapes, batch, dtype))
            inputs = [main_in, *cin]
            specs.append(
                GraphSpec(
                    name=name,
                    module=module,
                    args=args,
                    input_names=inputs,
                    output_names=[main_out, *cout],
                    precision=precision,
                    dynamic_axes={k: {0: "batch"} for k in inputs},
                    symbol_ranges={"batch": (1, 1024)},
                    arg_groups=[("frames" if direction == "encoder" else "latents", 0), ("caches", n)],
                    meta={
                        "direction": direction,
                        "first": first,
                        "height": height,
                        "width": width,
                        "in_frames": int(x.shape[2]),
                        "out_frames": out_frames,
                        "caches": caches_meta,
                    },
                )
            )
    return specs
