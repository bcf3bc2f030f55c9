"""TensorRT on every rank, checked where no GPU is needed: the factory, the refusals made before any plan loads,
the memory arithmetic, and the 256-byte alignment of every address the backend binds.

Nothing here pretends to build or run a plan: the factory's device choice is read through the two calls it
makes (torch.cuda.set_device, open_engine_backend), replaced by recorders.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from test_tensorrt_plans import _manifest

from tempomaster.build_format import manifest_text
from tempomaster.cli import run_main
from tempomaster.engines.manifest import load_manifest
from tempomaster.engines.plan_memory import (
    HEADROOM,
    PlanNeed,
    check_budget_kept,
    check_plans_fit,
    plan_needs,
    streaming_budget,
)
from tempomaster.engines.plans import check_run_options
from tempomaster.engines.profiles import build_profiles
from tempomaster.errors import MissingDependencyError, UsageError
from tempomaster.runtime.backends import factory as factory_module
from tempomaster.runtime.backends.base import batch_slices
from tempomaster.runtime.backends.binding import ALIGNMENT, aligned_empty, bindable, is_aligned, slice_offset_bytes
from tempomaster.runtime.backends.factory import TensorRTBackendFactory
from tempomaster.runtime.backends.tensorrt import TensorRTBackend

GIB = 2**30
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _edit(build: Path, fn) -> None:
    data = json.loads((build / "manifest.json").read_text())
    fn(data)
    (build / "manifest.json").write_text(manifest_text(data))


# -- the factory -----------------------------------------------------------------------------------


def test_factory_pickles_whole():
    f = TensorRTBackendFactory(
        Path("b"), Path("ckpt"), None, cuda_graphs=True, weight_streaming_budget=3 * GIB, tile=True
    )
    g = pickle.loads(pickle.dumps(f))
    assert g == f and g.weight_streaming_budget == 3 * GIB and g.cuda_graphs and g.tile


def test_factory_opens_the_plans_on_the_ranks_device(monkeypatch):
    calls = []

    class Opened:
        def tokenizer(self, checkpoints, config):
            return ("tokenizer", checkpoints)

    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(
        factory_module,
        "open_engine_backend",
        lambda engines, name, **kw: calls.append(("open", name, kw["device_index"])) or Opened(),
    )
    f = TensorRTBackendFactory(Path("b"), Path("ckpt"))
    for rank_device in (torch.device("cuda", 1), torch.device("cuda", 3)):
        calls.clear()
        backend, tok = f(rank_device)
        # the device is current before TensorRT deserialises anything, and the backend is told the same index
        assert calls == [("set_device", rank_device.index), ("open", "tensorrt", rank_device.index)]
        assert tok == ("tokenizer", Path("ckpt"))


@no_cuda
def test_factory_on_a_cpu_rank_says_it_needs_a_gpu():
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU"):
        TensorRTBackendFactory(Path("b"))(torch.device("cpu"))


@no_cuda
def test_devices_flag_is_accepted_and_refused_as_one_device_is(tmp_path, capsys):
    build = tmp_path / "b"
    _manifest(build)
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
        "1,1,1",
        "--no-progress",
        "--out",
        str(tmp_path / "o"),
    ]
    assert run_main(common) == 3
    one = capsys.readouterr().err.strip().splitlines()
    assert run_main([*common, "--devices", "0,1"]) == 3
    two = capsys.readouterr().err.strip().splitlines()
    assert len(one) == len(two) == 1 and one == two
    assert "needs an NVIDIA GPU" in two[0] and "one device only" not in two[0]


# -- refusals before anything loads ----------------------------------------------------------------


def test_cuda_graphs_with_a_streaming_build_is_refused_before_loading(tmp_path):
    build = tmp_path / "b"
    _manifest(build)
    _edit(build, lambda d: d["engines"]["plans"]["dit"].update(weight_streaming=True))
    m = load_manifest(build)
    check_run_options(m, cuda_graphs=False)  # streaming alone is fine
    with pytest.raises(UsageError, match=r"--cuda-graphs cannot run weight-streaming plans \(dit"):
        check_run_options(m, cuda_graphs=True)
    # the backend refuses it first thing: before the GPU, TensorRT or any plan is looked at
    with pytest.raises(UsageError, match="--cuda-graphs cannot run weight-streaming"):
        TensorRTBackend(m, cuda_graphs=True)


# -- memory ----------------------------------------------------------------------------------------


def test_plan_needs_count_weights_activations_and_the_streaming_budget(tmp_path):
    build = tmp_path / "b"
    _manifest(build)

    def edit(d):
        d["engines"]["plans"]["dit"].update(bytes=10 * GIB, device_memory_bytes=2 * GIB, weight_streaming=True)
        d["engines"]["plans"]["t5"].update(stripped=True, device_memory_bytes=GIB // 2)
        d["graphs"]["t5"]["weight_bytes"] = 3 * GIB

    _edit(build, edit)
    data = load_manifest(build).data
    dit, t5 = plan_needs(data, ["dit", "t5"], weight_streaming_budget=4 * GIB)
    assert (dit.weights, dit.activations, dit.streaming) == (4 * GIB, 2 * GIB, True)  # only the budget is resident
    assert (t5.weights, t5.activations) == (3 * GIB, GIB // 2)  # a stripped plan's weights come from its ONNX
    assert plan_needs(data, ["dit"])[0].weights == 0  # no budget asked: computed at load from what is free


def test_plans_too_large_for_a_gpu_are_refused_naming_graph_and_bytes():
    needs = [PlanNeed("dit", 30 * GIB, 6 * GIB, False), PlanNeed("t5", 10 * GIB, GIB, False)]
    check_plans_fit(needs, 48 * GIB + HEADROOM, device="cuda:1 (L40S)")
    with pytest.raises(UsageError) as info:
        check_plans_fit(needs, 30 * GIB, device="cuda:1 (L40S)")
    msg = str(info.value)
    assert "cuda:1 (L40S)" in msg and "dit plan needs 36.00 GiB" in msg and "30.00 GiB free" in msg
    assert "--weight-streaming" in msg
    with pytest.raises(UsageError, match="plans need 47.00 GiB together .*dit"):
        check_plans_fit(needs, 40 * GIB, device="cuda:0")


def test_streaming_budget_is_what_fits_capped_at_the_streamable_weights():
    assert streaming_budget("dit", streamable=20 * GIB, free_bytes=30 * GIB, reserved=4 * GIB, asked=None) == 20 * GIB
    assert streaming_budget("dit", streamable=20 * GIB, free_bytes=16 * GIB, reserved=4 * GIB, asked=None) == 12 * GIB
    assert streaming_budget("dit", streamable=20 * GIB, free_bytes=16 * GIB, reserved=4 * GIB, asked=5 * GIB) == 5 * GIB
    assert streaming_budget("dit", streamable=20 * GIB, free_bytes=1, reserved=0, asked=30 * GIB) == 20 * GIB
    with pytest.raises(UsageError, match="dit: weight streaming leaves no room"):
        streaming_budget("dit", streamable=20 * GIB, free_bytes=3 * GIB, reserved=4 * GIB, asked=None)
    check_budget_kept("dit", 5 * GIB, 5 * GIB)
    with pytest.raises(UsageError, match="dit: TensorRT kept a weight-streaming budget of 4 bytes, 5 were set"):
        check_budget_kept("dit", 5, 4)


# -- alignment -------------------------------------------------------------------------------------


def test_a_misaligned_slice_is_copied_and_an_aligned_one_is_bound_in_place():
    x = aligned_empty((3, 5), torch.float32, "cpu")  # rows of 20 bytes: row 1 starts off the boundary
    x.copy_(torch.randn(3, 5, generator=torch.Generator().manual_seed(2)))
    assert is_aligned(x) and bindable(x) is x
    piece = x[1:]
    assert slice_offset_bytes(x.shape, x.dtype, slice(1, 3)) == 20 and not is_aligned(piece)
    bound = bindable(piece)
    assert is_aligned(bound) and bound.is_contiguous() and torch.equal(bound, piece)
    wide = aligned_empty((4, 64), torch.float32, "cpu")  # 256-byte rows: every slice aligned
    assert bindable(wide[2:]).data_ptr() == wide[2:].data_ptr()


def test_every_slice_of_every_profile_shape_is_bound_aligned(tiny_build):
    """For each graph's inputs at its profile's largest shapes, a batch split into the graph's pieces."""
    data = load_manifest(tiny_build).data
    dtypes = {
        "float32": torch.float32,
        "int64": torch.int64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "bool": torch.bool,
        "int32": torch.int32,
    }
    gen = torch.Generator().manual_seed(5)
    checked = 0
    for name, prof in build_profiles(data).items():
        graph = data["graphs"][name]
        limit = min(int(graph["max_batch"]), prof.batch[2])
        for spec in graph["inputs"]:
            if spec["name"] not in prof.shapes:
                continue
            _, _, hi = prof.shapes[spec["name"]]
            total = 2 * limit + 1  # forces at least three pieces, the last one short
            full = aligned_empty((total, *hi[1:]), dtypes[spec["dtype"]], "cpu")
            full.copy_(torch.randint(0, 7, full.shape, generator=gen).to(full.dtype))
            for s in batch_slices(total, limit):
                piece = full[s]
                bound = bindable(piece)
                assert is_aligned(bound, ALIGNMENT) and torch.equal(bound, piece), (name, spec["name"], s)
                checked += 1
    assert checked > 20


