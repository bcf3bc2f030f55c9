"""Wan2.1 VAE: checkpoint layout, oracle vs diffusers' AutoencoderKLWan,
explicit-cache streaming, bf16 (tiling: test_vae_tiling.py).

The oracle runs the real width (dim 96) at 32x32 with fresh random weights.
"""

from __future__ import annotations

import pytest
import torch
from vae_diffusers_keys import wan_vae_to_diffusers

from tempomaster.models.presets import VAEConfig
from tempomaster.models.vae import LATENTS_MEAN, LATENTS_STD, WanVAE


def _diffusers():
    """diffusers is only the oracle: tests that need it skip without it."""
    return pytest.importorskip("diffusers")


from checkpoint_layouts import layout  # noqa: E402

TOL = 1e-4


def _expected_keys() -> dict[str, tuple[int, ...]]:
    return layout("VAE")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Fresh seeded weights: N(0, scale^2) for every weight and bias, gammas
    around 1; the decoder's output conv smaller so little is clamped."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                s = scale * (0.2 if name.startswith("decoder.head.2") else 1.0)
                p.copy_(s * torch.randn(p.shape, generator=g))


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1))


# ---------------------------------------------------------------------------
# fixtures: one dim-96 model pair, computed once
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    # built on meta and filled directly: skips the (slow) default init
    with torch.device("meta"):
        ours = WanVAE(VAEConfig())
        ref = _diffusers().AutoencoderKLWan(base_dim=96, z_dim=16)
    ours.to_empty(device="cpu").eval()
    ours.latents_mean.copy_(torch.tensor(LATENTS_MEAN))  # to_empty leaves buffers empty too
    ours.latents_std.copy_(torch.tensor(LATENTS_STD))
    _randomize(ours, seed=1)
    mapped = {k: v.clone() for k, v in wan_vae_to_diffusers(ours.state_dict()).items()}
    ref.load_state_dict(mapped, strict=True, assign=True)
    ref.eval()
    ref.disable_tiling()
    ref.disable_slicing()
    assert not any(t.is_meta for t in [*ref.parameters(), *ref.buffers()])
    return ours, ref


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(2)
    return torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1  # 9 frames -> 3 latent frames


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 16, 3, 4, 4, generator=g)  # normalised; -> 9 frames 32x32


@pytest.fixture(scope="module")
def ref_outputs(pair, video, latents):
    """diffusers' encode (raw mean, normalised here) and decode (of the de-normalised latents)."""
    _, ref = pair
    mean, std = _stats()
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
        frames = ref.decode(latents * std + mean).sample
    return (mu - mean) / std, frames


@pytest.fixture(scope="module")
def our_outputs(pair, video, latents):
    ours, _ = pair
    return ours.encode(video), ours.decode(latents)


# ---------------------------------------------------------------------------
# checkpoint layout
# ---------------------------------------------------------------------------


def test_state_dict_matches_release_checkpoint():
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    sd = model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    expected = _expected_keys()
    assert sorted(set(expected) - set(got)) == []  # missing
    assert sorted(set(got) - set(expected)) == []  # unexpected
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert len(sd) == 194
    n = sum(v.numel() for v in sd.values())
    assert round(n / 1e6, 1) == 126.9
    # mean/std are buffers, but not checkpoint keys
    assert "latents_mean" in dict(model.named_buffers()) and "latents_mean" not in sd


def test_key_mapping_covers_diffusers():
    with torch.device("meta"):
        ours = WanVAE(VAEConfig())
        ref = _diffusers().AutoencoderKLWan()
    mapped = wan_vae_to_diffusers(ours.state_dict())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want


# ---------------------------------------------------------------------------
# oracle
# ---------------------------------------------------------------------------


def test_encode_matches_diffusers(our_outputs, ref_outputs, video):
    z, z_ref = our_outputs[0], ref_outputs[0]
    assert z.shape == (1, 16, 3, 4, 4)
    assert z_ref.std() > 0.1  # non-trivial
    assert _rel(z, z_ref) < TOL


def test_decode_matches_diffusers(our_outputs, ref_outputs):
    x, x_ref = our_outputs[1], ref_outputs[1]
    assert x.shape == (1, 3, 9, 32, 32)
    assert (x_ref.abs() < 1).float().mean() > 0.9  # mostly not clamped
    assert x_ref.std() > 0.05
    assert _rel(x, x_ref) < TOL


def test_perturbed_weight_breaks_oracle(pair, video, latents, ref_outputs):
    ours, _ = pair
    cases = [
        ("encoder.downsamples.3.residual.2.weight", lambda: ours.encode(video), ref_outputs[0]),
        ("decoder.upsamples.8.residual.6.weight", lambda: ours.decode(latents), ref_outputs[1]),
    ]
    for name, run, want in cases:
        p = dict(ours.named_parameters())[name]
        idx = (0, 0, 1, 1, 1)
        old = p.data[idx].clone()
        try:
            p.data[idx] += 0.5
            assert _rel(run(), want) > TOL, name
        finally:
            p.data[idx] = old


# ---------------------------------------------------------------------------
# streaming with explicit cache tensors
# ---------------------------------------------------------------------------


