"""Step caching: skip the DiT calls whose output would barely change (MagCache).

The rule is MagCache's (Ma et al., "MagCache: Fast Video Generation with
Magnitude-Aware Cache", arXiv:2506.09045). Its observation: the magnitude
ratio of the model's residual at successive steps,

    gamma_k = mean over tokens of ||r_k|| / ||r_{k-1}||,

is nearly the same curve for every prompt of one model and schedule (close to
1 for most of the trajectory, falling at the end), so it is measured once (a
calibration run) and the skipping needs no extra tensor at run time. From the
last computed step on, each further step multiplies an accumulated ratio by
gamma_k and adds its distance from 1 to an accumulated error:

    ratio *= gamma_k;   skipped += 1;   error += |1 - ratio|
    skip step k  iff  error < threshold  and  skipped <= max_skips
    otherwise   call the model and reset (ratio 1, error 0, skipped 0)

A skipped step reuses the cached residual. MagCache's Wan code caches the
transformer blocks' residual inside the model; here the rule lives above the
backend seam (every backend, torch, onnxruntime or TensorRT, gets it without
a new graph output), so the residual is the DiT's output itself, the flow
velocity, and the calibration measures gamma on it: per latent pixel the norm
over channels, the ratio of two steps' norms averaged over pixels and chunks.
Why MagCache rather than TeaCache (Liu et al., arXiv:2411.19108, which decides
from the relative L1 change of the timestep-modulated input of the first
block, rescaled by a fitted polynomial): TeaCache needs that modulated input,
which no exported graph outputs, and a polynomial fitted per model; MagCache
needs only the velocity the runtime already holds, and at run time not even
that, so every rank of a many-process run reaches the same decisions.

Our additions to the published rule, for a next-frame-rate model whose stages
run their own schedules: one threshold per stage (0 turns a stage's caching
off); the first `retention` share of a stage's steps (MagCache's retention
ratio, at least one step) and its last step are always computed; the
calibrated curve is kept as a log-magnitude over sigma, so a schedule with
other step counts or shifts reads its ratios off the same curve (at the
calibrated schedule this gives back exactly the calibrated gammas; MagCache
instead resamples the list of gammas to the new length). With guidance the
cond and uncond halves of the batched call have their own curves and errors,
and one decision covers both: a step is skipped only when every branch may
be, so guidance always combines two velocities of the same step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..json_files import read_json_object

__all__ = [
    "BRANCHES",
    "CURVES_FILE",
    "DEFAULT_MAX_SKIPS",
    "DEFAULT_RETENTION",
    "MagnitudeCurve",
    "MagnitudeRecorder",
    "StepCachePolicy",
    "CACHE_MODES",
    "POLICY_THRESHOLDS",
    "POLICY_MAX_SKIPS",
    "check_thresholds",
    "stage_thresholds",
    "magnitude_ratios",
    "token_norms",
    "skip_plan",
    "load_curves",
    "curves_to_json",
    "save_curves",
]

BRANCHES = ("cond", "uncond")  # order of the halves of a guided DiT batch
CURVES_FILE = "magnitude_curves.json"  # beside a model set's weights (or in a build directory)
CURVES_FORMAT = "tempomaster-magnitude-curves"
DEFAULT_MAX_SKIPS = 2  # MagCache's K for Wan2.1
DEFAULT_RETENTION = 0.2  # MagCache's retention ratio: the first 20% of steps are always computed

CACHE_MODES = ("off", "safe", "fast")
# Per-stage accumulated-error thresholds (stage 0, 1, 2; a later stage takes the last value),
# chosen on the toy at steps [50, 32, 32] (benchmarks/results/step_cache_toy.json, docs/step_cache.md):
# safe 54 of 114 DiT calls, worst PSNR 41.6 dB against uncached, every toy quality bound kept;
# fast 42 calls, 35.6 dB, its largest centroid step 6.26 px on one prompt (bound 6).
POLICY_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "safe": (0.02, 0.02, 0.02),
    "fast": (0.08, 0.08, 0.08),
}
# The longest run of consecutive skips each policy allows (MagCache's K); a custom threshold list takes safe's.
POLICY_MAX_SKIPS: dict[str, int] = {"safe": 2, "fast": 4}
THRESHOLD_RANGE = (0.0, 1.0)


def check_thresholds(
    thresholds: Sequence[float], num_stages: int, flag: str = "--cache-threshold"
) -> tuple[float, ...]:
    """The thresholds as floats, or ValueError naming the flag: one per stage, each finite in [0, 1]."""
    values = tuple(thresholds)
    if len(values) != num_stages:
        raise ValueError(
            f"{flag}: {len(values)} value(s) given for {num_stages} stage(s); give one per stage, "
            f"e.g. {','.join(['0.1'] * num_stages)}"
        )
    low, high = THRESHOLD_RANGE
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
            raise ValueError(f"{flag}: each threshold must be a finite number in [{low:g}, {high:g}], got {v!r}")
    return tuple(float(v) for v in values)


def stage_thresholds(mode: str, num_stages: int) -> tuple[float, ...]:
    """A named policy's thresholds for `num_stages` stages: stage 0 the blueprint's, later stages the fill-ins'."""
    table = POLICY_THRESHOLDS[mode]
    return tuple(table[min(s, len(table) - 1)] for s in range(num_stages))