# -- tiled builds ----------------------------------------------------------------------------------


def _tiled(build: Path) -> None:
    """The synthetic build made tiled: a 4x4-latent tile and a 4x2 edge tile with its own four VAE plans."""
    _manifest(build)

    def edit(d):
        d["shape"].update(latent_height=4, latent_width=6)
        d["tiling"] = {
            "size": [4, 4],
            "stride": [2, 2],
            "tiles": [
                {"latent": [4, 4], "pixels": [32, 32], "suffix": ""},
                {"latent": [4, 2], "pixels": [32, 16], "suffix": "_4x2"},
            ],
        }
        for base in ("vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder"):
            name = f"{base}_4x2"
            d["graphs"][name] = {**d["graphs"][base], "file": f"onnx/{name}.onnx"}
            d["files"][f"onnx/{name}.onnx"] = {"sha256": "0" * 64, "bytes": 1}
            d["engines"]["plans"][name] = {**d["engines"]["plans"][base], "bytes": 123}

    _edit(build, edit)


def test_a_tiled_build_is_opened_tiled_and_only_so(tmp_path):
    build = tmp_path / "tiled"
    _tiled(build)
    m = load_manifest(build)
    # refused before any GPU or plan is looked at: the build's tiling decides, as on onnxruntime
    with pytest.raises(Exception, match="exported for tiled VAE calls"):
        TensorRTBackend.from_build(build)
    needs = {n.graph: n for n in plan_needs(m.data, list(m.data["engines"]["plans"]))}
    assert needs["vae_decoder_4x2"].weights == 123  # every tile shape's plans count against the GPU
    # the profile of a tile-shape plan is its base graph's (called once per tile)
    profs = build_profiles(m.data)
    assert profs["vae_decoder_4x2"].batch == profs["vae_decoder"].batch


