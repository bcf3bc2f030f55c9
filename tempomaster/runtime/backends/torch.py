"""The torch backend: the reference models of `tempomaster.models`, in eager mode, on any torch device."""

from __future__ import annotations

import torch

from ...models.checkpoints import ModelSet
from ...models.vae_tiling import TileSpec, resolve_tile
from .base import Backend, ModelInfo


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        models: ModelSet,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tile: bool | TileSpec = False,
    ):
        self.device = torch.device(device)
        self.tile = resolve_tile(tile)  # True: every VAE encode/decode tiled as the release does
        self.dtype = dtype
        # umT5 overflows in fp16; it runs in bf16 or fp32 only.
        t5_dtype = torch.float32 if dtype == torch.float16 else dtype
        # Weights move to the device once, here; the calls below only move their inputs.
        self.dit = models.dit.to(self.device, dtype).eval()
        self.vae = models.vae.to(self.device, dtype).eval()
        # where it applies (float32 on a CPU), the 3D convolutions on oneDNN: benchmarks/bench_vae_conv.py
        self.vae.use_onednn()
        self.t5 = models.t5.to(self.device, t5_dtype).eval()
        cfg = self.dit.cfg
        self.info = ModelInfo(
            text_len=models.preset.t5.text_len,
            text_dim=cfg.text_dim,
            head_dim=cfg.head_dim,
            patch_size=tuple(cfg.patch_size),
            z_dim=cfg.out_dim,
            dit_dtype=dtype,
        )

    @torch.inference_mode()
    def encode_text(self, ids, mask):
        return self.t5(ids.to(self.device), mask.to(self.device))

    @torch.inference_mode()
    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        return self.dit(x, y, timestep.to(self.device), context, rope_cos, rope_sin)

    @torch.inference_mode()
    def vae_encode(self, video):
        if self.tile is not None:
            # The input stays where it is; tiles visit the device one at a time.
            return self.vae.encode(video.to(dtype=self.dtype), tile=self.tile).to(self.device)
        return self.vae.encode(video.to(self.device, self.dtype))

    @torch.inference_mode()
    def vae_decode(self, latents):
        if self.tile is not None:
            return self.vae.decode(latents.to(dtype=self.dtype), tile=self.tile).to(self.device)
        return self.vae.decode(latents.to(self.device, self.dtype))