# ----------------------------------------------------------------------------
# The calibrated curve
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MagnitudeCurve:
    """One stage's calibration: the sigmas of the calibrated schedule and, per branch, log gamma at each step.

    log_gammas[b][k] is log(gamma_k) for branch b; entry 0 (the first step,
    which has no predecessor) is 0.
    """

    sigmas: tuple[float, ...]
    log_gammas: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        n = len(self.sigmas)
        if n < 2 or any(len(g) != n for g in self.log_gammas) or not self.log_gammas:
            raise ValueError(
                f"a magnitude curve needs >= 2 sigmas and one log-gamma per sigma per branch, got "
                f"{n} sigmas and {[len(g) for g in self.log_gammas]} values"
            )
        if any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ValueError("a magnitude curve's sigmas must be strictly descending")
        if not all(math.isfinite(v) for g in self.log_gammas for v in g):
            raise ValueError("a magnitude curve holds a non-finite value")

    def ratios(self, sigmas: Sequence[float], branches: int) -> np.ndarray:
        """gamma at each step of a schedule with these (descending) sigmas: ``[branches, len(sigmas)]``.

        The cumulative log-magnitude L(sigma) (L = 0 at the first calibrated
        sigma) is interpolated linearly in sigma, and extrapolated with its
        outermost segment's slope beyond the calibrated range; gamma_k =
        exp(L(sigma_k) - L(sigma_{k-1})), gamma_0 = 1.
        """
        if branches > len(self.log_gammas):
            raise ValueError(f"the curve has {len(self.log_gammas)} branch(es), {branches} asked for")
        s = np.asarray(self.sigmas, dtype=np.float64)[::-1]  # ascending, as np.interp wants
        target = np.asarray(sigmas, dtype=np.float64)
        out = np.ones((branches, len(target)))
        for b in range(branches):
            level = np.cumsum(np.asarray(self.log_gammas[b], dtype=np.float64))[::-1]
            at = np.interp(target, s, level)
            below, above = target < s[0], target > s[-1]
            at[below] = level[0] + (target[below] - s[0]) * (level[1] - level[0]) / (s[1] - s[0])
            at[above] = level[-1] + (target[above] - s[-1]) * (level[-1] - level[-2]) / (s[-1] - s[-2])
            out[b, 1:] = np.exp(np.diff(at))
        return out


def token_norms(velocity: torch.Tensor, branches: int) -> torch.Tensor:
    """Per branch, the norm over channels at every latent pixel of every chunk: ``[branches, n, F, H, W]`` float64."""
    v = velocity.to(torch.float64)
    return torch.linalg.vector_norm(v, dim=1).reshape(branches, -1, *v.shape[2:])


def magnitude_ratios(norms: Sequence[torch.Tensor]) -> np.ndarray:
    """gamma_k per branch from successive `token_norms`: ``[branches, steps]``, gamma_0 = 1.

    gamma_k = mean over pixels of ||v_k|| / ||v_{k-1}|| (MagCache's mean of
    per-token ratios); a pixel where the earlier norm is 0 is left out.
    """
    branches = norms[0].shape[0]
    out = np.ones((branches, len(norms)))
    for k in range(1, len(norms)):
        prev, cur = norms[k - 1].reshape(branches, -1), norms[k].reshape(branches, -1)
        for b in range(branches):
            keep = prev[b] > 0
            out[b, k] = float((cur[b][keep] / prev[b][keep]).mean()) if bool(keep.any()) else 1.0
    return out


@dataclass
class MagnitudeRecorder:
    """A `generate` step callback that measures each stage's magnitude curve on uncached runs.

    Give it to ``generate(..., on_step_end=recorder)`` for one or more runs
    with the same stage schedules (a run begins at stage 0, step 0);
    `curves()` averages log gamma over the runs.
    """

    branches: int = 2
    runs: list = field(default_factory=list)  # per run: {stage: [token norms per step]}
    sigmas: dict = field(default_factory=dict)  # stage -> [sigma per step]

    def __call__(self, event) -> None:
        if getattr(event, "skipped", False):
            raise ValueError("calibrating the magnitude curves needs an uncached run (every step a DiT call)")
        if (event.stage, event.step) == (0, 0) or not self.runs:
            self.runs.append({})
        steps = self.runs[-1].setdefault(event.stage, [])
        if len(steps) != event.step:
            raise ValueError(f"stage {event.stage}: step {event.step} arrived after {len(steps)} step(s)")
        steps.append(token_norms(event.velocity, self.branches))
        known = self.sigmas.setdefault(event.stage, [])
        if len(known) == event.step:
            known.append(float(event.sigma))
        elif known[event.step] != float(event.sigma):
            raise ValueError(
                f"stage {event.stage}: the runs have different schedules; calibrate one schedule at a time"
            )

    def curves(self) -> list[MagnitudeCurve]:
        out = []
        for s in sorted(self.sigmas):
            logs = np.mean(np.stack([np.log(magnitude_ratios(run[s])) for run in self.runs if s in run]), axis=0)
            out.append(MagnitudeCurve(tuple(self.sigmas[s]), tuple(tuple(float(v) for v in row) for row in logs)))
        return out


