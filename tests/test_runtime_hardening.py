"""Release parity, devices, builds with several frame counts, padding chunks, memory: the runtime's hard edges."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from tempomaster.planner import plan_stages
from tempomaster.runtime.backends.torch import TorchBackend
from tempomaster.runtime.pipeline import (
    BackendClock,
    GenerationRequest,
    cover_resize_center_crop,
    denoise_stage,
    generate,
)
from tempomaster.runtime.schedule import StageSchedule
from tempomaster.runtime.video import to_uint8_frames

# ----------------------------------------------------------------------------
# Release parity: reference-image resize and uint8 conversion (SPEC 3)
# ----------------------------------------------------------------------------


def _bilinear_float64(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize, align_corners=False, no antialiasing, written from its definition in float64.

    Output pixel i samples source coordinate (i + 0.5) * in / out - 0.5, clamped
    below at 0; the neighbours are floor and floor + 1 (held at the last pixel).
    """

    def weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = weights(img.shape[0], out_h)
    x0, x1, fx = weights(img.shape[1], out_w)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize(
    "size, target, resized, offsets",
    [
        # s = max(16/30, 16/36) = 0.5333: (int(16.0), int(19.2)) = (16, 19); left = round(1.5) = 2 (//2 would give 1)
        ((30, 36), (16, 16), (16, 19), (0, 2)),
        # s = max(32/20, 48/50) = 1.6: (32, 80); left = round(16.0) = 16
        ((20, 50), (32, 48), (32, 80), (0, 16)),
        # s = max(16/50, 32/40) = 0.8: (40, 32); top = round(12.0) = 12 (downscale without antialiasing)
        ((50, 40), (16, 32), (40, 32), (12, 0)),
    ],
)
def test_reference_image_resize_is_the_releases(size, target, resized, offsets):
    rng = np.random.default_rng(sum(size))
    data = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    H, W = target
    h, w = size
    s = max(H / h, W / w)
    assert (int(h * s), int(w * s)) == resized
    expected = _bilinear_float64(data.astype(np.float64) * 2 / 255 - 1, *resized)
    top, left = offsets
    expected = expected[top : top + H, left : left + W].transpose(2, 0, 1)
    got = cover_resize_center_crop(Image.fromarray(data), H, W).double().numpy()
    assert got.shape == (3, H, W)
    assert np.abs(got - expected).max() < 1e-5
    # the old LANCZOS resize differs by far more than float rounding
    old = (
        np.asarray(Image.fromarray(data).resize((resized[1], resized[0]), Image.LANCZOS), dtype=np.float64) * 2 / 255
        - 1
    )
    assert np.abs(old[top : top + H, left : left + W].transpose(2, 0, 1) - expected).max() > 0.05


def test_uint8_conversion_truncates_as_the_release():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.999, 1.5, -2.0, 0.996, -0.5])
    # (x + 1) * 127.5 = 0, 255, 127.5, 191.25, 0.1275, 318.75, -127.5, 254.49, 63.75, clipped then truncated
    expected = [0, 255, 127, 191, 0, 255, 0, 254, 63]
    video = x.reshape(1, 1, 1, -1).expand(3, 1, 1, -1)
    got = to_uint8_frames(video)[0, 0, :, 0].tolist()
    assert got == expected
    assert round(127.5) == 128  # rounding, the old rule, would make the third value 128


# ----------------------------------------------------------------------------
# Inputs handed to the backend are on its device, and constant per stage
# ----------------------------------------------------------------------------


class RecordingBackend:
    """Records what reaches `velocity` and `vae_encode`; answers with the wrapped backend."""

    def __init__(self, inner):
        self.inner, self.info, self.name, self.device = inner, inner.info, "recording", inner.device
        self.velocity_args, self.encoded = [], []

    def encode_text(self, ids, mask):
        return self.inner.encode_text(ids, mask)

    def velocity(self, *args):
        self.velocity_args.append(args)
        return self.inner.velocity(*args)

    def vae_encode(self, video):
        self.encoded.append(video.clone())
        return self.inner.vae_encode(video)

    def vae_decode(self, latents):
        return self.inner.vae_decode(latents)


def test_velocity_inputs_are_on_the_device_and_built_once_per_stage(tiny_models):
    backend = RecordingBackend(TorchBackend(tiny_models))
    request = GenerationRequest(prompt="a boat", height=32, width=48, num_frames=9, steps_per_stage=(3, 2, 2), seed=2)
    generate(backend, tiny_models.tokenizer, request, progress=False)
    assert len(backend.velocity_args) == 7
    for args in backend.velocity_args:
        assert all(a.device == backend.device for a in args)
        x, y, t, ctx, cos, sin = args
        assert x.dtype == y.dtype == ctx.dtype == backend.info.dit_dtype  # x is never promoted against y
    # within a stage y, context and the rope tables are the same tensors every step
    steps = [3, 2, 2]
    start = 0
    for n in steps:
        stage_args = backend.velocity_args[start : start + n]
        for k in (1, 3, 4, 5):
            assert len({a[k].data_ptr() for a in stage_args}) == 1
        start += n


