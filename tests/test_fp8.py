"""FP8: calibration on the generation trajectory, Q/DQ DiT graphs, their numerics, refusals.

References are independent of the code under test: ml_dtypes' float8_e4m3fn
rounding for the fake quantization, a torch DiT fake-quantized by hooks and
weight replacement (not `FP8Linear`) for the graphs, hooks of the test's own
for the recorded amax.
"""

import json

import ml_dtypes
import numpy as np
import pytest
import torch

from tempomaster.errors import UsageError
from tempomaster.export.dit import dit_example_inputs
from tempomaster.export.shapes import ExportShape

pytestmark = pytest.mark.filterwarnings("ignore")

SHAPE = ExportShape(height=32, width=48, num_frames=9, intervals=(4, 2, 1))
DIT_INPUTS = ["x", "y", "timestep", "context", "rope_cos", "rope_sin"]
LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


# ----------------------------------------------------------------------------
# Fixtures: one calibration and two DiT-only fp8 builds per module
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(d / "ref.png")
    (d / "prompts.txt").write_text(
        "# calibration prompts\n\na red fox in the snow\n0:ref.png|a cat jumps onto the sofa\nclouds | over the sea\n",
        encoding="utf-8",
    )
    return d / "prompts.txt"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_models, prompt_file):
    from tempomaster.calibration import calibrate

    out = tmp_path_factory.mktemp("fp8") / "build"
    cal = calibrate(
        tiny_models,
        SHAPE,
        out,
        prompts=prompt_file,
        calib_steps=2,
        seed=5,
        report=True,
        report_prompts=1,
        progress=False,
        log=None,
    )
    return out, cal


def _fp8_build(tmp_path_factory, tiny_models, calibrated, **kw):
    from tempomaster.calibration import export_fp8_onnx

    build_dir, cal = calibrated
    out = tmp_path_factory.mktemp("fp8b") / "b"
    manifest = export_fp8_onnx(
        tiny_models, SHAPE, out, calibration=cal.path, graphs=["dit"], progress=False, log=None, **kw
    )
    return out, manifest


@pytest.fixture(scope="module")
def twin_build(tmp_path_factory, tiny_models, calibrated):
    return _fp8_build(tmp_path_factory, tiny_models, calibrated, twin=True, attention=True)


@pytest.fixture(scope="module")
def bf16_build(tmp_path_factory, tiny_models, calibrated):
    return _fp8_build(tmp_path_factory, tiny_models, calibrated, base="bf16", attention=True)


@pytest.fixture(scope="module")
def plain_dit(tmp_path_factory, tiny_models):
    """The same DiT exported unquantized in bf16 (DiT graph only): the size and FLOP reference."""
    from tempomaster.export.build import export_onnx

    out = tmp_path_factory.mktemp("bf16") / "b"
    return out, export_onnx(
        tiny_models, "bf16", SHAPE, out, graphs=["dit"], preset_name="tiny", progress=False, copy=True
    )


# ----------------------------------------------------------------------------
# Fake quantization against ml_dtypes
# ----------------------------------------------------------------------------


