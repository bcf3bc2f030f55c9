"""Refusing a plan before TensorRT reads it, on a manifest written by the test; choosing the backend.

The plan files here are random bytes: these checks run before any plan is
deserialised, so they need neither TensorRT nor a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
import torch

from tempomaster.build_format import manifest_text
from tempomaster.engines.manifest import load_manifest
from tempomaster.engines.plans import check_plan, check_plan_compat, has_plans, plan_file, version_tuple
from tempomaster.engines.trt_env import cuda_available, tensorrt_available
from tempomaster.errors import ManifestError, MissingDependencyError, UsageError
from tempomaster.models.presets import get_preset
from tempomaster.runtime.backends.factory import choose_backend, open_engine_backend
from tempomaster.runtime.backends.tensorrt import GRAPHS, TensorRTBackend

BUILT = {"tensorrt_version": "11.4.0.106", "compute_capability": "9.0", "gpu": "NVIDIA H100 80GB HBM3"}
# the model settings a tiny export records (load_manifest checks those the runtime reads)
TINY_MODELS = json.loads(
    json.dumps({k: dataclasses.asdict(getattr(get_preset("tiny"), k)) for k in ("dit", "vae", "t5")})
)


def _manifest(build, engines: bool = True) -> None:
    """A build manifest written here: six graphs (their ONNX are not needed before a plan loads) and, optionally, plans."""
    (build / "engines").mkdir(parents=True)
    gen = torch.Generator().manual_seed(11)
    graphs, plans = {}, {}
    for name in GRAPHS:
        graphs[name] = {
            "file": f"onnx/{name}.onnx",
            "external_data": None,
            "max_batch": 8,
            "precision": "fp16",
            "inputs": [],
            "outputs": [],
            "meta": {},
        }
        blob = torch.randint(0, 256, (4096 + len(name),), generator=gen, dtype=torch.uint8).numpy().tobytes()
        (build / plan_file(name)).write_bytes(blob)
        plans[name] = {
            "file": plan_file(name),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            **BUILT,
            "onnx_parser_version": 11400,
            "hardware_compat": "none",
            "version_compatible": False,
            "stripped": False,
            "weight_streaming": False,
            "profile": {"batch": [1, 2, 4], "frames": None, "shapes": {}},
        }
    # the ONNX files are listed (load_manifest requires every graph file hashed) but never read here
    files = {g["file"]: {"sha256": "0" * 64, "bytes": 1} for g in graphs.values()}
    data = {
        "format": "tempomaster-build",
        "format_version": 1,
        "preset": "tiny",
        "precision": "fp16",
        "models": TINY_MODELS,
        "shape": {"height": 32, "width": 48, "num_frames": 9, "intervals": [4, 2, 1]},
        "graphs": graphs,
        "files": files,
    }
    if engines:
        data["engines"] = {**BUILT, "plans": plans}
    (build / "manifest.json").write_text(manifest_text(data))


def _with_plans(tmp_path):
    build = tmp_path / "b"
    _manifest(build)
    return build


def test_matching_plan_passes(tmp_path):
    m = load_manifest(_with_plans(tmp_path))
    assert has_plans(m)
    path = check_plan(m, "dit", tensorrt_version="11.4.0.106", compute_capability=(9, 0), gpu_name="NVIDIA H100 PCIe")
    assert path == m.root / "engines" / "dit.plan"


def test_other_tensorrt_version_is_refused_naming_both(tmp_path):
    m = load_manifest(_with_plans(tmp_path))
    with pytest.raises(ManifestError) as info:
        check_plan(m, "dit", tensorrt_version="11.5.0.20", compute_capability=(9, 0))
    msg = str(info.value)
    assert "TensorRT 11.4.0.106" in msg and "TensorRT 11.5.0.20" in msg and "dit.plan" in msg
    assert "tm-export build --resume" in msg


def test_other_compute_capability_is_refused_naming_both(tmp_path):
    m = load_manifest(_with_plans(tmp_path))
    with pytest.raises(ManifestError) as info:
        check_plan(m, "vae_decoder", tensorrt_version="11.4.0.106", compute_capability=(8, 9), gpu_name="NVIDIA L40S")
    msg = str(info.value)
    assert "compute capability 9.0" in msg and "compute capability 8.9" in msg
    assert "NVIDIA H100 80GB HBM3" in msg and "NVIDIA L40S" in msg


def test_hash_mismatch_is_refused(tmp_path):
    build = _with_plans(tmp_path)
    plan = build / "engines" / "t5.plan"
    data = bytearray(plan.read_bytes())
    data[100] ^= 0xFF
    plan.write_bytes(bytes(data))
    m = load_manifest(build)
    with pytest.raises(ManifestError, match=r"t5\.plan: sha256 .* \(modified\)"):
        check_plan(m, "t5", tensorrt_version="11.4.0.106", compute_capability=(9, 0))
    plan.write_bytes(bytes(data[:-1]))
    with pytest.raises(ManifestError, match=r"bytes, manifest says .* \(modified\)"):
        check_plan(m, "t5", tensorrt_version="11.4.0.106", compute_capability=(9, 0))
    os.remove(plan)
    assert not has_plans(m)
    with pytest.raises(ManifestError, match="missing"):
        check_plan(m, "t5", tensorrt_version="11.4.0.106", compute_capability=(9, 0))


def test_compatibility_rules():
    vc = {**BUILT, "version_compatible": True}
    check_plan_compat(vc, tensorrt_version="11.6.1.2", compute_capability="9.0")  # later 11.x: fine
    for other in ("11.3.0.99", "12.0.0.1", "10.16.1.11"):
        with pytest.raises(ManifestError, match="version-compatible"):
            check_plan_compat(vc, tensorrt_version=other, compute_capability="9.0")
    amp = {**BUILT, "compute_capability": "8.0", "hardware_compat": "ampere+"}
    for cc in ("8.0", "8.6", "9.0", (12, 0)):
        check_plan_compat(amp, tensorrt_version="11.4.0.106", compute_capability=cc)
    with pytest.raises(ManifestError, match="Ampere and later .* 7.5"):
        check_plan_compat(amp, tensorrt_version="11.4.0.106", compute_capability=(7, 5))
    # both problems at once are both named
    with pytest.raises(ManifestError, match="TensorRT 11.4.0.106.*11.5.0.1.*compute capability 9.0.*8.6"):
        check_plan_compat(BUILT, tensorrt_version="11.5.0.1", compute_capability="8.6")
    assert version_tuple("11.4.0.106") < version_tuple("11.10.0.1")  # numeric, not text, order
    # a 10.x version-compatible plan runs on 11.x (TensorRT's one cross-major path); an 11.x one never on 10.x
    check_plan_compat({**vc, "tensorrt_version": "10.16.1.11"}, tensorrt_version="11.4.0.106", compute_capability="9.0")


def test_compatibility_levels_follow_tensorrt():
    here = {"tensorrt_version": "11.4.0.106", "compute_capability": (9, 0)}
    # none: same compute capability; another model of it runs with TensorRT's warning, repeated
    assert check_plan_compat(BUILT, **here, gpu_name="NVIDIA H100 80GB HBM3") == []
    warned = check_plan_compat(BUILT, **here, gpu_name="NVIDIA H100 PCIe", where="dit.plan")
    assert len(warned) == 1 and "NVIDIA H100 80GB HBM3" in warned[0] and "NVIDIA H100 PCIe" in warned[0]
    assert "--hardware-compat same-cc" in warned[0]
    # same-cc: any model of the compute capability, silently; another compute capability refused
    same = {**BUILT, "hardware_compat": "same-cc"}
    assert check_plan_compat(same, **here, gpu_name="NVIDIA H100 PCIe") == []
    with pytest.raises(ManifestError, match="compute capability 9.0 .*compute capability 8.9"):
        check_plan_compat(same, tensorrt_version="11.4.0.106", compute_capability=(8, 9))
    # FP8 needs 8.9+ at every level, ampere+ included
    amp8 = {**BUILT, "compute_capability": "8.9", "hardware_compat": "ampere+", "precision": "fp8"}
    check_plan_compat(amp8, tensorrt_version="11.4.0.106", compute_capability=(9, 0))
    with pytest.raises(ManifestError, match="FP8 layers, which need compute capability 8.9\\+.*8.6"):
        check_plan_compat(amp8, tensorrt_version="11.4.0.106", compute_capability=(8, 6))
    with pytest.raises(ManifestError, match="level 'turing\\+' is unknown"):
        check_plan_compat({**BUILT, "hardware_compat": "turing+"}, **here)


def test_another_tensorrt_major_is_refused_naming_both():
    from tempomaster.engines.trt_env import check_major_version

    check_major_version("11.4.0.106")
    check_major_version("11.9.1.2")
    for other in ("10.16.1.11", "12.0.0.1"):
        with pytest.raises(MissingDependencyError) as info:
            check_major_version(other, "building TensorRT engines")
        assert f"TensorRT {other}" in str(info.value) and "TensorRT 11.x" in str(info.value)
        assert info.value.exit_code == 3


def test_a_build_without_plans(tmp_path):
    build = tmp_path / "onnx-only"
    _manifest(build, engines=False)
    m = load_manifest(build)
    assert not has_plans(m)
    with pytest.raises(ManifestError, match="no TensorRT plans"):
        TensorRTBackend.from_build(build)
    assert choose_backend(build) == "onnxruntime"


@pytest.mark.skipif(cuda_available() and tensorrt_available(), reason="this machine has TensorRT and a GPU")
def test_choose_backend_on_a_machine_without_tensorrt(tmp_path):
    build = _with_plans(tmp_path)
    assert choose_backend(build) == "onnxruntime"  # plans, but nothing here can run them
    assert choose_backend(None) == "torch"
    assert choose_backend(build, "tensorrt") == "tensorrt"
    assert choose_backend(build, "torch") == "torch"
    with pytest.raises(UsageError, match="--engines"):
        choose_backend(None, "onnxruntime")
    assert choose_backend(build, "tensorrt", cuda_graphs=True) == "tensorrt"
    with pytest.raises(
        UsageError, match="--cuda-graphs needs the tensorrt backend; the backend is onnxruntime \\(chosen"
    ):
        choose_backend(build, cuda_graphs=True)
    with pytest.raises(UsageError, match="--cuda-graphs"):
        choose_backend(None, cuda_graphs=True)
    with pytest.raises(UsageError, match="--backend must be one of"):
        choose_backend(build, "tvm")
    with pytest.raises(UsageError, match="--cuda-graphs"):
        open_engine_backend(build, "onnxruntime", cuda_graphs=True)
    with pytest.raises(UsageError, match="not 'torch'"):
        open_engine_backend(build, "torch")
    with pytest.raises(MissingDependencyError) as info:
        open_engine_backend(build, "tensorrt")
    assert info.value.exit_code == 3
    with pytest.raises(MissingDependencyError) as info:
        TensorRTBackend.from_build(build)
    assert info.value.exit_code == 3 and "needs an NVIDIA GPU" in str(info.value)


def test_build_summary_names_every_plan():
    from pathlib import Path

    from tempomaster.engines.build import BuildResult

    engines = {
        **BUILT,
        "plans": {
            "dit": {
                "bytes": 3 * 2**30,
                "build_seconds": 1800.25,
                "profile": {"batch": [1, 3, 3], "frames": None},
                "stripped": True,
                "hardware_compat": "none",
            },
            "t5": {
                "bytes": 2**29,
                "build_seconds": 30.0,
                "profile": {"batch": [1, 2, 2], "frames": [2, 3, 3]},
                "hardware_compat": "ampere+",
            },
        },
    }
    text = BuildResult(Path("b"), "bf16", None, 1830.3, engines).summary().splitlines()
    assert len(text) == 3 and "TensorRT 11.4.0.106" in text[0] and "ONNX reused" in text[0]
    assert text[1].split()[:4] == ["dit", "3072.0", "MiB", "batch"] and "1/3/3" in text[1] and "stripped" in text[1]
    assert "frames 2/3/3" in text[2] and "hardware_compat ampere+" in text[2]
