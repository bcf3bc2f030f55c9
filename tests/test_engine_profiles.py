"""Optimization profiles and safe batches, against values worked out by hand.

Hand arithmetic used below (480x832, 109 frames, intervals [4,2,1]):
  latent 60 x 104; stages: 109 frames in 1 chunk, 218 in 2 chunks of 109,
  436 in 4 chunks of 109 -> every chunk (109-1)/4+1 = 28 latent frames;
  DiT tokens 28 * 30 * 52 = 43680.
  14B: FFN hidden 43680 * 13824 = 603,832,320 elements per item,
       (2^31 - 1) // 603,832,320 = 3.
  wan-1.3b: 43680 * 8960 = 391,372,800 -> 5.
  Guided DiT batches 2 (50 steps), 4 (32), 8 (32).
"""

from __future__ import annotations

import pytest
from export_helpers import MICRO, micro_models

from tempomaster.engines.profiles import build_profiles, call_counts, graph_profile, split_batch
from tempomaster.errors import ManifestError
from tempomaster.export.shapes import ExportShape, dit_elements_per_item, estimate_dit_max_batch
from tempomaster.models.presets import get_preset

SHAPE_480 = ExportShape(480, 832, 109, (4, 2, 1))


def _dit_entry(cfg, shape: ExportShape, max_batch: int, text_len: int = 512) -> dict:
    """dit.onnx's inputs as export/dit.py declares them (static frames)."""
    f = shape.dit_latent_frames()[0]
    h, w = shape.latent_height, shape.latent_width
    tokens = f * (h // 2) * (w // 2)
    half = cfg.head_dim // 2
    return {
        "max_batch": max_batch,
        "inputs": [
            {"name": "x", "dtype": "bfloat16", "shape": ["batch", 16, f, h, w]},
            {"name": "y", "dtype": "bfloat16", "shape": ["batch", 20, f, h, w]},
            {"name": "timestep", "dtype": "float32", "shape": [1]},
            {"name": "context", "dtype": "bfloat16", "shape": ["batch", text_len, cfg.text_dim]},
            {"name": "rope_cos", "dtype": "float32", "shape": ["batch", tokens, half]},
            {"name": "rope_sin", "dtype": "float32", "shape": ["batch", tokens, half]},
        ],
        "meta": {"latent_frames": [f], "dynamic_frames": False},
    }


def _batch_entry(inputs: dict[str, list], max_batch: int) -> dict:
    return {"max_batch": max_batch, "inputs": [{"name": n, "dtype": "bfloat16", "shape": s} for n, s in inputs.items()]}


def test_split_batch_as_the_runtime_does():
    assert split_batch(8, 3) == [3, 3, 2]
    assert split_batch(4, 3) == [3, 1]
    assert split_batch(2, 5) == [2]
    assert split_batch(7, 1) == [1] * 7


def test_stage_plan_of_the_release_shape():
    stages = SHAPE_480.as_dict()["stages"]
    assert [s["chunks"] for s in stages] == [1, 2, 4]
    assert [s["chunk_frames"] for s in stages] == [109, 109, 109]
    assert [s["latent_frames"] for s in stages] == [28, 28, 28]


def test_dit_safe_batch_14b_and_1_3b_by_hand():
    dit14 = get_preset("tempomaster-14b").dit
    sizes = dit_elements_per_item(dit14, SHAPE_480)
    assert sizes["tokens x ffn_dim"] == 43680 * 13824 == 603_832_320
    assert max(sizes.values()) == 603_832_320
    assert estimate_dit_max_batch(dit14, SHAPE_480) == 3
    assert estimate_dit_max_batch(get_preset("wan-1.3b").dit, SHAPE_480) == 5
    # tiny at its default 64x96, 17 frames: nothing near the limit -> the 1024 cap
    assert estimate_dit_max_batch(get_preset("tiny").dit, ExportShape.from_preset(get_preset("tiny"))) == 1024


def test_dit_safe_batch_estimate_matches_an_export(tmp_path):
    """The estimate equals `largest_batch` on a real dit.onnx where the limit bites.

    Micro DiT at 480x832, 109 frames: the largest tensor is [x | y],
    36 * 28 * 60 * 104 = 6,289,920 per item -> (2^31 - 1) // 6,289,920 = 341.
    """
    from tempomaster.export.build import export_onnx

    manifest = export_onnx(
        micro_models(), "fp32", SHAPE_480, tmp_path / "b", graphs=["dit"], progress=False, audit=False
    )
    assert manifest["graphs"]["dit"]["max_batch"] == 341
    assert estimate_dit_max_batch(MICRO.dit, SHAPE_480) == 341
    assert manifest["graphs"]["dit"]["largest_activation"]["elements_per_item"] == 36 * 28 * 60 * 104


def test_14b_profiles():
    cfg = get_preset("tempomaster-14b").dit
    shape = SHAPE_480.as_dict()
    dit = graph_profile(
        "dit", _dit_entry(cfg, SHAPE_480, estimate_dit_max_batch(cfg, SHAPE_480)), shape, steps_per_stage=(50, 32, 32)
    )
    # pieces: 2 -> [2] x50; 4 -> [3,1] x32; 8 -> [3,3,2] x32 => 1: 32, 2: 82, 3: 96
    assert dit.calls == {"1x28": 32, "2x28": 82, "3x28": 96}
    assert dit.batch == (1, 3, 3)
    assert dit.frames is None
    assert set(dit.shapes) == {"x", "y", "context", "rope_cos", "rope_sin"}  # timestep is static
    assert dit.shapes["x"] == ((1, 16, 28, 60, 104), (3, 16, 28, 60, 104), (3, 16, 28, 60, 104))
    assert dit.shapes["context"] == ((1, 512, 4096), (3, 512, 4096), (3, 512, 4096))
    assert dit.shapes["rope_cos"] == ((1, 43680, 64), (3, 43680, 64), (3, 43680, 64))

    # VAE encoder (safe batch 2 given here): a stage's 1, 2, 4 active chunks in one batch, 4 split into 2 + 2
    enc_in = {"frames": ["batch", 3, 4, 480, 832], "cache_in_00": ["batch", 96, 2, 480, 832]}
    enc_first = graph_profile("vae_encoder_first", _batch_entry(enc_in, 2), shape)
    assert enc_first.calls == {"1": 1, "2": 3} and enc_first.batch == (1, 2, 2)
    enc = graph_profile("vae_encoder", _batch_entry(enc_in, 2), shape)
    assert enc.calls == {"1": 27, "2": 3 * 27} and enc.batch == (1, 2, 2)  # 27 steps of 4 frames per chunk
    assert enc.shapes["cache_in_00"] == ((1, 96, 2, 480, 832), (2, 96, 2, 480, 832), (2, 96, 2, 480, 832))
    # VAE decoder: one chunk at a time, 1 + 2 + 4 chunks
    dec_in = {"latents": ["batch", 16, 1, 60, 104]}
    dec_first = graph_profile("vae_decoder_first", _batch_entry(dec_in, 2), shape)
    assert dec_first.calls == {"1": 7} and dec_first.batch == (1, 1, 1)  # one chunk at a time, 1+2+4 chunks
    dec = graph_profile("vae_decoder", _batch_entry(dec_in, 2), shape)
    assert dec.calls == {"1": 7 * 27} and dec.batch == (1, 1, 1)
    t5_in = {"ids": ["batch", 512], "mask": ["batch", 512]}
    assert graph_profile("t5", _batch_entry(t5_in, 127), shape).batch == (1, 2, 2)
    assert graph_profile("t5", _batch_entry(t5_in, 127), shape, guidance=False).batch == (1, 1, 1)


def test_wan_1_3b_profiles():
    cfg = get_preset("wan-1.3b").dit
    entry = _dit_entry(cfg, SHAPE_480, estimate_dit_max_batch(cfg, SHAPE_480))
    shape = SHAPE_480.as_dict()
    dit = graph_profile("dit", entry, shape, steps_per_stage=(50, 32, 32))
    # 2 x50, 4 x32, 8 -> [5, 3] x32
    assert dit.calls == {"2x28": 50, "3x28": 32, "4x28": 32, "5x28": 32}
    assert dit.batch == (1, 2, 5)
    assert dit.shapes["context"][2] == (5, 512, 4096)
    assert dit.shapes["rope_sin"][0] == (1, 43680, 64)  # head_dim 1536 / 12 = 128
    unguided = graph_profile("dit", entry, shape, guidance=False, steps_per_stage=(50, 32, 32))
    assert unguided.calls == {"1x28": 50, "2x28": 32, "4x28": 32} and unguided.batch == (1, 1, 4)


def test_tiny_profiles_from_the_manifest_defaults():
    """tiny at 64x96, 17 frames: latent 8x12, 5 latent frames, 120 tokens; preset steps 6, 4, 4."""
    preset = get_preset("tiny")
    s = ExportShape.from_preset(preset)
    t5_in = {"ids": ["batch", 512], "mask": ["batch", 512]}
    manifest = {
        "preset": "tiny",
        "shape": s.as_dict(),
        "graphs": {
            "dit": _dit_entry(preset.dit, s, estimate_dit_max_batch(preset.dit, s)),
            "t5": _batch_entry(t5_in, 1024),
        },
    }
    profiles = build_profiles(manifest)
    dit = profiles["dit"]
    assert dit.calls == {"2x5": 6, "4x5": 4, "8x5": 4}
    assert dit.batch == (1, 2, 8)  # max = the largest batch the plan sends, not the 1024 cap
    assert dit.shapes["x"] == ((1, 16, 5, 8, 12), (2, 16, 5, 8, 12), (8, 16, 5, 8, 12))
    assert dit.shapes["rope_cos"][2] == (8, 120, 16)  # head_dim 64 / 2 = 32 -> 16
    assert profiles["t5"].batch == (1, 2, 2)


def test_dynamic_frames_from_a_real_export(tmp_path):
    """9 frames at [2, 1]: stage 0 one chunk of 9 frames (3 latent), stage 1 four chunks of 5 (2 latent).

    The DiT gets a `frames` axis (rope tokens "6*frames": (4/2) * (6/2) = 6 per frame).
    Steps 10, 4: batch 2 with 3 frames x10, batch 8 with 2 frames x4.
    """
    from tempomaster.export.build import export_onnx

    shape = ExportShape(32, 48, 9, (2, 1))
    manifest = export_onnx(micro_models(), "fp32", shape, tmp_path / "b", graphs=["dit"], progress=False, audit=False)
    g = manifest["graphs"]["dit"]
    assert g["meta"]["dynamic_frames"] and g["meta"]["latent_frames"] == [2, 3]
    dit = build_profiles(manifest, steps_per_stage=(10, 4))["dit"]
    assert dit.calls == {"2x3": 10, "8x2": 4}
    assert dit.batch == (1, 2, 8) and dit.frames == (2, 3, 3)
    assert dit.shapes["x"] == ((1, 16, 2, 4, 6), (2, 16, 3, 4, 6), (8, 16, 3, 4, 6))
    assert dit.shapes["rope_cos"] == ((1, 12, 8), (2, 18, 8), (8, 18, 8))
    assert dit.shapes["context"] == ((1, 512, 16), (2, 512, 16), (8, 512, 16))


def test_padding_only_chunks_are_not_counted():
    """[2, 1] at 5 frames: stage 1 has 10 frames in 4 chunks of 5; chunks 2 and 3 are all padding.

    DiT (guided, steps 3, 2): batch 2 (one chunk) x3, batch 2 * 2 active chunks = 4 x2.
    Latent frames: 5 pixel frames -> 2 in both stages.
    """
    shape = ExportShape(32, 48, 5, (2, 1)).as_dict()
    assert shape["stages"][1]["chunks"] == 4
    assert call_counts("dit", shape, steps_per_stage=(3, 2)) == {(2, 2): 3, (4, 2): 2}
    assert call_counts("vae_encoder_first", shape) == {(1, None): 1, (2, None): 1}  # 1, then 2 active chunks batched
    assert call_counts("vae_encoder", shape) == {(1, None): 1, (2, None): 1}  # (5 - 1) / 4 = 1 step per stage
    assert call_counts("vae_decoder", shape) == {(1, None): 3}  # 2 latent frames: 1 step per chunk
    profile = graph_profile(
        "dit",
        {"max_batch": 1024, "inputs": [{"name": "x", "shape": ["batch", 16, 2, 4, 6]}]},
        shape,
        steps_per_stage=(3, 2),
    )
    assert profile.batch == (1, 2, 4)


def test_call_counts_and_unknown_axes():
    shape = SHAPE_480.as_dict()
    assert call_counts("dit", shape, steps_per_stage=(1, 1, 1)) == {(2, 28): 1, (4, 28): 1, (8, 28): 1}
    with pytest.raises(ValueError, match="one value per stage"):
        call_counts("dit", shape, steps_per_stage=(1, 1))
    entry = _batch_entry({"ids": ["batch", "seq"]}, 4)
    with pytest.raises(ManifestError, match="seq"):
        graph_profile("t5", entry, shape)


# ----------------------------------------------------------------------------
# Dimension expressions come from files: parsed, never eval'd
# ----------------------------------------------------------------------------


def _run_bounded(code: str, timeout: float = 60.0) -> str:
    """Run `code` in a fresh interpreter; a hang fails the test instead of stalling the suite."""
    import subprocess
    import sys

    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout:.0f}s: {code}")
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_a_huge_power_in_a_manifest_dimension_is_refused_at_once():
    out = _run_bounded(
        "import time\n"
        "from tempomaster.engines.profiles import eval_dim, graph_profile\n"
        "from tempomaster.errors import ManifestError\n"
        "t = time.perf_counter()\n"
        "for dim in ('batch*9**9**9', '2**2**40*batch', '__import__(\"os\").getpid()'):\n"
        "    try:\n"
        "        eval_dim(dim, {'batch': 2})\n"
        "    except ManifestError as err:\n"
        "        print('refused', err)\n"
        "seconds = time.perf_counter() - t  # the profile below imports the planner: not timed\n"
        "entry = {'max_batch': 4, 'inputs': [{'name': 'ids', 'shape': ['batch*9**9**9', 8]}]}\n"
        "shape = {'num_frames': 9, 'intervals': [4, 2, 1]}\n"
        "try:\n"
        "    graph_profile('t5', entry, shape)\n"
        "except ManifestError as err:\n"
        "    print('refused', err)\n"
        "print('seconds', seconds)\n"
    )
    lines = out.splitlines()
    assert sum(line.startswith("refused dimension") for line in lines) == 4, out
    assert float(lines[-1].split()[1]) < 1.0


