"""A `tm-run generate` request: typed options and the release's config -> checked generation jobs.

Everything that can be wrong with the request is checked here, before a
model is loaded (UsageError: one line naming the flag or key, exit code 2,
nothing computed, nothing written). `tm-run serve` validates through the
same functions.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..reference_images import open_reference_image

if TYPE_CHECKING:  # the pipeline needs torch; importing it here would slow every CLI error
    from .pipeline import GenerationRequest

SEED_MAX = 2**64 - 1
FPS_MAX = 1000.0


@dataclass
class GenerateOptions:
    """What `tm-run generate` was asked; None means "from the config file, else the preset"."""

    prompt: str | None = None
    negative_prompt: str | None = None
    images: Sequence[str] = ()  # "FRAME:PATH", FRAME a stage-0 frame index (negative: from the end)
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    intervals: Sequence[int] | None = None
    steps: Sequence[int] | None = None
    shifts: Sequence[float] | None = None
    guidance: float | None = None
    use_apg: bool | None = None
    save_fps: float | None = None
    seed: int = 0
    dtype: str | None = None  # fp32 | bf16; default bf16 on a GPU, fp32 on the CPU, the build's with engines
    cast_timestep: bool = False
    save_stages: bool = False
    engines: Path | None = None
    preset: str | None = None
    checkpoints: Path | None = None
    config: Path | None = None
    out: Path = Path("out/video.mp4")
    progress: bool = True
    device: str | None = None  # default: cuda when available, else cpu
    threads: int | None = None  # CPU threads for torch and onnxruntime; default: the cores this process may use
    backend: str | None = None  # torch | onnxruntime | tensorrt; default: chosen from --engines and the machine
    cuda_graphs: bool = False  # tensorrt: replay each call shape as a CUDA graph
    weight_streaming_budget: str | None = None  # tensorrt, streaming plans: device bytes for weights ("20GiB")
    tile: bool | None = None  # the release's tiled VAE; None: the config's inference_configs.tile, else off
    prompts: Path | None = None  # a file of prompts, one video each
    devices: str | None = None  # "0,1,2,3" or "cpu:4": one process per device (None: this process, or torchrun's group)
    timeout: float = 600.0  # seconds a rank waits at any exchange before all stop
    sequence_parallel: bool = True  # Ulysses inside a sequence when a step has fewer sequences than ranks
    profile: Path | None = None  # write a Chrome trace, breakdown.json and stages.png per video here
    seeds: Sequence[int] | None = None  # --seeds: one video per prompt and seed (instead of --seed)
    stop_after: int | None = None  # --stop-after K: stop after stage K, write its video and a state to refine
    cache: str | None = None  # step cache: off | safe | fast (None: off, or custom with cache_thresholds)
    cache_thresholds: Sequence[float] | None = None  # one accumulated-error bound per stage, in [0, 1]
    cache_curves: Path | None = None  # calibrated magnitude curves (default: magnitude_curves.json beside the weights)


@dataclass
class Job:
    name: str  # case name, or "video"
    request: GenerationRequest


# ----------------------------------------------------------------------------
# The release's config, read strictly
# ----------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _describe(v) -> str:
    return f"{v!r} (a {type(v).__name__})" if not isinstance(v, str) else f"{v!r} (a string)"


def _check_key(key: str, value, ok: bool, want: str):
    if not ok:
        raise UsageError(f"--config: inference_configs.{key} must be {want}, got {_describe(value)}")
    return value


def release_settings(config: dict) -> dict:
    """GenerationRequest fields from the release's `inference_configs` block; wrong types are refused."""
    if not isinstance(config, dict):
        raise UsageError(f"--config: the file must hold a JSON object, got {type(config).__name__}")
    block = config.get("inference_configs", {})
    if not isinstance(block, dict):
        raise UsageError(f"--config: inference_configs must be an object, got {_describe(block)}")
    parallel = block.get("parallel_configs", {})
    if not isinstance(parallel, dict):
        raise UsageError(f"--config: inference_configs.parallel_configs must be an object, got {_describe(parallel)}")
    checks = {
        # release key: (request field, test, what is accepted)
        "height": ("height", _is_int, "an integer"),
        "width": ("width", _is_int, "an integer"),
        "num_frames": ("num_frames", _is_int, "an integer"),
        "cfg_scale": ("guidance_scale", _is_number, "a finite number"),
        "save_fps": ("save_fps", _is_number, "a finite number"),
        "negative_prompt": ("negative_prompt", lambda v: isinstance(v, str), "a string"),
        "use_apg": ("use_apg", lambda v: isinstance(v, bool), "true or false (a JSON boolean)"),
        "tile": ("tile", lambda v: isinstance(v, bool), "true or false (a JSON boolean)"),
    }
    fields = {}
    for key, (name, test, want) in checks.items():
        if block.get(key) is not None:
            fields[name] = _check_key(key, block[key], test(block[key]), want)
    lists = {
        "frame_intervals": (_is_int, "a list of integers"),
        "steps_per_stage": (_is_int, "a list of integers"),
        "shift_per_stage": (_is_number, "a list of finite numbers"),
    }
    for key, (test, want) in lists.items():
        value = parallel.get(key)
        if value is not None:
            ok = isinstance(value, list) and bool(value) and all(test(v) for v in value)
            _check_key(f"parallel_configs.{key}", value, ok, want)
            fields[key] = tuple(value)
    return fields


