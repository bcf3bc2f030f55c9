"""Tiled VAE builds: graphs at the tile's shape, the manifest's record, the
onnxruntime backend against the torch backend with tiling on, refusals.

The multi-tile build exports eight VAE graphs (minutes on a loaded CPU): those
tests are slow. The fast ones reuse the session's tiny build (32x48), which
is smaller than one release tile, so its graphs are exactly what a tiled
export at that size holds.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tempomaster.build_format import manifest_text
from tempomaster.engines.manifest import ManifestError, load_manifest
from tempomaster.export.build import export_onnx, tiling_record
from tempomaster.export.shapes import ExportShape
from tempomaster.models.vae_tiling import RELEASE_TILE, TileSpec
from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend
from tempomaster.runtime.backends.torch import TorchBackend

pytest.importorskip("onnxruntime")

SPEC = TileSpec((4, 6), (2, 3))
VAE_GRAPHS = ["vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder"]


def test_tiling_record_for_release_shapes():
    rec = tiling_record(RELEASE_TILE, ExportShape(480, 832, 109, (4, 2, 1)))
    assert rec == {
        "size": [30, 52],
        "stride": [15, 26],
        "tiles": [{"latent": [30, 52], "pixels": [240, 416], "suffix": ""}],
    }
    # 720x1280: the last tile across is cut to 30 latent columns and gets its own graphs
    rec = tiling_record(RELEASE_TILE, ExportShape(720, 1280, 109, (4, 2, 1)))
    assert [t["latent"] for t in rec["tiles"]] == [[30, 52], [30, 30]]
    assert [t["suffix"] for t in rec["tiles"]] == ["", "_30x30"]
    # smaller than one tile (the tiny preset's 32x48): one tile, the whole frame
    rec = tiling_record(RELEASE_TILE, ExportShape(32, 48, 9, (4, 2, 1)))
    assert rec["tiles"] == [{"latent": [4, 6], "pixels": [32, 48], "suffix": ""}]
    assert tiling_record(None, ExportShape(32, 48, 9, (4, 2, 1))) is None


@pytest.fixture
def release_tiled_tiny(tiny_build, tmp_path):
    """The tiny build with the manifest a `tile=True` export at 32x48 writes:
    the release's tiling cut to one 4x6 tile, i.e. the same graphs."""
    build = shutil.copytree(tiny_build, tmp_path / "b")
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["tiling"] = tiling_record(RELEASE_TILE, ExportShape(32, 48, 9, (4, 2, 1)))
    (build / "manifest.json").write_text(manifest_text(manifest))
    return build


def test_release_tiling_below_one_tile_on_onnxruntime(release_tiled_tiny, tiny_models):
    ort = OnnxRuntimeBackend.from_build(release_tiled_tiny, tile=True)
    assert ort.tile == RELEASE_TILE
    ref = TorchBackend(tiny_models, tile=True)
    g = torch.Generator().manual_seed(30)
    lat = torch.randn(1, 16, 2, 4, 6, generator=g)
    ours, want = ort.vae_decode(lat), ref.vae_decode(lat)
    assert ours.shape == want.shape == (1, 3, 5, 32, 48)
    assert (ours - want).abs().max() < 1e-4
    # one tile with unit weights: the untiled decode
    assert (want - tiny_models.vae.decode(lat)).abs().max() < 1e-6
    video = torch.rand(1, 3, 5, 32, 48, generator=g) * 2 - 1
    z, z_ref = ort.vae_encode(video), ref.vae_encode(video)
    assert ((z - z_ref).norm() / z_ref.norm()) < 1e-5


def test_tiling_mismatch_is_refused_in_one_line(release_tiled_tiny, tiny_build):
    with pytest.raises(ManifestError, match="exported without tiling") as err:
        OnnxRuntimeBackend.from_build(tiny_build, tile=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ManifestError, match="exported for tiled VAE calls.*run with --tile") as err:
        OnnxRuntimeBackend.from_build(release_tiled_tiny)
    assert "\n" not in str(err.value)
    with pytest.raises(ManifestError, match="tiled with"):
        OnnxRuntimeBackend.from_build(release_tiled_tiny, tile=TileSpec((4, 6), (2, 3)))


@pytest.fixture(scope="module")
def tiled_build(tmp_path_factory, tiny_models):
    """VAE graphs of the tiny preset tiled (4, 6) / (2, 3) at 48x80 pixels (latent 6x10):
    rows [0, 4) [2, 6); columns [0, 6) [3, 9) [6, 10) -- the last cut to 4."""
    out = tmp_path_factory.mktemp("tiled") / "b"
    export_onnx(
        tiny_models,
        "fp32",
        ExportShape(48, 80, 9, (4, 2, 1)),
        out,
        preset_name="tiny",
        progress=False,
        copy=True,
        graphs=VAE_GRAPHS,
        tile=SPEC,
        audit=False,
    )
    return out


@pytest.mark.slow
def test_tiled_build_has_graphs_at_the_tile_shapes(tiled_build):
    m = load_manifest(tiled_build)
    assert m.data["tiling"]["size"] == [4, 6] and m.data["tiling"]["stride"] == [2, 3]
    assert [t["latent"] for t in m.data["tiling"]["tiles"]] == [[4, 6], [4, 4]]
    assert sorted(m.graphs) == sorted(VAE_GRAPHS + [g + "_4x4" for g in VAE_GRAPHS])

    def shape(graph, name):
        return next(t["shape"] for t in m.graphs[graph]["inputs"] + m.graphs[graph]["outputs"] if t["name"] == name)

    assert shape("vae_decoder", "latents") == ["batch", 16, 1, 4, 6]
    assert shape("vae_decoder", "frames") == ["batch", 3, 4, 32, 48]
    assert shape("vae_encoder", "frames") == ["batch", 3, 4, 32, 48]
    assert shape("vae_decoder_first_4x4", "latents") == ["batch", 16, 1, 4, 4]
    assert shape("vae_encoder_4x4", "latents") == ["batch", 16, 1, 4, 4]


@pytest.mark.slow
def test_onnxruntime_tiled_equals_torch_tiled(tiled_build, tiny_models):
    ort = OnnxRuntimeBackend(load_manifest(tiled_build), tile=True)
    assert ort.tile == SPEC
    ref = TorchBackend(tiny_models, tile=SPEC)
    g = torch.Generator().manual_seed(31)
    lat = torch.randn(2, 16, 3, 6, 10, generator=g)
    ours, want = ort.vae_decode(lat), ref.vae_decode(lat)
    assert ours.shape == want.shape == (2, 3, 9, 48, 80)
    assert (ours - want).abs().max() < 1e-4
    # really tiled: the untiled model differs by far more
    assert (want - tiny_models.vae.decode(lat)).abs().max() > 1e-3
    video = torch.rand(2, 3, 5, 48, 80, generator=g) * 2 - 1
    z, z_ref = ort.vae_encode(video), ref.vae_encode(video)
    assert z.shape == z_ref.shape == (2, 16, 2, 6, 10)
    assert ((z - z_ref).norm() / z_ref.norm()) < 1e-5


@pytest.mark.slow
def test_tiled_build_refuses_an_untiled_run_and_unknown_tiles(tiled_build):
    with pytest.raises(ManifestError, match="exported for tiled VAE calls") as err:
        OnnxRuntimeBackend(load_manifest(tiled_build))
    assert "\n" not in str(err.value)
    backend = OnnxRuntimeBackend(load_manifest(tiled_build), tile=True)
    with pytest.raises(ManifestError, match="no VAE graphs for a 4x5 latent tile"):
        backend.vae_decode(torch.randn(1, 16, 1, 6, 11))
