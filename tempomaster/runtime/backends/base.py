"""The seam between the sampling loop and whatever runs the networks.

Every backend serves the same three groups of calls on torch tensors that live
on its device; the pipeline never knows which runtime answered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ...dtypes import TENSOR_DTYPES


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline must know about the networks to shape their inputs."""

    text_len: int
    text_dim: int
    head_dim: int
    patch_size: tuple[int, int, int]
    z_dim: int
    dit_dtype: torch.dtype


def model_info_from_manifest(data: dict) -> ModelInfo:
    """A build's ModelInfo; the DiT dtype is its graph's `x` input (an fp8 build's DiT takes its base dtype)."""
    models = data["models"]
    dit = models["dit"]
    x = next(t for t in data["graphs"]["dit"]["inputs"] if t["name"] == "x")
    return ModelInfo(
        text_len=int(models["t5"]["text_len"]),
        text_dim=int(dit["text_dim"]),
        head_dim=int(dit["dim"]) // int(dit["num_heads"]),
        patch_size=tuple(dit["patch_size"]),
        z_dim=int(dit["out_dim"]),
        dit_dtype=TENSOR_DTYPES[x["dtype"]],
    )


class Backend(ABC):
    name: str = "abstract"
    device: torch.device = torch.device("cpu")
    info: ModelInfo
    # Chunks per VAE decode call the pipeline sends: 1 keeps one chunk's activations on the
    # device; a backend that spreads a batch over ranks asks for one chunk per rank.
    vae_batch: int = 1
    # Chunks per VAE encode call: None sends a stage's active chunks in one call, as the
    # release does (one encode per stage); a backend splits it further where a graph's
    # safe batch or profile needs. Batched, the CPU runs the encoder's convolutions on
    # oneDNN instead of torch's per-sample im2col path (benchmarks/bench_vae_conv.py).
    vae_encode_batch: int | None = None

    @abstractmethod
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask int64 [B, text_len] -> embeddings [B, text_len, text_dim], zero past each prompt."""

    @abstractmethod
    def velocity(
        self,
        x: torch.Tensor,  # [B, 16, f, h, w] noisy latents
        y: torch.Tensor,  # [B, 20, f, h, w] mask + condition latents
        timestep: torch.Tensor,  # [1] float, the same for the whole batch
        context: torch.Tensor,  # [B, text_len, text_dim] text embeddings
        rope_cos: torch.Tensor,  # [B, f*(h/2)*(w/2), head_dim/2] float32
        rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        """One DiT call: [B, 16, f, h, w] velocity for the whole batch."""

    @abstractmethod
    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1+k, H/8, W/8]."""

    @abstractmethod
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, 16, F, h, w] -> video [B, 3, 1+4(F-1), 8h, 8w] in [-1, 1]."""


class BackendWrapper(Backend):
    """Forwards every call to `inner`; a subclass overrides only the calls it observes or replaces.

    Attributes a wrapper does not define (a build backend's `check_request`,
    `tokenizer`, ...) are read from the wrapped backend, as are its VAE batch sizes
    unless a subclass sets its own as a class attribute.
    """

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.device, self.info = inner.name, inner.device, inner.info

    @property
    def vae_batch(self) -> int:
        return self.inner.vae_batch

    @property
    def vae_encode_batch(self) -> int | None:
        return self.inner.vae_encode_batch

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def encode_text(self, ids, mask):
        return self.inner.encode_text(ids, mask)

    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        return self.inner.velocity(x, y, timestep, context, rope_cos, rope_sin)

    def vae_encode(self, video):
        return self.inner.vae_encode(video)

    def vae_decode(self, latents):
        return self.inner.vae_decode(latents)


# ----------------------------------------------------------------------------
# What every exported-graph backend does the same way
# ----------------------------------------------------------------------------


def batch_slices(total: int, limit: int) -> list[slice]:
    """Slices of at most `limit` along the batch: a graph's safe batch is never exceeded."""
    limit = max(1, limit)
    return [slice(s, min(s + limit, total)) for s in range(0, total, limit)]


def encoder_steps(video: torch.Tensor, step: int) -> list[torch.Tensor]:
    """[B, 3, 1 + step*k, H, W] -> the causal VAE encoder's steps: the first frame, then groups of `step`."""
    frames = video.shape[2]
    if (frames - 1) % step:
        raise ValueError(f"VAE encode needs 1 + {step}k frames, got {frames}")
    return [video[:, :, :1]] + [video[:, :, i : i + step] for i in range(1, frames, step)]


def decoder_steps(latents: torch.Tensor) -> list[torch.Tensor]:
    """[B, 16, F, h, w] -> the causal VAE decoder's steps: one latent frame each."""
    return [latents[:, :, i : i + 1] for i in range(latents.shape[2])]
