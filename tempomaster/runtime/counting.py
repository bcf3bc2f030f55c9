"""Deterministic work counters: backend calls per video, and what each DiT call is handed.

Clocks flake on shared machines; counts do not. `expected_backend_calls` says
from the stage plan alone how many calls of each kind one video needs, and
`CountingBackend` records what a real run made, so a test can hold the
pipeline to the plan (an extra DiT call, a per-chunk VAE encode, a per-step
copy of a stage constant all show up as a count that differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..planner import plan_stages, round_num_frames
from .backends.base import Backend, BackendWrapper

# The DiT inputs that are constant for a whole stage: the pipeline must hand
# the very same tensors (same storage) to every step of the stage.
STAGE_CONSTANT_INPUTS = ("y", "context", "rope_cos", "rope_sin")
VELOCITY_INPUTS = ("x", "y", "timestep", "context", "rope_cos", "rope_sin")


@dataclass(frozen=True)
class BackendCalls:
    """Calls across the backend seam for one video, and the batch each carried."""

    text: int
    dit: int
    vae_encode: int
    vae_decode: int
    # batch of every DiT call of each stage (cond and uncond twins included)
    dit_batches: tuple[int, ...] = ()
    # chunks encoded / decoded in total (a call may carry several)
    vae_encode_items: int = 0
    vae_decode_items: int = 0
    # DiT calls the release makes for the same settings (cond and uncond apart)
    release_dit: int = 0
    # steps that reused the cached DiT output instead of a call (step cache); dit counts only the calls
    dit_skipped: int = 0

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def expected_backend_calls(
    num_frames: int,
    frame_intervals: Sequence[int],
    steps_per_stage: Sequence[int],
    guidance_scale: float,
    vae_batch: int = 1,
    vae_encode_batch: int | None = None,
    step_cache=None,
    shift_per_stage: Sequence[float] = (5.0, 3.0, 3.0),
) -> BackendCalls:
    """What `pipeline.generate` must make for these settings, from the stage plan alone.

    One text call for prompt and negative prompt together; per stage one DiT
    call per step on its active chunks (with their unconditional twins unless
    the guidance scale is 1), VAE encodes of `vae_encode_batch` active chunks
    each (None: the whole stage in one call) and VAE decodes of `vae_batch`
    active chunks each (one chunk per call on one device). Chunks of nothing
    but padding are never sent. With a `step_cache` policy, the steps its
    plan skips (at these steps and shifts) are counted in dit_skipped, not in dit.
    """
    stages = plan_stages(round_num_frames(num_frames), frame_intervals)
    guided = guidance_scale != 1.0
    per_dit = 2 if guided else 1
    active = [len(s.active_chunks) for s in stages]
    encodes = sum(-(-n // (vae_encode_batch or n)) for n in active)
    decodes = sum(-(-n // vae_batch) for n in active)
    skipped = 0
    if step_cache is not None:
        from .schedule import StageSchedule

        for s, (steps, shift) in enumerate(zip(steps_per_stage, shift_per_stage)):
            skipped += sum(step_cache.plan(s, StageSchedule.create(steps, shift).sigmas.tolist(), guided))
    return BackendCalls(
        text=1,
        dit=sum(steps_per_stage) - skipped,
        vae_encode=encodes,
        vae_decode=decodes,
        dit_batches=tuple(per_dit * n for n in active),
        vae_encode_items=sum(active),
        vae_decode_items=sum(active),
        release_dit=per_dit * sum(steps_per_stage),
        dit_skipped=skipped,
    )


@dataclass
class VelocityCall:
    """What one DiT call was handed (kept small: no tensors, only their identity)."""

    stage: int  # the stage it belongs to: a stage begins with its run of VAE encodes
    batch: int
    devices: dict[str, str]
    dtypes: dict[str, torch.dtype]
    storage: dict[str, int]  # data_ptr of every input


@dataclass
class CallLog:
    text: int = 0
    dit: int = 0
    vae_encode: int = 0
    vae_decode: int = 0
    vae_encode_items: int = 0
    vae_decode_items: int = 0
    dit_skipped: int = 0  # steps the step cache answered without a call (counted by `CountingBackend.step_end`)
    velocity: list[VelocityCall] = field(default_factory=list)

    def dit_batches(self) -> tuple[int, ...]:
        """The batch of each stage's DiT calls, one entry per stage (all calls of a stage agree)."""
        out: dict[int, int] = {}
        for call in self.velocity:
            out.setdefault(call.stage, call.batch)
        return tuple(out[k] for k in sorted(out))

    def as_calls(self, release_dit: int = 0) -> BackendCalls:
        return BackendCalls(
            self.text,
            self.dit,
            self.vae_encode,
            self.vae_decode,
            self.dit_batches(),
            self.vae_encode_items,
            self.vae_decode_items,
            release_dit,
            self.dit_skipped,
        )


