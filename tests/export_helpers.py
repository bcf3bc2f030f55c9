"""Shared, cached exports for tests/test_export_*.py.

Each build is made once per test session (lru_cache) from a "micro" model set:
the real architectures at the smallest sizes that keep every code path
(4 VAE levels for 8x/4x compression, 1 DiT and 1 T5 block), because
torch.onnx's dynamo export costs time per traced op, not per FLOP.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from tempomaster.models.presets import DiTConfig, GenerationDefaults, Preset, T5Config, VAEConfig

MICRO = Preset(
    name="micro",
    dit=DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=16),
    vae=VAEConfig(dim=4, num_res_blocks=1),
    t5=T5Config(vocab_size=64, dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=1),
    defaults=GenerationDefaults(height=32, width=48, num_frames=9, steps_per_stage=(2, 2, 2)),
    builtin_weights=True,
)

_ROOT = Path(tempfile.mkdtemp(prefix="tm-export-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.cache
def micro_models():
    from tempomaster.models.checkpoints import ModelSet
    from tempomaster.models.dit import WanDiT
    from tempomaster.models.t5 import UMT5Encoder
    from tempomaster.models.vae import WanVAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        dit = WanDiT(MICRO.dit).eval()
        vae = WanVAE(MICRO.vae).eval()
        t5 = UMT5Encoder(MICRO.t5).eval()
        with torch.no_grad():
            # non-trivial norm weights and a VAE whose outputs are O(1)
            for m in (dit, vae, t5):
                for name, p in m.named_parameters():
                    if "norm" in name or "gamma" in name:
                        p.copy_(1 + 0.1 * torch.randn_like(p))
    return ModelSet(preset=MICRO, dit=dit, vae=vae, t5=t5, tokenizer=None)


def micro_shape():
    from tempomaster.export.shapes import ExportShape

    return ExportShape.from_preset(MICRO)


@functools.cache
def build(precision: str = "fp32", graphs: tuple[str, ...] | None = None) -> Path:
    """A build directory of the micro set (cached; treat as read-only: copy before tampering)."""
    from tempomaster.export.build import export_onnx

    name = f"{precision}-{'all' if graphs is None else '-'.join(graphs)}"
    out = _ROOT / name
    export_onnx(micro_models(), precision, micro_shape(), out, graphs=graphs, progress=False, copy=True)
    return out


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def session(path, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def rel_err(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def np_of(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def run_graph(path, feeds: dict, evaluator: str = "ort"):
    """Run a graph with onnxruntime ("ort") or onnx's reference evaluator ("reference")."""
    if evaluator == "ort":
        return session(path).run(None, feeds)
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(None, feeds)


# -- streaming the VAE step graphs ---------------------------------------------


def stream_vae(build_dir: Path, direction: str, x: np.ndarray, manifest: dict, evaluator: str = "ort") -> np.ndarray:
    """Chain `vae_{direction}_first` and `vae_{direction}` over a clip with explicit caches."""
    first_g = manifest["graphs"][f"vae_{direction}_first"]
    rest_g = manifest["graphs"][f"vae_{direction}"]
    runners = {}
    for g in (first_g, rest_g):
        path = build_dir / g["file"]
        if evaluator == "ort":
            s = session(path)
            runners[g["file"]] = lambda feeds, s=s: s.run(None, feeds)
        else:
            from onnx.reference import ReferenceEvaluator

            ev = ReferenceEvaluator(str(path))
            runners[g["file"]] = lambda feeds, ev=ev: ev.run(None, feeds)
    b = x.shape[0]
    caches = {}
    for c in first_g["meta"]["caches"]:
        shape = [b if d == "batch" else d for d in c["shape"]]
        caches[c["input"]] = np.zeros(shape, dtype=x.dtype)
    main_in = first_g["inputs"][0]["name"]
    step_in = rest_g["meta"]["in_frames"]
    t = x.shape[2]
    chunks = [x[:, :, :1]] + [x[:, :, i : i + step_in] for i in range(1, t, step_in)]
    outs = []
    for k, chunk in enumerate(chunks):
        g = first_g if k == 0 else rest_g
        res = runners[g["file"]]({main_in: np.ascontiguousarray(chunk), **caches})
        names = [o["name"] for o in g["outputs"]]
        res = dict(zip(names, res))
        outs.append(res[names[0]])
        caches = {c["input"]: res[c["output"]] for c in g["meta"]["caches"]}
    return np.concatenate(outs, axis=2)
