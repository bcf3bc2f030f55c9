"""Deterministic counters of the runtime's work: backend calls per video and what each DiT call is handed.

The expected values are worked out by hand from the stage plan (SPEC 3): one
text call; per stage one DiT call per step on all active chunks and their
unconditional twins, one VAE encode of all its active chunks (as the release
makes) and one VAE decode per active chunk (chunks of nothing but padding are
skipped). Real generations with the tiny preset at
16x16 pixels (the call structure does not depend on the resolution) must make
exactly those calls.
"""

import copy

import pytest
import torch

from tempomaster.runtime import pipeline
from tempomaster.runtime.backends.base import Backend
from tempomaster.runtime.backends.torch import TorchBackend
from tempomaster.runtime.counting import (
    BackendCalls,
    CountingBackend,
    expected_backend_calls,
    per_step_copies,
)
from tempomaster.runtime.pipeline import GenerationRequest, generate

RELEASE = dict(num_frames=109, frame_intervals=(4, 2, 1), steps_per_stage=(50, 32, 32), guidance_scale=8.0)

# Hand-worked (README of the planner: stage 0 is one chunk, stage s has max(4 // interval, 1) chunks).
HAND = {
    # 50 + 32 + 32 steps, one batched call each; the release runs cond and uncond apart: 2 x 114;
    # 1 + 2 + 4 chunks, encoded in one call per stage, each decoded on its own
    "release defaults": (
        RELEASE,
        BackendCalls(
            text=1,
            dit=114,
            vae_encode=3,
            vae_decode=7,
            dit_batches=(2, 4, 8),
            vae_encode_items=7,
            vae_decode_items=7,
            release_dit=228,
        ),
    ),
    # [4, 1]: stage 1 at interval 1 has 4 chunks; 50 + 32 steps
    "[4,1]": (
        dict(RELEASE, frame_intervals=(4, 1), steps_per_stage=(50, 32)),
        BackendCalls(1, 82, 2, 5, (2, 8), 5, 5, 164),
    ),
    # [2, 1]: the same chunk counts as [4, 1] (stage 0 is always one chunk)
    "[2,1]": (
        dict(RELEASE, frame_intervals=(2, 1), steps_per_stage=(50, 32)),
        BackendCalls(1, 82, 2, 5, (2, 8), 5, 5, 164),
    ),
    # [2, 1] at 5 frames: 10 frames in 4 chunks of 5, chunks 2 and 3 all padding: a DiT batch of 4, not 8
    "[2,1] 5 frames": (
        dict(RELEASE, num_frames=5, frame_intervals=(2, 1), steps_per_stage=(50, 32)),
        BackendCalls(1, 82, 2, 3, (2, 4), 3, 3, 164),
    ),
    # no unconditional twins: half the DiT batch, the same number of calls; the release needs one per step too
    "guidance 1": (dict(RELEASE, guidance_scale=1.0), BackendCalls(1, 114, 3, 7, (1, 2, 4), 7, 7, 114)),
    # four times the frames: longer chunks, not more calls
    "long video": (dict(RELEASE, num_frames=433), BackendCalls(1, 114, 3, 7, (2, 4, 8), 7, 7, 228)),
}


def run_counted(models, **settings) -> tuple[CountingBackend, "pipeline.GenerationResult"]:
    backend = CountingBackend(TorchBackend(models))
    request = GenerationRequest(
        prompt="a red ball bouncing on a beach",
        height=16,
        width=16,
        seed=3,
        shift_per_stage=(5.0, 3.0, 3.0)[: len(settings["frame_intervals"])],
        **settings,
    )
    return backend, generate(backend, models.tokenizer, request, progress=False, keep_stages=False)


def mismatches(got: BackendCalls, want: BackendCalls) -> list[str]:
    return [
        f"{k}: {getattr(got, k)} != {getattr(want, k)}"
        for k in want.__dataclass_fields__
        if k != "release_dit" and getattr(got, k) != getattr(want, k)
    ]


@pytest.mark.parametrize("case", list(HAND))
def test_expected_calls_match_hand_values(case):
    settings, want = HAND[case]
    assert expected_backend_calls(**settings) == want


def test_release_defaults_make_114_dit_calls(tiny_models):
    """The release's own settings, run for real (at 16x16): 114 DiT calls where the release makes 228."""
    backend, result = run_counted(tiny_models, **RELEASE)
    settings, want = HAND["release defaults"]
    assert mismatches(backend.log.as_calls(), want) == []
    # the pipeline's own tally agrees with what crossed the seam
    assert (result.dit_calls, result.reference_dit_calls) == (114, 228)
    assert backend.log.dit == 114 and want.release_dit == 228


@pytest.mark.parametrize(
    "case,steps", [("[4,1]", (3, 2)), ("[2,1]", (2, 3)), ("guidance 1", (3, 2, 2)), ("long video", (2, 1, 1))]
)
def test_real_runs_make_the_expected_calls(tiny_models, case, steps):
    """Fewer steps than the release (DiT calls scale with steps alone, checked above) to keep it fast."""
    settings = dict(HAND[case][0], steps_per_stage=steps)
    if case == "long video":
        settings["num_frames"] = 217  # twice the release's frames: the same calls
    backend, result = run_counted(tiny_models, **settings)
    assert mismatches(backend.log.as_calls(), expected_backend_calls(**settings)) == []
    assert backend.log.dit == result.dit_calls == sum(steps)