def test_reference_image_pixels_condition_stage_zero(tiny_models):
    backend = RecordingBackend(TorchBackend(tiny_models))
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)  # another size than the output
    request = GenerationRequest(
        prompt="x",
        ref_images={0: Image.fromarray(data), 4: Image.fromarray(data[::-1])},
        height=32,
        width=32,
        num_frames=9,
        steps_per_stage=(1, 1, 1),
    )
    H, W = request.output_size()
    generate(backend, tiny_models.tokenizer, request, progress=False)
    video = backend.encoded[0][0]  # stage 0's condition video [3, 9, H, W]
    s = max(H / 30, W / 36)
    size = (int(30 * s), int(36 * s))
    top, left = round((size[0] - H) / 2), round((size[1] - W) / 2)
    for frame, img in ((0, data), (4, data[::-1])):
        want = _bilinear_float64(img.astype(np.float64) * 2 / 255 - 1, *size)[top : top + H, left : left + W]
        assert np.abs(video[:, frame].double().numpy() - want.transpose(2, 0, 1)).max() < 1e-5
    others = [f for f in range(9) if f not in (0, 4)]
    assert video[:, others].abs().max() == 0


# ----------------------------------------------------------------------------
# Chunks of nothing but padding never reach the DiT
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_frames, intervals, stage_index, active, total",
    [
        (5, (2, 1), 1, 2, 4),  # 10 frames in 4 chunks of 5: chunks 2 and 3 are padding
        (13, (2, 1), 1, 3, 4),  # 26 frames in 4 chunks of 9: chunk 3 is padding
        (9, (3, 1), 1, 3, 4),  # 27 frames in 4 chunks of 9: chunk 3 is padding
    ],
)
def test_padding_only_chunks_are_skipped(num_frames, intervals, stage_index, active, total):
    stage = plan_stages(num_frames, intervals)[stage_index]
    assert stage.num_chunks == total and len(stage.active_chunks) == active
    assert stage.padded_frames == active * stage.chunk_frames >= stage.total_frames


