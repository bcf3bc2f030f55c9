"""The VAE's 3D convolutions on oneDNN with packed weights (`WanVAE.use_onednn`, what the torch backend runs on a CPU).

Same model, same frames: the full-size VAE (dim 96, fresh random weights)
encodes and decodes within float32 rounding of the default path, far inside
1/255; torch's per-sample im2col kernel no longer runs; the packed weights
follow the module's weights; training and export keep the default path.
"""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tempomaster.models.presets import VAEConfig
from tempomaster.models.vae import WanVAE

SLOW_KERNEL = "aten::slow_conv3d_forward"


@pytest.fixture(scope="module")
def full_vae():
    torch.manual_seed(torch.seed() % 2**31)  # fresh weights each run
    return WanVAE(VAEConfig()).eval()


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 5, 16, 16, generator=gen) * 2 - 1, torch.randn(1, 16, 2, 2, 2, generator=gen)


def _slow_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == SLOW_KERNEL)


def _pointwise_conv_calls(vae, fn) -> int:
    """CausalConv3d calls with a 1x1x1 kernel (cheap: left on the default path)."""
    from tempomaster.models.vae import CausalConv3d

    calls = []
    pointwise = [m for m in vae.modules() if isinstance(m, CausalConv3d) and m.weight.shape[2:].numel() == 1]
    for m in pointwise:  # layers run through .step, not __call__: wrap the conv itself
        m._conv_forward = (lambda f: lambda *a: calls.append(1) or f(*a))(m._conv_forward)
    try:
        fn()
    finally:
        for m in pointwise:
            del m._conv_forward
    return len(calls)


def test_onednn_path_gives_the_same_frames(full_vae):
    video, latents = _inputs(torch.seed() % 2**31)
    fast = copy.deepcopy(full_vae).use_onednn()
    with torch.inference_mode():
        z_want, x_want = full_vae.encode(video), full_vae.decode(latents, clamp=False)
        z_got, x_got = fast.encode(video), fast.decode(latents, clamp=False)
    assert (z_got - z_want).abs().max() <= 1e-5 * z_want.abs().max()
    assert (x_got - x_want).abs().max() <= 1e-5 * x_want.abs().max()
    assert (x_got.clamp(-1, 1) - x_want.clamp(-1, 1)).abs().max() < 1 / 255


def test_onednn_path_replaces_the_im2col_kernel(full_vae):
    """Only the 1x1x1 convolutions are left on torch's per-sample im2col kernel."""
    video, _ = _inputs(1)
    fast = copy.deepcopy(full_vae).use_onednn()
    with torch.inference_mode():
        default = _slow_calls(lambda: full_vae.encode(video))  # batch 1: torch's default choice
        pointwise = _pointwise_conv_calls(fast, lambda: fast.encode(video))
        assert _slow_calls(lambda: fast.encode(video)) == pointwise
        assert default > pointwise + 10
        assert _slow_calls(lambda: fast.use_onednn(False).encode(video)) == default


def test_packed_weights_follow_the_weights(full_vae):
    video, _ = _inputs(2)
    fast = copy.deepcopy(full_vae).use_onednn()
    other = WanVAE(VAEConfig()).eval()
    with torch.inference_mode():
        fast.encode(video)  # packs the first weights
    fast.load_state_dict(other.state_dict())
    with torch.inference_mode():
        got, want = fast.encode(video), other.encode(video)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_training_keeps_the_default_path(full_vae):
    """No autograd through packed weights: with gradients on, the default kernels run and gradients flow."""
    video, _ = _inputs(3)
    fast = copy.deepcopy(full_vae).use_onednn()
    frames = video[:, :, :1]
    cache = fast.new_encoder_cache(1, 16, 16)
    mu = fast.encode_chunk(frames, cache)
    mu.square().mean().backward()
    assert fast.encoder.conv1.weight.grad is not None and fast.encoder.conv1.weight.grad.abs().sum() > 0


def test_export_keeps_a_plain_conv():
    from tempomaster.models.vae import CausalConv3d

    conv = CausalConv3d(4, 8, 3, padding=1).eval()
    conv.onednn = True
    with torch.no_grad():
        program = torch.onnx.export(conv, (torch.randn(1, 4, 3, 6, 6),), dynamo=True, verbose=False)
    assert [n.op_type for n in program.model_proto.graph.node] == ["Conv"]
