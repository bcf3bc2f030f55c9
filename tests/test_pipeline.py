"""The generation loop on the tiny preset: batching, determinism, stage outputs."""

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

FAST = dict(height=32, width=48, num_frames=9, steps_per_stage=(2, 1, 1), shift_per_stage=(5.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def backend(tiny_models):
    return TorchBackend(tiny_models)


class TwoCallBackend:
    """Wraps a backend so every batched cond+uncond call is made as two calls."""

    def __init__(self, inner):
        self.inner, self.info, self.name, self.calls = inner, inner.info, "two-call", 0
        self.device = inner.device

    def velocity(self, x, y, t, ctx, cos, sin):
        n = x.shape[0] // 2
        self.calls += 2
        halves = [self.inner.velocity(x[s], y[s], t, ctx[s], cos[s], sin[s]) for s in (slice(0, n), slice(n, None))]
        return torch.cat(halves)


def _stage_inputs(backend, g):
    stage = plan_stages(9, (4, 2, 1))[2]  # 4 chunks
    n, f = stage.num_chunks, stage.latent_frames
    y = torch.randn(n, 20, f, 4, 6, generator=g)
    ctx = torch.randn(1, 512, backend.info.text_dim, generator=g)
    neg = torch.randn(1, 512, backend.info.text_dim, generator=g)
    return stage, y, ctx, neg


def test_batched_cond_uncond_equals_two_calls(backend):
    g = torch.Generator().manual_seed(3)
    stage, y, ctx, neg = _stage_inputs(backend, g)
    request = GenerationRequest(prompt="x", guidance_scale=5.0, seed=11)
    schedule = StageSchedule.create(3, 3.0)
    batched, calls = denoise_stage(backend, stage, y, ctx, neg, request, schedule, BackendClock())
    twin = TwoCallBackend(backend)
    split, _ = denoise_stage(twin, stage, y, ctx, neg, request, schedule, BackendClock())
    assert calls == 3 and twin.calls == 6
    assert torch.allclose(batched, split, rtol=1e-5, atol=1e-5)
    # the guidance did something: a different scale gives another result
    other, _ = denoise_stage(
        backend,
        stage,
        y,
        ctx,
        neg,
        GenerationRequest(prompt="x", guidance_scale=2.0, seed=11),
        schedule,
        BackendClock(),
    )
    assert not torch.allclose(batched, other, atol=1e-4)


def test_guidance_one_makes_one_call_per_step_without_negative(backend):
    g = torch.Generator().manual_seed(4)
    stage, y, ctx, _ = _stage_inputs(backend, g)
    request = GenerationRequest(prompt="x", guidance_scale=1.0)
    out, calls = denoise_stage(backend, stage, y, ctx, None, request, StageSchedule.create(2, 3.0), BackendClock())
    assert calls == 2 and torch.isfinite(out).all()


def _frames(result):
    return [torch.from_numpy(to_uint8_frames(s.frames)) for s in result.stages]


def test_same_seed_same_bytes_other_seed_differs(backend, tiny_models):
    tok = tiny_models.tokenizer
    a = generate(backend, tok, GenerationRequest(prompt="a red ball", seed=5, **FAST), progress=False)
    b = generate(backend, tok, GenerationRequest(prompt="a red ball", seed=5, **FAST), progress=False)
    c = generate(backend, tok, GenerationRequest(prompt="a red ball", seed=6, **FAST), progress=False)
    for fa, fb in zip(_frames(a), _frames(b)):
        assert torch.equal(fa, fb)
    assert not torch.equal(_frames(a)[-1], _frames(c)[-1])
    assert [s.num_frames for s in a.stages] == [9, 18, 36]
    assert a.dit_calls == 4 and a.reference_dit_calls == 8


def test_reference_image_sets_size_and_conditions(backend, tiny_models):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 80, 3), dtype=np.uint8))
    request = GenerationRequest(prompt="a red ball", ref_images={0: image}, **FAST)
    # area 32*48 = 1536 at aspect 1:4: h = round(sqrt(384)/16)*16 = 16, w = round(sqrt(6144)/16)*16 = 80
    assert request.output_size() == (16, 80)
    result = generate(backend, tiny_models.tokenizer, request, progress=False)
    h, w = request.output_size()
    assert result.video.frames.shape[-2:] == (h, w)
    plain = generate(
        backend,
        tiny_models.tokenizer,
        GenerationRequest(
            prompt="a red ball", height=h, width=w, **{k: v for k, v in FAST.items() if k not in ("height", "width")}
        ),
        progress=False,
    )
    assert not torch.equal(_frames(result)[0], _frames(plain)[0])