def _e4m3_reference(x: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear(saturate=1) to FLOAT8E4M3FN then back, through ml_dtypes."""
    return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def test_fake_quant_matches_ml_dtypes_and_saturates():
    from tempomaster.calibration.fp8 import fake_quant, scale_from_amax

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, generator=g) * 3
    x[:5] = torch.tensor([1e6, -1e6, 500.0 * 0.02, 0.0, 1e-9])  # beyond range, at range, tiny
    scale = scale_from_amax(x[5:].abs().max(), torch.float32)
    out = fake_quant(x, scale).double().numpy()
    ref = _e4m3_reference((x / scale).numpy().astype(np.float32)) * float(scale)
    assert np.array_equal(out, ref.astype(np.float32).astype(np.float64))
    assert out[0] == pytest.approx(448 * float(scale)) and out[1] == pytest.approx(-448 * float(scale))
    assert len(np.unique(out[5:] / float(scale))) <= 253  # on the FP8 grid: at most 253 finite values


def test_quantize_weight_transposed_per_channel():
    from tempomaster.calibration.fp8 import dequantize_weight, quantize_weight, scale_from_amax

    g = torch.Generator().manual_seed(4)
    w = torch.randn(37, 20, generator=g) * torch.linspace(0.1, 5, 37)[:, None]
    s = scale_from_amax(w.abs().amax(1), torch.float32)
    w8 = quantize_weight(w, s, rows=8)  # several slabs
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (20, 37)
    ref = _e4m3_reference((w / s[:, None]).numpy()).T.astype(np.float32) * s.numpy()[None, :]
    assert np.array_equal(dequantize_weight(w8, s, torch.float32).numpy(), ref)
    # each output channel uses its range: its largest weight lands on 448
    assert torch.allclose(w8.float().abs().amax(0), torch.full((37,), 448.0))


def test_calib_steps():
    from tempomaster.calibration.collect import resolve_steps
    from tempomaster.models.presets import get_preset

    tiny = get_preset("tiny")
    assert resolve_steps(None, tiny, 3) == (6, 4, 4)
    assert resolve_steps(2, tiny, 3) == (2, 2, 2)
    assert resolve_steps([3, 2, 1], tiny, 3) == (3, 2, 1)
    with pytest.raises(UsageError, match="--calib-steps"):
        resolve_steps([3, 2], tiny, 3)
    with pytest.raises(UsageError, match="--calib-steps"):
        resolve_steps(0, tiny, 3)


def test_skip_blocks_parsing():
    from tempomaster.calibration.fp8 import parse_skip_blocks

    assert parse_skip_blocks("0,2-3,-1", 30) == (0, 2, 3, 29)
    assert parse_skip_blocks([1, -2], 4) == (1, 2)
    with pytest.raises(UsageError, match="--fp8-skip-blocks: block 30 does not exist"):
        parse_skip_blocks("30", 30)
    with pytest.raises(UsageError, match="--fp8-skip-blocks"):
        parse_skip_blocks("a", 30)


# ----------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------


def test_prompt_file_format(prompt_file, tmp_path):
    from tempomaster.calibration.prompts import BUILTIN_PROMPTS, HELD_OUT_PROMPTS, read_prompt_file

    prompts = read_prompt_file(prompt_file)
    assert [p.prompt for p in prompts] == [
        "a red fox in the snow",
        "a cat jumps onto the sofa",
        "clouds | over the sea",
    ]
    assert prompts[1].images == {0: prompt_file.parent / "ref.png"} and prompts[0].images == {}
    assert len(set(BUILTIN_PROMPTS)) >= 32 and not set(BUILTIN_PROMPTS) & set(HELD_OUT_PROMPTS)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"--calib-prompts .*empty.txt: no prompts"):
        read_prompt_file(empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("3:missing.png|a dog\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"bad.txt:1: reference image .*missing.png not found"):
        read_prompt_file(bad)


# ----------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------


def test_calibration_file(calibrated, tiny_models):
    build_dir, cal = calibrated
    data = json.loads((build_dir / "calibration" / "amax.json").read_text())
    assert data["preset"] == "tiny" and data["seed"] == 5
    assert data["shape"] == {"height": 32, "width": 48, "num_frames": 9, "intervals": [4, 2, 1]}
    assert data["settings"]["steps_per_stage"] == [2, 2, 2] and data["settings"]["calib_steps"] == 2
    assert data["dit_calls"] == 3 * 6
    assert data["prompts"][0] == {"prompt": "a red fox in the snow", "images": {}}
    assert list(data["prompts"][1]["images"]) == ["0"] and data["prompts"][1]["images"]["0"].endswith("ref.png")
    names = [f"blocks.{b}.{n}" for b in range(2) for n in LINEARS]
    assert sorted(data["layers"]) == sorted(names)
    modules = dict(tiny_models.dit.named_modules())
    for n in names:
        rec = data["layers"][n]
        assert len(rec["input_amax_per_stage"]) == 3 and min(rec["input_amax_per_stage"]) > 0
        assert rec["input_amax"] == max(rec["input_amax_per_stage"])
        assert rec["weight_amax"] == pytest.approx(float(modules[n].weight.abs().max()), rel=1e-7)
    # q, k, v of self-attention read the same tensor
    q, v = data["layers"]["blocks.1.self_attn.q"], data["layers"]["blocks.1.self_attn.v"]
    assert q["input_amax_per_stage"] == v["input_amax_per_stage"]
    per_channel = cal.per_channel()
    assert torch.equal(per_channel["blocks.0.ffn.0"], modules["blocks.0.ffn.0"].weight.abs().amax(1).float())


def test_amax_against_own_hooks(tmp_path, tiny_models):
    """One video recorded by calibrate equals the per-stage maxima seen by independent hooks."""
    from tempomaster.calibration import calibrate
    from tempomaster.calibration.collect import make_request
    from tempomaster.calibration.prompts import CalibrationPrompt
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import generate

    cal = calibrate(
        tiny_models,
        SHAPE,
        tmp_path,
        prompts=["a boat on a lake"],
        calib_steps=[1, 2, 1],
        seed=9,
        report=False,
        progress=False,
        log=None,
    )
    seen = {"blocks.1.ffn.2": [], "blocks.0.cross_attn.k": []}
    calls = []
    modules = dict(tiny_models.dit.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].abs().max().item())) for n in seen
    ]
    # what attention reads: v of block 1's self-attention, k of block 0's cross-attention,
    # and q, k of block 0's self-attention as FP8 attention quantizes them (k less its token mean, rotated)
    attention_seen = {("blocks.1.self_attn", 2): [], ("blocks.0.cross_attn", 1): []}
    handles += [
        modules[f"{n}.attn"].register_forward_hook(
            lambda m, a, o, key=(n, i): attention_seen[key].append(a[key[1]].abs().max().item())
        )
        for n, i in attention_seen
    ]
    h_q, h_k = _hadamard_pair(tiny_models.dit.cfg.head_dim)
    rotated_seen = {"q": [], "k": []}

    def rotated_hook(m, a, o):
        q, k = a[0].double(), a[1].double()
        rotated_seen["q"].append(float((q @ h_q).abs().max()))
        rotated_seen["k"].append(float(((k - k.mean(1, keepdim=True)) @ h_k).abs().max()))

    handles.append(modules["blocks.0.self_attn.attn"].register_forward_hook(rotated_hook))
    backend = TorchBackend(tiny_models)
    original = backend.velocity
    backend.velocity = lambda *a: (calls.append(a[0].shape[0]), original(*a))[1]
    try:
        request = make_request(CalibrationPrompt("a boat on a lake"), SHAPE, tiny_models.preset, (1, 2, 1), 9)
        generate(backend, tiny_models.tokenizer, request, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 4 and all(b % 2 == 0 for b in calls)  # cond + uncond in every call
    bounds = [(0, 1), (1, 3), (3, 4)]
    for n, values in seen.items():
        want = [max(values[a:b]) for a, b in bounds]
        assert cal.layers[n]["input_amax_per_stage"] == pytest.approx(want, rel=0, abs=0)
    for (n, i), values in attention_seen.items():
        want = [max(values[a:b]) for a, b in bounds]
        rec = cal.data["attention"][n]
        assert rec[f"{'qkv'[i]}_amax_per_stage"] == pytest.approx(want, rel=0, abs=0)
        assert rec[f"{'qkv'[i]}_amax"] == max(want)
    for which, values in rotated_seen.items():
        want = [max(values[a:b]) for a, b in bounds]
        got = cal.data["attention"]["blocks.0.self_attn"][f"{which}_rotated_amax_per_stage"]
        assert got == pytest.approx(want, rel=1e-5)


def test_quality_report(calibrated):
    from tempomaster.calibration.report import format_report

    build_dir, cal = calibrated
    report = json.loads((build_dir / "calibration" / "report.json").read_text())
    assert report["prompts"] and not set(report["prompts"]) & {p["prompt"] for p in cal.data["prompts"]}
    assert sorted(report["variants"]) == ["all_fp8", "all_stages", "stage0_only"]
    for k in ("all_stages", "stage0_only", "all_fp8"):
        v = report["variants"][k]
        assert [len(s) for s in v["velocity_rel_error"]] == [2, 2, 2]
        errs = [e["mean"] for s in v["velocity_rel_error"] for e in s]
        # FP8 changes the velocity, by about 2^-4 per element at most
        assert all(1e-4 < e < 0.05 for e in errs)
        assert 25 < v["psnr_db_min"] < 100
    text = format_report(report)
    assert "stage 0 only" in text and "all FP8" in text and len(text.splitlines()) == 3 + 6 + 5
    # quantizing attention too moves the velocity further than the Linears alone
    assert (
        report["variants"]["all_fp8"]["velocity_rel_error_mean"]
        > report["variants"]["all_stages"]["velocity_rel_error_mean"]
    )


# ----------------------------------------------------------------------------
# Graphs
# ----------------------------------------------------------------------------


def _quantized_matmuls(path):
    """layer -> {weight fp8 bytes, weight scale, input scale, scale dtype} read from the graph alone."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def const(name):
        return numpy_helper.to_array(inits[name])

    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        a, b = (producer.get(i) for i in node.input)
        if b is None or b.op_type != "DequantizeLinear" or b.input[0] not in inits:
            continue
        w = inits[b.input[0]]
        assert w.data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert a is not None and a.op_type == "DequantizeLinear"
        q = producer[a.input[0]]
        assert q.op_type == "QuantizeLinear" and q.input[1] == a.input[1]
        assert inits[q.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
        layer = b.input[0].removeprefix("dit.").removesuffix(".weight_t8")
        found[layer] = {
            "weight": numpy_helper.to_array(w).view(np.uint8).tobytes(),
            "weight_shape": list(w.dims),
            "weight_scale": float(const(b.input[1]).astype(np.float64)),
            "input_scale": float(const(a.input[1]).astype(np.float64)),
            "scale_dtype": inits[b.input[1]].data_type,
            "input_scale_dtype": inits[a.input[1]].data_type,
        }
    return model, found


def test_bf16_graph_and_twin_quantize_the_same_layers(bf16_build, twin_build, calibrated):
    import onnx

    _, cal = calibrated
    _, bf = _quantized_matmuls(bf16_build[0] / "onnx" / "dit.onnx")
    model, tw = _quantized_matmuls(twin_build[0] / "onnx" / "dit.onnx")
    names = [f"blocks.{b}.{n}" for b in range(2) for n in LINEARS]
    assert sorted(bf) == sorted(tw) == sorted(names)
    for n in names:
        rec = cal.layers[n]
        assert bf[n]["weight"] == tw[n]["weight"], n  # the same FP8 bytes
        assert bf[n]["scale_dtype"] == bf[n]["input_scale_dtype"] == onnx.TensorProto.BFLOAT16
        assert tw[n]["scale_dtype"] == tw[n]["input_scale_dtype"] == onnx.TensorProto.FLOAT
        for key, amax in (("weight_scale", rec["weight_amax"]), ("input_scale", rec["input_amax"])):
            # amax / 448 rounded to bf16 in both (the twin stores the bf16 value in fp32)
            want = float(torch.tensor(np.float32(amax) / np.float32(448)).to(torch.bfloat16))
            assert tw[n][key] == bf[n][key] == want, (n, key)
    # nothing else is quantized and no high-precision copy of a quantized weight is left
    assert sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN) == len(names) + 1
    inits = {i.name for i in model.graph.initializer}
    assert not [n for n in names if f"dit.{n}.weight" in inits]
    plain = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    # + text embedding (2), time embedding/projection (3 Gemm), head, and the q and k rotations of 2 self-attentions
    assert len(plain) == len(names) + 2 + 3 + 1 + 2 * 2


def test_fp8_weights_hold_one_byte(bf16_build, tiny_models):
    import onnx

    man = bf16_build[1]
    model = onnx.load(str(bf16_build[0] / "onnx" / "dit.onnx"))
    fp8_bytes = sum(len(i.raw_data) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN)
    modules = dict(tiny_models.dit.named_modules())
    quant_params = sum(modules[f"blocks.{b}.{n}"].weight.numel() for b in range(2) for n in LINEARS)
    assert fp8_bytes == quant_params + 1  # + the zero point
    total_params = sum(p.numel() for p in tiny_models.dit.parameters())
    # every other parameter in bf16 (2 bytes; equal norm weights may be stored once), plus 40 scalar scales
    # of the Linears and 6 of the self-attentions at most, and the q and k rotations (head_dim^2 bf16 each;
    # the same in every attention, so stored once or once per self-attention)
    rotations = 2 * 2 * tiny_models.dit.cfg.head_dim**2
    rest = 2 * (total_params - quant_params)
    low = quant_params + rest - 2 * 8 * 64 + rotations
    assert low <= man["graphs"]["dit"]["weight_bytes"] <= quant_params + rest + 2 * 46 + 1 + 2 * rotations


def test_self_attention_reads_fp8_qkv(bf16_build, calibrated, plain_dit):
    """Every self-attention's Attention node reads q, k, v through Q/DQ at the calibrated scales;
    cross-attention stays unquantized by default; the DiT file is well under the bf16 one's size."""
    import onnx
    from onnx import numpy_helper

    _, cal = calibrated
    model = onnx.load(str(bf16_build[0] / "onnx" / "dit.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2 * 2  # self and cross, two blocks
    quantized = {}
    for node in attention:
        feeding = [producer[i] for i in node.input[:3]]
        if all(f.op_type != "DequantizeLinear" for f in feeding):
            continue  # a cross-attention (off by default)
        for f, which in zip(feeding, "qkv"):
            assert f.op_type == "DequantizeLinear"
            q = producer[f.input[0]]
            assert q.op_type == "QuantizeLinear" and q.input[1] == f.input[1]
            assert inits[q.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
            scale = inits[f.input[1]]
            assert scale.data_type == onnx.TensorProto.BFLOAT16 and list(scale.dims) == []
            module = _attention_module(node)
            # q and k: rotated by a constant Hadamard factor (k first less its token mean), quantized at that amax
            amax = cal.data["attention"][module][f"{which}_rotated_amax" if which in "qk" else "v_amax"]
            if which in "qk":
                rotation = producer[q.input[0]]
                assert rotation.op_type == "MatMul" and rotation.input[1] in inits
                h = numpy_helper.to_array(inits[rotation.input[1]]).astype(np.float64)
                want = _hadamard_pair(h.shape[0])["qk".index(which)].numpy()
                assert np.array_equal(h, want), which
                if which == "k":
                    sub = producer[rotation.input[0]]
                    assert sub.op_type == "Sub" and producer[sub.input[1]].op_type == "ReduceMean"
                    assert producer[sub.input[1]].input[0] == sub.input[0]
            assert float(numpy_helper.to_array(scale).astype(np.float64)) == float(_bf16_scale(amax))
            quantized.setdefault(module, []).append(which)
    assert quantized == {f"blocks.{b}.self_attn": ["q", "k", "v"] for b in range(2)}
    assert bf16_build[1]["fp8"]["attention"]["self"] and not bf16_build[1]["fp8"]["attention"]["cross"]
    # every block Linear still reads an FP8 weight
    fp8_weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    assert {f"dit.blocks.{b}.{n}.weight_t8" for b in range(2) for n in LINEARS} <= fp8_weights
    ratio = bf16_build[1]["graphs"]["dit"]["weight_bytes"] / plain_dit[1]["graphs"]["dit"]["weight_bytes"]
    print(f"fp8 / bf16 DiT weight bytes: {ratio:.3f}")
    assert ratio < 0.9


def _drop_attention(amax: dict) -> None:
    del amax["attention"]


def _drop_rotated(amax: dict) -> None:
    for rec in amax["attention"].values():
        for key in [k for k in rec if k.startswith(("q_rotated", "k_rotated"))]:
            del rec[key]


@pytest.mark.parametrize(
    "strip, message",
    [
        # from before FP8 attention: refused unless --fp8-attention off
        (_drop_attention, r"old/amax.json: no \"attention\" section .* --fp8-attention off$"),
        # from before the q/k rotation: refused, naming the attention
        (_drop_rotated, r"old/amax.json: no amax of the rotated q and k for blocks.0.self_attn .*"),
    ],
)
def test_calibration_without_attention_amax_refused(calibrated, tiny_models, tmp_path, strip, message):
    """An amax.json older than the FP8 attention it is asked for: one line, nothing written."""
    from tempomaster.calibration import export_fp8_onnx

    _, cal = calibrated
    old = json.loads(cal.path.read_text())
    strip(old)
    path = tmp_path / "old" / "amax.json"
    path.parent.mkdir()
    path.write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        export_fp8_onnx(
            tiny_models,
            SHAPE,
            tmp_path / "b",
            calibration=path,
            graphs=["dit"],
            attention=True,
            progress=False,
            log=None,
        )
    assert not (tmp_path / "b").exists()


def _bf16_scale(amax):
    return torch.tensor(np.float32(amax) / np.float32(448)).to(torch.bfloat16).float()


def _attention_module(node) -> str:
    """ "blocks.N.self_attn" of an exported Attention node, read off the exporter's module namespace."""
    import re

    namespace = next(p.value for p in node.metadata_props if p.key == "namespace")
    return re.findall(r"dit\.(blocks\.\d+\.(?:self|cross)_attn)\b", namespace)[-1]


def _ort_with_codes(path, feeds):
    """Run a graph with onnxruntime, also returning every QuantizeLinear's FP8 output by what it feeds.

    Keys: the Linear ("blocks.0.ffn.0", named by the weight its MatMul reads;
    one Q/DQ may feed several) or the attention input ("blocks.0.self_attn:q",
    named by the Attention node's module and input position; not by its
    scale, which the exporter may share between attentions whose bf16 scales
    are equal).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in nodes for o in n.output}
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    layers_of = []
    for q in qs:
        names = []
        for dq in consumers[q.output[0]]:
            for user in consumers[dq.output[0]]:
                if user.op_type == "MatMul":
                    w = producer[user.input[1]].input[0]
                    names.append(w.removeprefix("dit.").removesuffix(".weight_t8"))
                else:
                    assert user.op_type == "Attention", user.op_type
                    which = "qkv"[list(user.input[:3]).index(dq.output[0])]
                    names.append(f"{_attention_module(user)}:{which}")
        layers_of.append(names)
        model.graph.output.append(onnx.helper.make_tensor_value_info(q.output[0], onnx.TensorProto.FLOAT8E4M3FN, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    codes = {}
    for names, raw in zip(layers_of, outs[1:]):
        value = np.asarray(raw).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        for n in names:
            codes[n] = value
    return outs[0], codes


def _hook_fake_quant_dit(dit, layers, skip=(), per_channel=None, ort_codes=None, flips=None, attention=None):
    """An independent torch reference: weights replaced by their FP8 round trip, inputs by pre-hooks.

    Scales are amax / 448 rounded to bf16, what the bf16 graph stores and its twin copies.
    With `ort_codes` (layer -> FP8 activation values onnxruntime computed), an
    element whose FP8 value differs is accepted only at a rounding tie: the
    torch value x / s lies within 1e-4 (relative) + 2e-4 (absolute, a tenth of
    the finest FP8 step) of the midpoint between the two FP8 values, where
    float32 noise upstream decides the rounding. The
    reference then takes onnxruntime's value there, so that one tie does not
    hide (or fake) agreement everywhere downstream; `flips` counts them.
    `attention` ("blocks.N.self_attn" -> {"q", "k", "v"} amax, q and k those of
    the rotated tensors) fake-quantizes those attentions' inputs the same way,
    by a pre-hook on their attention module that also smooths and rotates q
    and k first (`_hadamard_pair`; the unquantized attention of the rotated
    q, k is the original one).
    """
    import copy

    ref = copy.deepcopy(dit).float().eval()
    modules = dict(ref.named_modules())
    for name, rec in layers.items():
        if int(name.split(".")[1]) in skip:
            continue
        m = modules[name]
        if per_channel is not None:
            s_w = (per_channel[name] / 448).to(torch.bfloat16).float()[:, None]
        else:
            s_w = _bf16_scale(rec["weight_amax"])
        s_x = _bf16_scale(rec["input_amax"])
        with torch.no_grad():
            m.weight.copy_((m.weight / s_w).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s_w)

        def pre_hook(mod, args, s=s_x, name=name):
            return (fake(args[0], s, name),)

        m.register_forward_pre_hook(pre_hook)

    def fake(x, s, name, heads_first=False):
        # heads_first: the graph quantizes attention inputs as [B, heads, L, dim]
        t = (x.float() / s).clamp(-448, 448)
        q = t.to(torch.float8_e4m3fn).float()
        if ort_codes is not None:
            code = torch.from_numpy(ort_codes[name])
            other = code.transpose(1, 2) if heads_first else code.reshape(q.shape)
            differ = q != other
            if differ.any():
                mid = (q[differ] + other[differ]) / 2
                near_tie = (t[differ] - mid).abs() <= 1e-4 * mid.abs() + 2e-4
                assert bool(near_tie.all()), (
                    f"{name}: FP8 values differ away from a rounding tie: x/s {t[differ][~near_tie][:4].tolist()}, "
                    f"torch {q[differ][~near_tie][:4].tolist()}, onnxruntime {other[differ][~near_tie][:4].tolist()}"
                )
                flips.append(int(differ.sum()))
                q = torch.where(differ, other, q)
        return q * s

    for name, amax in (attention or {}).items():
        if int(name.split(".")[1]) in skip:
            continue
        scales = {w: _bf16_scale(amax[w]) for w in "qkv"}
        h_q, h_k = _hadamard_pair(dit.cfg.head_dim)

        def attention_hook(mod, args, scales=scales, name=name, h_q=h_q.float(), h_k=h_k.float()):
            q, k, v = args  # [B, L, heads, head_dim]
            q, k = q @ h_q, (k - k.mean(1, keepdim=True)) @ h_k
            return tuple(fake(t, scales[w], f"{name}:{w}", heads_first=True) for t, w in zip((q, k, v), "qkv"))

        modules[f"{name}.attn"].register_forward_pre_hook(attention_hook)
    return ref


def _hadamard_pair(n):
    """(H_q, H_k) float64 by Kronecker products: +-1 Hadamard scaled so that H_q @ H_k.T is the identity."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    log2 = int(np.log2(n))
    return torch.from_numpy(h / 2 ** ((log2 + 1) // 2)), torch.from_numpy(h / 2 ** (log2 // 2))


def _attention_amax(cal, *kinds):
    """The calibration's amax of what the attentions of `kinds` quantize (rotated q, k; v), read off amax.json."""
    return {
        name: {"q": rec["q_rotated_amax"], "k": rec["k_rotated_amax"], "v": rec["v_amax"]}
        for name, rec in cal.data["attention"].items()
        if name.rsplit(".", 1)[1] in kinds
    }


def _check_twin(path, dit, layers, args, per_channel=None, skip=(), attention=None):
    """Relative error of the graph against the torch reference (ties aligned), and the flips seen."""
    feeds = {n: a.numpy() for n, a in zip(DIT_INPUTS, args)}
    out, codes = _ort_with_codes(path, feeds)
    flips = []
    ref = _hook_fake_quant_dit(dit, layers, skip, per_channel, codes, flips, attention)
    with torch.no_grad():
        want = ref(*args).double().numpy()
    return np.linalg.norm(out - want) / np.linalg.norm(want), flips, out


def test_twin_matches_torch_fake_quant(twin_build, calibrated, tiny_models):
    _, cal = calibrated
    cfg = tiny_models.dit.cfg
    frames = twin_build[1]["graphs"]["dit"]["meta"]["latent_frames"][0]
    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # fresh inputs on every run, seed printed on failure
    for batch in (1, 4):
        args = dit_example_inputs(
            cfg,
            batch,
            frames,
            SHAPE.latent_height,
            SHAPE.latent_width,
            torch.float32,
            generator=torch.Generator().manual_seed(seed + batch),
            timestep=float(seed % 1000),
        )
        err, flips, out = _check_twin(
            twin_build[0] / "onnx" / "dit.onnx",
            tiny_models.dit,
            cal.layers,
            args,
            attention=_attention_amax(cal, "self_attn"),
        )
        print(f"batch {batch}: rel err {err:.2e}, {sum(flips)} tie flip(s) (seed {seed})")
        assert err < 1e-5, (seed, batch, err)
        with torch.no_grad():
            unquantized = tiny_models.dit(*args).double().numpy()
        # and the quantization is there: the unquantized DiT is far further away
        assert np.linalg.norm(out - unquantized) / np.linalg.norm(unquantized) > 100 * err


def test_skip_blocks_and_channel_scales(tmp_path_factory, tiny_models, calibrated):
    import shutil

    import onnx

    from tempomaster.calibration import export_fp8_onnx
    from tempomaster.engines.manifest import sha256_file

    build_dir, cal = calibrated
    # `tm-export calibrate --out B` then `tm-export build --precision fp8 --no-calibrate --out B`
    out = tmp_path_factory.mktemp("fp8c") / "b"
    shutil.copytree(build_dir / "calibration", out / "calibration")
    man = export_fp8_onnx(
        tiny_models,
        SHAPE,
        out,
        calibrate_now=False,
        graphs=["dit"],
        twin=True,
        skip_blocks="1",
        weight_scale="channel",
        attention=True,
        cross_attention=True,
        progress=False,
        log=None,
    )
    assert man["fp8"]["skip_blocks"] == [1] and man["fp8"]["weight_scale"] == "channel"
    assert man["fp8"]["attention"]["quantized"] == ["blocks.0.self_attn", "blocks.0.cross_attn"]
    assert man["files"]["calibration/amax.json"]["sha256"] == sha256_file(cal.path)
    assert (
        man["fp8"]["twin"]
        and man["fp8"]["twin_of"] == "bf16"
        and man["graphs"]["dit"]["inputs"][0]["dtype"] == "float32"
    )
    model = onnx.load(str(out / "onnx" / "dit.onnx"))
    fp8 = [
        i.name
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and "weight_t8" in i.name
    ]
    assert sorted(fp8) == sorted(f"dit.blocks.0.{n}.weight_t8" for n in LINEARS)
    per_channel = cal.per_channel()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("weight_t8"):
            scale = next(i for i in model.graph.initializer if i.name == node.input[1])
            layer = node.input[0].removeprefix("dit.").removesuffix(".weight_t8")
            assert list(scale.dims) == [per_channel[layer].numel()]
            assert [a.i for a in node.attribute if a.name == "axis"] == [1]
    # numerics: block 1 in fp32, block 0 per-channel FP8
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    args = dit_example_inputs(
        tiny_models.dit.cfg,
        2,
        man["graphs"]["dit"]["meta"]["latent_frames"][0],
        SHAPE.latent_height,
        SHAPE.latent_width,
        torch.float32,
        generator=torch.Generator().manual_seed(seed),
    )
    err, flips, _ = _check_twin(
        out / "onnx" / "dit.onnx",
        tiny_models.dit,
        cal.layers,
        args,
        per_channel,
        skip=(1,),
        attention=_attention_amax(cal, "self_attn", "cross_attn"),
    )
    assert err < 1e-5, (seed, err)


# ----------------------------------------------------------------------------
# Manifest and refusals
# ----------------------------------------------------------------------------


def test_manifest_records_fp8(bf16_build, calibrated):
    from tempomaster.engines.manifest import sha256_file, verify_build

    out, man = bf16_build
    _, cal = calibrated
    assert man["precision"] == "fp8" and man["graphs"]["dit"]["precision"] == "fp8"
    from tempomaster.export.build import describe_fp8

    assert man["fp8"]["base"] == "bf16" and man["fp8"]["weight_scale"] == "tensor" and not man["fp8"]["twin"]
    assert "Hadamard pair (H_q H_k^T = I)" in man["fp8"]["attention"]["qk_transform"]
    # the summary says whether FP8 attention is on and that on is the default
    assert "q/k/v of every self-attention (--fp8-attention on, the default)" in describe_fp8(man)
    off = {**man, "fp8": {**man["fp8"], "attention": {**man["fp8"]["attention"], "self": False}}}
    assert "attention in bf16 (--fp8-attention off; the default is on)" in describe_fp8(off)
    assert man["fp8"]["scale_dtype"] == "bf16"
    assert man["fp8"]["high_precision_graphs"]["t5"] == "bf16"
    assert man["fp8"]["high_precision_graphs"]["vae_decoder"] == "bf16"
    assert man["fp8"]["calibration"]["dit_sha256"] == cal.data["dit_sha256"]
    assert man["op_audit"]["ok"]
    assert [t["dtype"] for t in man["graphs"]["dit"]["inputs"]][:2] == ["bfloat16", "bfloat16"]
    # the calibration travels with the build and is hashed with it
    assert man["files"]["calibration/amax.json"]["sha256"] == sha256_file(cal.path)
    assert "calibration/weight_amax.safetensors" in man["files"] and "calibration/report.json" in man["files"]
    verify_build(out, graphs=["dit"])


def test_refusals(tmp_path, tiny_models, calibrated):
    import copy

    from tempomaster.calibration import export_fp8_onnx
    from tempomaster.models.checkpoints import ModelSet

    _, cal = calibrated
    kw = dict(graphs=["dit"], progress=False, log=None)
    other = ExportShape(height=64, width=48, num_frames=9, intervals=(4, 2, 1))
    with pytest.raises(UsageError, match=r"amax.json: calibration made for shape 32x48, 9 frames.*\(this build: 64x48"):
        export_fp8_onnx(tiny_models, other, tmp_path / "a", calibration=cal.path, **kw)
    with pytest.raises(UsageError, match=r"calibration made for preset 'tiny' \(this build: 'wan-1.3b'\)"):
        export_fp8_onnx(tiny_models, SHAPE, tmp_path / "b", calibration=cal.path, preset_name="wan-1.3b", **kw)
    changed = copy.deepcopy(tiny_models.dit)
    with torch.no_grad():
        changed.blocks[1].ffn[2].weight[3, 4] += 0.5
    models = ModelSet(tiny_models.preset, changed, tiny_models.vae, tiny_models.t5, tiny_models.tokenizer)
    with pytest.raises(UsageError, match=r"calibration made for DiT weights sha256"):
        export_fp8_onnx(models, SHAPE, tmp_path / "c", calibration=cal.path, **kw)
    with pytest.raises(UsageError, match=r"--no-calibrate: .*calibration/amax.json not found"):
        export_fp8_onnx(tiny_models, SHAPE, tmp_path / "d", calibrate_now=False, **kw)
    with pytest.raises(UsageError, match=r"--fp8-base"):
        export_fp8_onnx(tiny_models, SHAPE, tmp_path / "e", calibration=cal.path, base="fp32", **kw)
    empty = tmp_path / "p.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"no prompts"):
        export_fp8_onnx(tiny_models, SHAPE, tmp_path / "f", calib_prompts=empty, **kw)
    assert not any((tmp_path / n).exists() for n in "abcdef")


# ----------------------------------------------------------------------------
# End to end (slow: the VAE and umT5 graphs too)
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_twin_build_generates_through_onnxruntime(tmp_path, tiny_models, prompt_file):
    from tempomaster.calibration import export_fp8_onnx
    from tempomaster.calibration.collect import load_calibration
    from tempomaster.calibration.fp8 import quantize_dit
    from tempomaster.calibration.report import psnr, rel_error
    from tempomaster.calibration.trajectory import VelocityOverride
    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    out = tmp_path / "twin"
    man = export_fp8_onnx(
        tiny_models,
        SHAPE,
        out,
        calib_prompts=prompt_file,
        calib_steps=2,
        report=False,
        twin=True,
        progress=False,
        log=None,
    )
    assert man["precision"] == "fp8" and sorted(man["graphs"]) == sorted(
        ["dit", "vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder", "t5"]
    )
    assert all(g["precision"] == "fp32" for n, g in man["graphs"].items() if n != "dit")
    backend = OnnxRuntimeBackend.from_build(out)
    assert backend.info.dit_dtype == torch.float32
    request = GenerationRequest(
        prompt="a red ball on the beach", seed=7, height=32, width=48, num_frames=9, steps_per_stage=(2, 2, 2)
    )
    # the twin's own trajectory; at every DiT call torch's fake-quantized DiT answers the same inputs
    cal = load_calibration(out)
    q = quantize_dit(tiny_models.dit, cal.layer_table(), torch.float32, scale_dtype=torch.bfloat16)
    errors = []

    def compare(event):
        with torch.no_grad():
            errors.append(rel_error(event.velocity, q(*event.inputs)))

    got = generate(backend, backend.tokenizer(), request, progress=False, on_step_end=compare)
    want = generate(VelocityOverride(TorchBackend(tiny_models), q), tiny_models.tokenizer, request, progress=False)
    assert [s.frames.shape for s in got.stages] == [s.frames.shape for s in want.stages]
    assert torch.isfinite(got.video.frames).all()
    final = psnr(got.video.frames, want.video.frames)
    print(f"twin vs torch FP8 per DiT call: {[f'{e:.1e}' for e in errors]}; final frames PSNR {final:.1f} dB")
    # Per call the twin matches torch to ~1e-6 once FP8 rounding ties are aligned
    # (test_twin_matches_torch_fake_quant); on a real trajectory a few ties go the
    # other way through float32 noise, each moving one FP8 value by one step.
    assert sorted(errors)[len(errors) // 2] < 1e-3 and max(errors) < 1e-2
    assert final > 35


# ----------------------------------------------------------------------------
# Resumable calibration
# ----------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _counting_generate(monkeypatch, stop_at_video=None):
    """Patch the pipeline's generate: count DiT calls (through on_step_end) and stop before video `stop_at_video`."""
    import tempomaster.runtime.pipeline as pipeline

    original = pipeline.generate
    counts = {"videos": 0, "dit_calls": 0}

    def generate(backend, tokenizer, request, **kw):
        if stop_at_video is not None and counts["videos"] + 1 == stop_at_video:
            raise _Stop(f"stopped before video {stop_at_video}")
        inner = kw.get("on_step_end")

        def on_step_end(event):
            counts["dit_calls"] += 1
            if inner is not None:
                inner(event)

        kw["on_step_end"] = on_step_end
        out = original(backend, tokenizer, request, **kw)
        counts["videos"] += 1
        return out

    monkeypatch.setattr(pipeline, "generate", generate)
    return counts


def test_calibration_resumes_after_last_finished_video(tmp_path, tiny_models, monkeypatch):
    from tempomaster.calibration import calibrate
    from tempomaster.export.target import check_replaceable

    prompts = ["a boat on a lake", "a dog in the park", "rain over a city"]
    kw = dict(prompts=prompts, calib_steps=1, report=False, progress=False)
    lines = []

    with monkeypatch.context() as m:
        counts = _counting_generate(m, stop_at_video=3)
        with pytest.raises(_Stop):
            calibrate(tiny_models, SHAPE, tmp_path / "a", seed=4, log=lines.append, **kw)
    assert counts == {"videos": 2, "dit_calls": 2 * 3}
    saved = json.loads((tmp_path / "a" / "calibration" / "progress.json").read_text())
    assert saved["videos_done"] == 2 and not (tmp_path / "a" / "calibration" / "amax.json").exists()
    check_replaceable(tmp_path / "a")  # a stopped calibration's folder is ours: tm-export may run on it again

    with monkeypatch.context() as m:
        counts = _counting_generate(m)
        resumed = calibrate(tiny_models, SHAPE, tmp_path / "a", seed=4, log=lines.append, **kw)
    assert counts == {"videos": 1, "dit_calls": 3}  # the first two videos are not redone
    assert any(line.startswith("calibration: resuming after video 2 of 3") for line in lines)
    assert not (tmp_path / "a" / "calibration" / "progress.json").exists()

    whole = calibrate(tiny_models, SHAPE, tmp_path / "b", seed=4, log=None, **kw)
    assert resumed.data["layers"] == whole.data["layers"]
    assert resumed.data["attention"] == whole.data["attention"]
    assert resumed.data["dit_calls"] == whole.data["dit_calls"] == 9

    # other arguments (the seed): the saved maxima are not used
    with monkeypatch.context() as m:
        _counting_generate(m, stop_at_video=2)
        with pytest.raises(_Stop):
            calibrate(tiny_models, SHAPE, tmp_path / "c", seed=4, log=None, **kw)
    lines.clear()
    with monkeypatch.context() as m:
        counts = _counting_generate(m)
        calibrate(tiny_models, SHAPE, tmp_path / "c", seed=5, log=lines.append, **kw)
    assert counts["videos"] == 3
    assert any("was made with other arguments" in line and "starting over" in line for line in lines)


# ----------------------------------------------------------------------------
# FLOPs: FP8 and 16-bit
# ----------------------------------------------------------------------------


def test_flop_split_of_fp8_graph(bf16_build, plain_dit, tiny_models, capsys):
    from tempomaster.cli.export import main
    from tempomaster.export.flops import dit_flops_split, graph_flops, graph_flops_split

    meta = bf16_build[1]["graphs"]["dit"]["meta"]
    path = bf16_build[0] / "onnx" / "dit.onnx"
    split = graph_flops_split(path, {"batch": 1})
    assert split["total"] == graph_flops(path, {"batch": 1})["total"]
    # by hand: every block Linear (cross-attention k, v over the text tokens) and Q K^T of each self-attention
    cfg = tiny_models.dit.cfg
    tokens, text = meta["tokens_per_chunk"][0], meta["text_len"]
    modules = dict(tiny_models.dit.named_modules())
    linear = 0
    for b in range(cfg.num_layers):
        for n in LINEARS:
            out_f, in_f = modules[f"blocks.{b}.{n}"].weight.shape
            rows = text if n in ("cross_attn.k", "cross_attn.v") else tokens
            linear += 2 * rows * in_f * out_f
    assert split["linear_fp8"] == linear
    assert split["attention_fp8"] == cfg.num_layers * 2 * tokens * tokens * cfg.dim
    model_split = dit_flops_split(cfg, 1, meta["latent_frames"][0], meta["latent_height"], meta["latent_width"], text)
    assert (model_split["fp8"], model_split["total"]) == (split["fp8"], split["total"])
    # an unquantized graph: nothing FP8, and no q, k rotations ([tokens, dim] x [head_dim, head_dim] per head, 16-bit)
    plain = graph_flops_split(plain_dit[0] / "onnx" / "dit.onnx", {"batch": 1})
    rotations = cfg.num_layers * 2 * (2 * tokens * cfg.dim * cfg.head_dim)
    assert plain["fp8"] == 0 and plain["total"] == split["total"] - rotations
    assert main(["inspect", str(bf16_build[0])]) == 0
    out = capsys.readouterr().out
    share = split["fp8"] / split["total"]
    assert f"({share:.1%})" in out and "softmax x V is 16-bit" in out