def test_a_huge_power_in_an_onnx_dim_param_is_not_computed():
    """The export side reads dim_params of ONNX files (safe batch, FLOP count): same grammar, same bounds."""
    out = _run_bounded(
        "import onnx\n"
        "from onnx import TensorProto, helper\n"
        "from tempomaster.export.onnx_utils import _eval_dim, largest_batch\n"
        "x = helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', 8])\n"
        "y = helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch*9**9**9', 8])\n"
        "g = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g', [x], [y])\n"
        "batch, info = largest_batch(helper.make_model(g))\n"
        "print(batch, info.get('unsized_tensors'), _eval_dim('frames*9**9**9', {'frames': 3}))\n"
    )
    batch, unsized, value = out.split()
    assert int(batch) > 1 and unsized == "1" and value == "None"


@pytest.mark.parametrize(
    "dim, value",
    [
        ("batch", lambda b, f: b),
        ("2*batch", lambda b, f: 2 * b),
        ("4*batch", lambda b, f: 4 * b),
        ("6*frames", lambda b, f: 6 * f),
        ("120*frames", lambda b, f: 120 * f),
        ("batch*frames", lambda b, f: b * f),
        ("(frames - 1)//4 + 1", lambda b, f: (f - 1) // 4 + 1),
        ("-1 + 2*frames", lambda b, f: 2 * f - 1),
    ],
)
def test_the_dimensions_exports_write_still_evaluate(dim, value):
    import random

    from tempomaster.engines.profiles import eval_dim
    from tempomaster.export.onnx_utils import _eval_dim

    rng = random.Random()
    for _ in range(20):
        b, f = rng.randint(1, 1024), rng.randint(1, 200)
        assert eval_dim(dim, {"batch": b, "frames": f}) == value(b, f)
        assert _eval_dim(dim, {"batch": b, "frames": f}) == value(b, f)


@pytest.mark.parametrize(
    "dim", ["batch/2", "1.5", "batch if 1 else 2", "batch.real", "[batch][0]", "True", "9" * 30, "frames//0"]
)
def test_dimensions_outside_the_grammar_are_refused(dim):
    from tempomaster.engines.profiles import eval_dim

    with pytest.raises(ManifestError, match="dimension"):
        eval_dim(dim, {"batch": 3, "frames": 5})


def test_call_counts_are_what_the_runtime_sends(tiny_models):
    """The profiles' batch counts against a real tiny generation: the DiT's and the VAE encoder's batches per call."""
    from collections import Counter

    import torch

    from tempomaster.runtime.backends.base import BackendWrapper
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    class BatchLog(BackendWrapper):
        def __init__(self, inner):
            super().__init__(inner)
            self.dit, self.encode = Counter(), Counter()

        def velocity(self, x, *rest):
            self.dit[(x.shape[0], x.shape[2])] += 1
            return super().velocity(x, *rest)

        def vae_encode(self, video):
            self.encode[(video.shape[0], None)] += 1
            return super().vae_encode(video)

    steps = (2, 1, 1)
    shape = ExportShape(32, 48, 9, (4, 2, 1)).as_dict()
    backend = BatchLog(TorchBackend(tiny_models))
    request = GenerationRequest(
        prompt="a red ball", height=32, width=48, num_frames=9, steps_per_stage=steps, seed=torch.seed() % 2**31
    )
    generate(backend, tiny_models.tokenizer, request, progress=False)
    assert backend.dit == call_counts("dit", shape, steps_per_stage=steps)
    assert backend.encode == call_counts("vae_encoder_first", shape)  # one encode per stage, each with one _first call