def test_cover_resize_center_crop_keeps_the_centre():
    data = np.zeros((20, 60, 3), dtype=np.uint8)
    data[:, 20:40] = 255  # white centre third
    out = cover_resize_center_crop(Image.fromarray(data), 16, 16)
    assert out.shape == (3, 16, 16)
    # cover: height 20 -> 16 (scale 0.8), width 48, crop centre 16 columns: all white
    assert out[:, :, 2:14].min() > 0.9


def test_stage_fps_follow_spec_when_the_last_interval_is_not_one(backend, tiny_models):
    # intervals [4, 2]: stage 0 at 24/4 = 6 fps, the output at save_fps = 24
    request = GenerationRequest(
        prompt="x",
        height=32,
        width=48,
        num_frames=5,
        frame_intervals=(4, 2),
        steps_per_stage=(1, 1),
        shift_per_stage=(5.0, 3.0),
    )
    result = generate(backend, tiny_models.tokenizer, request, progress=False)
    assert [s.fps for s in result.stages] == [6.0, 24.0]
    assert [s.num_frames for s in result.stages] == [5, 10]


def test_step_and_stage_callbacks_see_every_step_in_order(backend, tiny_models):
    """The step callback locates each DiT call (stage, step, sigma) and carries its inputs and raw output."""
    from tempomaster.runtime.pipeline import StepEvent

    request = GenerationRequest(prompt="a blue cube", seed=int(torch.randint(0, 1000, ())), **FAST)
    events: list[StepEvent] = []
    order: list[tuple] = []
    result = generate(
        backend,
        tiny_models.tokenizer,
        request,
        progress=False,
        on_step_end=lambda e: (events.append(e), order.append(("step", e.stage, e.step))),
        on_stage_end=lambda s: order.append(("stage", s.index, s.frames is not None)),
    )
    assert [(e.stage, e.step, e.num_steps) for e in events] == [(0, 0, 2), (0, 1, 2), (1, 0, 1), (2, 0, 1)]
    assert order == [
        ("step", 0, 0),
        ("step", 0, 1),
        ("stage", 0, True),
        ("step", 1, 0),
        ("stage", 1, True),
        ("step", 2, 0),
        ("stage", 2, True),
    ]
    for e in events:
        sched = StageSchedule.create(request.steps_per_stage[e.stage], request.shift_per_stage[e.stage])
        assert (e.sigma, e.sigma_next) == (sched.sigma(e.step), sched.sigma_next(e.step))
        # the raw output is the batched cond+uncond call on exactly these inputs
        assert e.velocity.shape[0] == e.inputs[0].shape[0] == 2 * e.latents.shape[0]
        assert torch.equal(backend.velocity(*e.inputs), e.velocity)
    assert len(events) == result.dit_calls


def test_a_callback_that_raises_stops_the_generation_at_that_boundary(backend, tiny_models):
    class Stop(Exception):
        pass

    steps = []

    def stop_after_blueprint(stage):
        if stage.index == 0:
            raise Stop

    with pytest.raises(Stop):
        generate(
            backend,
            tiny_models.tokenizer,
            GenerationRequest(prompt="a red ball", **FAST),
            progress=False,
            on_step_end=lambda e: steps.append(e.stage),
            on_stage_end=stop_after_blueprint,
        )
    assert steps == [0, 0]  # no step of stage 1 ran