def test_skipping_padding_chunks_leaves_the_others_unchanged(tiny_models):
    backend = TorchBackend(tiny_models)
    stage = plan_stages(5, (2, 1))[1]  # 4 chunks, 2 active
    everything = dataclasses.replace(
        stage, chunks=tuple(dataclasses.replace(c, num_valid=max(c.num_valid, 1)) for c in stage.chunks)
    )
    assert len(everything.active_chunks) == 4
    g = torch.Generator().manual_seed(9)
    f = stage.latent_frames
    y = torch.randn(4, 20, f, 4, 6, generator=g)
    ctx = torch.randn(1, 512, backend.info.text_dim, generator=g)
    neg = torch.randn(1, 512, backend.info.text_dim, generator=g)
    request = GenerationRequest(prompt="x", guidance_scale=4.0, seed=13)
    schedule = StageSchedule.create(3, 3.0)
    full, _ = denoise_stage(backend, everything, y, ctx, neg, request, schedule, BackendClock())
    skipped, _ = denoise_stage(backend, stage, y[:2], ctx, neg, request, schedule, BackendClock())
    assert skipped.shape[0] == 2
    assert torch.allclose(skipped, full[:2], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Builds whose stages need different latent frame counts (dynamic DiT frames)
# ----------------------------------------------------------------------------


@pytest.mark.slow  # ~95 s: three exports
def test_onnxruntime_runs_a_build_with_several_frame_counts(tmp_path, tiny_models):
    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape
    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

    shape = ExportShape(height=32, width=48, num_frames=9, intervals=(2, 1))
    assert shape.dit_latent_frames() == [2, 3]  # stage 0: 9 frames (3 latent); stage 1: chunks of 5 (2 latent)
    export_onnx(
        tiny_models,
        "fp32",
        shape,
        tmp_path / "b",
        preset_name="tiny",
        progress=False,
        graphs=["dit"] + [n for n in ("vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder", "t5")],
    )
    ort_backend = OnnxRuntimeBackend.from_build(tmp_path / "b")
    assert ort_backend.manifest.graph("dit")["meta"]["dynamic_frames"]
    request = GenerationRequest(
        prompt="a red ball",
        seed=3,
        height=32,
        width=48,
        num_frames=9,
        frame_intervals=(2, 1),
        steps_per_stage=(2, 2),
        shift_per_stage=(5.0, 3.0),
    )
    ours = generate(ort_backend, ort_backend.tokenizer(), request, progress=False)
    ref = generate(TorchBackend(tiny_models), tiny_models.tokenizer, request, progress=False)
    for a, b in zip(ours.stages, ref.stages):
        assert a.frames.shape == b.frames.shape
        assert (a.frames - b.frames).abs().max() < 1 / 255


# ----------------------------------------------------------------------------
# Memory: estimated before loading, refused when it cannot fit
# ----------------------------------------------------------------------------


def test_memory_estimate_grows_with_the_request():
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.memory import estimate_peak_memory

    preset = get_preset("tiny")
    small = estimate_peak_memory(
        preset,
        GenerationRequest(prompt="x", height=64, width=96, num_frames=17, steps_per_stage=(6, 4, 4)),
        dtype="fp32",
        device="cpu",
    )
    long = estimate_peak_memory(
        preset,
        GenerationRequest(prompt="x", height=64, width=96, num_frames=433, steps_per_stage=(6, 4, 4)),
        dtype="fp32",
        device="cpu",
    )
    # frames on the host: stage 1 holds 433 + 2 x 866 (+ a chunk) frames of 3 x 64 x 96 float32
    frame = 3 * 64 * 96 * 4
    assert long.parts["frames on the host"] >= (866 + 2 * 1732) * frame
    assert long.host_bytes > small.host_bytes
    assert small.device_bytes == 0


@pytest.mark.parametrize("flags", [["--num-frames", "100000"], ["--height", "16384", "--width", "16384"]])
def test_a_request_past_the_machine_is_refused_before_loading(flags, tmp_path, capsys, monkeypatch):
    import tempomaster.runtime.jobs as jobs
    from tempomaster.cli import run_main

    monkeypatch.setattr(jobs, "make_backend", lambda *a: pytest.fail("a model was loaded"))
    rc = run_main(["generate", "--prompt", "x", *flags, "--out", str(tmp_path / "v.mp4"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "GiB of host memory" in err and "available" in err
    assert not list(tmp_path.iterdir())


def test_dtype_disagreeing_with_the_build_is_refused(tiny_build, tmp_path, capsys):
    from tempomaster.cli import run_main

    rc = run_main(
        [
            "generate",
            "--prompt",
            "x",
            "--engines",
            str(tiny_build),
            "--dtype",
            "bf16",
            "--out",
            str(tmp_path / "v.mp4"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--dtype bf16" in err and "fp32" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_cuda_matches_cpu(tiny_models):
    from tempomaster.models.tiny import build_tiny_models

    request = GenerationRequest(
        prompt="a red ball", height=32, width=48, num_frames=9, steps_per_stage=(2, 1, 1), seed=4
    )
    cpu = generate(TorchBackend(tiny_models), tiny_models.tokenizer, request, progress=False)
    on_gpu = build_tiny_models()  # the backend moves its models: not the session's shared CPU set
    gpu = generate(TorchBackend(on_gpu, device="cuda"), on_gpu.tokenizer, request, progress=False)
    for a, b in zip(cpu.stages, gpu.stages):
        assert b.frames.device.type == "cpu"  # decoded frames live on the host
        assert (a.frames - b.frames).abs().max() < 2 / 255


@pytest.mark.slow
def test_memory_estimate_against_the_measured_peak():
    """The estimate covers the measured peak RSS of a real run, without overshooting by more than half."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    res = subprocess.run([sys.executable, str(script), "--frames", "17"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ratio = float(res.stdout.split("(")[-1].split("x")[0])
    assert 1.0 <= ratio <= 1.5, res.stdout


def test_condition_videos_are_built_one_encode_call_at_a_time(tiny_models, monkeypatch):
    """A later stage builds its chunks' condition videos only for the encode call that takes them: with
    `vae_encode_batch` 1, each only once the previous one has been encoded."""
    from tempomaster.runtime import pipeline

    built = []
    original = pipeline.chunk_condition_video

    def counting(frames, stage, chunk):
        built.append((stage.index, chunk.index))
        return original(frames, stage, chunk)

    monkeypatch.setattr(pipeline, "chunk_condition_video", counting)

    class Checking(RecordingBackend):
        vae_encode_batch = 1

        def vae_encode(self, video):
            later = [b for b in built if b[0] > 0]
            encoded_later = len(self.encoded) - 1  # stage 0's video is not built by chunk_condition_video
            assert len(later) - encoded_later <= 1, "condition videos were built ahead of their encodes"
            return super().vae_encode(video)

    backend = Checking(TorchBackend(tiny_models))
    generate(
        backend,
        tiny_models.tokenizer,
        GenerationRequest(prompt="x", height=32, width=48, num_frames=9, steps_per_stage=(1, 1, 1)),
        progress=False,
    )
    assert len(built) == 2 + 4 and len(backend.encoded) == 1 + 2 + 4
