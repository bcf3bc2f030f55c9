"""A generation stopped after a stage, on disk: NAME.state.json beside NAME.state.safetensors.

The JSON says what the state is (format name and version), the request, the
stage it stopped after, the models that made it (source, preset, backend,
dtype and a hash of their files) and the sha256 of the tensor file; the
safetensors file holds the stage's decoded frames, float32 ``[3, T, H, W]``,
which is all the next stage needs (each stage's noise comes from the seed
alone). Nothing is unpickled: JSON and safetensors only, each file checked
against its hash before it is trusted. Both are written atomically, and an
existing pair is replaced only when its JSON is one of ours.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..atomic_write import write_bytes, write_text
from ..errors import UsageError
from .video import is_video_file

STATE_FORMAT = "tempomaster-stage-state"
STATE_VERSION = 1
JSON_SUFFIX = ".state.json"
TENSOR_SUFFIX = ".state.safetensors"
TENSOR_NAME = "frames"
MAX_STATE_JSON_BYTES = 1 << 20  # a request and a few hashes: a few KB
# Weight files up to this size are hashed whole; larger ones (the 14B's tens of GB) by their size and
# their first and last MiB, so a refine starts in seconds; a retrained or swapped file still differs.
FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 1 << 20


def state_paths(final: Path) -> tuple[Path, Path]:
    """(JSON, tensors) beside the video `final` (out/video.mp4 -> out/video.state.json) or PNG folder."""
    base = final.stem if is_video_file(final) else final.name
    return final.with_name(base + JSON_SUFFIX), final.with_name(base + TENSOR_SUFFIX)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ----------------------------------------------------------------------------
# Which models made it
# ----------------------------------------------------------------------------


def file_fingerprint(path: Path) -> str:
    """sha256 of a weight file: whole up to FULL_HASH_BYTES, else of its size and first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            digest.update(fh.read(EDGE_BYTES))
            fh.seek(size - EDGE_BYTES)
            digest.update(fh.read(EDGE_BYTES))
    return digest.hexdigest()


def _files_hash(files: list[Path], root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        name = str(path.relative_to(root)) if root is not None else path.name
        digest.update(f"{name}\0{file_fingerprint(path)}\n".encode())
    return digest.hexdigest()


def model_identity(
    preset, manifest, *, backend: str, dtype: str, tile: bool, checkpoints: Path | None, config: Path | None
) -> dict:
    """What a state records of its models, and what `refine` compares: source, preset, backend, dtype, tile and
    the sha256 of the build's manifest (which lists every graph's sha256) or of the weight files."""
    from ..models.checkpoints import CheckpointPaths
    from ..models.presets import packaged_weights_dir

    if manifest is not None:
        source, root = "engines", Path(manifest.root)
        weights = sha256_bytes((root / "manifest.json").read_bytes())
        paths = {"engines": str(root.resolve())}
    elif checkpoints is not None or (config is not None and _config_has_models(config)):
        source = "checkpoints"
        found = (
            CheckpointPaths.from_dir(checkpoints)
            if checkpoints is not None
            else CheckpointPaths.from_release_config(config)
        )
        files = [found.dit, found.t5, found.vae] + sorted(p for p in Path(found.tokenizer).rglob("*") if p.is_file())
        weights = _files_hash([Path(f) for f in files])
        paths = (
            {"checkpoints": str(Path(checkpoints).resolve())}
            if checkpoints is not None
            else {"config": str(Path(config).resolve())}
        )
    elif preset.packaged_weights is not None:
        source, root = "preset", packaged_weights_dir(preset)
        weights = _files_hash([p for p in root.rglob("*") if p.is_file()], root)
        paths = {}
    else:  # built from a seed in code: the preset's dimensions name them
        source, weights, paths = "preset", sha256_bytes(repr(preset).encode()), {}
    return {
        "source": source,
        "preset": preset.name,
        "backend": backend,
        "dtype": dtype,
        "tile": bool(tile),
        "weights_sha256": weights,
        **paths,
    }


def _config_has_models(config: Path) -> bool:
    from ..models.sources import release_config_has_models

    return release_config_has_models(config)


# What a difference in each field is called in a refusal.
IDENTITY_FIELDS = {
    "source": "model source",
    "preset": "preset",
    "backend": "backend",
    "dtype": "dtype",
    "tile": "VAE tiling",
    "weights_sha256": "build/weights hash",
}


def identity_difference(recorded: dict, live: dict) -> str | None:
    """The first field where the state's models and this run's differ, worded; None when they agree."""
    for key, words in IDENTITY_FIELDS.items():
        if recorded.get(key) != live.get(key):
            return f"{words}: the state was made with {recorded.get(key)!r}, this run has {live.get(key)!r}"
    return None


# ----------------------------------------------------------------------------
# The request
# ----------------------------------------------------------------------------


def request_to_json(request) -> dict:
    """Everything of a GenerationRequest the later stages use; reference images by their size and pixel hash
    (stage 0 alone reads them; the output size they decided is recorded)."""
    height, width = request.output_size()
    refs = [
        {
            "frame": int(k),
            "width": img.width,
            "height": img.height,
            "rgb_sha256": sha256_bytes(img.convert("RGB").tobytes()),
        }
        for k, img in sorted(request.ref_images.items())
    ]
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "height": height,
        "width": width,
        "requested_size": [request.height, request.width],
        "num_frames": request.num_frames,
        "frame_intervals": list(request.frame_intervals),
        "steps_per_stage": list(request.steps_per_stage),
        "shift_per_stage": [float(s) for s in request.shift_per_stage],
        "guidance_scale": float(request.guidance_scale),
        "use_apg": bool(request.use_apg),
        "seed": int(request.seed),
        "save_fps": float(request.save_fps),
        "cast_timestep": bool(request.cast_timestep),
        "reference_images": refs,
    }


