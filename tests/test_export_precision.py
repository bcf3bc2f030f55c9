"""fp16 / bf16 graphs: they load and run, and their error against fp32 torch is reported.

onnxruntime's CPU provider has no bfloat16 kernels for most ops (and few
float16 ones for some); where it cannot run a graph the test says which node
it refused and runs the graph with onnx's reference evaluator instead.
"""

import json

import numpy as np
import pytest
import torch
from export_helpers import build, micro_models, micro_shape, np_of, rel_err, session, stream_vae

from tempomaster.export.dit import dit_example_inputs
from tempomaster.export.t5 import t5_example_inputs

pytestmark = pytest.mark.filterwarnings("ignore")
DIT_INPUTS = ["x", "y", "timestep", "context", "rope_cos", "rope_sin"]
# Loose bounds: random micro weights, one half-precision rounding per op.
BOUND = {"float16": 2e-2, "bfloat16": 1e-1}


def _run(path, feeds):
    """(outputs, evaluator used, why onnxruntime was not used)."""
    try:
        return session(path).run(None, feeds), "onnxruntime", None
    except Exception as err:  # NOT_IMPLEMENTED: no CPU kernel for this dtype
        why = str(err).split("\n")[0][:300]
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(None, feeds), "onnx.reference", why


def _report(what, err, evaluator, why):
    print(f"{what}: rel err vs fp32 torch {err:.2e} ({evaluator}{'; onnxruntime CPU: ' + why if why else ''})")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_dit_low_precision(precision):
    d = build(precision, ("dit",))
    manifest = json.loads((d / "manifest.json").read_text())
    g = manifest["graphs"]["dit"]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert g["precision"] == precision
    assert [t["dtype"] for t in g["inputs"]] == [g["inputs"][0]["dtype"]] * 2 + [
        "float32",
        g["inputs"][0]["dtype"],
        "float32",
        "float32",
    ]
    models, shape = micro_models(), micro_shape()
    args = dit_example_inputs(
        models.dit.cfg,
        2,
        g["meta"]["latent_frames"][0],
        shape.latent_height,
        shape.latent_width,
        torch.float32,
        generator=torch.Generator().manual_seed(5),
    )
    with torch.no_grad():
        ref = models.dit(*args).numpy()
    feeds = {
        n: np_of(a.to(dtype) if a.dtype == torch.float32 and n in ("x", "y", "context") else a)
        for n, a in zip(DIT_INPUTS, args)
    }
    outs, ev, why = _run(d / g["file"], feeds)
    err = rel_err(outs[0].astype(np.float32), ref)
    _report(f"dit {precision}", err, ev, why)
    assert np.isfinite(outs[0].astype(np.float32)).all()
    assert err < BOUND[g["outputs"][0]["dtype"]]


def test_t5_bf16_for_fp16_build():
    d = build("fp16", ("t5", "vae_decoder_first", "vae_decoder"))
    manifest = json.loads((d / "manifest.json").read_text())
    g = manifest["graphs"]["t5"]
    assert g["precision"] == "bf16" and g["outputs"][0]["dtype"] == "bfloat16"
    models = micro_models()
    ids, mask = t5_example_inputs(models.t5.cfg, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = models.t5(ids, mask).numpy()
    outs, ev, why = _run(d / g["file"], {"ids": ids.numpy(), "mask": mask.numpy()})
    err = rel_err(outs[0].astype(np.float32), ref)
    _report("t5 bf16", err, ev, why)
    assert err < BOUND["bfloat16"]


def test_vae_decoder_fp16_streamed():
    d = build("fp16", ("t5", "vae_decoder_first", "vae_decoder"))
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["graphs"]["vae_decoder"]["precision"] == "fp16"
    vae, shape = micro_models().vae, micro_shape()
    latents = torch.randn(
        1, vae.z_dim, 3, shape.latent_height, shape.latent_width, generator=torch.Generator().manual_seed(9)
    )
    with torch.no_grad():
        ref = vae.decode(latents).numpy()
    try:
        out = stream_vae(d, "decoder", latents.half().numpy(), manifest)
        ev, why = "onnxruntime", None
    except Exception as err:
        ev, why = "onnx.reference", str(err).split("\n")[0][:300]
        out = stream_vae(d, "decoder", latents.half().numpy(), manifest, evaluator="reference")
    err = rel_err(np.clip(out.astype(np.float32), -1, 1), ref)
    _report("vae decoder fp16 (3 latent frames streamed)", err, ev, why)
    assert err < BOUND["float16"]
