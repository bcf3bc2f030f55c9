"""`tm-run generate` as a library call: a checked request -> one backend (or one per rank) -> videos."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

from ..errors import UsageError
from .backends.factory import TensorRTBackendFactory, backend_factory
from .outputs import GenerateReport, check_writable, output_targets, summarise
from .request import (
    GenerateOptions,
    Job,
    available_cores,
    build_jobs,
    preset_defaults,
    resolve_device,
    resolve_dtype,
)
from .video import write_result


def make_backend(options: GenerateOptions, dtype: str, device: str, threads: int):
    """(backend, tokenizer) in this process, on `device`."""
    import torch

    return backend_factory(options, dtype, threads)(torch.device(device))


def run_generate(options: GenerateOptions, echo=print) -> GenerateReport:
    """Check everything, then load the models once and generate every job; `echo` gets each job's summary."""
    defaults, preset, manifest = preset_defaults(options)
    jobs = build_jobs(options, defaults)
    several = len(jobs) > 1
    targets, finals = [], []
    for job in jobs:
        final, stage_paths = output_targets(options.out, job.name, several, _stages_run(options, job))
        targets += [final, *(stage_paths if options.save_stages else [])]
        finals.append(final)
    if options.stop_after is not None:
        from .refine import blueprint_targets, check_stop_after

        check_stop_after(options.stop_after, jobs)
        blueprint_targets(options.out, finals, several)  # checked by their own rule: ours, by their format
    check_writable(options.out, targets)
    if options.profile is not None:
        if options.profile.exists() and not options.profile.is_dir():
            raise UsageError(f"--profile: {options.profile} exists and is not a directory")
        if options.devices is not None:
            raise UsageError("--profile profiles one process: leave out --devices")
    if options.threads is not None and options.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {options.threads}")
    threads = options.threads or available_cores()
    device = resolve_device(options.device)
    # a build's precision decides for its graphs; `--backend torch` runs the torch models in fp32 / bf16
    runs_graphs = manifest is not None and options.backend != "torch"
    dtype = resolve_dtype(options, device, manifest.precision if runs_graphs else None)

    from .memory import check_fits, check_video_fits, estimate_peak_memory

    for job in jobs:
        check_video_fits(job.request, where=f"[{job.name}]")  # arithmetic only: before the stages are planned
        estimate = estimate_peak_memory(preset, job.request, dtype=dtype, device=device, manifest=manifest)
        check_fits(estimate, where=f"[{job.name}]")

    identity = None  # with --stop-after: the models, as each state records them
    if options.stop_after is not None:
        from .refine import run_identity

        identity = run_identity(options, preset, manifest, dtype)

    import torch

    torch.set_num_threads(threads)
    if options.devices is not None or _under_torchrun():
        return _run_distributed(options, jobs, identity, dtype, threads, echo)
    backend, tokenizer = make_backend(options, dtype, device, threads)
    if hasattr(backend, "check_request"):
        for job in jobs:
            h, w = job.request.output_size()
            backend.check_request(h, w, job.request.num_frames, job.request.frame_intervals)

    from .pipeline import generate

    report = GenerateReport(lines=[], written=[])
    blueprints = []
    for job in jobs:
        final, stage_paths = output_targets(options.out, job.name, several, _stages_run(options, job))
        with _profiled(options, job.name, several, backend) as (run_on, phase):
            result = generate(
                run_on,
                tokenizer,
                job.request,
                progress=options.progress,
                keep_stages=options.save_stages,
                stop_after=options.stop_after,
            )
            start = time.perf_counter()
            with phase("writing"):
                written = write_result(result, final, stage_paths, options.save_stages)
        text = summarise(job, result, written, backend.name, time.perf_counter() - start)
        if identity is not None:
            from .contact_sheet import middle_frame
            from .refine import save_blueprint

            state = save_blueprint(final, job.request, result, identity)
            text += f"\n  state: {state[0]} (tm-run refine {state[0]} runs the remaining stages)"
            written += state
            blueprints.append((job, middle_frame(result.video.frames)))  # one frame kept, not the clip
        echo(text)
        report.lines.append(text)
        report.written += written
    if identity is not None and several:
        report.written.append(_contact_sheet(options.out, blueprints, echo))
    return report


def _stages_run(options: GenerateOptions, job: Job) -> int:
    """Stages this run makes: all, or up to --stop-after's."""
    total = len(job.request.frame_intervals)
    return total if options.stop_after is None else min(total, options.stop_after + 1)