def _resolve_asset(path: str, config_path: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (config_path.parent, config_path.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def _release_cases(config: dict, config_path: Path) -> list[tuple[str, str | None, dict[str, Path]]]:
    cases = config.get("inference_cases") or {}
    if not isinstance(cases, dict):
        raise UsageError(f"--config: inference_cases must be an object of named cases, got {_describe(cases)}")
    out = []
    for name, case in cases.items():
        if not isinstance(case, dict):
            raise UsageError(f"--config: inference_cases.{name} must be an object, got {_describe(case)}")
        prompt = case.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(
                f"--config: inference_cases.{name}.prompt must be a non-empty string, got {_describe(prompt)}"
            )
        refs = case.get("ref_images") or {}
        if not isinstance(refs, dict) or not all(isinstance(p, str) for p in refs.values()):
            raise UsageError(f"--config: inference_cases.{name}.ref_images must map frame indices to image paths")
        out.append((name, prompt, {str(k): _resolve_asset(v, config_path) for k, v in refs.items()}))
    return out


# ----------------------------------------------------------------------------
# Building the jobs
# ----------------------------------------------------------------------------

_FRAME_INDEX = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also reads '²' or '٣'


def parse_frame_index(text: str, where: str) -> int:
    if not _FRAME_INDEX.fullmatch(text.strip()):
        raise UsageError(f"{where}: frame index must be an integer such as 0 or -1, got {text!r}")
    return int(text.strip())


def parse_image_flags(values: Sequence[str]) -> dict[str, Path]:
    """--image FRAME:PATH values -> {frame text: path} (frames checked once the clip length is known)."""
    images: dict[str, Path] = {}
    for value in values:
        frame, sep, path = value.partition(":")
        if not sep or not path:
            raise UsageError(
                f"--image: expected FRAME:PATH with an integer stage-0 frame index, e.g. 0:first.png; got {value!r}"
            )
        parse_frame_index(frame, "--image")
        images[frame.strip()] = Path(path)
    return images


def resolve_frame_indices(refs: dict[str, Path], num_frames: int, where: str) -> dict[int, Path]:
    """Frame texts -> indices in [0, num_frames); negative indices count from the end, as Python's do."""
    out: dict[int, Path] = {}
    for text, path in refs.items():
        index = parse_frame_index(text, where)
        resolved = index + num_frames if index < 0 else index
        if not 0 <= resolved < num_frames:
            raise UsageError(
                f"{where}: frame index {index} is outside the stage-0 clip of {num_frames} frames "
                f"(accepted: {-num_frames}..{num_frames - 1})"
            )
        if resolved in out:
            raise UsageError(f"{where}: frame {resolved} is given twice")
        out[resolved] = path
    return out


MAX_SEEDS = 10_000


def parse_seeds(text: str) -> tuple[int, ...]:
    """--seeds A-B (inclusive) or A,B,C -> the seeds, each in torch's range, at most MAX_SEEDS of them."""
    accepted = "a range A-B or a list A,B,C of integers, e.g. 0-7"
    text = text.strip()
    first, dash, last = text.partition("-")
    try:
        bounds = (int(first, 10), int(last, 10)) if dash and "," not in text else None
        listed = None if bounds else tuple(int(v, 10) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--seeds: expected {accepted}; got {text!r}") from None
    if bounds is not None:
        low, high = bounds
        if high < low:
            raise UsageError(f"--seeds {text}: the range ends before it starts")
        if high - low + 1 > MAX_SEEDS:
            raise UsageError(f"--seeds {text}: {high - low + 1} seeds; at most {MAX_SEEDS} are accepted")
        seeds = tuple(range(low, high + 1))
    else:
        seeds = listed
    if len(seeds) > MAX_SEEDS:
        raise UsageError(f"--seeds: {len(seeds)} seeds; at most {MAX_SEEDS} are accepted")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text}: a seed is listed twice")
    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad:
        raise UsageError(f"--seeds: {bad[0]} is outside [0, {SEED_MAX}] (torch's generator seed range)")
    return seeds


def _check_scalars(settings: dict, seed: int) -> None:
    if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed must be an integer in [0, {SEED_MAX}] (torch's generator seed range), got {seed!r}")
    g = settings["guidance_scale"]
    if not _is_number(g) or g <= 0:
        raise UsageError(f"--guidance must be a finite number > 0 (1 = no guidance), got {g!r}")
    fps = settings["save_fps"]
    if not _is_number(fps) or not 0 < fps <= FPS_MAX:
        raise UsageError(f"--save-fps must be a finite number in (0, {FPS_MAX:g}], got {fps!r}")
    if not isinstance(settings["use_apg"], bool):
        raise UsageError(f"use_apg must be true or false, got {_describe(settings['use_apg'])}")


def build_jobs(options: GenerateOptions, defaults) -> list[Job]:
    """Flags override the config file, which overrides the preset's defaults."""
    from ..models.checkpoints import CheckpointError, read_json
    from ..planner import round_num_frames, validate_run_config
    from .pipeline import DEFAULT_NEGATIVE_PROMPT, GenerationRequest

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
    cases: list[tuple[str, str | None, dict[str, Path]]] = []
    if options.config is not None:
        try:
            config = read_json(options.config)
        except CheckpointError as err:
            raise UsageError(f"--config: {err}") from None
        release = release_settings(config)
        config_tile = release.pop("tile", None)  # a backend option, not part of a request
        if options.tile is None and config_tile is not None:
            options.tile = config_tile
        settings.update(release)
        cases = _release_cases(config, options.config)
    flag_images = parse_image_flags(options.images)
    if options.prompts is not None:
        if options.prompt is not None:
            raise UsageError("--prompts: give either --prompt or --prompts FILE, not both")
        prompts = read_prompts(options.prompts)
        width = len(str(len(prompts) - 1))
        cases = [(f"prompt{i:0{width}d}", text, flag_images) for i, text in enumerate(prompts)]
    elif options.prompt is not None or not cases:
        if options.prompt is None:
            raise UsageError("--prompt: required (or give --config with inference_cases)")
        if not options.prompt.strip():
            raise UsageError("--prompt: empty; give the text to generate from")
        cases = [("video", options.prompt, flag_images)]
    elif flag_images:
        cases = [(n, p, flag_images) for n, p, _ in cases]

    overrides = {
        "height": options.height,
        "width": options.width,
        "num_frames": options.num_frames,
        "frame_intervals": options.intervals,
        "steps_per_stage": options.steps,
        "shift_per_stage": options.shifts,
        "guidance_scale": options.guidance,
        "save_fps": options.save_fps,
        "negative_prompt": options.negative_prompt,
        "use_apg": options.use_apg,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("frame_intervals", "steps_per_stage", "shift_per_stage"):
        settings[key] = tuple(settings[key])
    _check_scalars(settings, options.seed)
    try:
        validate_run_config(
            settings["num_frames"],
            settings["height"],
            settings["width"],
            settings["frame_intervals"],
            settings["steps_per_stage"],
            settings["shift_per_stage"],
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    clip_frames = round_num_frames(settings["num_frames"])
    step_cache = step_cache_policy(options, len(settings["frame_intervals"]))

    seeds = (options.seed,) if options.seeds is None else tuple(options.seeds)
    if options.seeds is not None and options.seed != 0:
        raise UsageError("--seeds: give either --seed N or --seeds A-B / A,B,C, not both")
    if len(cases) * len(seeds) > MAX_SEEDS:
        raise UsageError(
            f"--seeds: {len(cases)} prompt(s) x {len(seeds)} seed(s) is {len(cases) * len(seeds)} videos; "
            f"at most {MAX_SEEDS} are accepted"
        )
    for seed in seeds:
        _check_scalars(settings, seed)

    jobs = []
    opened: dict[Path, object] = {}  # one decoded copy of a file, however many videos use it (--prompts with --image)
    for name, prompt, refs in cases:
        where = "--image" if refs is flag_images else f"--config: inference_cases.{name}.ref_images"
        frames = resolve_frame_indices(refs, clip_frames, where)
        for path in frames.values():
            if path not in opened:
                opened[path] = open_reference_image(path, where)
        images = {frame: opened[path] for frame, path in frames.items()}
        for seed in seeds:
            request = GenerationRequest(
                prompt=prompt,
                ref_images=images,
                seed=seed,
                cast_timestep=options.cast_timestep,
                step_cache=step_cache,
                **settings,
            )
            try:
                request.validate()
            except ValueError as err:
                raise UsageError(str(err)) from None
            # --seeds: one video per prompt and seed, named by both (video -> seed3, prompt0 -> prompt0_seed3)
            label = name if options.seeds is None else (f"seed{seed}" if name == "video" else f"{name}_seed{seed}")
            jobs.append(Job(name=label, request=request))
    return jobs


# ----------------------------------------------------------------------------
# The step cache
# ----------------------------------------------------------------------------


def cache_curves_path(options: GenerateOptions) -> Path | None:
    """Where the model source's calibrated magnitude curves are: --cache-curves, else beside its weights."""
    from ..errors import CheckpointError
    from ..models.presets import DEFAULT_PRESET, get_preset, packaged_weights_dir
    from .step_cache import CURVES_FILE

    if options.cache_curves is not None:
        return options.cache_curves
    if options.engines is not None:
        return options.engines / CURVES_FILE
    if options.checkpoints is not None:
        return options.checkpoints / CURVES_FILE
    if options.config is not None:
        from ..models.checkpoints import CheckpointPaths
        from ..models.sources import release_config_has_models

        try:
            if release_config_has_models(options.config):
                return CheckpointPaths.from_release_config(options.config).dit.parent / CURVES_FILE
        except CheckpointError as err:
            raise UsageError(f"--config: {err}") from None
    try:
        preset = get_preset(options.preset or DEFAULT_PRESET)
    except ValueError as err:
        raise UsageError(f"--preset: {err}") from None
    return packaged_weights_dir(preset) / CURVES_FILE if preset.packaged_weights else None


def step_cache_policy(options: GenerateOptions, num_stages: int):
    """The request's `StepCachePolicy` (None: every step calls the DiT), checked before any model loads."""
    from .step_cache import (
        CACHE_MODES,
        POLICY_MAX_SKIPS,
        StepCachePolicy,
        check_thresholds,
        load_curves,
        stage_thresholds,
    )

    mode = options.cache
    if mode is not None and mode not in CACHE_MODES:
        raise UsageError(f"--cache: {mode!r} is not a step-cache policy (accepted: {', '.join(CACHE_MODES)})")
    if options.cache_thresholds is not None:
        if mode == "off":
            raise UsageError(
                "--cache-threshold: the step cache is off (--cache off); give --cache safe or fast, or leave --cache out"
            )
        try:
            thresholds = check_thresholds(options.cache_thresholds, num_stages)
        except ValueError as err:
            raise UsageError(str(err)) from None
    elif mode in (None, "off"):
        return None
    else:
        thresholds = stage_thresholds(mode, num_stages)
    path = cache_curves_path(options)
    flag = f"--cache {mode}" if mode else "--cache-threshold"
    if options.cache_curves is not None and not path.is_file():
        raise UsageError(f"--cache-curves: {path}: no such file")
    if path is None or not path.is_file():
        where = f"no {path}" if path is not None else f"preset {options.preset!r} ships none"
        raise UsageError(
            f"{flag}: the step cache needs the model's calibrated magnitude curves ({where}); "
            f"give --cache-curves FILE (benchmarks/bench_step_cache.py --calibrate writes one)"
        )
    try:
        curves = load_curves(path)
    except ValueError as err:
        raise UsageError(f"--cache-curves: {err}") from None
    if len(curves) < num_stages:
        raise UsageError(
            f"--cache-curves: {path} holds curves for {len(curves)} stage(s); the request has {num_stages}"
        )
    return StepCachePolicy(
        thresholds=thresholds,
        curves=curves[:num_stages],
        name=mode or "custom",
        max_skips=POLICY_MAX_SKIPS.get(mode, POLICY_MAX_SKIPS["safe"]),
    )


# ----------------------------------------------------------------------------
# The model source's defaults, the device and the dtype
# ----------------------------------------------------------------------------


def preset_defaults(options: GenerateOptions):
    """(generation defaults, preset, build manifest or None) for the request's model source."""
    from dataclasses import replace

    from ..errors import CheckpointError, ManifestError
    from ..models.presets import DEFAULT_PRESET, get_preset

    if options.engines is not None:
        # The build's own shape is the default: it is the one its graphs take.
        from ..engines.manifest import load_manifest

        try:
            manifest = load_manifest(options.engines)
        except ManifestError as err:
            raise UsageError(f"--engines: {err}") from None
        shape = manifest.shape
        try:
            preset = get_preset(manifest.preset)
        except ValueError as err:
            raise UsageError(f"--engines: {manifest.root / 'manifest.json'}: {err}") from None
        defaults = replace(
            preset.defaults,
            height=shape["height"],
            width=shape["width"],
            num_frames=shape["num_frames"],
            frame_intervals=tuple(shape["intervals"]),
        )
        return defaults, models_of_build(manifest, preset), manifest
    from ..models.checkpoints import CheckpointPaths, checkpoint_preset
    from ..models.sources import release_config_has_models

    try:
        config_has_models = release_config_has_models(options.config)
    except CheckpointError as err:
        raise UsageError(f"--config: {err}") from None
    typed = get_preset(options.preset) if options.preset else None
    if options.checkpoints is not None or config_has_models:
        # Every dimension from the files (memory-mapped: only the headers are read); a typed
        # --preset is checked against them, a guessed one lends its defaults only.
        flag = "--checkpoints" if options.checkpoints is not None else "--config"
        try:
            paths = (
                CheckpointPaths.from_dir(options.checkpoints)
                if options.checkpoints is not None
                else CheckpointPaths.from_release_config(options.config)
            )
            preset = checkpoint_preset(paths, typed)
        except CheckpointError as err:
            raise UsageError(f"{flag}: {err}") from None
    elif typed is not None:
        preset = typed
    elif options.config is None:
        preset = get_preset(DEFAULT_PRESET)
    else:
        preset = get_preset("tempomaster-14b")
    return preset.defaults, preset, None


def models_of_build(manifest, preset):
    """`preset` with the model dimensions the build recorded: its name lent the defaults, its files their sizes."""
    from dataclasses import fields, replace

    recorded = manifest.data.get("models") or {}
    parts = {}
    for name in ("dit", "vae", "t5"):
        cfg, found = getattr(preset, name), recorded.get(name)
        if isinstance(found, dict):
            known = {f.name for f in fields(cfg)}
            parts[name] = replace(
                cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in found.items() if k in known}
            )
    return replace(preset, **parts)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {device!r} is not a device (accepted: cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: {device!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no CUDA device on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def resolve_dtype(options: GenerateOptions, device: str, build_precision: str | None) -> str:
    """The model dtype: the build's with --engines (a disagreeing --dtype is refused), else bf16 on GPUs."""
    if build_precision is not None:
        if options.dtype is not None and options.dtype != build_precision:
            raise UsageError(
                f"--dtype {options.dtype}: the build {options.engines} is {build_precision}; its precision decides "
                f"(drop --dtype, or export a {options.dtype} build)"
            )
        return build_precision
    if options.dtype is not None:
        return options.dtype
    return "bf16" if device.startswith("cuda") else "fp32"


def read_prompts(path: Path) -> list[str]:
    """``--prompts FILE``: one prompt per line; blank lines and lines starting with # are skipped.

    The file is bounded (``MAX_PROMPTS_FILE_BYTES``, ``MAX_PROMPTS``): a device
    such as /dev/zero is refused after that many bytes, not read forever.
    """
    from ..limits import MAX_PROMPTS, read_prompt_lines

    lines = read_prompt_lines(path, "--prompts")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts: {path} holds no prompt (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(
            f"--prompts: {path} holds {len(prompts)} prompts; at most {MAX_PROMPTS} are accepted (one video each)"
        )
    return prompts
