"""fp32 graphs against the torch models, in onnxruntime, on fresh random inputs at two batch sizes."""

import json

import numpy as np
import pytest
import torch
from export_helpers import build, micro_models, micro_shape, rel_err, session, stream_vae

from tempomaster.export.dit import dit_example_inputs
from tempomaster.export.t5 import t5_example_inputs

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def fp32_build():
    d = build("fp32")
    return d, json.loads((d / "manifest.json").read_text())


@pytest.mark.parametrize("batch", [1, 3])
def test_dit_matches_torch(fp32_build, batch):
    d, manifest = fp32_build
    models, shape = micro_models(), micro_shape()
    g = manifest["graphs"]["dit"]
    f = g["meta"]["latent_frames"][0]
    gen = torch.Generator().manual_seed(100 + batch)
    args = dit_example_inputs(
        models.dit.cfg,
        batch,
        f,
        shape.latent_height,
        shape.latent_width,
        torch.float32,
        generator=gen,
        timestep=float(torch.rand(1, generator=gen)) * 1000,
    )
    with torch.no_grad():
        ref = models.dit(*args).numpy()
    out = session(d / g["file"]).run(
        None, {n: a.numpy() for n, a in zip(["x", "y", "timestep", "context", "rope_cos", "rope_sin"], args)}
    )[0]
    err = rel_err(out, ref)
    print(f"dit fp32 batch {batch}: rel err {err:.2e}")
    assert out.shape == ref.shape
    assert err < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_t5_matches_torch(fp32_build, batch):
    d, manifest = fp32_build
    models = micro_models()
    ids, mask = t5_example_inputs(models.t5.cfg, batch, generator=torch.Generator().manual_seed(7 + batch))
    with torch.no_grad():
        ref = models.t5(ids, mask).numpy()
    out = session(d / manifest["graphs"]["t5"]["file"]).run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
    err = rel_err(out, ref)
    print(f"t5 fp32 batch {batch}: rel err {err:.2e}")
    assert out.shape == (batch, 512, models.t5.cfg.dim)
    assert err < 1e-5
    assert np.all(out[mask.numpy() == 0] == 0)


@pytest.mark.parametrize("batch", [1, 2])
def test_vae_streamed_matches_torch(fp32_build, batch):
    """3 latent frames = 9 pixel frames through the chained step graphs."""
    d, manifest = fp32_build
    vae, shape = micro_models().vae, micro_shape()
    gen = torch.Generator().manual_seed(31 + batch)
    video = torch.rand(batch, 3, 9, shape.height, shape.width, generator=gen) * 2 - 1
    latents = torch.randn(batch, vae.z_dim, 3, shape.latent_height, shape.latent_width, generator=gen)
    with torch.no_grad():
        ref_lat = vae.encode(video).numpy()
        ref_vid = vae.decode(latents).numpy()
    lat = stream_vae(d, "encoder", video.numpy(), manifest)
    vid = np.clip(stream_vae(d, "decoder", latents.numpy(), manifest), -1, 1)
    e_err, d_err = norm_rel_err(lat, ref_lat), norm_rel_err(vid, ref_vid)
    e_max, d_max = rel_err(lat, ref_lat), rel_err(vid, ref_vid)
    print(
        f"vae fp32 batch {batch}: encoder rel err {e_err:.2e} (max-abs {e_max:.2e}), "
        f"decoder rel err {d_err:.2e} (max-abs {d_max:.2e})"
    )
    assert lat.shape == ref_lat.shape == (batch, vae.z_dim, 3, shape.latent_height, shape.latent_width)
    assert vid.shape == ref_vid.shape == (batch, 3, 9, shape.height, shape.width)
    # relative error ||a-b|| / ||b|| as for every other graph; the worst element stays close too
    assert e_err < 1e-5 and d_err < 1e-5
    assert e_max < 1e-4 and d_max < 1e-4


def norm_rel_err(out, ref) -> float:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def test_vae_cache_io_matches_model(fp32_build):
    d, manifest = fp32_build
    vae, shape = micro_models().vae, micro_shape()
    for direction, shapes in (
        ("encoder", vae.encoder_cache_shapes(1, shape.height, shape.width)),
        ("decoder", vae.decoder_cache_shapes(1, shape.latent_height, shape.latent_width)),
    ):
        for name in (f"vae_{direction}_first", f"vae_{direction}"):
            g = manifest["graphs"][name]
            ins = {t["name"]: t for t in g["inputs"]}
            outs = {t["name"]: t for t in g["outputs"]}
            assert len(g["meta"]["caches"]) == len(shapes)
            for c, (layer, s) in zip(g["meta"]["caches"], shapes):
                assert c["layer"] == layer
                assert ins[c["input"]]["shape"] == ["batch", *s[1:]]
                assert outs[c["output"]]["shape"] == ["batch", *s[1:]]


def test_manifest_records_shapes_and_batches(fp32_build):
    d, manifest = fp32_build
    assert manifest["preset"] == "micro" and manifest["precision"] == "fp32"
    assert set(manifest["graphs"]) == {
        "dit",
        "vae_encoder_first",
        "vae_encoder",
        "vae_decoder_first",
        "vae_decoder",
        "t5",
    }
    s = manifest["shape"]
    assert (s["height"], s["width"], s["dit_latent_frames"]) == (32, 48, [3])
    assert [st["chunks"] for st in s["stages"]] == [1, 2, 4]
    dit = manifest["graphs"]["dit"]
    assert [t["name"] for t in dit["inputs"]] == ["x", "y", "timestep", "context", "rope_cos", "rope_sin"]
    assert dit["inputs"][0]["shape"] == ["batch", 16, 3, 4, 6]
    assert dit["inputs"][2] == {"name": "timestep", "dtype": "float32", "shape": [1]}
    assert dit["inputs"][4]["shape"] == ["batch", 3 * 2 * 3, micro_models().dit.cfg.head_dim // 2]
    assert dit["outputs"] == [{"name": "velocity", "dtype": "float32", "shape": ["batch", 16, 3, 4, 6]}]
    for g in manifest["graphs"].values():
        assert g["max_batch"] >= 1
        assert "Attention" in g["ops"] or g["file"].endswith("t5.onnx")
    for rel, info in manifest["files"].items():
        assert (d / rel).stat().st_size == info["bytes"] and len(info["sha256"]) == 64
    for k in ("torch", "onnx", "onnxruntime"):
        assert manifest["versions"][k]