# ----------------------------------------------------------------------------
# The decision
# ----------------------------------------------------------------------------


def skip_plan(
    ratios: np.ndarray, threshold: float, max_skips: int = DEFAULT_MAX_SKIPS, retention: float = DEFAULT_RETENTION
) -> tuple[bool, ...]:
    """MagCache's decision for every step of one stage: True where the step reuses the cached velocity.

    ratios: ``[branches, steps]`` gamma per step (`MagnitudeCurve.ratios`).
    The first ``max(1, int(steps * retention))`` steps and the last step are
    always computed; ``threshold <= 0`` or ``max_skips < 1`` computes every step.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    branches, steps = ratios.shape
    first_free = max(1, int(steps * retention))
    acc_ratio, acc_error, acc_steps = np.ones(branches), np.zeros(branches), 0
    plan = []
    for k in range(steps):
        skip = False
        if threshold > 0 and max_skips >= 1 and first_free <= k < steps - 1:
            acc_ratio = acc_ratio * ratios[:, k]
            acc_steps += 1
            acc_error = acc_error + np.abs(1.0 - acc_ratio)
            skip = bool(np.all(acc_error < threshold)) and acc_steps <= max_skips
        if not skip:  # a computed step refreshes the cache: the accumulators start again from it
            acc_ratio, acc_error, acc_steps = np.ones(branches), np.zeros(branches), 0
        plan.append(skip)
    return tuple(plan)


@dataclass(frozen=True)
class StepCachePolicy:
    """Which steps of each stage reuse the cached velocity: per-stage thresholds over calibrated curves.

    thresholds: the accumulated-error bound of each stage (0: never skip there).
    curves: one `MagnitudeCurve` per stage (at least as many as thresholds).
    """

    thresholds: tuple[float, ...]
    curves: tuple[MagnitudeCurve, ...]
    max_skips: int = DEFAULT_MAX_SKIPS
    retention: float = DEFAULT_RETENTION
    name: str = "custom"

    def __post_init__(self):
        if len(self.curves) < len(self.thresholds):
            raise ValueError(
                f"step cache: {len(self.thresholds)} thresholds but curves for {len(self.curves)} stage(s)"
            )
        check_thresholds(self.thresholds, len(self.thresholds), "step cache")
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise ValueError(f"step cache: max_skips must be an integer >= 0, got {self.max_skips!r}")
        if not 0.0 <= self.retention <= 1.0:
            raise ValueError(f"step cache: retention must be in [0, 1], got {self.retention!r}")

    def plan(self, stage: int, sigmas: Sequence[float], guided: bool) -> tuple[bool, ...]:
        """The skip decisions of `stage` for a schedule with these sigmas (both branches when guided)."""
        ratios = self.curves[stage].ratios(sigmas, 2 if guided else 1)
        return skip_plan(ratios, self.thresholds[stage], self.max_skips, self.retention)


# ----------------------------------------------------------------------------
# The curves on disk
# ----------------------------------------------------------------------------


def curves_to_json(curves: Sequence[MagnitudeCurve], calibration: dict | None = None) -> dict:
    return {
        "format": CURVES_FORMAT,
        "version": 1,
        "rule": "MagCache (arXiv:2506.09045) on the DiT's velocity: log gamma per step, per branch",
        "calibration": calibration or {},
        "stages": [
            {"sigmas": list(c.sigmas), "log_gammas": {name: list(g) for name, g in zip(BRANCHES, c.log_gammas)}}
            for c in curves
        ],
    }


def save_curves(path: str | Path, curves: Sequence[MagnitudeCurve], calibration: dict | None = None) -> Path:
    from ..atomic_write import write_text

    return write_text(path, json.dumps(curves_to_json(curves, calibration), indent=1) + "\n")


def load_curves(path: str | Path) -> tuple[MagnitudeCurve, ...]:
    """The stages' curves from a `save_curves` file; ValueError naming the file and what is wrong."""
    path = Path(path)
    data = read_json_object(path, ValueError, "magnitude curves")
    if data.get("format") != CURVES_FORMAT:
        raise ValueError(f"{path}: not a magnitude-curves file (format {CURVES_FORMAT!r} expected)")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{path}: 'stages' must be a non-empty list")
    curves = []
    for i, stage in enumerate(stages):
        try:
            gammas = stage["log_gammas"]
            curves.append(
                MagnitudeCurve(
                    tuple(float(v) for v in stage["sigmas"]),
                    tuple(tuple(float(v) for v in gammas[b]) for b in BRANCHES if b in gammas),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: stages[{i}]: {err}") from None
    return tuple(curves)
