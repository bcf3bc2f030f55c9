"""Wan2.1 causal 3D VAE (the `Wan2.1_VAE.pth` checkpoint), written for export.

Layout and parameter names follow Wan2.1's own `vae.py`, so the release
checkpoint loads with `load_state_dict(strict=True)`:

    encoder.*   Encoder3d: video [B,3,T,H,W] -> [B,2*z,T',H/8,W/8] (mu | logvar)
    conv1       1x1x1 conv on (mu | logvar)
    conv2       1x1x1 conv on z before the decoder
    decoder.*   Decoder3d: z [B,z,F,h,w] -> video [B,3,T,8h,8w]

Time is causal. The video is processed as a first frame and then groups of 4
frames (encoder), or one latent frame at a time (decoder). Every temporal
convolution sees the last frames of the previous chunk through a cache.
Here that cache is explicit: a flat list of fixed-shape tensors, one per
cached layer, listed by `encoder_cache_shapes` / `decoder_cache_shapes`,
so a step is a pure function

    encoder_step(frames, caches, first) -> (latents, new_caches)
    decoder_step(latent, caches, first) -> (frames, new_caches)

that can be exported with every cache tensor as a graph input and output.
An all-zero cache is exactly Wan's "no cache yet" (causal zero padding). The
one thing a zero cache cannot express is that the temporal resamplers skip
their `time_conv` on the very first chunk; that is the `first` flag (a
Python bool: an exporter builds one graph for the first step and one for
the others).

Latents seen from outside (encode output, decode input, step functions) are
normalised per channel: z_norm = (mu - latents_mean) / latents_std, with the
16 constants of Wan2.1's WanVAE wrapper kept as non-persistent buffers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .presets import VAEConfig
from .vae_tiling import TileSpec, tiled_decode, tiled_encode

__all__ = ["WanVAE", "CausalCache", "TileSpec", "LATENTS_MEAN", "LATENTS_STD"]

# Per-channel latent statistics of the Wan2.1 VAE (Wan2.1 `WanVAE.mean/std`).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip


# ---------------------------------------------------------------------------
# Cache plumbing
# ---------------------------------------------------------------------------


@dataclass
class CausalCache:
    """State carried between chunks of one encoder or decoder pass.

    tensors: one tensor per cached layer, in execution order (see
        `WanVAE.encoder_cache_shapes` / `decoder_cache_shapes` for names and
        shapes). Fixed shapes; zeros at the start.
    first: True until the first chunk has been processed.
    """

    tensors: list[torch.Tensor]
    first: bool = True


class _CacheIO:
    """Cursor over the cache tensors during one step: layers `take()` their
    slot in execution order and `put()` its successor."""

    def __init__(self, tensors: list[torch.Tensor], first: bool):
        self.inputs = tensors
        self.outputs: list[torch.Tensor] = []
        self.first = first

    def take(self) -> torch.Tensor:
        return self.inputs[len(self.outputs)]

    def put(self, t: torch.Tensor) -> None:
        """Store the successor of the slot last taken: t [B, C, frames, H/d, W/d], the shape `take()` gave."""
        self.outputs.append(t)

    def done(self) -> list[torch.Tensor]:
        if len(self.outputs) != len(self.inputs):
            raise RuntimeError(f"cache mismatch: {len(self.inputs)} tensors given, {len(self.outputs)} used")
        return self.outputs


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


# CausalConv3d -> (weight identity and version, oneDNN-packed weight): packed once per
# weight, held outside the module so that state_dict, deepcopy and .to() never see it.
_PACKED_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether a conv may run on oneDNN with a packed weight: float32 inference on
    the CPU, outside tracing and export (graphs keep their plain Conv)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and groups == 1
        and weight.shape[2:].numel() > 1  # 1x1x1 convs are cheap on the default path
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
        and type(x) is torch.Tensor  # not a fake or functional tensor
    )


class CausalConv3d(nn.Conv3d):
    """3D conv, causal in time: the `cache_frames` frames before the chunk come
    from the cache (zeros at the start = Wan's front zero padding).

    `padding` is Wan's (t, h, w): h and w pad symmetrically; t means 2*t
    frames in front. `res_div` is the spatial size of the layer's input as a
    divisor of the pixel size (used only to list cache shapes).
    """

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0, *, cache_frames=None, res_div=1):
        kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, padding[1], padding[2]))
        self.cache_frames = 2 * padding[0] if cache_frames is None else cache_frames
        self.res_div = res_div
        self.onednn = False  # set by WanVAE.use_onednn

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # On a CPU torch sends these small-batch 3D convs to its per-sample im2col path
        # (slow_conv3d_forward); oneDNN with the weight packed once is 1.3-4.5x faster per
        # call at the VAE's shapes (benchmarks/bench_vae_conv.py), the same sums in another order.
        if not (self.onednn and _onednn_applies(x, weight, self.groups)):
            return super()._conv_forward(x, weight, bias)
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self._packed_weight(weight, x),
            bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            "none",
            [],
            "",
        )

    def _packed_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        held = _PACKED_WEIGHTS.get(self)
        if held is None or held[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv3d_weight(
                weight.detach().to_mkldnn(),
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                list(x.shape),
            )
            held = _PACKED_WEIGHTS[self] = (key, packed)
        return held[1]

    def step(self, x: torch.Tensor, io: _CacheIO | None) -> torch.Tensor:
        """x [B, C_in, T, H, W] -> [B, C_out, T (T/2 at time stride 2), H, W]; the frames before come from `io`."""
        if self.cache_frames == 0:
            return super().forward(x)
        cache = io.take()
        x = torch.cat([cache.to(x.dtype), x], dim=2)  # [B, C, cache_frames + T, H, W]
        io.put(x[:, :, -self.cache_frames :].clone())  # clone: do not keep the whole concat alive
        return super().forward(x)


class RMS_norm(nn.Module):
    """Channel-first RMS norm: F.normalize over channels * sqrt(dim) * gamma.
    gamma is [C,1,1,1] for video tensors, [C,1,1] for per-frame images."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T, H, W] (or [N, C, H, W] with `images`) -> the same shape, normalised over C."""
        # F.normalize(x, dim=1) written out: its vector norm over the channel dim is
        # 20x slower on a CPU (measured: 31 against 1.6 ms at [8, 8, 6, 64, 96]).
        xf = x.float()
        y = (xf / torch.sqrt((xf * xf).sum(dim=1, keepdim=True)).clamp_min(1e-12)).to(x.dtype)
        return y * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest 2x spatial upsampling of [N,C,H,W] (equal to Wan's nearest-exact at 2x).

    resize_dtype: when set (the ONNX export sets float32 on a bf16 VAE), the
    upsampling runs in that dtype between two casts. TensorRT's strongly typed
    networks have no bf16 Resize; nearest copies values, so the result is the
    same bits either way. (Expand + Reshape needs no Resize at all, but runs
    30x slower than Cast + Resize + Cast on onnxruntime: benchmarks/bench_upsample.py.)
    """

    resize_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> [N, C, 2H, 2W]."""
        if self.resize_dtype is not None and x.dtype != self.resize_dtype:
            return F.interpolate(x.to(self.resize_dtype), scale_factor=2.0, mode="nearest").to(x.dtype)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Resample(nn.Module):
    """Spatial 2x down/up sampling, per frame; the '3d' modes also halve (down)
    or double (up) the frame count with a causal `time_conv`.

    upsample: C -> C//2 channels. downsample: C -> C.
    res_div: spatial divisor of the input (for cache shapes).
    """

    def __init__(self, dim: int, mode: str, res_div: int):
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(mode)
        if mode == "upsample3d":
            # [B,C,T] -> [B,2C,T], the two halves become frames 2t and 2t+1
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0), res_div=res_div)
        elif mode == "downsample3d":
            # runs after the spatial conv; sees the previous chunk's last frame,
            # kernel 3 stride 2 over (1 + T) frames -> T/2 frames
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), cache_frames=1, res_div=res_div * 2)

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.resample(x)
        return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)

    def step(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        """x [B, C, T, H, W] -> up [B, C/2, 2T, 2H, 2W] or down [B, C, T/2, H/2, W/2] (T kept by 2d and on the first chunk)."""
        if self.mode == "upsample3d":
            if io.first:
                io.put(io.take())  # Wan skips time_conv on the first chunk; cache stays zero
            else:
                b, c, t, h, w = x.shape
                x = self.time_conv.step(x, io)  # [B, 2C, T, H, W]
                x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = self._spatial(x)
        if self.mode == "downsample3d":
            if io.first:
                # first chunk: no time_conv, only remember its last frame
                io.take()
                io.put(x[:, :, -1:].clone())  # = cat([cache, x])[-1:], x has >= 1 frame
            else:
                x = self.time_conv.step(x, io)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, res_div: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1, res_div=res_div),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1, res_div=res_div),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def step(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        """x [B, C_in, T, H, W] -> [B, C_out, T, H, W]."""
        h = x if self.shortcut is None else self.shortcut.step(x, io)
        for layer in self.residual:
            x = layer.step(x, io) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention inside each frame (no mixing over time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def step(self, x: torch.Tensor, io: _CacheIO | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> the same shape; attention over the H*W positions of each frame."""
        identity = x
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x))  # [BT, 3C, H, W]
        # One head, spelled out as a head axis: ONNX Attention and TensorRT take 4-D q/k/v.
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # [BT, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        x = x.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        x = self.proj(x)
        return x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


def _step_all(layers, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
    for layer in layers:
        x = layer.step(x, io) if hasattr(layer, "step") else layer(x)
    return x


class Encoder3d(nn.Module):
    """[B,3,T,H,W] -> [B,z_dim,T',H/8,W/8] (z_dim = 2*16 here: mu | logvar).

    Channels 96 -> 96 -> 192 -> 384 -> 384 (dim 96); spatial /2 after each of
    the first three stages, time /2 after the ones marked in
    temporal_downsample (chunk of 4 frames -> 1, first frame -> 1)."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_downsample, dropout=0.0):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        div = 1
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1, res_div=div)
        downsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, div, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temporal_downsample[i] else "downsample2d"
                downsamples.append(Resample(out_dim, mode, res_div=div))
                div *= 2
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim, div, dropout),
            AttentionBlock(out_dim),
            ResidualBlock(out_dim, out_dim, div, dropout),
        )
        self.head = nn.Sequential(
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            CausalConv3d(out_dim, z_dim, 3, padding=1, res_div=div),
        )

    def step(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        """x [B, 3, T, H, W] pixels -> [B, z_dim, T/4 (1 on the first chunk: T = 1), H/8, W/8]."""
        x = self.conv1.step(x, io)
        x = _step_all(self.downsamples, x, io)
        x = _step_all(self.middle, x, io)
        return _step_all(self.head, x, io)


class Decoder3d(nn.Module):
    """[B,z,F,h,w] -> [B,3,T,8h,8w]; one latent frame -> 1 frame (first
    chunk) or 4 frames (later chunks). Channels 384 -> 384 -> 192 -> 96."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_upsample, dropout=0.0):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]  # e.g. 384 384 384 192 96
        div = 2 ** (len(dim_mult) - 1)  # latent resolution = pixels / 8
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1, res_div=div)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], div, dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], div, dropout),
        )
        upsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the previous upsampler halved the channels
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, div, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                upsamples.append(Resample(out_dim, mode, res_div=div))
                div //= 2
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            CausalConv3d(out_dim, 3, 3, padding=1, res_div=div),
        )

    def step(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        """x [B, z_dim, 1, h, w] (raw latents after conv2) -> pixels [B, 3, 1 on the first chunk else 4, 8h, 8w]."""
        x = self.conv1.step(x, io)
        x = _step_all(self.middle, x, io)
        x = _step_all(self.upsamples, x, io)
        return _step_all(self.head, x, io)


# ---------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE with state-dict keys of `Wan2.1_VAE.pth`.

    Spatial compression 8 (= 2**(len(dim_mult)-1)), temporal 4 (two temporal
    resamplers). Computes in the parameter dtype (norms in fp32).
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.spatial_ratio = 2 ** (len(cfg.dim_mult) - 1)
        self.temporal_ratio = 2 ** sum(cfg.temporal_downsample)
        dim_mult = tuple(cfg.dim_mult)
        self.encoder = Encoder3d(cfg.dim, cfg.z_dim * 2, dim_mult, cfg.num_res_blocks, cfg.temporal_downsample)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg.dim, cfg.z_dim, dim_mult, cfg.num_res_blocks, cfg.temporal_downsample[::-1])
        self.init_constant_buffers()

    def init_constant_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the latent statistics, which are constants, not checkpoint keys.

        A loader that builds the model on the meta device calls this after
        assigning the weights.
        """
        if self.cfg.z_dim == len(LATENTS_MEAN):
            mean, std = torch.tensor(LATENTS_MEAN, device=device), torch.tensor(LATENTS_STD, device=device)
        else:  # no published statistics for other widths
            mean, std = torch.zeros(self.cfg.z_dim, device=device), torch.ones(self.cfg.z_dim, device=device)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def use_onednn(self, enabled: bool = True) -> WanVAE:
        """Run the 3D convolutions on oneDNN with weights packed once, where that applies
        (float32 inference on a CPU; never in training, tracing or export).

        The packed copy follows the weights through their identity and version
        counter (load_state_dict, in-place updates); an edit through `.data`
        bypasses the counter: call this again after one. Returns the model.
        """
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.onednn = enabled
                _PACKED_WEIGHTS.pop(m, None)
        return self

    # -- latent normalisation ------------------------------------------------

    def _stat(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device, torch.float32).view(1, -1, 1, 1, 1)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """mu [B, z, F, h, w] (raw latent mean) -> (mu - latents_mean) / latents_std per channel, same dtype."""
        z = (mu.float() - self._stat(self.latents_mean, mu)) / self._stat(self.latents_std, mu)
        return z.to(mu.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, z, F, h, w] (normalised latents) -> raw latents z * latents_std + latents_mean, same dtype."""
        mu = z.float() * self._stat(self.latents_std, z) + self._stat(self.latents_mean, z)
        return mu.to(z.dtype)

    # -- cache layout --------------------------------------------------------

    @staticmethod
    def _cached_layers(module: nn.Module, prefix: str) -> list[tuple[str, CausalConv3d]]:
        # named_modules order is execution order here: every cached layer sits
        # in a block that is registered in the order it runs, and a Resample
        # has a single cached layer (time_conv).
        return [
            (f"{prefix}.{name}", m)
            for name, m in module.named_modules()
            if isinstance(m, CausalConv3d) and m.cache_frames > 0
        ]

    def _cache_shapes(self, module, prefix, batch, height, width):
        out = []
        for name, m in self._cached_layers(module, prefix):
            out.append((name, (batch, m.in_channels, m.cache_frames, height // m.res_div, width // m.res_div)))
        return out

    def encoder_cache_shapes(self, batch: int, height: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every encoder cache tensor, in order, for video of
        `height` x `width` pixels. Shape [B, C_in, frames(2, or 1 for the
        temporal downsamplers), H/d, W/d]; the name is the layer's state-dict prefix."""
        return self._cache_shapes(self.encoder, "encoder", batch, height, width)

    def decoder_cache_shapes(self, batch: int, h: int, w: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every decoder cache tensor, in order, for latents
        of `h` x `w` (all 2 frames deep)."""
        r = self.spatial_ratio
        return self._cache_shapes(self.decoder, "decoder", batch, h * r, w * r)

    def new_encoder_cache(self, batch: int, height: int, width: int, dtype=None, device=None) -> CausalCache:
        dtype, device = dtype or self.dtype, device or self.device
        shapes = self.encoder_cache_shapes(batch, height, width)
        return CausalCache([torch.zeros(s, dtype=dtype, device=device) for _, s in shapes], first=True)

    def new_decoder_cache(self, batch: int, h: int, w: int, dtype=None, device=None) -> CausalCache:
        dtype, device = dtype or self.dtype, device or self.device
        shapes = self.decoder_cache_shapes(batch, h, w)
        return CausalCache([torch.zeros(s, dtype=dtype, device=device) for _, s in shapes], first=True)

    # -- pure step functions (export surface) ---------------------------------

    def encoder_step(
        self, frames: torch.Tensor, cache_tensors: list[torch.Tensor], first: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """frames [B,3,T,H,W] in [-1,1], T = 1 when `first`, else a multiple
        of 4 (Wan uses 4) -> normalised latents [B,z,T//4 or 1,H/8,W/8] and
        the new cache tensors (same shapes as `cache_tensors`)."""
        t = frames.shape[2]
        if (first and t != 1) or (not first and t % self.temporal_ratio != 0):
            raise ValueError(f"encoder_step: got {t} frames with first={first}")
        io = _CacheIO(cache_tensors, first)
        h = self.encoder.step(frames.to(self.dtype), io)  # [B, 2z, t', H/8, W/8]
        mu = self.conv1.step(h, io)[:, : self.z_dim]
        return self.normalize(mu), io.done()

    def decoder_step(
        self, latents: torch.Tensor, cache_tensors: list[torch.Tensor], first: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised latents [B,z,1,h,w] -> video frames [B,3,1 if first
        else 4,8h,8w] (not clamped) and the new cache tensors."""
        io = _CacheIO(cache_tensors, first)
        z = self.conv2.step(self.denormalize(latents).to(self.dtype), io)  # [B, z, 1, h, w]
        x = self.decoder.step(z, io)
        return x, io.done()

    # -- stateful wrappers ------------------------------------------------------

    def encode_chunk(self, frames: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """`encoder_step` on `cache` (updated in place): frames [B, 3, 1 or 4k, H, W] -> latents [B, z, 1 or k, H/8, W/8]."""
        mu, cache.tensors = self.encoder_step(frames, cache.tensors, cache.first)
        cache.first = False
        return mu

    def decode_chunk(self, latents: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """`decoder_step` on `cache` (updated in place): latents [B, z, 1, h, w] -> frames [B, 3, 1 or 4, 8h, 8w]."""
        x, cache.tensors = self.decoder_step(latents, cache.tensors, cache.first)
        cache.first = False
        return x

    # -- high-level API ----------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tile: TileSpec | None = None) -> torch.Tensor:
        """video [B,3,T,H,W] in [-1,1], T = 1+4k, H and W multiples of 8 ->
        normalised latent mean [B,z,1+k,H/8,W/8] (no sampling).

        tile: the release's tiling (see `vae_tiling`), in latent units; the
        result is then on the host, in the video's dtype."""
        b, _, t, hgt, wid = video.shape
        r = self.temporal_ratio
        if (t - 1) % r or hgt % self.spatial_ratio or wid % self.spatial_ratio:
            raise ValueError(
                f"encode: need T=1+{r}k and sides multiple of {self.spatial_ratio}, got {tuple(video.shape)}"
            )
        if tile is not None:
            # Tiles run on the model's device, the blend on the host (the release's split).
            return tiled_encode(self.encode, video, tile, self.spatial_ratio, device=self.device)
        cache = self.new_encoder_cache(b, hgt, wid, device=video.device)
        out = [self.encode_chunk(video[:, :, :1], cache)]
        for i in range(1, t, r):
            out.append(self.encode_chunk(video[:, :, i : i + r], cache))
        return torch.cat(out, dim=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: TileSpec | None = None, clamp: bool = True) -> torch.Tensor:
        """normalised latents [B,z,F,h,w] -> video [B,3,1+4(F-1),8h,8w] in [-1,1],
        one latent frame at a time.

        tile: the release's tiling (see `vae_tiling`); the result is then on
        the host, in the latents' dtype, and clamped after blending only.
        clamp=False returns the raw decoder output."""
        if tile is not None:
            fn = lambda z: self.decode(z, clamp=False)  # noqa: E731 - a tile is blended unclamped
            return tiled_decode(fn, latents, tile, self.spatial_ratio, device=self.device)
        b, _, f, h, w = latents.shape
        cache = self.new_decoder_cache(b, h, w, device=latents.device)
        out = torch.cat([self.decode_chunk(latents[:, :, i : i + 1], cache) for i in range(f)], dim=2)
        return out.clamp(-1.0, 1.0) if clamp else out
