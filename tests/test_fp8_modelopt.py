"""FP8 attention: our Q/DQ placement against NVIDIA ModelOpt's FP8 MHA export, node by node.

ModelOpt (`nvidia-modelopt`, the `[modelopt]` extra) is the reference for the
pattern TensorRT's FP8 attention fusion is tuned for. One self-attention
block, the same weights on both sides:

- ModelOpt: diffusers' `WanAttention` quantized with ModelOpt's diffusers FP8
  preset plus its q/k/v bmm unit (what its diffusers example's `--quantize-mha`
  enables), max-calibrated on random inputs, exported by ModelOpt's own FP8
  path (`get_onnx_bytes_and_metadata`: torch.onnx's TorchScript exporter, then
  its FP8 graph rewrites) to MatMul-Softmax-MatMul;
- ours: `models.dit.SelfAttention` with `FP8Attention` (what `quantize_dit`
  installs), amax recorded by this test's own hooks, exported by
  `export_graph` to one ONNX `Attention` node.

What must agree: q, k and v each pass exactly one QuantizeLinear ->
DequantizeLinear (FLOAT8E4M3FN zero point, one scalar scale amax/448) right
before the attention compute. What differs, asserted as such: ModelOpt adds a
Q/DQ with the fixed scale 1/448 on the softmax output (the "MHA v2" fusion of
a decomposed attention); ours has none, because the standard `Attention` node
that TensorRT's parser maps to its fused IAttention layer has no input for a
softmax-output scale (see `calibration.fp8.FP8Attention`). Two smaller
differences of ModelOpt's export are pinned down too: a Cast to float between
each DequantizeLinear and its MatMul, and q, k multiplied by d^-1/4 (half of
the softmax's 1/sqrt(d)) before their QuantizeLinear.

Skipped when ModelOpt is not installed or its export cannot run on this CPU.
"""

import copy
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")

DIM, HEADS, TOKENS = 64, 4, 32  # head_dim 16: ModelOpt's example quantizes MHA only when head_dim % 16 == 0
E4M3_MAX = 448.0


def _import_modelopt():
    """ModelOpt's quantization and ONNX export modules, or a skip saying why not."""
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (pip install -e '.[modelopt]')")
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes, get_onnx_bytes_and_metadata
        from modelopt.torch.opt.config_loader import load_config
        from modelopt.torch.quantization.config import QuantizeConfig
    except ImportError as err:
        pytest.skip(f"nvidia-modelopt's ONNX export is not importable: {err}".replace("\n", " "))
    return mtq, OnnxBytes, get_onnx_bytes_and_metadata, load_config, QuantizeConfig


@pytest.fixture(scope="module")
def blocks():
    """Our SelfAttention (fp32, random weights and q/k norm weights) and random calibration inputs."""
    from tempomaster.models.dit import SelfAttention

    torch.manual_seed(0)
    ours = SelfAttention(DIM, HEADS, eps=1e-6).eval()
    with torch.no_grad():
        for norm in (ours.norm_q, ours.norm_k):
            norm.weight.copy_(1 + 0.2 * torch.randn(DIM))
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, TOKENS, DIM, generator=g) for _ in range(3)]
    return ours, inputs


