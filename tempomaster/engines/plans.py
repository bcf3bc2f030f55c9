"""TensorRT plans beside a build: their manifest entries and the checks made before loading one.

TensorRT 11.4 cannot say whether a plan suits this machine before it is
deserialised (and a foreign plan can fail in ways that are hard to read), so
every plan is recorded in manifest.json with the TensorRT version, the GPU
and its compute capability it was built on, and a plan is refused here,
before its bytes are read by TensorRT, when they do not match:

    "engines": {
      "tensorrt_version", "onnx_parser_version", "gpu", "compute_capability",
      "options": {opt_level, workspace, weight_streaming, hardware_compat, version_compatible, strip_weights},
      "timing_cache": "engines/timing.cache" | null,
      "plans": {NAME: {"file": "engines/NAME.plan", "sha256", "bytes",
                       "tensorrt_version", "onnx_parser_version", "gpu", "compute_capability",
                       "hardware_compat", "version_compatible", "stripped", "weight_streaming",
                       "profile": {"batch": [min,opt,max], "frames": [..] | null, "shapes": {input: [min,opt,max]}},
                       "inputs": [{"name","dtype"}], "outputs": [...], "build_seconds"}}
    }

Compatibility rules (TensorRT's own: the engine-compatibility guide and the
errors and warnings its runtime gives when deserialising):
- TensorRT version: exactly the same; a version-compatible plan runs on the
  same or a later release of its major version (and a 10.x version-compatible
  plan on 11.x);
- hardware, by the plan's compatibility level:
  - none: the same compute capability (TensorRT refuses another); another GPU
    model of that compute capability runs with TensorRT's warning that this is
    not recommended, which we repeat;
  - same-cc (SAME_COMPUTE_CAPABILITY): any GPU of the same compute capability;
  - ampere+ (AMPERE_PLUS): any GPU of compute capability 8.0 or later;
- FP8 needs compute capability 8.9 or later, whatever the level: an fp8 plan
  is refused below it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..atomic_write import write_text
from ..build_format import manifest_text
from ..errors import ManifestError, UsageError
from .manifest import MANIFEST_FILE, Manifest, sha256_file

ENGINES_KEY = "engines"
ENGINE_DIR = "engines"
TIMING_CACHE = "engines/timing.cache"
HARDWARE_COMPAT = ("none", "ampere+", "same-cc")
FP8_MIN_CC = (8, 9)


def plan_file(name: str) -> str:
    return f"{ENGINE_DIR}/{name}.plan"


def version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(version))
    if not parts:
        raise ManifestError(f"unreadable TensorRT version {version!r}")
    return tuple(int(p) for p in parts)


def cc_tuple(cc) -> tuple[int, int]:
    if isinstance(cc, str):
        major, _, minor = cc.partition(".")
        return int(major), int(minor or 0)
    return int(cc[0]), int(cc[1])


def engines_section(manifest: Manifest | Mapping) -> dict | None:
    data = manifest.data if isinstance(manifest, Manifest) else manifest
    section = data.get(ENGINES_KEY)
    return section if section and section.get("plans") else None


def has_plans(manifest: Manifest) -> bool:
    section = engines_section(manifest)
    return bool(section) and all((manifest.root / p["file"]).is_file() for p in section["plans"].values())


def plan_entry(manifest: Manifest, name: str) -> dict:
    section = engines_section(manifest)
    if section is None:
        raise ManifestError(
            f"{manifest.root}: the build has no TensorRT plans; run `tm-export build --resume {manifest.root}` on a GPU machine"
        )
    try:
        return section["plans"][name]
    except KeyError:
        raise ManifestError(
            f"{manifest.root}: the build has no plan for {name!r} (it has {', '.join(sorted(section['plans']))})"
        ) from None


def check_plan_compat(
    entry: Mapping, *, tensorrt_version: str, compute_capability, gpu_name: str | None = None, where: str = "plan"
) -> list[str]:
    """Refuse a plan this machine cannot run, naming both sides, before TensorRT sees it.

    Returns the warnings TensorRT itself would give (a plan built on another GPU model of the same compute capability).
    """
    built_v, here_v = str(entry["tensorrt_version"]), str(tensorrt_version)
    built_cc, here_cc = cc_tuple(entry["compute_capability"]), cc_tuple(compute_capability)
    level = entry.get("hardware_compat") or "none"
    this_gpu = f"this GPU{' (' + gpu_name + ')' if gpu_name else ''}"
    problems, warnings = [], []
    bv, hv = version_tuple(built_v), version_tuple(here_v)
    if entry.get("version_compatible"):
        same_major_later = hv[0] == bv[0] and hv >= bv
        if not (same_major_later or (bv[0] == 10 and hv[0] == 11)):
            problems.append(
                f"it is version-compatible from TensorRT {built_v} on (same major version), this machine has TensorRT {here_v}"
            )
    elif bv != hv:
        problems.append(f"it was built with TensorRT {built_v}, this machine has TensorRT {here_v}")
    if level == "ampere+":
        if here_cc < (8, 0):
            problems.append(
                f"it is hardware-compatible with Ampere and later (compute capability 8.0+), {this_gpu} "
                f"has compute capability {here_cc[0]}.{here_cc[1]}"
            )
    elif level in ("none", "same-cc"):
        if built_cc != here_cc:
            problems.append(
                f"it was built for compute capability {built_cc[0]}.{built_cc[1]} ({entry.get('gpu', 'unknown GPU')}), "
                f"{this_gpu} has compute capability {here_cc[0]}.{here_cc[1]}"
            )
        elif level == "none" and gpu_name and entry.get("gpu") and entry["gpu"] != gpu_name:
            warnings.append(
                f"{where}: built on {entry['gpu']}, running on {gpu_name} (same compute capability): TensorRT "
                "advises against a plan across GPU models (build with --hardware-compat same-cc to allow it)"
            )
    else:
        problems.append(f"its hardware compatibility level {level!r} is unknown (known: {', '.join(HARDWARE_COMPAT)})")
    if entry.get("precision") == "fp8" and here_cc < FP8_MIN_CC:
        problems.append(
            f"it holds FP8 layers, which need compute capability {FP8_MIN_CC[0]}.{FP8_MIN_CC[1]}+, "
            f"{this_gpu} has compute capability {here_cc[0]}.{here_cc[1]}"
        )
    if problems:
        raise ManifestError(
            f"{where}: refusing a TensorRT plan this machine cannot run: {'; '.join(problems)}; rebuild it here with "
            "`tm-export build --resume BUILD` (or build with --version-compatible / --hardware-compat same-cc or ampere+)"
        )
    return warnings


def verify_plan_file(manifest: Manifest, name: str) -> Path:
    """The plan's path once its size and sha256 match the manifest."""
    entry = plan_entry(manifest, name)
    path = manifest.root / entry["file"]
    if not path.is_file():
        raise ManifestError(
            f"{path}: missing (the manifest lists it); rebuild with `tm-export build --resume {manifest.root}`"
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ManifestError(f"{path}: {size} bytes, manifest says {entry['bytes']} (modified); refusing to load it")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ManifestError(
            f"{path}: sha256 {digest[:16]}..., manifest says {entry['sha256'][:16]}... (modified); refusing to load it"
        )
    return path


def check_plan(
    manifest: Manifest, name: str, *, tensorrt_version: str, compute_capability, gpu_name: str | None = None
) -> Path:
    """Compatibility first (cheap, and names both sides), then the hash. Returns the plan's path."""
    entry = plan_entry(manifest, name)
    check_plan_compat(
        entry,
        tensorrt_version=tensorrt_version,
        compute_capability=compute_capability,
        gpu_name=gpu_name,
        where=str(manifest.root / entry["file"]),
    )
    return verify_plan_file(manifest, name)


def write_manifest(build_dir: str | os.PathLike, data: Mapping) -> None:
    """manifest.json through a temporary name and a rename: never half-written."""
    # sealed anew: the engines section is part of it
    write_text(Path(build_dir) / MANIFEST_FILE, manifest_text(data))


def check_run_options(manifest: Manifest | Mapping, *, cuda_graphs: bool) -> None:
    """UsageError for run options a build's plans cannot serve, before any plan is read.

    CUDA graphs and weight streaming do not combine: a streaming plan's
    execute_async_v3 copies weights in synchronously, which a graph capture
    cannot hold.
    """
    section = engines_section(manifest)
    if cuda_graphs and section:
        streaming = [n for n, p in section["plans"].items() if p.get("weight_streaming")]
        if streaming:
            raise UsageError(
                f"--cuda-graphs cannot run weight-streaming plans ({', '.join(streaming)}: streaming makes "
                "each call synchronous); leave out --cuda-graphs, or build without --weight-streaming"
            )
