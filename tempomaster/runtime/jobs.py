"""`tm-run generate`: turn flags and the release's config into generation jobs and run them.

Everything that can be wrong with the request is checked before a model is
loaded: one-line errors naming the flag, exit code 2, nothing computed.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from .pipeline import DEFAULT_NEGATIVE_PROMPT, GenerationRequest, GenerationResult, generate


class JobError(ValueError):
    """A request that cannot run; the message names the flag or file."""


@dataclass
class Job:
    name: str  # case name, or "video"
    request: GenerationRequest


# ----------------------------------------------------------------------------
# Building the jobs
# ----------------------------------------------------------------------------

def _open_image(path: Path, flag: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise JobError(f"{flag}: cannot read image {path} ({err.__class__.__name__}: {err})") from None


def parse_image_flags(values: list[str]) -> dict[int, Path]:
    images: dict[int, Path] = {}
    for value in values:
        frame, sep, path = value.partition(":")
        if not sep or not frame.strip().lstrip("-").isdigit() or not path:
            raise JobError(f"--image: expected FRAME:PATH with an integer stage-0 frame index, e.g. 0:first.png; got {value!r}")
        images[int(frame)] = Path(path)
    return images


def _release_settings(config: dict) -> dict:
    """GenerationRequest fields from the release's `inference_configs` block."""
    block = config.get("inference_configs", {})
    parallel = block.get("parallel_configs", {})
    fields = {
        "height": block.get("height"),
        "width": block.get("width"),
        "num_frames": block.get("num_frames"),
        "guidance_scale": block.get("cfg_scale"),
        "save_fps": block.get("save_fps"),
        "negative_prompt": block.get("negative_prompt"),
        "use_apg": block.get("use_apg"),
        "frame_intervals": parallel.get("frame_intervals"),
        "steps_per_stage": parallel.get("steps_per_stage"),
        "shift_per_stage": parallel.get("shift_per_stage"),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _resolve_asset(path: str, config_path: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (config_path.parent, config_path.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def build_jobs(args, defaults) -> list[Job]:
    """Flags override the config file, which overrides the preset's defaults."""
    settings = {
        "height": defaults.height,
        "width": defaults.width,
        "num_frames": defaults.num_frames,
        "frame_intervals": defaults.frame_intervals,
        "steps_per_stage": defaults.steps_per_stage,
        "shift_per_stage": defaults.shift_per_stage,
        "guidance_scale": defaults.guidance_scale,
        "use_apg": defaults.use_apg,
        "save_fps": defaults.save_fps,
        "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
    }
    cases: list[tuple[str, str | None, dict[int, Path]]] = []
    if args.config is not None:
        from ..models.checkpoints import CheckpointError, read_json

        try:
            config = read_json(args.config)
        except CheckpointError as err:
            raise JobError(f"--config: {err}") from None
        settings.update(_release_settings(config))
        for name, case in (config.get("inference_cases") or {}).items():
            refs = {}
            for frame, path in (case.get("ref_images") or {}).items():
                if not str(frame).lstrip("-").isdigit():
                    raise JobError(f"--config: case {name!r} has a non-integer ref_images frame {frame!r}")
                refs[int(frame)] = _resolve_asset(path, args.config)
            cases.append((name, case.get("prompt"), refs))
    flag_images = parse_image_flags(args.image)
    if args.prompt is not None or not cases:
        if args.prompt is None:
            raise JobError("--prompt: required (or give --config with inference_cases)")
        cases = [("video", args.prompt, flag_images)]
    elif flag_images:
        cases = [(n, p, flag_images) for n, p, _ in cases]

    overrides = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "frame_intervals": args.intervals,
        "steps_per_stage": args.steps,
        "shift_per_stage": args.shifts,
        "guidance_scale": args.guidance,
        "save_fps": args.save_fps,
        "negative_prompt": args.negative_prompt,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if args.no_apg:
        settings["use_apg"] = False
    for key in ("frame_intervals", "steps_per_stage", "shift_per_stage"):
        settings[key] = tuple(settings[key])

    jobs = []
    for name, prompt, refs in cases:
        if not prompt:
            raise JobError(f"--config: case {name!r} has no prompt")
        images = {frame: _open_image(path, "--image") for frame, path in refs.items()}
        request = GenerationRequest(
            prompt=prompt, ref_images=images, seed=args.seed, cast_timestep=args.cast_timestep, **settings
        )
        try:
            request.validate()
        except ValueError as err:
            raise JobError(str(err)) from None
        jobs.append(Job(name=name, request=request))
    return jobs


# ----------------------------------------------------------------------------
# Where the videos go
# ----------------------------------------------------------------------------

def output_targets(out: Path, job_name: str, several: bool, num_stages: int) -> tuple[Path, list[Path]]:
    """(final video path, one path per stage) for `--out` as an .mp4 file or a directory."""
    if out.suffix.lower() == ".mp4":
        stem = f"{out.stem}_{job_name}" if several else out.stem
        final = out.with_name(stem + ".mp4")
        return final, [out.with_name(f"{stem}_stage{s}.mp4") for s in range(num_stages)]
    final = out / job_name
    return final, [out / f"{job_name}_stage{s}" for s in range(num_stages)]


def check_writable(out: Path) -> None:
    folder = out.parent if out.suffix.lower() == ".mp4" else out
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise JobError(f"--out: cannot write under {probe} (accepted: a writable .mp4 path or directory)")
    if out.suffix.lower() != ".mp4" and out.exists() and not out.is_dir():
        raise JobError(f"--out: {out} exists and is not a directory (accepted: an .mp4 path or a directory)")


def write_result(result: GenerationResult, final: Path, stage_paths: list[Path], save_stages: bool) -> list[Path]:
    from .video import to_uint8_frames, write_mp4, write_png_frames

    def write(frames, path: Path, fps: float) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = to_uint8_frames(frames)
        return write_mp4(data, path, fps) if path.suffix.lower() == ".mp4" else write_png_frames(data, path)

    written = [write(result.video.frames, final, result.video.fps)]
    if save_stages:
        for stage, path in zip(result.stages, stage_paths):
            written.append(write(stage.frames, path, stage.fps))
    return written


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------

def make_backend(args, dtype):
    """The torch backend over the named models, or onnxruntime over a build's graphs."""
    from ..models.sources import load_model_set

    if args.engines is not None:
        from .backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend.from_build(args.engines)
        return backend, backend.tokenizer(args.checkpoints, args.config)
    from .backends.torch import TorchBackend

    models = load_model_set(args.preset, args.checkpoints, args.config, dtype)
    return TorchBackend(models, dtype), models.tokenizer


def _preset_defaults(args):
    from dataclasses import replace as _replace

    from ..models.presets import get_preset

    if args.engines is not None:
        # The build's own shape is the default: it is the one its graphs take.
        from ..engines.manifest import ManifestError, load_manifest

        try:
            manifest = load_manifest(args.engines)
        except ManifestError as err:
            raise JobError(f"--engines: {err}") from None
        shape = manifest.shape
        return _replace(
            get_preset(manifest.preset).defaults,
            height=shape["height"], width=shape["width"], num_frames=shape["num_frames"],
            frame_intervals=tuple(shape["intervals"]),
        )
    if args.preset:
        return get_preset(args.preset).defaults
    if args.checkpoints is not None:
        # The preset whose DiT width the checkpoint has (memory-mapped: nothing is read but the header).
        from ..models.checkpoints import CheckpointError, CheckpointPaths, preset_for_dit_file

        try:
            return preset_for_dit_file(CheckpointPaths.from_dir(args.checkpoints).dit).defaults
        except CheckpointError as err:
            raise JobError(f"--checkpoints: {err}") from None
    if args.config is None:
        return get_preset("tiny").defaults
    return get_preset("tempomaster-14b").defaults


def run_generate(args) -> int:
    import torch

    from ..models.checkpoints import CheckpointError

    try:
        jobs = build_jobs(args, _preset_defaults(args))
        check_writable(args.out)
    except JobError as err:
        print(f"tm-run generate: error: {err}", file=sys.stderr)
        return 2

    from ..engines.manifest import ManifestError

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        backend, tokenizer = make_backend(args, dtype)
        if hasattr(backend, "check_request"):
            for job in jobs:
                h, w = job.request.output_size()
                backend.check_request(h, w, job.request.num_frames, job.request.frame_intervals)
    except (CheckpointError, ManifestError, ValueError, OSError, ImportError) as err:
        print(f"tm-run generate: error: {err}", file=sys.stderr)
        return 2

    several = len(jobs) > 1
    for job in jobs:
        result = generate(backend, tokenizer, job.request, progress=not args.no_progress, keep_stages=args.save_stages)
        final, stage_paths = output_targets(args.out, job.name, several, len(result.stages))
        start = time.perf_counter()
        written = write_result(result, final, stage_paths, args.save_stages)
        write_seconds = time.perf_counter() - start
        print(summarise(job, result, written, backend.name, write_seconds))
    return 0


def summarise(job: Job, result: GenerationResult, written: list[Path], backend_name: str, write_seconds: float) -> str:
    video = result.video
    lines = [
        f"[{job.name}] {video.num_frames} frames {result.width}x{result.height} at {video.fps:g} fps "
        f"-> {written[0]}",
    ]
    for stage, path in zip(result.stages, written[1:] or [None] * len(result.stages)):
        where = f" -> {path}" if path is not None else ""
        lines.append(
            f"  stage {stage.index}: interval {stage.interval}, {stage.num_frames} frames at {stage.fps:g} fps, "
            f"{stage.seconds:.2f} s, {stage.dit_calls} DiT calls{where}"
        )
    overhead = result.seconds - result.backend_seconds
    lines.append(
        f"  backend {backend_name}: {result.seconds:.2f} s total, {result.backend_seconds:.2f} s in backend calls, "
        f"{overhead:.2f} s runtime overhead ({100 * overhead / max(result.seconds, 1e-9):.1f}%), "
        f"writing {write_seconds:.2f} s"
    )
    lines.append(f"  DiT calls: {result.dit_calls} (the reference makes {result.reference_dit_calls} for these settings)")
    return "\n".join(lines)