@no_cuda
def test_tiled_tensorrt_is_refused_only_for_want_of_a_gpu(tmp_path):
    build = tmp_path / "tiled"
    _tiled(build)
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU"):
        TensorRTBackend.from_build(build, tile=True)
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU"):
        factory_module.open_engine_backend(build, "tensorrt", tile=True)


def test_plan_for_tensorrt_places_whole_sequences_and_shows_the_idle_time(capsys):
    # 14B defaults, 8 devices: 2, 4, 8 sequences per step; without Ulysses ranks beyond the sequences wait
    common = ["plan", "--preset", "tempomaster-14b", "--devices", "8"]
    assert run_main([*common, "--json"]) == 0
    torch_plan = json.loads(capsys.readouterr().out)
    assert run_main([*common, "--backend", "tensorrt", "--json"]) == 0
    trt_plan = json.loads(capsys.readouterr().out)
    assert torch_plan["sequence_parallel"] and not trt_plan["sequence_parallel"]
    assert trt_plan["sequential_forwards"] == 114  # 50 + 32 + 32: one sequence per rank, as --no-sequence-parallel
    assert trt_plan["idle_fraction"] > torch_plan["idle_fraction"]
    assert run_main([*common, "--backend", "tensorrt"]) == 0
    text = capsys.readouterr().out
    assert "sequence parallel off" in text and "idle" in text


@pytest.mark.slow
def test_engine_backend_on_two_ranks_equals_one_process(tiny_build, tmp_path, capsys):
    """The path the tensorrt factory takes on ranks (a picklable build factory called with each rank's device, the
    DistributedBackend's chunk x cond/uncond split), run with the onnxruntime factory on two CPU ranks."""
    import numpy as np

    from tempomaster.runtime.video import read_video_frames

    common = [
        "generate",
        "--engines",
        str(tiny_build),
        "--backend",
        "onnxruntime",
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
        "--threads",
        "1",
    ]
    assert run_main([*common, "--out", str(tmp_path / "one")]) == 0
    assert run_main([*common, "--devices", "cpu:2", "--timeout", "300", "--out", str(tmp_path / "two")]) == 0
    assert "onnxruntime x2" in capsys.readouterr().out
    one, _ = read_video_frames(tmp_path / "one" / "video")
    two, _ = read_video_frames(tmp_path / "two" / "video")
    assert one.shape == two.shape
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1