def _contact_sheet(out, blueprints, echo):
    from .contact_sheet import write_contact_sheet
    from .refine import contact_sheet_path

    tiles = [tile for _, tile in blueprints]
    labels = [f"seed {job.request.seed}: {job.request.prompt}" for job, _ in blueprints]
    path = write_contact_sheet(contact_sheet_path(out), tiles, labels)
    echo(f"contact sheet of {len(tiles)} blueprints (middle frames) -> {path}")
    return path


@contextmanager
def _profiled(options: GenerateOptions, name: str, several: bool, backend):
    """(backend to run on, phase context) with or without `--profile`."""
    if options.profile is None:
        yield backend, lambda _name: nullcontext()
        return
    from .profiling import profile_generation

    folder = options.profile / name if several else options.profile
    with profile_generation(folder, device=backend.device, title=f"{name} on {backend.name}") as prof:
        yield prof.wrap(backend), prof.phase


def _under_torchrun() -> bool:
    from .distributed import torchrun_environment

    return torchrun_environment()


def _run_distributed(
    options: GenerateOptions, jobs: list[Job], identity: dict | None, dtype: str, threads: int, echo
) -> GenerateReport:
    """One process per device (or torchrun's processes): the same videos, the work split over the ranks."""
    from .workers import VideoJob, generate_videos, parse_devices

    if options.devices is not None and _under_torchrun():
        raise UsageError(
            "--devices: tm-run runs under torchrun already, which chose the processes; leave --devices out"
        )
    # first: the tensorrt factory refuses a machine without a GPU or TensorRT as one device does
    factory = backend_factory(options, dtype, threads)
    devices = parse_devices(options.devices) if options.devices is not None else None
    if isinstance(factory, TensorRTBackendFactory) and devices is not None and any(d.type != "cuda" for d in devices):
        raise UsageError(
            "--devices: the tensorrt backend runs one engine instance per CUDA device; give CUDA indices such as 0,1"
        )
    several = len(jobs) > 1
    video_jobs = []
    for job in jobs:
        final, stage_paths = output_targets(options.out, job.name, several, _stages_run(options, job))
        video_jobs.append(
            VideoJob(
                job.name,
                job.request,
                final,
                tuple(stage_paths) if options.save_stages else (),
                options.stop_after,
                identity,
            )
        )
    reports = generate_videos(
        video_jobs,
        factory,
        devices=devices,
        timeout=options.timeout,
        sequence_parallel=options.sequence_parallel,
        progress=options.progress,
    )
    report = GenerateReport(lines=[], written=[])
    for r in reports:
        line = r.line()
        if identity is not None:
            line += f"\n  state: {r.paths[-2]} (tm-run refine {r.paths[-2]} runs the remaining stages)"
        echo(line)
        report.lines.append(line)
        report.written += list(r.paths)
    # under torchrun each rank knows only the videos it wrote: the launcher (or rank 0 of a plain run) draws the sheet
    if identity is not None and several and len(reports) == len(jobs):
        by_name = {job.name: job for job in jobs}
        report.written.append(_contact_sheet(options.out, [(by_name[r.name], r.blueprint_tile) for r in reports], echo))
    return report


def plan_request(options: GenerateOptions, devices: int, forward_seconds: float | None = None):
    """`tm-run plan`: the schedule generate would run for the first video on `devices` ranks (no model is loaded)."""
    from .workers import plan_for_request

    defaults, preset, manifest = preset_defaults(options)
    job = build_jobs(options, defaults)[0]
    num_heads = int(manifest.data["models"]["dit"]["num_heads"]) if manifest is not None else preset.dit.num_heads
    # engines run chunk/CFG split only (sequence parallel needs the torch backend): the planner places
    # whole sequences, and the plan shows the idle ranks that leaves
    sequence_parallel = options.sequence_parallel and plan_runs_torch(options, manifest)
    return plan_for_request(
        job.request,
        devices=devices,
        num_heads=num_heads,
        sequence_parallel=sequence_parallel,
        forward_seconds=forward_seconds,
    )


def plan_runs_torch(options: GenerateOptions, manifest) -> bool:
    """Whether generate would run the torch backend, the only one with sequence parallel (Ulysses)."""
    return options.backend == "torch" or (options.backend is None and manifest is None)
