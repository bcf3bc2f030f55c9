"""Next-frame-rate generation end to end (SPEC 3) on any backend.

The loop is the same whatever runs the networks: text once per video, stage 0
from seeded noise conditioned on the reference images, each later stage
conditioned on the previous stage's decoded frames, every chunk of a stage in
one DiT call together with its unconditional twin (a batch of 2n).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..interrupts import raise_if_interrupted
from ..planner import (
    StagePlan,
    chunk_condition_video,
    plan_stages,
    reference_output_size,
    trim_stage_frames,
    validate_run_config,
)
from ..rope import batched_rope_table
from .backends.base import Backend
from .guidance import APGState, guided_velocity
from .schedule import StageSchedule, euler_step, model_timestep
from .step_cache import StepCachePolicy

DEFAULT_NEGATIVE_PROMPT = (
    "jittery, shaky, fliker, unstable, static, ultra slow motion, distorted, blurry details, "
    "many people in the background worst quality, low quality, ugly, poorly drawn legs, "
    "poorly drawn face, three arms, deformed, mutilated, disfigured, malformed limbs, "
    "fused fingers, three legs"
)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    ref_images: Mapping[int, Image.Image] = field(default_factory=dict)  # stage-0 frame -> image
    height: int = 480
    width: int = 832
    num_frames: int = 109
    frame_intervals: Sequence[int] = (4, 2, 1)
    steps_per_stage: Sequence[int] = (50, 32, 32)
    shift_per_stage: Sequence[float] = (5.0, 3.0, 3.0)
    guidance_scale: float = 8.0
    use_apg: bool = True
    seed: int = 0
    save_fps: float = 24.0
    # The reference rounds the timestep to the model dtype before embedding it.
    cast_timestep: bool = False
    # Which steps reuse the last DiT output instead of calling the DiT (runtime/step_cache.py); None: every step calls it.
    step_cache: StepCachePolicy | None = None

    def validate(self) -> None:
        validate_run_config(
            self.num_frames,
            self.height,
            self.width,
            self.frame_intervals,
            self.steps_per_stage,
            self.shift_per_stage,
            self.ref_images.keys(),
        )

    def output_size(self) -> tuple[int, int]:
        """SPEC 3.1: with a reference image, keep the area and take its aspect ratio."""
        if not self.ref_images:
            return self.height, self.width
        first = self.ref_images[min(self.ref_images)]
        return reference_output_size(self.height, self.width, first.height, first.width)


@dataclass
class StageOutput:
    index: int
    interval: int
    fps: float
    num_frames: int
    frames: torch.Tensor | None  # [3, T, H, W] float32 in [-1, 1]; None once dropped
    seconds: float
    dit_calls: int
    dit_batch: int = 0  # sequences per DiT call (active chunks, x2 with guidance)
    dit_skipped: int = 0  # steps that reused the cached DiT output (step cache)


@dataclass
class GenerationResult:
    stages: list[StageOutput]
    height: int
    width: int
    dit_calls: int
    reference_dit_calls: int  # what the reference makes for the same settings
    seconds: float
    backend_seconds: float  # time inside backend calls; the rest is the runtime's own
    dit_skipped: int = 0  # steps that reused the cached DiT output instead of a call (step cache)

    @property
    def video(self) -> StageOutput:
        return self.stages[-1]


@dataclass(frozen=True)
class StepEvent:
    """What `generate`'s step callback sees after each denoising step (diffusers' `callback_on_step_end`).

    inputs are the DiT call's `(x, y, timestep, context, rope_cos, rope_sin)`,
    velocity its raw output for that whole batch (cond and uncond halves when
    guided, before guidance), latents the stage's x after this step's update.
    skipped: the step cache reused the last computed step's output (velocity
    is that output) instead of calling the DiT on these inputs.
    """

    stage: int
    step: int
    num_steps: int
    sigma: float
    sigma_next: float
    inputs: tuple[torch.Tensor, ...]
    velocity: torch.Tensor
    latents: torch.Tensor
    skipped: bool = False


StepCallback = Callable[[StepEvent], None]
StageCallback = Callable[["StageOutput"], None]


class BackendClock:
    """Accumulates wall time spent inside backend calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


# ----------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------