class CountingBackend(BackendWrapper):
    """Passes every call to `inner` and records it; it computes nothing itself."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.name = f"counting({inner.name})"
        self.log = CallLog()
        # The current stage's first constant inputs, held so that their memory
        # cannot be freed and handed to a per-step copy at the same address.
        self._held: tuple[int, dict] = (-1, {})
        self._stage = -1
        self._last: str | None = None

    def encode_text(self, ids, mask):
        self._last = "text"
        self.log.text += 1
        return self.inner.encode_text(ids, mask)

    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        self._last = "velocity"
        tensors = dict(zip(VELOCITY_INPUTS, (x, y, timestep, context, rope_cos, rope_sin)))
        self.log.dit += 1
        stage = self._stage
        if self._held[0] != stage:
            self._held = (stage, {k: tensors[k] for k in STAGE_CONSTANT_INPUTS})
        self.log.velocity.append(
            VelocityCall(
                stage=stage,
                batch=int(x.shape[0]),
                devices={k: str(t.device) for k, t in tensors.items()},
                dtypes={k: t.dtype for k, t in tensors.items()},
                storage={k: t.data_ptr() for k, t in tensors.items()},
            )
        )
        return self.inner.velocity(x, y, timestep, context, rope_cos, rope_sin)

    def step_end(self, event) -> None:
        """A `generate` step callback: counts the steps the step cache skipped (they never reach `velocity`)."""
        self.log.dit_skipped += int(getattr(event, "skipped", False))

    def vae_encode(self, video):
        if self._last != "vae_encode":  # the first of a stage's condition encodes
            self._stage += 1
        self._last = "vae_encode"
        self.log.vae_encode += 1
        self.log.vae_encode_items += int(video.shape[0])
        return self.inner.vae_encode(video)

    def vae_decode(self, latents):
        self._last = "vae_decode"
        self.log.vae_decode += 1
        self.log.vae_decode_items += int(latents.shape[0])
        return self.inner.vae_decode(latents)


def per_step_copies(log: CallLog, device: torch.device, dit_dtype: torch.dtype) -> list[str]:
    """Every way the DiT calls of `log` break "no host<->device copy, nothing constant converted per step".

    - every input is on the backend's device;
    - y and context are already in the DiT's dtype, the RoPE tables in float32
      (what the graph takes), so no backend has to convert them per call;
    - within a stage, each stage-constant input is the same storage at every
      step: it was moved and cast once, not per step.
    Returns one line per problem; empty when there is none.
    """
    want_device = torch.device(device)
    problems = []
    expected_dtype = {"y": dit_dtype, "context": dit_dtype, "rope_cos": torch.float32, "rope_sin": torch.float32}
    first_of_stage: dict[int, VelocityCall] = {}
    for n, call in enumerate(log.velocity):
        for name, dev in call.devices.items():
            if torch.device(dev).type != want_device.type:
                problems.append(f"DiT call {n}: {name} is on {dev}, the backend on {want_device}")
        for name, dtype in expected_dtype.items():
            if call.dtypes[name] != dtype:
                problems.append(f"DiT call {n}: {name} is {call.dtypes[name]}, the DiT takes {dtype}")
        first = first_of_stage.setdefault(call.stage, call)
        for name in STAGE_CONSTANT_INPUTS:
            if call.storage[name] != first.storage[name]:
                problems.append(f"DiT call {n} (stage {call.stage}): {name} is a new tensor, made again this step")
    return problems
