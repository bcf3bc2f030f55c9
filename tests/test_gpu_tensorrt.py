"""TensorRT on a GPU: tiny engines built, compared with onnxruntime and torch, CUDA graphs, refusals.

Run with `python -m pytest -m gpu` on a machine with a CUDA GPU and
`pip install -e '.[dev,trt]'`. Skipped everywhere else.

THESE TESTS HAVE NEVER RUN: they were written on machines without a GPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tempomaster.build_format import manifest_text
from tempomaster.engines.trt_env import cuda_available, tensorrt_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (cuda_available() and tensorrt_available()), reason="needs a CUDA GPU and TensorRT 11.4"),
]

SHAPE = dict(height=32, width=48, num_frames=9, frame_intervals=(4, 2, 1), steps_per_stage=(3, 2, 2))
# worst element of a whole generation, in [-1, 1] pixel units, against the fp32 torch reference
TOLERANCE = {"fp16": 0.05, "bf16": 0.1}


def _uint8(frames):
    return ((frames.float().cpu() + 1) * 127.5).round().to(torch.int16)


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def engine_build(request, tmp_path_factory, tiny_models):
    """The tiny models exported at `precision` (32x48, 9 frames, [4,2,1]) with their plans built."""
    from tempomaster.engines.builder import EngineOptions, build_engines
    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape

    precision = request.param
    out = tmp_path_factory.mktemp(f"trt-{precision}") / "tiny"
    export_onnx(
        tiny_models, precision, ExportShape(32, 48, 9, (4, 2, 1)), out, preset_name="tiny", progress=False, copy=True
    )
    build_engines(out, EngineOptions(opt_level=3))
    return precision, out


def _ort_backend(build):
    import onnxruntime as ort

    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is needed to run fp16/bf16 graphs as the reference")
    return OnnxRuntimeBackend.from_build(build)


def test_manifest_records_every_plan(engine_build):
    from tempomaster.engines.manifest import load_manifest
    from tempomaster.engines.plans import engines_section, verify_plan_file

    precision, build = engine_build
    m = load_manifest(build)
    section = engines_section(m)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    assert section["compute_capability"] == f"{props.major}.{props.minor}"
    for name in ("dit", "t5", "vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder"):
        entry = section["plans"][name]
        verify_plan_file(m, name)
        assert [i["name"] for i in entry["inputs"]] == [i["name"] for i in m.graph(name)["inputs"]]
        assert entry["build_seconds"] > 0 and entry["bytes"] > 0


def test_each_engine_matches_onnxruntime(engine_build):
    from tempomaster.runtime.backends.tensorrt import TensorRTBackend

    precision, build = engine_build
    trt_b = TensorRTBackend.from_build(build)
    ort_b = _ort_backend(build)
    g = torch.Generator().manual_seed(5)
    n, f, h, w = 4, 3, 4, 6
    x, y = torch.randn(n, 16, f, h, w, generator=g), torch.randn(n, 20, f, h, w, generator=g)
    ctx = torch.randn(n, 512, trt_b.info.text_dim, generator=g)
    cos, sin = (
        torch.randn(n, f * 6, trt_b.info.head_dim // 2, generator=g),
        torch.randn(n, f * 6, trt_b.info.head_dim // 2, generator=g),
    )
    t = torch.tensor([700.0])
    cuda = torch.device("cuda")
    a = trt_b.velocity(*(v.to(cuda) for v in (x, y, t, ctx, cos, sin))).float().cpu()
    b = ort_b.velocity(*(v.to(cuda) for v in (x, y, t, ctx, cos, sin))).float().cpu()
    assert (a - b).abs().max() / b.abs().max() < 2e-2
    video = torch.rand(2, 3, 9, 32, 48, generator=g) * 2 - 1
    za, zb = trt_b.vae_encode(video.to(cuda)).cpu(), ort_b.vae_encode(video.to(cuda)).cpu()
    assert (za - zb).abs().max() / zb.abs().max() < 2e-2
    da, db = trt_b.vae_decode(za.to(cuda)).cpu(), ort_b.vae_decode(za.to(cuda)).cpu()
    assert (da - db).abs().max() < 2e-2
    ids = torch.randint(1, 384, (2, 512), generator=g)
    mask = (torch.arange(512)[None] < torch.tensor([[7], [40]])).long()
    ea, eb = (
        trt_b.encode_text(ids.to(cuda), mask.to(cuda)).float().cpu(),
        ort_b.encode_text(ids.to(cuda), mask.to(cuda)).float().cpu(),
    )
    assert (ea - eb).abs().max() / eb.abs().max() < 2e-2


def test_generate_on_engines_matches_torch(engine_build, tiny_models):
    from tempomaster.runtime.backends.tensorrt import TensorRTBackend
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    precision, build = engine_build
    backend = TensorRTBackend.from_build(build)
    request = GenerationRequest(prompt="a red ball on the beach", seed=7, **SHAPE)
    ours = generate(backend, backend.tokenizer(), request, progress=False)
    ref = generate(TorchBackend(tiny_models), tiny_models.tokenizer, request, progress=False)
    for a, b in zip(ours.stages, ref.stages):
        assert a.frames.shape == b.frames.shape
        assert (a.frames.float().cpu() - b.frames.float().cpu()).abs().max() < TOLERANCE[precision]


def test_cuda_graphs_on_and_off_give_the_same_video(engine_build):
    from tempomaster.runtime.backends.tensorrt import TensorRTBackend
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    precision, build = engine_build
    request = GenerationRequest(prompt="a boat at dawn", seed=3, **SHAPE)
    eager = TensorRTBackend.from_build(build)
    graphed = TensorRTBackend.from_build(build, cuda_graphs=True)
    a = generate(eager, eager.tokenizer(), request, progress=False)
    b = generate(graphed, graphed.tokenizer(), request, progress=False)
    assert graphed.graphs["dit"]._graphs, "no CUDA graph was captured"
    for sa, sb in zip(a.stages, b.stages):
        assert torch.equal(_uint8(sa.frames), _uint8(sb.frames))


def test_a_build_with_plans_picks_tensorrt(engine_build):
    from tempomaster.runtime.backends.factory import choose_backend

    precision, build = engine_build
    assert choose_backend(build) == "tensorrt"


def test_foreign_plans_are_refused(engine_build, tmp_path):
    from tempomaster.engines.manifest import ManifestError
    from tempomaster.runtime.backends.tensorrt import TensorRTBackend

    precision, build = engine_build
    for key, value, needle in (
        ("tensorrt_version", "11.3.0.99", "TensorRT 11.3.0.99"),
        ("compute_capability", "7.5", "compute capability 7.5"),
    ):
        copy = shutil.copytree(build, tmp_path / f"{key}")
        data = json.loads((copy / "manifest.json").read_text())
        data["engines"]["plans"]["dit"][key] = value
        (copy / "manifest.json").write_text(manifest_text(data))
        with pytest.raises(ManifestError, match=needle):
            TensorRTBackend.from_build(copy)
    copy = shutil.copytree(build, tmp_path / "tampered")
    plan = copy / "engines" / "vae_decoder.plan"
    blob = bytearray(plan.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    plan.write_bytes(bytes(blob))
    backend = TensorRTBackend.from_build(copy)
    with pytest.raises(ManifestError, match="modified"):
        _ = backend.graphs["vae_decoder"].engine


def test_weight_stripped_plans_refit_to_the_same_outputs(engine_build, tmp_path):
    from tempomaster.engines.builder import EngineOptions, build_engines
    from tempomaster.runtime.backends.tensorrt import TensorRTBackend

    precision, build = engine_build
    stripped = shutil.copytree(build, tmp_path / "stripped")
    build_engines(stripped, EngineOptions(strip_weights=True), graphs=["t5"])  # the other plans stay as they were
    data = json.loads((stripped / "manifest.json").read_text())
    assert data["engines"]["plans"]["t5"]["stripped"] and not data["engines"]["plans"]["dit"]["stripped"]
    assert (
        data["engines"]["plans"]["t5"]["bytes"]
        < json.loads((build / "manifest.json").read_text())["engines"]["plans"]["t5"]["bytes"]
    )
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 384, (2, 512), generator=g).cuda()
    mask = (torch.arange(512)[None] < torch.tensor([[9], [33]])).long().cuda()
    ref = TensorRTBackend.from_build(build).encode_text(ids, mask).float()
    out = TensorRTBackend.from_build(stripped).encode_text(ids, mask).float()
    assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2)


# -- one engine instance per GPU, tiled builds, streaming budgets, the FP8 layer report ------------------


def test_two_gpus_equal_one(engine_build, tmp_path):
    """tm-run generate --backend tensorrt --devices 0,1: the video one GPU makes, within 1/255."""
    import numpy as np

    from tempomaster.cli import run_main
    from tempomaster.runtime.video import read_video_frames

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    precision, build = engine_build
    common = [
        "generate",
        "--engines",
        str(build),
        "--backend",
        "tensorrt",
        "--prompt",
        "a red ball",
        "--height",
        "32",
        "--width",
        "48",
        "--num-frames",
        "9",
        "--steps",
        "2,1,1",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert run_main([*common, "--out", str(tmp_path / "one")]) == 0
    assert run_main([*common, "--devices", "0,1", "--timeout", "300", "--out", str(tmp_path / "two")]) == 0
    one, _ = read_video_frames(tmp_path / "one" / "video")
    two, _ = read_video_frames(tmp_path / "two" / "video")
    assert one.shape == two.shape
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1


def test_each_rank_opens_its_plans_on_its_own_device(engine_build):
    from pathlib import Path

    from tempomaster.runtime.backends.factory import TensorRTBackendFactory

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    precision, build = engine_build
    backend, _ = TensorRTBackendFactory(Path(build))(torch.device("cuda", 1))
    assert backend.device == torch.device("cuda", 1) and backend.gpu.index == 1
    _ = backend.graphs["t5"].engine  # deserialised on cuda:1
    assert backend.graphs["t5"]._engine is not None and torch.cuda.current_device() == 1


def test_a_tiled_build_on_tensorrt_decodes_as_onnxruntime(tmp_path_factory, tiny_models):
    from tempomaster.engines.builder import EngineOptions, build_engines
    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape
    from tempomaster.models.vae_tiling import TileSpec
    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from tempomaster.runtime.backends.tensorrt import TensorRTBackend

    out = tmp_path_factory.mktemp("trt-tiled") / "tiny"
    tile = TileSpec((4, 4), (2, 2))  # 32x48 frames: 4x6 latents, tiles of 4x4 with an edge tile
    export_onnx(
        tiny_models,
        "fp32",
        ExportShape(32, 48, 9, (4, 2, 1)),
        out,
        preset_name="tiny",
        progress=False,
        copy=True,
        tile=tile,
    )
    build_engines(out, EngineOptions(opt_level=3))
    trt_b = TensorRTBackend.from_build(out, tile=tile)
    ort_b = OnnxRuntimeBackend.from_build(out, tile=tile)
    g = torch.Generator().manual_seed(13)
    latents = torch.randn(2, 16, 3, 4, 6, generator=g)
    a = trt_b.vae_decode(latents.cuda()).cpu()
    b = ort_b.vae_decode(latents).cpu()
    assert a.shape == b.shape and (a - b).abs().max() < 1e-3  # fp32 on both: rounding only
    video = torch.rand(2, 3, 9, 32, 48, generator=g) * 2 - 1
    za, zb = trt_b.vae_encode(video.cuda()).cpu(), ort_b.vae_encode(video).cpu()
    assert (za - zb).abs().max() / zb.abs().max() < 1e-3


def test_streaming_budget_is_set_and_read_back(engine_build, tmp_path):
    from tempomaster.engines.builder import EngineOptions, build_engines
    from tempomaster.errors import UsageError
    from tempomaster.runtime.backends.tensorrt import TensorRTBackend

    precision, build = engine_build
    streaming = shutil.copytree(build, tmp_path / "streaming")
    build_engines(streaming, EngineOptions(weight_streaming=True), graphs=["dit"])
    entry = json.loads((streaming / "manifest.json").read_text())["engines"]["plans"]["dit"]
    assert entry["weight_streaming"] and entry["streamable_weights_bytes"] > 0 and entry["device_memory_bytes"] >= 0
    asked = entry["streamable_weights_bytes"] // 2
    lines = []
    backend = TensorRTBackend.from_build(streaming, weight_streaming_budget=asked, log=lines.append)
    engine = backend.graphs["dit"].engine
    assert int(engine.weight_streaming_budget_v2) == asked
    assert any("weight streaming" in line for line in lines)
    with pytest.raises(UsageError, match="--cuda-graphs cannot run weight-streaming"):
        TensorRTBackend.from_build(streaming, cuda_graphs=True)


def test_the_fp8_layer_report_is_recorded(tmp_path):
    """An fp8 tiny build: the manifest says, per quantized DiT layer, whether the plan runs it in FP8."""
    from tempomaster.calibration.export import FP8Options
    from tempomaster.cli import export_main
    from tempomaster.engines.builder import EngineOptions
    from tempomaster.export.source import ExportSource
    from tempomaster.toolchain import export_and_build

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if (props.major, props.minor) < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    out = tmp_path / "fp8"
    export_and_build(
        out,
        ExportSource(preset="tiny", height=32, width=48, num_frames=9, intervals=(4, 2, 1), graphs=["dit"]),
        precision="fp8",
        options=EngineOptions(),
        progress=False,
        fp8=FP8Options(calib_steps=1, report_prompts=0),
    )
    report = json.loads((out / "manifest.json").read_text())["engines"]["plans"]["dit"]["fp8_layers"]
    assert report["quantized"] > 0
    assert len(report["fp8"]) + len(report["not_fp8"]) + len(report["not_found"]) == report["quantized"]
    assert report["fp8"], "no quantized DiT layer runs in FP8"
    assert export_main(["inspect", str(out)]) == 0


def test_export_check_tensorrt_against_onnxruntime(engine_build, capsys):
    from tempomaster.cli import export_main

    precision, build = engine_build
    if precision == "bf16":
        pytest.skip("numpy holds no bf16 inputs: tm-export check runs fp32 and fp16 builds")
    _ort_backend(build)  # skips without onnxruntime-gpu
    assert export_main(["check", str(build), "--runner", "tensorrt", "--graphs", "dit", "t5"]) == 0
    out = capsys.readouterr().out
    assert "dit: ok" in out and "t5: ok" in out
