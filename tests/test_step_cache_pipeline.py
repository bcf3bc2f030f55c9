"""The step cache inside the generation loop: off is today's loop, on reuses the DiT output exactly as planned."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tempomaster.runtime.backends.torch import TorchBackend
from tempomaster.runtime.counting import CountingBackend, expected_backend_calls
from tempomaster.runtime.pipeline import GenerationRequest, generate
from tempomaster.runtime.schedule import StageSchedule
from tempomaster.runtime.step_cache import MagnitudeCurve, StepCachePolicy, save_curves

STEPS = (6, 4, 4)
SHIFTS = (5.0, 3.0, 3.0)
FAST = dict(height=32, width=48, num_frames=9, steps_per_stage=STEPS, shift_per_stage=SHIFTS, guidance_scale=5.0)


def flat_curves(stages: int = 3, steps: int = 12) -> tuple[MagnitudeCurve, ...]:
    """Curves whose gamma is exactly 1: every step after the first may be skipped, up to max_skips."""
    sigmas = tuple(np.linspace(1.0, 0.05, steps).tolist())
    return tuple(MagnitudeCurve(sigmas, ((0.0,) * steps, (0.0,) * steps)) for _ in range(stages))


def policy(thresholds=(0.1, 0.1, 0.1), max_skips=2) -> StepCachePolicy:
    return StepCachePolicy(tuple(thresholds), flat_curves(), max_skips=max_skips, retention=0.2)


def plans(p: StepCachePolicy, guided: bool = True) -> list[tuple[bool, ...]]:
    return [
        p.plan(s, StageSchedule.create(n, sh).sigmas.tolist(), guided) for s, (n, sh) in enumerate(zip(STEPS, SHIFTS))
    ]


def frames(result) -> list[torch.Tensor]:
    return [s.frames for s in result.stages]


@pytest.fixture(scope="module")
def backend(tiny_models):
    return TorchBackend(tiny_models)


class ReplayBackend:
    """Reuse done at the seam instead: the wrapped backend's last output is returned on the planned steps.

    An independent statement of what a skipped step is, to hold the pipeline's cache to.
    """

    def __init__(self, inner, skip_flags):
        self.inner, self.info, self.device, self.name = inner, inner.info, inner.device, "replay"
        self.flags, self.last, self.calls = list(skip_flags), None, 0

    def velocity(self, *inputs):
        if self.flags.pop(0):
            return self.last
        self.calls += 1
        self.last = self.inner.velocity(*inputs)
        return self.last

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_cache_off_is_bit_identical_to_the_loop_without_a_policy(backend, tiny_models):
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import GenerateOptions, build_jobs

    seed = int(torch.randint(0, 1000, ()))
    plain = GenerationRequest(prompt="a red ball", seed=seed, **FAST)
    (job,) = build_jobs(
        GenerateOptions(
            prompt="a red ball",
            seed=seed,
            cache="off",
            preset="tiny",
            height=32,
            width=48,
            num_frames=9,
            steps=STEPS,
            guidance=5.0,
        ),
        get_preset("tiny").defaults,
    )
    assert job.request.step_cache is None
    a = generate(backend, tiny_models.tokenizer, plain, progress=False)
    b = generate(
        backend,
        tiny_models.tokenizer,
        replace(plain, negative_prompt=job.request.negative_prompt, step_cache=job.request.step_cache),
        progress=False,
    )
    # a policy whose thresholds are all 0 never skips: the same bytes too
    c = generate(backend, tiny_models.tokenizer, replace(plain, step_cache=policy((0.0, 0.0, 0.0))), progress=False)
    for x, y, z in zip(frames(a), frames(b), frames(c)):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert a.dit_calls == c.dit_calls == sum(STEPS) and a.dit_skipped == c.dit_skipped == 0


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_skipped_steps_reuse_the_last_output_exactly_as_planned(backend, tiny_models, guidance):
    p = policy()
    flags = [f for plan in plans(p, guided=guidance != 1.0) for f in plan]
    # hand-worked for flat curves, retention 0.2, max_skips 2: 6 steps F T T F T F, 4 steps F T T F
    assert flags == [False, True, True, False, True, False] + [False, True, True, False] * 2
    request = GenerationRequest(
        prompt="a blue cube", seed=int(torch.randint(0, 1000, ())), **dict(FAST, guidance_scale=guidance)
    )
    events = []
    counting = CountingBackend(backend)
    cached = generate(
        counting,
        tiny_models.tokenizer,
        replace(request, step_cache=p),
        progress=False,
        on_step_end=lambda e: (events.append(e), counting.step_end(e)),
    )
    replay = ReplayBackend(backend, flags)
    reference = generate(replay, tiny_models.tokenizer, request, progress=False)
    for x, y in zip(frames(cached), frames(reference)):
        assert torch.equal(x, y)
    assert [e.skipped for e in events] == flags
    # a skipped step's event carries the output it reused: the last computed step's
    for prev, e in zip(events, events[1:]):
        if e.skipped:
            assert torch.equal(e.velocity, prev.velocity) and e.stage == prev.stage
    assert cached.dit_calls == replay.calls == counting.log.dit == 7
    assert [s.dit_skipped for s in cached.stages] == [3, 2, 2] and cached.dit_skipped == 7
    want = expected_backend_calls(9, (4, 2, 1), STEPS, guidance, step_cache=p, shift_per_stage=SHIFTS)
    assert (want.dit, want.dit_skipped) == (7, 7)
    assert counting.log.as_calls(want.release_dit) == want
    # and the cache changed the video: the reused outputs are not what the DiT would have said
    uncached = generate(backend, tiny_models.tokenizer, request, progress=False)
    assert not torch.equal(frames(uncached)[-1], frames(cached)[-1])


def test_each_stage_has_its_own_threshold(backend, tiny_models):
    request = GenerationRequest(prompt="a cat", seed=2, **FAST)
    result = generate(
        backend, tiny_models.tokenizer, replace(request, step_cache=policy((0.0, 0.1, 0.0))), progress=False
    )
    assert [s.dit_calls for s in result.stages] == [6, 2, 4]
    assert [s.dit_skipped for s in result.stages] == [0, 2, 0]


def test_the_summary_reports_calls_and_skips_per_stage(backend, tiny_models):
    from tempomaster.runtime.outputs import summarise
    from tempomaster.runtime.request import Job

    request = replace(GenerationRequest(prompt="a cat", seed=2, **FAST), step_cache=policy())
    result = generate(backend, tiny_models.tokenizer, request, progress=False)
    text = summarise(Job("video", request), result, [Path("out/video.mp4")], "torch", 0.0)
    assert "3 DiT calls (batch 2), 3 skipped (step cache)" in text
    assert "2 DiT calls (batch 4), 2 skipped (step cache)" in text
    assert "DiT calls: 7, 7 skipped (step cache)" in text
    plain = replace(request, step_cache=None)
    assert "skipped" not in summarise(
        Job("video", plain),
        generate(backend, tiny_models.tokenizer, plain, progress=False),
        [Path("out/video.mp4")],
        "torch",
        0.0,
    )


# ----------------------------------------------------------------------------
# The request: flags -> policy, and every refusal before a model loads
# ----------------------------------------------------------------------------


def _options(**kw):
    from tempomaster.runtime.request import GenerateOptions

    return GenerateOptions(prompt="a red ball", **kw)


def test_named_policies_read_the_curves_beside_the_weights(tmp_path):
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import build_jobs
    from tempomaster.runtime.step_cache import POLICY_MAX_SKIPS, stage_thresholds

    (job,) = build_jobs(_options(cache="safe", preset="toy"), get_preset("toy").defaults)
    p = job.request.step_cache
    assert p.name == "safe" and p.thresholds == stage_thresholds("safe", 3) and p.max_skips == POLICY_MAX_SKIPS["safe"]
    assert len(p.curves) == 3 and p.curves[0].sigmas[0] == 1.0
    (job,) = build_jobs(
        _options(cache="fast", cache_thresholds=(0.0, 0.3, 0.25), preset="toy"), get_preset("toy").defaults
    )
    assert (
        job.request.step_cache.thresholds == (0.0, 0.3, 0.25)
        and job.request.step_cache.max_skips == POLICY_MAX_SKIPS["fast"]
    )
    # a curves file given by path, for a model set that ships none
    path = save_curves(tmp_path / "curves.json", flat_curves())
    (job,) = build_jobs(
        _options(cache_thresholds=(0.1, 0.1, 0.1), cache_curves=path, preset="tiny"), get_preset("tiny").defaults
    )
    assert job.request.step_cache.name == "custom" and job.request.step_cache.curves == flat_curves()


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(cache_thresholds=(0.1, 0.1)), "--cache-threshold: 2 value(s) given for 3 stage(s)"),
        (dict(cache_thresholds=(0.1, float("nan"), 0.1)), "finite number in [0, 1]"),
        (dict(cache_thresholds=(0.1, 1.2, 0.1)), "finite number in [0, 1]"),
        (dict(cache_thresholds=(-0.1, 0.1, 0.1)), "finite number in [0, 1]"),
        (dict(cache="off", cache_thresholds=(0.1, 0.1, 0.1)), "the step cache is off"),
        (dict(cache="quick"), "--cache: 'quick' is not a step-cache policy"),
        (dict(cache="safe", preset="tiny"), "preset 'tiny' ships none"),
    ],
)
def test_bad_cache_requests_are_refused(kw, needle):
    from tempomaster.errors import UsageError
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import build_jobs

    preset = kw.pop("preset", "toy")
    with pytest.raises(UsageError) as err:
        build_jobs(_options(preset=preset, **kw), get_preset(preset).defaults)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_curves_must_cover_every_stage(tmp_path):
    from tempomaster.errors import UsageError
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import build_jobs

    path = save_curves(tmp_path / "two.json", flat_curves(2))
    with pytest.raises(UsageError, match="curves for 2 stage"):
        build_jobs(_options(cache="safe", cache_curves=path, preset="tiny"), get_preset("tiny").defaults)
    with pytest.raises(UsageError, match="--cache-curves: .*nothing.json"):
        build_jobs(
            _options(cache="safe", cache_curves=tmp_path / "nothing.json", preset="tiny"), get_preset("tiny").defaults
        )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--cache-threshold", "0.1,nan,0.1"], "--cache-threshold"),
        (["--cache-threshold", "0.1,2,0.1"], "--cache-threshold"),
        (["--cache-threshold", "0.1,0.1"], "2 value(s) given for 3 stage(s)"),
        (["--cache", "turbo"], "--cache"),
        (["--cache", "safe", "--preset", "tiny"], "--cache safe"),
    ],
)
def test_cli_refuses_in_one_line_before_any_model_loads(args, needle, tmp_path, capsys, monkeypatch):
    import tempomaster.runtime.jobs as jobs
    from tempomaster.cli import run_main

    monkeypatch.setattr(jobs, "make_backend", lambda *a: pytest.fail("a model was loaded"))
    try:
        code = run_main(["generate", "--prompt", "a red ball", "--out", str(tmp_path / "v.mp4"), *args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Two ranks (gloo): every rank skips the same steps, the video is the one-process video
# ----------------------------------------------------------------------------


def cached_video_on_ranks(world, jobs):
    """One rank's part: the tiny preset's video with the step cache, split over the ranks (module level: spawned)."""
    from tempomaster.runtime.backends.factory import TorchBackendFactory
    from tempomaster.runtime.workers import run_videos

    done = run_videos(world, jobs, TorchBackendFactory(preset="tiny"), write=False, keep_frames=True)
    return [
        (report.dit_calls, report.dit_skipped, len(placements), [s.frames.numpy().copy() for s in result.stages])
        for _, (report, result, placements) in done
    ]


def test_two_ranks_skip_the_same_steps_and_make_the_one_process_video(backend, tiny_models, tmp_path):
    import os

    from tempomaster.runtime.workers import VideoJob, launch

    request = replace(GenerationRequest(prompt="a red ball bouncing", seed=3, **FAST), step_cache=policy())
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each of the 2 ranks runs
    try:
        single = generate(backend, tiny_models.tokenizer, request, progress=False)
    finally:
        torch.set_num_threads(threads)
    results = launch(
        cached_video_on_ranks,
        ([VideoJob("one", request, tmp_path / "one.mp4")],),
        devices=[torch.device("cpu")] * 2,
        timeout=120,
    )
    produced = [item for res in results for item in res]
    assert len(produced) == 1  # the group's first rank reports
    calls, skipped, placed, video = produced[0]
    # a rank that decided otherwise would have waited alone in an all-gather: the run would time out
    assert (calls, skipped) == (single.dit_calls, single.dit_skipped) == (7, 7) and placed == 7
    for x, y in zip(video, frames(single)):
        assert x.shape == tuple(y.shape)
        assert np.abs(x - y.numpy()).max() <= 1 / 255
