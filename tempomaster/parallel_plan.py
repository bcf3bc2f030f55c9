"""How a video's DiT work is placed on several devices: pure maths, no models.

A step of stage s runs S = chunks x (2 with guidance, else 1) *sequences*
(cond and uncond twins of every chunk).  On P devices they are placed as:

- **chunk/CFG split**: the S sequences are cut into g balanced shares, one
  per group of devices;
- **sequence parallel** (Ulysses) of degree d: each group is d devices that
  share every one of its sequences' tokens (1/d each) and swap token shards
  for head shards around each self-attention, so d must divide the head count.

g = min(P // d, S) groups are used; ranks past g * d idle for the stage.  The
unit of time is one *forward*: one DiT pass over one whole sequence.  A
rank's share of a step costs (sequences of its group) / d forwards, the step
lasts as long as the largest share, and the stage's wall time is steps times
that.  d is chosen to minimise the step time, the smaller d on a tie (less
communication).  Communication, batching gains and the VAE/text encoder are
not modelled: the projection is a lower bound on the DiT time.

The runtime (``tempomaster.runtime.distributed``) calls ``place_sequences``
for every DiT call, so it runs exactly the placement ``plan_schedule`` prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from .errors import UsageError
from .planner import plan_stages, validate_run_config

__all__ = [
    "Placement",
    "StageSchedule",
    "SchedulePlan",
    "balanced_shares",
    "place_sequences",
    "plan_schedule",
    "plan_video_groups",
    "format_schedule",
]


def balanced_shares(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of ``parts`` consecutive shares of ``total``, larger shares first."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class Placement:
    """Where one DiT call's S sequences go on P ranks.

    Ranks ``k*d .. k*d + d - 1`` form group k (k < groups) and run sequences
    ``shares[k]`` together, each holding 1/d of every sequence's tokens.
    """

    sequences: int
    devices: int
    sp_degree: int
    groups: int
    shares: tuple[tuple[int, int], ...]

    def group_of(self, rank: int) -> int | None:
        k = rank // self.sp_degree
        return k if k < self.groups else None

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp_degree

    def group_ranks(self, k: int) -> tuple[int, ...]:
        return tuple(range(k * self.sp_degree, (k + 1) * self.sp_degree))

    def sequences_of(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the sequences rank takes part in (empty when idle)."""
        k = self.group_of(rank)
        return (0, 0) if k is None else self.shares[k]

    def forwards(self, rank: int) -> Fraction:
        """Forwards this rank computes per step: its group's sequences / d."""
        start, stop = self.sequences_of(rank)
        return Fraction(stop - start, self.sp_degree)

    @property
    def step_forwards(self) -> Fraction:
        """Wall time of one step in forwards: the largest share."""
        return max(self.forwards(r) for r in range(self.devices))

    @property
    def idle_fraction(self) -> Fraction:
        """Share of the P devices' time that no forward uses."""
        return 1 - Fraction(self.sequences) / (self.devices * self.step_forwards)


