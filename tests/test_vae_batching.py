"""A stage's condition videos go through the VAE encoder in one batched call, with the same latents.

Batching changes which convolution kernels run (oneDNN instead of torch's
per-sample im2col path on a CPU), not what is computed: each chunk's
latents equal its own per-chunk encode to float32 rounding, on every
backend, and a whole generation gives the same frames with one encode per
stage instead of one per chunk.
"""

import copy

import pytest
import torch

from tempomaster.models.presets import VAEConfig
from tempomaster.models.vae import WanVAE
from tempomaster.runtime.backends.torch import TorchBackend
from tempomaster.runtime.counting import CountingBackend, expected_backend_calls
from tempomaster.runtime.pipeline import GenerationRequest, generate

TOL = 1e-5  # relative to the latents' largest magnitude: float32 rounding of another summation order


def _video(batch: int, frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=gen) * 2 - 1


def _assert_same(batched: torch.Tensor, single: torch.Tensor) -> None:
    assert batched.shape == single.shape
    scale = single.abs().max().item()
    assert scale > 0
    assert (batched - single).abs().max().item() <= TOL * scale


def _per_chunk(encode, video: torch.Tensor) -> torch.Tensor:
    return torch.cat([encode(video[i : i + 1]) for i in range(video.shape[0])])


def test_full_size_vae_batched_encode_equals_per_chunk():
    """The real width (dim 96), seeded random weights: batch 3 against three calls of 1."""
    torch.manual_seed(11)
    vae = WanVAE(VAEConfig()).eval()
    video = _video(3, 5, 16, 16, seed=torch.seed() % 2**31)
    with torch.inference_mode():
        _assert_same(vae.encode(video), _per_chunk(vae.encode, video))


class RecordingEncodes(CountingBackend):
    """Counts every call and keeps what each VAE encode returned, one entry per chunk."""

    def __init__(self, inner):
        super().__init__(inner)
        self.latents: list[torch.Tensor] = []

    def vae_encode(self, video):
        out = super().vae_encode(video)
        self.latents += list(out.float().cpu())
        return out


class PerChunkEncodes(RecordingEncodes):
    """The runtime as it was: one VAE encode call per chunk."""

    vae_encode_batch = 1


def _backend(kind: str, models, build):
    if kind == "torch":
        return TorchBackend(models), models.tokenizer
    pytest.importorskip("onnxruntime")
    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend.from_build(build, threads=1)
    return backend, backend.tokenizer()


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_generation_encodes_once_per_stage_with_the_same_latents(tiny_models, tiny_build, kind):
    """1 + 2 + 4 active chunks: 3 encode calls instead of 7, each chunk's latents and the video the same."""
    models = copy.deepcopy(tiny_models)
    inner, tokenizer = _backend(kind, models, tiny_build)
    seed = torch.seed() % 2**31  # fresh noise each run
    request = dict(prompt="a red ball", height=32, width=48, num_frames=9, steps_per_stage=(2, 1, 1), seed=seed)
    batched, per_chunk = RecordingEncodes(inner), PerChunkEncodes(inner)
    got = generate(batched, tokenizer, GenerationRequest(**request), progress=False)
    want = generate(per_chunk, tokenizer, GenerationRequest(**request), progress=False)
    assert (batched.log.vae_encode, batched.log.vae_encode_items) == (3, 7)
    assert (per_chunk.log.vae_encode, per_chunk.log.vae_encode_items) == (7, 7)
    assert batched.log.vae_encode == expected_backend_calls(9, (4, 2, 1), (2, 1, 1), 8.0).vae_encode
    assert (
        per_chunk.log.vae_encode == expected_backend_calls(9, (4, 2, 1), (2, 1, 1), 8.0, vae_encode_batch=1).vae_encode
    )
    assert len(batched.latents) == len(per_chunk.latents) == 7
    for a, b in zip(batched.latents, per_chunk.latents):
        _assert_same(a, b)
    for a, b in zip(got.stages, want.stages):
        assert (a.frames - b.frames).abs().max().item() <= 1e-4