_REQUEST_TYPES = {
    "prompt": str,
    "negative_prompt": str,
    "height": int,
    "width": int,
    "num_frames": int,
    "guidance_scale": float,
    "use_apg": bool,
    "seed": int,
    "save_fps": float,
    "cast_timestep": bool,
}


def request_from_json(data: dict, where: str):
    """The GenerationRequest the later stages need (no reference images: the output size stands for them)."""
    from .pipeline import GenerationRequest

    if not isinstance(data, dict):
        raise UsageError(f"{where}: 'request' must be an object")
    fields = {}
    for key, kind in _REQUEST_TYPES.items():
        value = data.get(key)
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if kind is float
            else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        )
        if not ok:
            raise UsageError(f"{where}: request.{key} must be a {kind.__name__}, got {value!r}")
        fields[key] = value
    for key, kind in (("frame_intervals", int), ("steps_per_stage", int), ("shift_per_stage", float)):
        value = data.get(key)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool) for v in value)
        ):
            raise UsageError(f"{where}: request.{key} must be a list of numbers, got {value!r}")
        fields[key] = tuple(value)
    request = GenerationRequest(**fields)
    try:
        request.validate()
    except ValueError as err:
        raise UsageError(f"{where}: request: {err}") from None
    return request


# ----------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------


def foreign_state(json_path: Path, tensor_path: Path) -> str | None:
    """Why an existing state pair may not be replaced (tm-run did not write it), or None."""
    if json_path.is_symlink() or tensor_path.is_symlink():
        return "is a symbolic link"
    if tensor_path.exists() and not json_path.exists():
        return f"{tensor_path.name} exists without its {json_path.name}, so tm-run did not write it"
    if not json_path.exists():
        return None
    try:
        ours = json.loads(json_path.read_bytes()[:MAX_STATE_JSON_BYTES]).get("format") == STATE_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    return None if ours else "exists and is not a state tm-run wrote"


@dataclass
class StageState:
    json_path: Path
    stage: int
    num_stages: int
    request: object  # GenerationRequest
    model: dict
    frames: object  # torch.Tensor [3, T, H, W] float32