def cover_resize_center_crop(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """The release's reference-image preparation (SPEC 3 step 2) -> [3, H, W] float32 in [-1, 1].

    The RGB image as float32 x*2/255 - 1, bilinear (align_corners False, no
    antialiasing) to (int(h*s), int(w*s)) with s = max(H/h, W/w), then a
    centre crop at round((h' - H)/2), round((w' - W)/2) (Python's round, as
    the release). Where float error makes int(h*s) one short of the target
    the release would crop a short frame and fail; the size is then held at
    the target.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # [h, w, 3]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None] * (2.0 / 255.0) - 1.0
    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, int(h * scale)), max(width, int(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    top, left = round((new_h - height) / 2), round((new_w - width) / 2)
    return x[0, :, top : top + height, left : left + width].contiguous()


def stage0_condition_video(
    stage: StagePlan, images: Mapping[int, torch.Tensor], height: int, width: int
) -> torch.Tensor:
    """[1, 3, L, H, W]: zeros with each reference image in its frame."""
    video = torch.zeros(1, 3, stage.chunk_frames, height, width)
    for frame, image in images.items():
        video[0, :, frame] = image
    return video


def _groups(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of `size` items, drawn from `items` only as each group is needed."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def encode_batch(backend: Backend, stage: StagePlan) -> int:
    """Chunks per VAE encode call: the backend's limit, else the stage's active chunks."""
    limit = getattr(backend, "vae_encode_batch", None)
    return max(1, int(limit)) if limit else max(1, len(stage.active_chunks))


def condition_latents(
    backend: Backend, videos: Iterable[torch.Tensor], stage: StagePlan, clock: BackendClock
) -> torch.Tensor:
    """y = [mask (4) | VAE latents (16)] for the stage's active chunks: [n, 20, f, h, w] on the backend's device.

    `videos` yields one host-side [1, 3, L, H, W] condition video per active
    chunk; `backend.vae_encode_batch` of them (all of the stage's by default:
    one encode call per stage, as the release makes) are moved, encoded and
    dropped before the next are built.
    """
    latents = []
    for group in _groups(videos, encode_batch(backend, stage)):
        batch = torch.cat(group).to(backend.device)
        del group
        with clock.timing():
            latents.append(backend.vae_encode(batch).float())
        del batch
    latents = torch.cat(latents)
    n, _, f, h, w = latents.shape
    mask = stage.latent_masks(active_only=True).to(latents.device)[:, :, :, None, None].expand(n, 4, f, h, w)
    return torch.cat([mask, latents], dim=1)


def encode_prompts(backend: Backend, tokenizer, prompt: str, negative: str | None, clock: BackendClock):
    """[1, text_len, D] (512; the toy 32) for the prompt and, if guidance is on, the negative prompt (one call)."""
    texts = [prompt] if negative is None else [prompt, negative]
    ids, mask = tokenizer(texts)
    with clock.timing():
        emb = backend.encode_text(ids, mask).float()
    return emb[:1], (emb[1:2] if negative is not None else None)


def stage_noise(shape: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """SPEC 3.6: one float32 randn of the whole stage from a fresh CPU generator, cast to the model dtype."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    # Rounded to the model dtype as the release does, then carried in float32.
    return noise.to(dtype).float()


def denoise_stage(
    backend: Backend,
    stage: StagePlan,
    y: torch.Tensor,
    context: torch.Tensor,
    negative_context: torch.Tensor | None,
    request: GenerationRequest,
    schedule: StageSchedule,
    clock: BackendClock,
    on_step_end: StepCallback | None = None,
) -> tuple[torch.Tensor, int]:
    """Flow-matching loop of one stage over its active chunks; returns the clean latents and the DiT calls made.

    y: ``[n, 4 + z_dim, f, h, w]`` mask + condition latents of the n active chunks (h = H/8 pixels);
    context, negative_context: ``[1, text_len, text_dim]`` (`encode_prompts`). The latents come back
    as ``[n, z_dim, f, h, w]`` float32 on the backend's device.
    `on_step_end` gets a `StepEvent` after every step (it may raise to stop the run).
    With `request.step_cache`, the steps its plan marks reuse the last DiT
    output (cond and uncond together: one decision per batched call) and
    are not counted as calls.
    """
    info = backend.info
    device = backend.device
    n, _, f, h, w = y.shape
    # SPEC 3.6: the whole stage's noise is drawn (padding-only chunks included, so
    # the others get the release's values), on the CPU, then moved once.
    noise = stage_noise(stage.latent_shape(h * 8, w * 8, info.z_dim), request.seed, info.dit_dtype)
    x = noise[:n].to(device)
    del noise
    _, ph, pw = info.patch_size
    cos, sin = batched_rope_table(stage.rope_table(active_only=True).tolist(), h // ph, w // pw, info.head_dim)
    guided = request.guidance_scale != 1.0
    ctx = context.expand(n, -1, -1)
    if guided:
        # cond and uncond in one call: a batch of 2n.
        y_in = torch.cat([y, y])
        ctx = torch.cat([ctx, negative_context.expand(n, -1, -1)])
        cos, sin = torch.cat([cos, cos]), torch.cat([sin, sin])
    else:
        y_in = y
    # Constant for the whole stage: moved and cast to the DiT's dtype once, not per step.
    y_in, ctx = y_in.to(device, info.dit_dtype).contiguous(), ctx.to(device, info.dit_dtype).contiguous()
    cos, sin = cos.to(device).contiguous(), sin.to(device).contiguous()
    host_timesteps = torch.stack(
        [model_timestep(schedule.timestep(i), info.dit_dtype, request.cast_timestep) for i in range(schedule.num_steps)]
    )  # [steps, 1] float32
    timesteps = host_timesteps.to(device)  # moved once; guidance reads the host copy (no device sync per step)
    apg = APGState()
    calls = 0
    # Decided from the calibrated curve and the schedule alone, so every rank skips the same steps.
    skips = (
        request.step_cache.plan(stage.index, schedule.sigmas.tolist(), guided)
        if request.step_cache is not None
        else (False,) * schedule.num_steps
    )
    cached = None
    for i in range(schedule.num_steps):
        t = timesteps[i]
        # The DiT concatenates x with y: hand it x in y's dtype so y is never promoted back.
        x_model = x.to(info.dit_dtype)
        x_in = torch.cat([x_model, x_model]) if guided else x_model
        inputs = (x_in, y_in, t, ctx, cos, sin)
        if skips[i]:
            raw = cached
        else:
            with clock.timing():
                raw = backend.velocity(*inputs)
            calls += 1
            cached = raw if request.step_cache is not None else None
        v = raw.float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = guided_velocity(x, v_cond, v_uncond, host_timesteps[i], request.guidance_scale, request.use_apg, apg)
        x = euler_step(x, v, schedule.sigma(i), schedule.sigma_next(i))
        raise_if_interrupted()
        if on_step_end is not None:
            on_step_end(
                StepEvent(
                    stage.index,
                    i,
                    schedule.num_steps,
                    schedule.sigma(i),
                    schedule.sigma_next(i),
                    inputs,
                    raw,
                    x,
                    skips[i],
                )
            )
    return x, calls


def decode_chunks(
    backend: Backend, latents: torch.Tensor, clock: BackendClock, batch: int | None = None
) -> list[torch.Tensor]:
    """Each chunk's frames ``[3, L, H, W]``, float32 in [-1, 1] on the CPU, ``batch`` chunks per call.

    ``batch`` defaults to `backend.vae_batch` (1 for one device: the least
    device memory; a backend that spreads a batch over ranks asks for one per rank).
    """
    pieces = []
    step = max(1, int(batch or getattr(backend, "vae_batch", 1)))
    for c in range(0, latents.shape[0], step):
        with clock.timing():
            frames = backend.vae_decode(latents[c : c + step])
        pieces += [f.float().clamp(-1, 1).cpu() for f in frames]
        del frames
    return pieces


def decode_stage(backend: Backend, latents: torch.Tensor, stage: StagePlan, clock: BackendClock) -> torch.Tensor:
    """Decode into host memory, concatenate in time, drop the padding: [3, T*r, H, W] on the CPU."""
    return trim_stage_frames(torch.cat(decode_chunks(backend, latents, clock), dim=1), stage)


def count_reference_dit_calls(request: GenerationRequest, stages: Iterable[int] | None = None) -> int:
    """The release runs cond and uncond as two DiT calls per step (at scale 1 it
    crashes; counted as one call per step, what it would need). `stages`: only
    those stage indices (a resumed run makes the later stages only)."""
    steps = request.steps_per_stage if stages is None else [request.steps_per_stage[s] for s in stages]
    return sum(steps) * (1 if request.guidance_scale == 1.0 else 2)


@dataclass(frozen=True)
class StageResume:
    """Where a generation picks up: `frames` ([3, T, H, W] float32 in [-1, 1]) are stage `stage`'s
    decoded output (a blueprint's state, or a user's video); the stages after it run."""

    stage: int
    frames: torch.Tensor


def check_resume(resume: StageResume, stages: Sequence[StagePlan], height: int, width: int) -> None:
    """The frames must be what stage `resume.stage` of this plan outputs: ValueError naming both shapes."""
    if not 0 <= resume.stage < len(stages) - 1:
        raise ValueError(
            f"resume after stage {resume.stage}: the plan has stages 0..{len(stages) - 1}, "
            f"and the last one leaves nothing to run"
        )
    want = (3, stages[resume.stage].total_frames, height, width)
    if tuple(resume.frames.shape) != want:
        raise ValueError(
            f"resume after stage {resume.stage}: expected frames of shape {list(want)}, got {list(resume.frames.shape)}"
        )


# ----------------------------------------------------------------------------
# The whole video
# ----------------------------------------------------------------------------


def generate(
    backend: Backend,
    tokenizer,
    request: GenerationRequest,
    progress: bool = True,
    keep_stages: bool = True,
    on_step_end: StepCallback | None = None,
    on_stage_end: StageCallback | None = None,
    stop_after: int | None = None,
    resume: StageResume | None = None,
) -> GenerationResult:
    """One video, stage by stage (SPEC 3).

    stop_after: the last stage to run (0: the 6 fps blueprint alone); its
    output is then the result's video. resume: start after a stage whose
    frames are given; the result holds only the stages run here. Each stage
    draws its noise from the request's seed alone, so a resumed run makes
    exactly what an uninterrupted one does after that stage.

    on_step_end: called with a `StepEvent` after every denoising step of
    every stage. on_stage_end: called with each `StageOutput` as soon as the
    stage's frames are decoded (stage 0 is the 6 fps blueprint). Either may
    raise to stop the generation at that boundary.
    """
    from tqdm.auto import tqdm

    request.validate()
    start = time.perf_counter()
    clock = BackendClock()
    height, width = request.output_size()
    stages = plan_stages(request.num_frames, request.frame_intervals, request.ref_images.keys())
    guided = request.guidance_scale != 1.0
    if resume is not None:
        check_resume(resume, stages, height, width)
    if stop_after is not None and not 0 <= stop_after < len(stages):
        raise ValueError(f"stop after stage {stop_after}: the plan has stages 0..{len(stages) - 1}")

    context, negative_context = encode_prompts(
        backend, tokenizer, request.prompt, request.negative_prompt if guided else None, clock
    )
    images = {k: cover_resize_center_crop(img, height, width) for k, img in request.ref_images.items()}

    outputs: list[StageOutput] = []
    previous: torch.Tensor | None = None if resume is None else resume.frames.float().cpu()
    for stage, steps, shift in zip(stages, request.steps_per_stage, request.shift_per_stage):
        if resume is not None and stage.index <= resume.stage:
            continue  # made before: its frames are `previous`
        stage_start = time.perf_counter()
        if stage.index == 0:
            videos = [stage0_condition_video(stage, images, height, width)]
        else:
            # built lazily, one active chunk at a time, from the host-side frames
            videos = (chunk_condition_video(previous, stage, chunk)[None] for chunk in stage.active_chunks)
        y = condition_latents(backend, videos, stage, clock)
        del videos
        schedule = StageSchedule.create(steps, shift)
        # SPEC 3.5: the output at save_fps; an intermediate stage at save_fps / interval (6, 12 fps at 24).
        last = stage.index == len(stages) - 1
        fps = request.save_fps if last else request.save_fps / stage.interval
        with tqdm(
            total=steps,
            desc=f"stage {stage.index} ({fps:g} fps, {len(stage.active_chunks)} chunk(s))",
            disable=not progress,
            leave=False,
        ) as bar:

            def step_done(event: StepEvent) -> None:
                bar.update()
                if on_step_end is not None:
                    on_step_end(event)

            latents, calls = denoise_stage(
                backend, stage, y, context, negative_context, request, schedule, clock, on_step_end=step_done
            )
        previous = decode_stage(backend, latents, stage, clock)
        outputs.append(
            StageOutput(
                stage.index,
                stage.interval,
                fps,
                previous.shape[1],
                previous,
                time.perf_counter() - stage_start,
                calls,
                dit_batch=y.shape[0] * (2 if guided else 1),
                dit_skipped=steps - calls,
            )
        )
        del y, latents
        if on_stage_end is not None:
            on_stage_end(outputs[-1])
        if not keep_stages and len(outputs) > 1:
            outputs[-2].frames = None
        if stop_after is not None and stage.index >= stop_after:
            break
    return GenerationResult(
        stages=outputs,
        height=height,
        width=width,
        dit_calls=sum(out.dit_calls for out in outputs),
        reference_dit_calls=count_reference_dit_calls(request, [out.index for out in outputs]),
        seconds=time.perf_counter() - start,
        backend_seconds=clock.seconds,
        dit_skipped=sum(out.dit_skipped for out in outputs),
    )
