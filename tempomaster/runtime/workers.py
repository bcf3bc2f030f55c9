"""Videos on many devices: start one process per device (or join torchrun's), run, write from rank 0.

``generate_videos`` is the library call behind ``tm-run generate --devices``
and behind a ``tm-run generate`` that torchrun started.  The ranks are cut
into groups (``parallel_plan.plan_video_groups``); each group makes its
videos one after another with a ``DistributedBackend``, and the group's first
rank alone writes them, after a barrier, so a broken run writes nothing.
"""

from __future__ import annotations

import os
import queue as queue_module
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MissingDependencyError, UsageError
from ..parallel_plan import plan_video_groups
from .distributed import (
    STORE_HOSTED_ENV,
    DistributedBackend,
    RankGroup,
    WorkerError,
    World,
    host_store,
    join_from_env,
    supports_sequence_parallel,
    torchrun_environment,
)
from .pipeline import GenerationRequest, GenerationResult, generate

FLAG_DEVICES = "--devices"


# ----------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------


def parse_devices(text: str) -> list[torch.device]:
    """``0,1,2,3`` -> CUDA devices; ``cpu:4`` (or ``cpu,cpu``) -> CPU processes (gloo)."""
    accepted = "comma-separated CUDA indices such as 0,1,2,3, or cpu:N for N CPU processes"
    text = text.strip()
    if text.startswith("cpu:"):
        count = text[4:]
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"{FLAG_DEVICES}: expected {accepted}; got {text!r}")
        return [torch.device("cpu")] * int(count)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{FLAG_DEVICES}: expected {accepted}; got {text!r}")
    if all(t == "cpu" for t in items):
        return [torch.device("cpu")] * len(items)
    if not all(t.isdigit() for t in items):
        raise UsageError(f"{FLAG_DEVICES}: expected {accepted}; got {text!r}")
    indices = [int(t) for t in items]
    if len(set(indices)) != len(indices):
        raise UsageError(f"{FLAG_DEVICES}: device listed twice in {text!r}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in indices if i >= available]
    if missing:
        raise MissingDependencyError(
            f"{FLAG_DEVICES}: CUDA device {missing[0]} is not available ({available} visible); "
            f"use {FLAG_DEVICES} cpu:{len(indices)} for CPU processes"
        )
    return [torch.device("cuda", i) for i in indices]


# ----------------------------------------------------------------------------
# Starting the processes
# ----------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the launcher dies, so no rank outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(rank: int, world_size: int, device: str, port: int, timeout: float, fn, args, results) -> None:
    # Ctrl-C goes to the whole terminal's process group: the launcher alone decides, and stops every rank.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        **{STORE_HOSTED_ENV: "1"},
    )
    if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    world = None
    try:
        world = join_from_env(timeout, device)
        results.put(("ok", rank, fn(world, *args)))
    except WorkerError as err:
        results.put(("fault", rank, str(err), err.culprit))
        raise SystemExit(1) from None
    except BaseException as err:  # noqa: BLE001 - reported to the launcher as one line
        results.put(("error", rank, _one_line(err), rank))
        raise SystemExit(1) from None
    finally:
        if world is not None:
            world.close()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def launch(
    fn: Callable,
    args: tuple = (),
    *,
    devices: Sequence[torch.device],
    timeout: float = 600.0,
    on_start: Callable[[list[int]], None] | None = None,
) -> list:
    """Run ``fn(world, *args)`` in one new process per device; return each rank's value, by rank.

    ``fn`` and ``args`` must pickle (a module-level function).  The launcher
    hosts the rendezvous store, so it outlives any rank.  If a rank fails,
    dies or hangs, every rank is stopped and ``WorkerError`` names it; Ctrl-C
    stops every rank and re-raises.
    """
    import torch.multiprocessing as mp

    devices = [torch.device(d) for d in devices]
    if not devices:
        raise UsageError(f"{FLAG_DEVICES}: no device given")
    # A fork server imports torch once and forks every rank from it (cheaper than a fresh
    # interpreter per rank, and safe: nothing in it has started threads or touched CUDA).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tempomaster.runtime.workers"])
    store = host_store("127.0.0.1", 0, None, timeout)  # loopback only: the ranks are all on this host
    results = ctx.Queue()
    world = len(devices)
    procs = [
        ctx.Process(target=_child, args=(r, world, str(d), store.port, timeout, fn, args, results), name=f"tm-rank-{r}")
        for r, d in enumerate(devices)
    ]
    values: dict[int, object] = {}
    failures: list[tuple] = []
    try:
        for p in procs:
            p.start()
        if on_start is not None:
            on_start([p.pid for p in procs])
        failed_at = None
        while True:
            try:
                msg = results.get(timeout=0.1)
                if msg[0] == "ok":
                    values[msg[1]] = msg[2]
                else:
                    failures.append(msg)
            except queue_module.Empty:
                pass
            died = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if (failures or died) and failed_at is None:
                failed_at = time.monotonic()
            # After the first failure, a short grace lets the ranks' own reports arrive.
            if failed_at is not None and time.monotonic() - failed_at > 0.5:
                raise _launch_error(procs, failures, values)
            if len(values) == world and all(p.exitcode is not None for p in procs):
                return [values[r] for r in range(world)]
            if failed_at is None and all(p.exitcode == 0 for p in procs) and len(values) < world:
                # exited cleanly but a result is lost in the queue: drain once more
                try:
                    msg = results.get(timeout=1.0)
                    values[msg[1]] = msg[2]
                    continue
                except queue_module.Empty:
                    raise WorkerError("a rank exited without reporting its result") from None
    finally:
        _stop(procs)
        results.close()
        del store