def write_state(final: Path, request, stage: int, frames, model: dict) -> tuple[Path, Path]:
    """The state of a generation stopped after `stage` (its frames [3, T, H, W]) beside the video `final`."""
    import torch
    from safetensors.torch import save

    json_path, tensor_path = state_paths(final)
    problem = foreign_state(json_path, tensor_path)
    if problem is not None:
        raise UsageError(f"--out: {json_path} {problem}: refusing to replace it")
    frames = frames.detach().to(torch.float32).cpu().contiguous()
    blob = save({TENSOR_NAME: frames}, metadata={"format": STATE_FORMAT, "stage": str(stage)})
    request_json = request_to_json(request)
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "stage": stage,
        "num_stages": len(request.frame_intervals),
        "fps": request.save_fps / request.frame_intervals[stage],
        "request": request_json,
        "request_sha256": sha256_bytes(_canonical(request_json)),
        "model": model,
        "tensors": {
            "file": tensor_path.name,
            "name": TENSOR_NAME,
            "dtype": "float32",
            "shape": list(frames.shape),
            "sha256": sha256_bytes(blob),
            "bytes": len(blob),
        },
    }
    write_bytes(tensor_path, blob)  # first: a JSON is never left naming a missing tensor file
    write_text(json_path, json.dumps(state, indent=2) + "\n")
    return json_path, tensor_path


def _refuse(path: Path, why: str) -> UsageError:
    return UsageError(f"{path}: {why}")


def read_state(json_path: Path) -> StageState:
    """Read and check a state: format and version, the request's hash, the tensor file's size, hash and shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ..limits import TooLarge, read_limited
    from ..planner import plan_stages

    json_path = Path(json_path)
    try:
        data = json.loads(read_limited(json_path, MAX_STATE_JSON_BYTES))
    except TooLarge:
        raise _refuse(json_path, f"larger than {MAX_STATE_JSON_BYTES} bytes: not a state tm-run wrote") from None
    except (OSError, ValueError) as err:
        raise _refuse(json_path, f"cannot read a state ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise _refuse(json_path, f"not a {STATE_FORMAT} file (written by tm-run generate --stop-after)")
    version = data.get("format_version")
    if version != STATE_VERSION:
        raise _refuse(json_path, f"format version {version!r}: this tm-run reads version {STATE_VERSION}")
    request_json = data.get("request")
    try:
        edited = sha256_bytes(_canonical(request_json)) != data.get("request_sha256")
    except (TypeError, ValueError):
        edited = True
    if edited:
        raise _refuse(
            json_path,
            "its request does not match its request_sha256: the request was edited after "
            "tm-run wrote it (generate again with the new request)",
        )
    request = request_from_json(request_json, str(json_path))
    stages = plan_stages(request.num_frames, request.frame_intervals)
    stage = data.get("stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < len(stages) - 1:
        raise _refuse(json_path, f"stage {stage!r}: a state stops after one of stages 0..{len(stages) - 2}")
    model = data.get("model")
    if not isinstance(model, dict):
        raise _refuse(json_path, "'model' must be an object")
    tensors = data.get("tensors") or {}
    name = tensors.get("file")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(TENSOR_SUFFIX):
        raise _refuse(json_path, f"tensors.file must name a {TENSOR_SUFFIX} file beside it, got {name!r}")
    tensor_path = json_path.with_name(name)
    want_shape = [3, stages[stage].total_frames, request.height, request.width]
    if tensors.get("shape") != want_shape:
        raise _refuse(
            json_path, f"shape {tensors.get('shape')} of the stage-{stage} frames, where the request makes {want_shape}"
        )
    limit = 4 * math.prod(want_shape) + (1 << 16)  # the frames and a header
    try:
        blob = read_limited(tensor_path, limit)
    except TooLarge:
        raise _refuse(
            tensor_path, f"larger than the {limit} bytes its frames need: not the state's tensor file"
        ) from None
    except OSError as err:
        raise _refuse(tensor_path, f"cannot read the state's tensors ({err.strerror or err})") from None
    if sha256_bytes(blob) != tensors.get("sha256"):
        raise _refuse(
            tensor_path,
            f"tensor hash: its sha256 is not the one {json_path.name} records: the file was "
            "changed or replaced after tm-run wrote it",
        )
    try:
        frames = load(blob)[TENSOR_NAME]
    except (SafetensorError, KeyError, ValueError) as err:
        raise _refuse(tensor_path, f"not a safetensors file holding {TENSOR_NAME!r} ({err})") from None
    if list(frames.shape) != want_shape or str(frames.dtype) != "torch.float32":
        raise _refuse(
            tensor_path, f"shape: {TENSOR_NAME} is {list(frames.shape)} {frames.dtype}, expected {want_shape} float32"
        )
    return StageState(json_path, stage, len(stages), request, model, frames)
