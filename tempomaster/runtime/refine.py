"""Blueprint, then refine: `tm-run generate --stop-after K` writes stage K's video and its state;
`tm-run refine STATE` runs the remaining stages and gives the video one uninterrupted generate gives.

Every check happens before a model loads: the state's own (format, version,
request hash, tensor hash and shape: stage_state.read_state), then the
models of this run against the state's (source, preset, backend, dtype,
tiling, the build's or the weights' hash), each refusal one line naming the
difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .outputs import GenerateReport, check_writable, output_targets, summarise
from .request import GenerateOptions, Job, available_cores, preset_defaults, resolve_device, resolve_dtype
from .stage_state import foreign_state, identity_difference, model_identity, read_state, state_paths, write_state

FLAG_STOP_AFTER = "--stop-after"
CONTACT_SHEET_SUFFIX = "_contact.png"


# ----------------------------------------------------------------------------
# generate --stop-after K
# ----------------------------------------------------------------------------


def run_identity(options: GenerateOptions, preset, manifest, dtype: str) -> dict:
    """The models `run_generate` (or `run_refine`) runs, as a state records them."""
    from .backends.factory import choose_backend

    backend = choose_backend(options.engines, options.backend, options.cuda_graphs)
    return model_identity(
        preset,
        manifest if backend != "torch" else None,
        backend=backend,
        dtype=dtype,
        tile=bool(options.tile),
        checkpoints=options.checkpoints,
        config=options.config,
    )


def check_stop_after(stop_after: int, jobs: list[Job]) -> None:
    for job in jobs:
        last = len(job.request.frame_intervals) - 1
        if not 0 <= stop_after < last:
            raise UsageError(
                f"{FLAG_STOP_AFTER} {stop_after}: the request's stages are 0..{last} ({FLAG_STOP_AFTER} takes 0..{last - 1}; "
                f"stage {last} is the finished video: leave {FLAG_STOP_AFTER} out)"
            )


def blueprint_targets(out: Path, finals: list[Path], several: bool) -> list[Path]:
    """The state files and, for several videos, the contact sheet; refused now if one is not tm-run's."""
    targets = []
    for final in finals:
        json_path, tensor_path = state_paths(final)
        problem = foreign_state(json_path, tensor_path)
        if problem is not None:
            raise UsageError(
                f"--out: {json_path} {problem}: refusing to replace it; move it away or choose another --out"
            )
        targets += [json_path, tensor_path]
    if several:
        sheet = contact_sheet_path(out)
        from .contact_sheet import foreign_sheet

        problem = foreign_sheet(sheet)
        if problem is not None:
            raise UsageError(f"--out: {sheet} {problem}: refusing to replace it; move it away or choose another --out")
        targets.append(sheet)
    return targets


def contact_sheet_path(out: Path) -> Path:
    from .video import is_video_file

    return (
        out.with_name(out.stem + CONTACT_SHEET_SUFFIX)
        if is_video_file(out)
        else out / ("blueprints" + CONTACT_SHEET_SUFFIX)
    )


# ----------------------------------------------------------------------------
# refine STATE
# ----------------------------------------------------------------------------


@dataclass
class RefineOptions:
    """`tm-run refine`: the state, where to write, and (optional) this run's models, checked against the state's."""

    state: Path
    out: Path | None = None  # default: beside the state, NAME_refined.mp4
    save_stages: bool = False
    device: str | None = None
    threads: int | None = None
    progress: bool = True
    # None: the models the state records; given: compared with them (a difference is refused)
    preset: str | None = None
    checkpoints: Path | None = None
    config: Path | None = None
    engines: Path | None = None
    backend: str | None = None
    dtype: str | None = None
    tile: bool | None = None


def default_refine_out(json_path: Path) -> Path:
    base = json_path.name[: -len(".state.json")] if json_path.name.endswith(".state.json") else json_path.stem
    return json_path.with_name(base + "_refined.mp4")


def generate_options_for(options: RefineOptions, model: dict, out: Path) -> GenerateOptions:
    """The models the state names, unless this run names others (then they are compared, not trusted)."""

    def recorded_path(key):
        value = model.get(key)
        return Path(value) if isinstance(value, str) else None

    model_flags = ("preset", "checkpoints", "config", "engines")
    model_source = {k: getattr(options, k) for k in model_flags}
    if all(v is None for v in model_source.values()):
        from_preset = model.get("source") == "preset"
        model_source = {k: recorded_path(k) for k in model_flags[1:]}
        model_source["preset"] = model.get("preset") if from_preset else None
    return GenerateOptions(
        prompt="(refine)",
        out=out,
        save_stages=options.save_stages,
        device=options.device,
        threads=options.threads,
        progress=options.progress,
        **model_source,
        backend=options.backend or model.get("backend"),
        dtype=options.dtype or model.get("dtype"),
        tile=options.tile if options.tile is not None else bool(model.get("tile")),
    )


def run_refine(options: RefineOptions, echo=print) -> GenerateReport:
    """Check the state and this run's models, then run the stages after the state's."""
    state = read_state(options.state)
    out = options.out or default_refine_out(state.json_path)
    gen = generate_options_for(options, state.model, out)
    _defaults, preset, manifest = preset_defaults(gen)
    device = resolve_device(gen.device)
    from .backends.factory import choose_backend

    runs_graphs = manifest is not None and choose_backend(gen.engines, gen.backend) != "torch"
    dtype = resolve_dtype(gen, device, manifest.precision if runs_graphs else None)
    difference = identity_difference(state.model, run_identity(gen, preset, manifest, dtype))
    if difference is not None:
        raise UsageError(f"{state.json_path}: made by other models than this run's: {difference}")

    request = state.request
    job = Job(name="video", request=request)
    final, stage_paths = output_targets(out, job.name, False, state.num_stages)
    later = [stage_paths[s] for s in range(state.stage + 1, state.num_stages - 1)]
    check_writable(out, [final, *(later if options.save_stages else [])])
    from .memory import check_fits, check_video_fits, estimate_peak_memory

    check_video_fits(request)
    check_fits(estimate_peak_memory(preset, request, dtype=dtype, device=device, manifest=manifest))

    import torch

    threads = gen.threads or available_cores()
    torch.set_num_threads(threads)
    from .backends.factory import backend_factory
    from .pipeline import StageResume, generate
    from .video import write_result

    backend, tokenizer = backend_factory(gen, dtype, threads)(torch.device(device))
    if hasattr(backend, "check_request"):
        backend.check_request(request.height, request.width, request.num_frames, request.frame_intervals)
    result = generate(
        backend,
        tokenizer,
        request,
        progress=gen.progress,
        keep_stages=options.save_stages,
        resume=StageResume(state.stage, state.frames),
    )
    start = time.perf_counter()
    written = write_result(result, final, later, options.save_stages)
    text = summarise(job, result, written, backend.name, time.perf_counter() - start)
    text += f"\n  refined from {state.json_path} (stage {state.stage} of {state.num_stages - 1})"
    echo(text)
    return GenerateReport(lines=[text], written=written)


def save_blueprint(final: Path, request, result, identity: dict) -> list[Path]:
    """The state beside a video that stopped after a stage (the result's last stage)."""
    stage = result.video
    return list(write_state(final, request, stage.index, stage.frames, identity))