def place_sequences(
    sequences: int, devices: int, num_heads: int, sequence_parallel: bool = True, tokens: int | None = None
) -> Placement:
    """The placement of S sequences on P ranks with the shortest step (smaller d on a tie).

    d ranges over the divisors of ``num_heads`` up to P (and up to ``tokens``,
    a sequence's token count, when given); ``sequence_parallel=False`` pins d to 1.
    """
    if sequences < 1 or devices < 1 or num_heads < 1:
        raise ValueError(f"sequences, devices and num_heads must be >= 1, got {sequences}, {devices}, {num_heads}")
    best = None
    for d in range(1, devices + 1 if sequence_parallel else 2):
        if num_heads % d or (tokens is not None and d > tokens):
            continue
        groups = min(devices // d, sequences)
        shares = balanced_shares(sequences, groups)
        step = Fraction(shares[0][1] - shares[0][0], d)
        if best is None or step < best[0]:
            best = (step, Placement(sequences, devices, d, groups, tuple(shares)))
    return best[1]


@dataclass(frozen=True)
class StageSchedule:
    index: int
    interval: int
    chunks: int
    steps: int
    tokens: int  # per sequence
    placement: Placement

    @property
    def sequences(self) -> int:
        return self.placement.sequences

    def forwards_per_rank(self) -> list[Fraction]:
        return [self.steps * self.placement.forwards(r) for r in range(self.placement.devices)]

    def calls_per_rank(self) -> list[int]:
        """DiT calls each rank's backend makes in the stage (one per step unless idle)."""
        return [self.steps if self.placement.group_of(r) is not None else 0 for r in range(self.placement.devices)]

    @property
    def sequential_forwards(self) -> Fraction:
        return self.steps * self.placement.step_forwards

    @property
    def single_device_forwards(self) -> int:
        return self.steps * self.sequences


@dataclass(frozen=True)
class SchedulePlan:
    devices: int
    sequence_parallel: bool
    num_heads: int
    guided: bool
    stages: tuple[StageSchedule, ...]
    forward_seconds: float | None = None

    @property
    def sequential_forwards(self) -> Fraction:
        return sum((s.sequential_forwards for s in self.stages), Fraction(0))

    @property
    def single_device_forwards(self) -> int:
        return sum(s.single_device_forwards for s in self.stages)

    @property
    def speedup(self) -> float:
        return float(self.single_device_forwards / self.sequential_forwards)

    @property
    def idle_fraction(self) -> float:
        return float(1 - Fraction(self.single_device_forwards) / (self.devices * self.sequential_forwards))

    def seconds(self, forward_seconds: float | None = None) -> float | None:
        f = self.forward_seconds if forward_seconds is None else forward_seconds
        return None if f is None else float(self.sequential_forwards) * f

    def to_json(self) -> dict:
        """Plain numbers only (json.dumps-able)."""
        stages = []
        for s in self.stages:
            p = s.placement
            stages.append(
                {
                    "stage": s.index,
                    "interval": s.interval,
                    "chunks": s.chunks,
                    "steps": s.steps,
                    "sequences_per_step": s.sequences,
                    "tokens_per_sequence": s.tokens,
                    "groups": p.groups,
                    "sp_degree": p.sp_degree,
                    "placement": [
                        {"ranks": list(p.group_ranks(k)), "sequences": list(range(*p.shares[k]))}
                        for k in range(p.groups)
                    ],
                    "idle_ranks": list(range(p.groups * p.sp_degree, p.devices)),
                    "forwards_per_rank": [float(f) for f in s.forwards_per_rank()],
                    "dit_calls_per_rank": s.calls_per_rank(),
                    "sequential_forwards": float(s.sequential_forwards),
                    "idle_fraction": float(p.idle_fraction),
                    "seconds": None
                    if self.forward_seconds is None
                    else float(s.sequential_forwards) * self.forward_seconds,
                }
            )
        return {
            "devices": self.devices,
            "sequence_parallel": self.sequence_parallel,
            "num_heads": self.num_heads,
            "guided": self.guided,
            "forward_seconds": self.forward_seconds,
            "stages": stages,
            "sequential_forwards": float(self.sequential_forwards),
            "single_device_forwards": self.single_device_forwards,
            "speedup": self.speedup,
            "idle_fraction": self.idle_fraction,
            "seconds": self.seconds(),
        }


def plan_schedule(
    *,
    devices: int,
    num_heads: int,
    num_frames: int,
    frame_intervals: Sequence[int],
    steps_per_stage: Sequence[int],
    guidance_scale: float,
    height: int,
    width: int,
    shift_per_stage: Sequence[float] | None = None,
    ref_frames: Iterable[int] = (),
    sequence_parallel: bool = True,
    forward_seconds: float | None = None,
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> SchedulePlan:
    """Per stage: sequences per step, their placement, forwards per rank, idle share, projected time."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise UsageError(f"--devices must be an integer >= 1, got {devices!r}")
    if forward_seconds is not None and not forward_seconds > 0:
        raise UsageError(f"--forward-seconds must be > 0, got {forward_seconds!r}")
    shifts = shift_per_stage if shift_per_stage is not None else [1.0] * len(frame_intervals)
    ref_frames = tuple(ref_frames)
    validate_run_config(num_frames, height, width, frame_intervals, steps_per_stage, shifts, ref_frames)
    guided = guidance_scale != 1.0
    pt, ph, pw = patch_size
    stages = []
    for stage, steps in zip(plan_stages(num_frames, frame_intervals, ref_frames), steps_per_stage):
        tokens = (stage.latent_frames // pt) * (height // 8 // ph) * (width // 8 // pw)
        # padding-only chunks never reach the DiT (StagePlan.active_chunks)
        chunks = len(stage.active_chunks)
        sequences = chunks * (2 if guided else 1)
        placement = place_sequences(sequences, devices, num_heads, sequence_parallel, tokens)
        stages.append(StageSchedule(stage.index, stage.interval, chunks, steps, tokens, placement))
    return SchedulePlan(devices, sequence_parallel, num_heads, guided, tuple(stages), forward_seconds)


def plan_video_groups(num_videos: int, devices: int) -> list[tuple[int, ...]]:
    """Split P ranks into min(videos, P) groups of consecutive ranks, larger groups first.

    Video i runs on group i % groups; every group runs its videos one after another.
    """
    if num_videos < 1 or devices < 1:
        raise ValueError(f"need at least one video and one device, got {num_videos} and {devices}")
    return [tuple(range(a, b)) for a, b in balanced_shares(devices, min(num_videos, devices))]


def _num(x: Fraction | float) -> str:
    return f"{float(x):g}"


def format_schedule(plan: SchedulePlan) -> str:
    """The plan as a table for people."""
    sp = "on" if plan.sequence_parallel else "off"
    lines = [
        f"{plan.devices} device(s), sequence parallel {sp} ({plan.num_heads} heads), "
        f"guidance {'on' if plan.guided else 'off'}; 1 forward = one DiT pass over one sequence",
        "stage  steps  seq/step  tokens  groups x sp  forwards/rank (max)  sequential forwards  idle",
    ]
    for s in plan.stages:
        p = s.placement
        lines.append(
            f"{s.index:>5}  {s.steps:>5}  {s.sequences:>8}  {s.tokens:>6}  {p.groups:>6} x {p.sp_degree:<2}  "
            f"{_num(max(s.forwards_per_rank())):>19}  {_num(s.sequential_forwards):>19}  {float(p.idle_fraction):>4.0%}"
        )
    total = (
        f"total: {_num(plan.sequential_forwards)} sequential forwards (1 device: {plan.single_device_forwards}), "
        f"speed-up {plan.speedup:.2f}x, idle {plan.idle_fraction:.0%}"
    )
    seconds = plan.seconds()
    if seconds is not None:
        total += f", projected DiT time {seconds:.1f} s at {plan.forward_seconds:g} s/forward"
    lines.append(total)
    return "\n".join(lines)