def test_decoder_step_streaming(pair, latents, our_outputs, ref_outputs):
    ours, _ = pair
    b, _, f, h, w = latents.shape
    shapes = [s for _, s in ours.decoder_cache_shapes(b, h, w)]
    caches = [torch.zeros(s) for s in shapes]
    frames = []
    with torch.no_grad():
        for i in range(f):
            out, caches = ours.decoder_step(latents[:, :, i : i + 1], caches, first=(i == 0))
            assert out.shape == (b, 3, 1 if i == 0 else 4, 8 * h, 8 * w)
            assert [tuple(c.shape) for c in caches] == shapes  # fixed shapes
            frames.append(out)
    x = torch.cat(frames, 2).clamp(-1, 1)
    assert torch.equal(x, our_outputs[1])
    assert _rel(x, ref_outputs[1]) < TOL


def test_encoder_step_streaming(pair, video, our_outputs, ref_outputs):
    ours, _ = pair
    b, _, t, H, W = video.shape
    shapes = [s for _, s in ours.encoder_cache_shapes(b, H, W)]
    assert len(shapes) == 24
    with torch.no_grad():
        # Wan's chunking: 1 frame, then groups of 4
        caches = [torch.zeros(s) for s in shapes]
        out = []
        for i, (s, e) in enumerate([(0, 1), (1, 5), (5, 9)]):
            mu, caches = ours.encoder_step(video[:, :, s:e], caches, first=(i == 0))
            assert [tuple(c.shape) for c in caches] == shapes
            out.append(mu)
        z = torch.cat(out, 2)
    assert torch.equal(z, our_outputs[0])
    assert _rel(z, ref_outputs[0]) < TOL


def test_encoder_step_larger_chunks(small):
    """After the first frame, chunks of 8 frames give what chunks of 4 give:
    all mixing over time is causal convolution with the cache."""
    g = torch.Generator().manual_seed(9)
    video = torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1
    cache = small.new_encoder_cache(1, 32, 32)
    with torch.no_grad():
        z0 = small.encode_chunk(video[:, :, :1], cache)
        z1 = small.encode_chunk(video[:, :, 1:], cache)
    assert not cache.first
    assert _rel(torch.cat([z0, z1], 2), small.encode(video)) < TOL


def test_cache_object_and_names(pair):
    ours, _ = pair
    cache = ours.new_decoder_cache(2, 3, 5)
    names = [n for n, _ in ours.decoder_cache_shapes(2, 3, 5)]
    assert len(cache.tensors) == len(names) == 32 and cache.first
    assert names[0] == "decoder.conv1" and names[-1] == "decoder.head.2"
    assert "decoder.upsamples.3.time_conv" in names
    assert all(float(t.abs().sum()) == 0 for t in cache.tensors)
    enc = dict(ours.encoder_cache_shapes(1, 64, 32))
    assert enc["encoder.conv1"] == (1, 3, 2, 64, 32)
    assert enc["encoder.downsamples.5.time_conv"] == (1, 192, 1, 16, 8)
    assert enc["encoder.head.2"] == (1, 384, 2, 8, 4)
    with pytest.raises(ValueError):
        ours.encoder_step(torch.zeros(1, 3, 4, 32, 32), ours.new_encoder_cache(1, 32, 32).tensors, first=True)


# ---------------------------------------------------------------------------
# small width (a bigger picture at CPU speed)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    model = WanVAE(VAEConfig(dim=8)).eval()
    _randomize(model, seed=4)
    return model


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


def test_bf16_close_to_fp32(small):
    g = torch.Generator().manual_seed(8)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    lat = torch.randn(1, 16, 2, 4, 4, generator=g)
    z32, x32 = small.encode(video), small.decode(lat)
    half = WanVAE(VAEConfig(dim=8)).eval()
    half.load_state_dict(small.state_dict())
    half.to(torch.bfloat16)
    z16, x16 = half.encode(video), half.decode(lat)
    assert z16.dtype == x16.dtype == torch.bfloat16
    assert half.latents_mean.dtype == torch.bfloat16  # buffers follow .to(); the arithmetic is fp32
    assert _rel(z16.float(), z32) < 0.05
    assert _rel(x16.float(), x32) < 0.05


# ---------------------------------------------------------------------------
# export surface
# ---------------------------------------------------------------------------


def test_decoder_step_exports_with_explicit_cache(small, tmp_path):
    """decoder_step is a pure function of (latent, caches): it exports to ONNX
    with every cache tensor as a named graph input and output."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import warnings

    shapes = small.decoder_cache_shapes(1, 4, 4)
    names = [n.replace(".", "_") for n, _ in shapes]

    class Step(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, z, *caches):
            x, new = self.vae.decoder_step(z, list(caches), first=False)
            return (x, *new)

    g = torch.Generator().manual_seed(10)
    z = torch.randn(1, 16, 1, 4, 4, generator=g)
    caches = [torch.randn(s, generator=g) for _, s in shapes]
    path = tmp_path / "dec_step.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Step(small),
            (z, *caches),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["z", *names],
            output_names=["x", *[n + "_out" for n in names]],
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["z", *names]
    got = sess.run(None, {"z": z.numpy(), **{n: c.numpy() for n, c in zip(names, caches)}})
    with torch.no_grad():
        x, new = small.decoder_step(z, caches, first=False)
    for a, b in zip(got, [x, *new]):
        assert a.shape == tuple(b.shape)
        assert _rel(torch.from_numpy(a), b) < 1e-4