def _launch_error(procs, failures, values) -> WorkerError:
    unreported = (
        {r for r, p in enumerate(procs) if p.exitcode not in (None, 0)} - {f[1] for f in failures} - set(values)
    )
    own = [f for f in failures if f[0] == "error"]
    if own:  # a rank's own exception is the root cause; the others only saw it vanish
        return WorkerError(f"rank {own[0][1]} failed: {own[0][2]}; all ranks stopped, nothing written", own[0][1])
    if unreported:
        r = min(unreported)
        return WorkerError(f"rank {r} died ({_exit_text(procs[r].exitcode)}); all ranks stopped, nothing written", r)
    named = [f for f in failures if f[3] is not None] or failures
    return WorkerError(f"{named[0][2]}; all ranks stopped, nothing written", named[0][3])


def _stop(procs) -> None:
    """SIGTERM every live rank, SIGKILL what is left after 3 s, reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
            try:  # a stopped rank (SIGSTOP, Ctrl-Z) acts on the SIGTERM only once it runs again
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


# ----------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoJob:
    """One video: its request and where rank 0 writes it (an .mp4 path or a PNG folder)."""

    name: str
    request: GenerationRequest
    out: Path
    stage_outs: tuple[Path, ...] = ()  # one per stage, written when given
    stop_after: int | None = None  # --stop-after: the last stage made; its state is written beside `out`
    state_identity: dict | None = None  # the models, as the state records them (runtime.refine.run_identity)


@dataclass(frozen=True)
class VideoReport:
    name: str
    paths: tuple[Path, ...]
    num_frames: int
    height: int
    width: int
    fps: float
    seconds: float
    dit_calls: int
    ranks: tuple[int, ...]
    backend: str
    blueprint_tile: object = None  # with --stop-after: the clip's middle frame (uint8 [H, W, 3]) for a contact sheet
    dit_skipped: int = 0  # steps the step cache answered with the last DiT output

    def line(self) -> str:
        return (
            f"[{self.name}] {self.num_frames} frames {self.width}x{self.height} at {self.fps:g} fps -> {self.paths[0]} "
            f"({self.seconds:.2f} s on rank(s) {','.join(map(str, self.ranks))}, {self.backend}, {self.dit_calls} DiT calls"
            f"{f', {self.dit_skipped} skipped (step cache)' if self.dit_skipped else ''})"
        )


def write_video(result: GenerationResult, job: VideoJob) -> tuple[Path, ...]:
    from .video import write_result

    return tuple(write_result(result, job.out, list(job.stage_outs), bool(job.stage_outs)))


def make_groups(world: World, num_videos: int, num_heads: int, sequence_parallel: bool) -> list[RankGroup]:
    """Every video group and every sequence-parallel subgroup inside it, made in the same order on every rank."""
    groups = []
    for ranks in plan_video_groups(num_videos, world.size):
        group = RankGroup(world, ranks)
        world.group(ranks)
        if sequence_parallel:
            for d in range(2, group.size + 1):
                if num_heads % d == 0:
                    for k in range(group.size // d):
                        group.subgroup(tuple(range(k * d, (k + 1) * d)))
        groups.append(group)
    return groups


def run_videos(
    world: World,
    jobs: Sequence[VideoJob],
    make_backend: Callable,
    sequence_parallel: bool = True,
    progress: bool = False,
    write: bool = True,
    keep_frames: bool = False,
) -> list:
    """One rank's part: make its group's videos; its group's first rank writes them and returns reports.

    ``keep_frames`` returns ``(report, result, placements)`` instead, for tests.
    """
    backend, tokenizer = make_backend(world.device)
    sp = sequence_parallel and supports_sequence_parallel(backend)
    num_heads = backend.dit.cfg.num_heads if sp else 1
    groups = make_groups(world, len(jobs), num_heads, sp)
    mine = next(k for k, g in enumerate(groups) if world.rank in g.ranks)
    group = groups[mine]
    out = []
    for i, job in enumerate(jobs):
        if i % len(groups) != mine:
            continue
        dist_backend = DistributedBackend(backend, group, sp)
        leader = group.index == 0
        result = generate(
            dist_backend,
            tokenizer,
            job.request,
            progress=progress and leader,
            keep_stages=bool(job.stage_outs) or keep_frames,
            stop_after=job.stop_after,
        )
        dist_backend.barrier("the end of the video")
        if not leader:
            continue
        paths = write_video(result, job) if write else (job.out,)
        tile = None
        if job.stop_after is not None and write:
            from .contact_sheet import middle_frame
            from .refine import save_blueprint

            paths += tuple(save_blueprint(job.out, job.request, result, job.state_identity))
            tile = middle_frame(result.video.frames)
        report = VideoReport(
            job.name,
            paths,
            result.video.num_frames,
            result.height,
            result.width,
            result.video.fps,
            result.seconds,
            result.dit_calls,
            group.ranks,
            dist_backend.name,
            blueprint_tile=tile,
            dit_skipped=result.dit_skipped,
        )
        out.append((i, (report, result, dist_backend.placements) if keep_frames else report))
    _wait_for_all(world)
    return out


def _wait_for_all(world: World) -> None:
    """Where rank 0 hosts the store (plain env://), it must outlive the groups still working."""
    world.store.add("tm/done", 1)
    hosted_elsewhere = (
        os.environ.get(STORE_HOSTED_ENV) == "1" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    )
    if world.rank != 0 or hosted_elsewhere:
        return
    while world.store.add("tm/done", 0) < world.size:
        time.sleep(0.2)


def generate_videos(
    jobs: Sequence[VideoJob],
    make_backend: Callable,
    *,
    devices: Sequence[torch.device] | None = None,
    timeout: float = 600.0,
    sequence_parallel: bool = True,
    progress: bool = False,
) -> list[VideoReport]:
    """Make ``jobs`` on ``devices`` (new processes) or, with ``devices=None``, inside torchrun's group.

    Returns the reports of the videos this process knows: all of them from the
    launcher; under torchrun, those written by this rank (each video's group
    leader), so every video is printed exactly once.
    """
    if not timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {timeout!r}")
    if not jobs:
        raise UsageError("no video to make")
    if devices is None:
        if not torchrun_environment():
            raise UsageError(f"{FLAG_DEVICES}: give devices, or start tm-run with torchrun")
        world = join_from_env(timeout)
        try:
            done = run_videos(world, jobs, make_backend, sequence_parallel, progress)
        finally:
            world.close()
    else:
        per_rank = launch(
            run_videos, (jobs, make_backend, sequence_parallel, progress), devices=devices, timeout=timeout
        )
        done = [item for items in per_rank for item in items]
    return [report for _, report in sorted(done, key=lambda item: item[0])]


# ----------------------------------------------------------------------------
# For the command line
# ----------------------------------------------------------------------------


def plan_for_request(
    request: GenerationRequest,
    *,
    devices: int,
    num_heads: int,
    sequence_parallel: bool = True,
    forward_seconds: float | None = None,
):
    """``tm-run plan``: the schedule ``generate_videos`` runs for this request on ``devices`` ranks.

    ``num_heads`` is the DiT's (the preset's); pass ``sequence_parallel=False``
    for engine builds, which run chunk/CFG split only.
    """
    from ..parallel_plan import plan_schedule

    height, width = request.output_size()
    return plan_schedule(
        devices=devices,
        num_heads=num_heads,
        num_frames=request.num_frames,
        frame_intervals=request.frame_intervals,
        steps_per_stage=request.steps_per_stage,
        shift_per_stage=request.shift_per_stage,
        guidance_scale=request.guidance_scale,
        height=height,
        width=width,
        ref_frames=request.ref_images.keys(),
        sequence_parallel=sequence_parallel,
        forward_seconds=forward_seconds,
    )