def test_extra_dit_call_is_caught(tiny_models, monkeypatch):
    """Regression: one more DiT call per stage (e.g. a warm-up call left in) breaks the count."""
    original = pipeline.denoise_stage

    def with_extra_call(backend, stage, y, context, negative_context, request, schedule, clock, on_step_end=None):
        x, calls = original(backend, stage, y, context, negative_context, request, schedule, clock, on_step_end)
        n = y.shape[0]
        backend.velocity(x, y, torch.ones(1), context.expand(n, -1, -1), *_rope(backend, stage, y))
        return x, calls

    monkeypatch.setattr(pipeline, "denoise_stage", with_extra_call)
    settings = dict(RELEASE, steps_per_stage=(2, 1, 1), guidance_scale=1.0)
    backend, _ = run_counted(tiny_models, **settings)
    problems = mismatches(backend.log.as_calls(), expected_backend_calls(**settings))
    assert any(p.startswith("dit: 7 != 4") for p in problems), problems


def _rope(backend, stage, y):
    from tempomaster.rope import batched_rope_table

    _, ph, pw = backend.info.patch_size
    return batched_rope_table(stage.rope_table().tolist(), y.shape[3] // ph, y.shape[4] // pw, backend.info.head_dim)


# ----------------------------------------------------------------------------
# What each DiT call is handed
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_velocity_inputs_are_ready_and_constant_per_stage(tiny_models, dtype):
    models = copy.deepcopy(tiny_models)  # TorchBackend casts the modules in place
    backend = CountingBackend(TorchBackend(models, dtype=dtype))
    request = GenerationRequest(prompt="a cat", height=16, width=16, num_frames=9, steps_per_stage=(3, 2, 2), seed=1)
    generate(backend, models.tokenizer, request, progress=False)
    assert backend.log.dit == 7
    assert per_step_copies(backend.log, backend.device, dtype) == []
    # the check has something to compare: several steps in each stage
    assert [sum(c.stage == s for c in backend.log.velocity) for s in range(3)] == [3, 2, 2]


def test_velocity_inputs_onnxruntime(tiny_models, tiny_build):
    """The same on the onnxruntime backend (the session's tiny fp32 build, 32x48, 9 frames)."""
    pytest.importorskip("onnxruntime")
    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

    ort_backend = OnnxRuntimeBackend.from_build(tiny_build, threads=1)
    backend = CountingBackend(ort_backend)
    request = GenerationRequest(prompt="a cat", height=32, width=48, num_frames=9, steps_per_stage=(2, 2, 1), seed=2)
    generate(backend, ort_backend.tokenizer(), request, progress=False)
    assert mismatches(backend.log.as_calls(), expected_backend_calls(9, (4, 2, 1), (2, 2, 1), 8.0)) == []
    assert per_step_copies(backend.log, ort_backend.device, torch.float32) == []


class PerStepCast(Backend):
    """Regression: a layer that casts the stage's constant inputs on every step (as a naive adapter would)."""

    def __init__(self, inner):
        self.inner, self.device, self.info, self.name = inner, inner.device, inner.info, "per-step-cast"

    def encode_text(self, ids, mask):
        return self.inner.encode_text(ids, mask)

    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        dtype = self.info.dit_dtype
        return self.inner.velocity(
            x, y.float().to(dtype), timestep, context, rope_cos.to(torch.float64).float(), rope_sin
        )

    def vae_encode(self, video):
        return self.inner.vae_encode(video)

    def vae_decode(self, latents):
        return self.inner.vae_decode(latents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_step_to_is_caught(tiny_models, dtype):
    models = copy.deepcopy(tiny_models)
    counting = CountingBackend(TorchBackend(models, dtype=dtype))
    request = GenerationRequest(prompt="a cat", height=16, width=16, num_frames=9, steps_per_stage=(2, 2, 2), seed=1)
    generate(PerStepCast(counting), models.tokenizer, request, progress=False)
    problems = per_step_copies(counting.log, counting.device, dtype)
    # rope_cos is made again at every step after the first of each stage (3 stages x 1)
    assert sum("rope_cos is a new tensor" in p for p in problems) == 3, problems
    if dtype == torch.bfloat16:  # .float().to(bf16) is a real copy of y at bf16 (a no-op at fp32)
        assert sum("y is a new tensor" in p for p in problems) == 3, problems


def test_inputs_on_the_wrong_device_or_dtype_are_caught(tiny_models):
    """A backend on another device than the tensors it is handed (what a host->device copy per step means)."""
    backend = CountingBackend(TorchBackend(tiny_models))
    request = GenerationRequest(prompt="a cat", height=16, width=16, num_frames=9, steps_per_stage=(1, 1, 1), seed=1)
    generate(backend, tiny_models.tokenizer, request, progress=False)
    problems = per_step_copies(backend.log, torch.device("cuda"), torch.float32)
    assert len([p for p in problems if "is on cpu, the backend on cuda" in p]) == 3 * 6
    problems = per_step_copies(backend.log, torch.device("cpu"), torch.float16)
    assert {p.split(": ")[1].split(" ")[0] for p in problems} == {"y", "context"}