def _identity_rope(x):
    # cos 1, sin 0: RoPE leaves q and k as they are, as WanAttention without rotary_emb does
    shape = (x.shape[0], x.shape[1], DIM // HEADS // 2)
    return torch.ones(shape), torch.zeros(shape)


# ----------------------------------------------------------------------------
# The two graphs
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modelopt_graph(blocks):
    mtq, OnnxBytes, get_onnx_bytes_and_metadata, load_config, QuantizeConfig = _import_modelopt()
    import onnx
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    ours, inputs = blocks
    ref = WanAttention(DIM, heads=HEADS, dim_head=DIM // HEADS, eps=1e-6, processor=WanAttnProcessor()).eval()
    with torch.no_grad():
        for theirs, mine in (("to_q", ours.q), ("to_k", ours.k), ("to_v", ours.v)):
            getattr(ref, theirs).load_state_dict(mine.state_dict())
        ref.to_out[0].load_state_dict(ours.o.state_dict())
    # The same q/k norms (over the whole width): ours is written out as arithmetic, which the
    # TorchScript exporter ModelOpt uses can export (it has no aten::rms_norm at opset 20).
    ref.norm_q, ref.norm_k = copy.deepcopy(ours.norm_q), copy.deepcopy(ours.norm_k)
    with torch.no_grad():
        for x in inputs:  # the same block: otherwise the comparison below would compare nothing
            torch.testing.assert_close(ref(x), ours(x, *_identity_rope(x)), rtol=1e-5, atol=1e-5)
    ref = ref.to(torch.bfloat16)

    # ModelOpt's diffusers FP8 preset (weights, Linear inputs, softmax output) and its
    # attention unit (q/k/v bmm), with the Q/DQ scales in bf16 as its diffusers example sets them.
    config = load_config("configs/ptq/presets/diffusers/fp8", schema_type=QuantizeConfig).model_dump(exclude_unset=True)
    mha = [entry.model_dump(exclude_unset=True) for entry in load_config("configs/ptq/units/attention_qkv_fp8")]
    config["quant_cfg"] = list(config["quant_cfg"]) + mha
    for entry in config["quant_cfg"]:
        cfg = entry.get("cfg")
        if isinstance(cfg, dict) and "num_bits" in cfg:
            cfg["trt_high_precision_dtype"] = "BFloat16"

    def forward_loop(model):
        for x in inputs:
            model(x.to(torch.bfloat16))

    mtq.quantize(ref, config, forward_loop=forward_loop)
    amax = {n: float(getattr(ref, f"{n}_bmm_quantizer").amax) for n in "qkv"}
    try:
        onnx_bytes, _ = get_onnx_bytes_and_metadata(ref, (inputs[0].to(torch.bfloat16),), weights_dtype="bf16")
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"ModelOpt's FP8 ONNX export does not run on this CPU: {type(err).__name__}: {err}")
    files = OnnxBytes.from_bytes(onnx_bytes).onnx_model
    (name,) = [n for n in files if n.endswith(".onnx")]
    return onnx.load_from_string(files[name]), amax


@pytest.fixture(scope="module")
def our_graph(blocks, tmp_path_factory):
    import onnx

    from tempomaster.calibration.fp8 import ONNX_TRANSLATIONS, FP8Attention
    from tempomaster.calibration.qk_transform import hadamard_pair, transform_qk
    from tempomaster.export.onnx_utils import GraphSpec, export_graph

    ours, inputs = blocks
    amax = {n: 0.0 for n in ("q", "k", "v", "q_rotated", "k_rotated")}
    head_dim = ours.q.out_features // ours.num_heads

    def record(_module, args):
        q, k, v = args[:3]  # [B, L, heads, d]
        # what FP8Attention quantizes by default: k less its token mean, q and k rotated (exact)
        q_rot, k_rot = transform_qk(q.transpose(1, 2), k.transpose(1, 2), *hadamard_pair(head_dim))
        for tensor, n in zip((q, k, v, q_rot, k_rot), amax):
            amax[n] = max(amax[n], float(tensor.abs().amax()))

    handle = ours.attn.register_forward_pre_hook(record)
    with torch.no_grad():
        for x in inputs:
            ours(x, *_identity_rope(x))
    handle.remove()

    class Block(torch.nn.Module):
        def __init__(self, attention):
            super().__init__()
            self.attention = attention

        def forward(self, x, rope_cos, rope_sin):
            return self.attention(x, rope_cos, rope_sin)

    quantized = copy.deepcopy(ours).to(torch.bfloat16)
    quantized.attn = FP8Attention.from_amax(amax, torch.bfloat16, head_dim)  # the shipped default: qk_transform
    x = inputs[0].to(torch.bfloat16)
    spec = GraphSpec(
        name="attention",
        module=Block(quantized),
        args=(x, *_identity_rope(x)),
        input_names=("x", "rope_cos", "rope_sin"),
        output_names=("out",),
        precision="bf16",
        translations=ONNX_TRANSLATIONS,
    )
    out = tmp_path_factory.mktemp("ours")
    export_graph(spec, out)
    return onnx.load(str(out / "attention.onnx")), amax


# ----------------------------------------------------------------------------
# Reading Q/DQ off a graph
# ----------------------------------------------------------------------------


class Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        # scales and zero points are initializers or Constant nodes, depending on the exporter
        self.constants = {i.name: i for i in model.graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                self.constants[n.output[0]] = next(a.t for a in n.attribute if a.name == "value")
        self.to_array = numpy_helper.to_array

    def of_type(self, op_type):
        return [n for n in self.nodes if n.op_type == op_type]

    def qdq_into(self, tensor):
        """The Q/DQ pair that `tensor` (an input of the attention compute) comes from.

        Walks back over anything between the DequantizeLinear and the compute
        (listed in "between"), then checks the pair: FLOAT8E4M3FN zero point,
        the same scalar scale on both nodes, saturating quantization.
        """
        import onnx

        between = []
        node = self.producer[tensor]
        while node.op_type != "DequantizeLinear":
            between.append((node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}))
            assert len(node.input) == 1, f"{node.op_type} between a DequantizeLinear and the attention"
            node = self.producer[node.input[0]]
        dq = node
        q = self.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear", f"{dq.name} is fed by {q.op_type}, not QuantizeLinear"
        zero = self.constants[q.input[2]]
        assert zero.data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert self.to_array(zero).view(np.uint8).max() == 0
        assert {a.name: a.i for a in q.attribute}.get("saturate", 1) == 1
        scale, dq_scale = (self.constants[n] for n in (q.input[1], dq.input[1]))
        assert int(np.prod(scale.dims)) == 1, "per-tensor scale"
        assert float(self.to_array(scale).astype(np.float64)) == float(self.to_array(dq_scale).astype(np.float64))
        # q/k/v and the softmax output each pass exactly one Q/DQ: none right before this one
        upstream = self.producer.get(q.input[0])
        assert upstream is None or upstream.op_type != "DequantizeLinear"
        return {
            "scale": float(self.to_array(scale).astype(np.float64)),
            "scale_dtype": scale.data_type,
            "between": between,
            "quantized": upstream.op_type if upstream is not None else "input",
        }


def _bf16(value):
    return float(torch.tensor(value, dtype=torch.float64).to(torch.bfloat16))


def _scale_of(amax):
    return _bf16(amax / E4M3_MAX)


def _decomposed_attention(g):
    """ModelOpt's attention: (Softmax, first MatMul q k^T, second MatMul p v), found from the Softmax."""
    (softmax,) = g.of_type("Softmax")
    bmm1 = g.producer[softmax.input[0]]
    while bmm1.op_type == "Cast":  # the scores come back to bf16 for the softmax
        bmm1 = g.producer[bmm1.input[0]]
    (q_node,) = g.consumers[softmax.output[0]]
    assert q_node.op_type == "QuantizeLinear", "no Q/DQ on the softmax output"
    (dq_node,) = g.consumers[q_node.output[0]]
    (bmm2,) = g.consumers[dq_node.output[0]]
    while bmm2.op_type == "Cast":
        (bmm2,) = g.consumers[bmm2.output[0]]
    assert bmm1.op_type == bmm2.op_type == "MatMul"
    return softmax, bmm1, bmm2


# ----------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------


def test_modelopt_quantizes_q_k_v_and_the_softmax_output(modelopt_graph):
    """ModelOpt's FP8 MHA: Q/DQ on q, k into the first MatMul, on the softmax output and v into the second."""
    import onnx

    model, amax = modelopt_graph
    g = Graph(model)
    # its rewrites turn TRT_FP8QuantizeLinear/DequantizeLinear into the standard op types (0.47 leaves
    # them in the "trt" domain, which TensorRT's parser ignores: it imports by op type)
    assert not [n for n in g.nodes if n.op_type.startswith("TRT_")]
    softmax, bmm1, bmm2 = _decomposed_attention(g)
    q, k = g.qdq_into(bmm1.input[0]), g.qdq_into(bmm1.input[1])
    p, v = g.qdq_into(bmm2.input[0]), g.qdq_into(bmm2.input[1])
    for which, found in (("q", q), ("k", k), ("v", v)):
        # one per-tensor E4M3 scale, amax/448 of the calibrated tensor, in bf16
        assert found["scale_dtype"] == onnx.TensorProto.BFLOAT16, which
        assert found["scale"] == pytest.approx(_scale_of(amax[which]), rel=2**-8), which
    # the softmax output: a fixed scale 1/448 (softmax is in [0, 1]: 1.0 maps to E4M3's largest value)
    assert p["scale"] == pytest.approx(1 / E4M3_MAX, rel=2**-8)
    assert p["quantized"] == "Softmax"
    # ModelOpt's MHA pattern: each DequantizeLinear reaches its MatMul through one Cast to float
    # (its export_fp8_mha: the two attention GEMMs run in fp32 on the high-precision side)
    for found in (q, k, p, v):
        assert found["between"] == [("Cast", {"to": onnx.TensorProto.FLOAT})]
    # it quantizes q * d^-1/4 and k^T * d^-1/4 (the softmax's 1/sqrt(d) split over both),
    # with the scale of the unscaled tensor's amax; v as it is
    assert q["quantized"] == k["quantized"] == "Mul"
    assert v["quantized"] == "Transpose"
    # attention Q/DQ: q, k, v and the softmax output; the rest are the four Linears' inputs
    assert len(g.of_type("QuantizeLinear")) == 4 + 4


def test_ours_quantizes_q_k_v_into_the_attention_node(our_graph):
    import onnx

    model, amax = our_graph
    g = Graph(model)
    (attention,) = g.of_type("Attention")
    assert [i for i in attention.input[3:] if i] == []  # no mask, no cache: nothing beyond q, k, v
    found = {which: g.qdq_into(attention.input[i]) for i, which in enumerate("qkv")}
    calibrated = {"q": "q_rotated", "k": "k_rotated", "v": "v"}
    for which, f in found.items():
        assert f["between"] == [], which  # the DequantizeLinear feeds the Attention node directly
        assert f["scale_dtype"] == onnx.TensorProto.BFLOAT16, which
        # amax/448 of the calibrated tensor (float32 division, rounded once to bf16)
        want = np.float32(amax[calibrated[which]]) / np.float32(E4M3_MAX)
        assert f["scale"] == float(torch.tensor(want).to(torch.bfloat16)), which
    # v itself (after the [B, L, heads, d] -> [B, heads, L, d] transpose); q and k after their
    # Hadamard MatMul (k less its token mean first). The Attention node applies 1/sqrt(d) itself.
    assert found["v"]["quantized"] == "Transpose"
    assert found["q"]["quantized"] == found["k"]["quantized"] == "MatMul"
    # the softmax lives inside the Attention node: no Softmax and no Q/DQ on its output
    assert not g.of_type("Softmax")
    assert [n.op_type for n in g.consumers[attention.output[0]]] != ["QuantizeLinear"]
    assert len(g.of_type("QuantizeLinear")) == 3
    assert {n.domain for n in g.nodes if n.op_type.endswith("QuantizeLinear")} == {""}  # standard ONNX


def test_same_block_same_scales_one_deliberate_difference(modelopt_graph, our_graph):
    """Node by node: the q, k, v Q/DQ agree (placement, E4M3, scale); the softmax-output Q/DQ is ModelOpt's alone."""
    import onnx

    mo, mo_amax = modelopt_graph
    ours, our_amax = our_graph
    g_mo, g_ours = Graph(mo), Graph(ours)

    softmax, bmm1, bmm2 = _decomposed_attention(g_mo)
    (attention,) = g_ours.of_type("Attention")
    theirs = {"q": g_mo.qdq_into(bmm1.input[0]), "k": g_mo.qdq_into(bmm1.input[1]), "v": g_mo.qdq_into(bmm2.input[1])}
    mine = {which: g_ours.qdq_into(attention.input[i]) for i, which in enumerate("qkv")}
    for which in "qkv":
        # the same tensor's amax on both sides: ModelOpt's calibration runs the block with its FP8
        # Linears, ours the unquantized block, so they agree to FP8 rounding, not exactly
        assert mo_amax[which] == pytest.approx(our_amax[which], rel=0.05), which
        # v's scale is that amax / 448 on both sides; q's and k's in ours are the rotated tensors'
        # (the second deliberate difference, below)
        ours_from = which if which == "v" else f"{which}_rotated"
        assert mine[which]["scale"] == pytest.approx(_scale_of(our_amax[ours_from]), rel=2**-7), which
        if which == "v":
            assert theirs[which]["scale"] == pytest.approx(mine[which]["scale"], rel=0.05)
        assert theirs[which]["scale_dtype"] == mine[which]["scale_dtype"]
        # the DequantizeLinear feeds the compute: directly in ours, through one Cast to float in ModelOpt's
        assert mine[which]["between"] == [] and theirs[which]["between"] == [("Cast", {"to": onnx.TensorProto.FLOAT})]
    # The deliberate difference. ModelOpt: softmax -> Q/DQ(1/448) -> MatMul, the decomposed
    # MatMul-Softmax-MatMul that TensorRT must recognise as one attention. Ours: no softmax-output
    # Q/DQ, because the one ONNX Attention node (TensorRT's IAttention, which stays fused at
    # 43,680 tokens where unfused scores would take ~150 GB) has no input for that scale.
    # The second: ours quantizes k less its token mean and q, k times a Hadamard pair whose
    # product is the identity (calibration.qk_transform: exact before rounding, half the FP8
    # error on the toy), so its q, k scales come from the rotated tensors' amax.
    assert mine["q"]["quantized"] == mine["k"]["quantized"] == "MatMul"
    softmax_q = g_mo.consumers[softmax.output[0]]
    assert [n.op_type for n in softmax_q] == ["QuantizeLinear"]
    assert g_mo.qdq_into(bmm2.input[0])["scale"] == pytest.approx(1 / E4M3_MAX, rel=2**-8)
    assert len(g_mo.of_type("QuantizeLinear")) - 4 == len(g_ours.of_type("QuantizeLinear")) + 1
    assert not g_ours.of_type("Softmax")
