"""umT5 encoder: oracle vs transformers' UMT5EncoderModel, checkpoint layout, dtypes."""

from __future__ import annotations

import pytest
import torch
from checkpoint_layouts import layout  # noqa: E402

from tempomaster.models.presets import PRESETS, T5Config
from tempomaster.models.t5 import (
    UMT5Encoder,
    check_t5_dtype,
    relative_position_bucket,
    wan_t5_to_transformers,
)

transformers = pytest.importorskip("transformers")

TINY = PRESETS["tiny"].t5  # vocab 384, dim 32, 4 heads, ffn 64, 2 layers, 32 buckets


def _random_state_dict(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Fresh seeded weights: N(0, scale) matrices, norms around 1 (not all-ones)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.state_dict().items():
        w = torch.randn(value.shape, generator=g)
        sd[key] = 1.0 + 0.3 * w if "norm" in key else scale * w
    return sd


def _tiny_encoder(seed: int = 0, scale: float = 0.5) -> UMT5Encoder:
    model = UMT5Encoder(TINY).eval()
    model.load_state_dict(_random_state_dict(model, seed, scale))
    return model


def _oracle(cfg: T5Config):
    """transformers' umT5 encoder with the same widths (the real structure)."""
    hf_cfg = transformers.UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps,
        feed_forward_proj="gated-gelu",
    )
    assert hf_cfg.dense_act_fn == "gelu_new" and hf_cfg.is_gated_act
    return transformers.UMT5EncoderModel._from_config(hf_cfg, attn_implementation="eager").eval()


def _inputs(seed: int = 1, batch: int = 3, length: int = 200):
    """Random ids with right padding of different lengths (one row unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (batch, length), generator=g)
    lengths = [length, 150, 7][:batch]
    mask = torch.zeros(batch, length, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0
    return ids, mask


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def pair():
    """Our encoder with fresh weights, and transformers' output on `_inputs()`
    with the same weights (padded positions zeroed the same way)."""
    ours = _tiny_encoder(seed=0)
    oracle = _oracle(TINY)
    oracle.load_state_dict(wan_t5_to_transformers(ours.state_dict()), strict=True)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = oracle(input_ids=ids, attention_mask=mask).last_hidden_state
    return ours, ref * mask.unsqueeze(-1)


def test_matches_transformers_umt5(pair):
    ours, ref = pair
    ids, mask = _inputs()
    with torch.no_grad():
        got = ours(ids, mask)
    assert got.shape == (3, 200, TINY.dim) and got.dtype == torch.float32
    assert _rel_err(got, ref) < 1e-4
    # and per row, so the short row is not hidden by the long ones
    for i in range(ids.size(0)):
        assert _rel_err(got[i], ref[i]) < 1e-4
    # padded positions are exactly zero, real ones are not
    assert (got[mask == 0] == 0).all()
    assert (got[mask == 1].abs().sum(-1) > 0).all()


def test_padding_does_not_leak():
    """A row's embeddings depend only on its real tokens, not on what is padded."""
    model = _tiny_encoder(seed=3)
    ids, mask = _inputs(batch=3, length=64)
    ids[2, 7:] = torch.randint(3, TINY.vocab_size, (57,))  # garbage under padding
    with torch.no_grad():
        full = model(ids, mask)
        alone = model(ids[2:3, :7], mask[2:3, :7])
    torch.testing.assert_close(full[2, :7], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "key",
    [
        "blocks.1.attn.k.weight",
        "blocks.0.ffn.gate.0.weight",
        "blocks.0.pos_embedding.embedding.weight",
        "norm.weight",
    ],
)
def test_perturbed_weight_breaks_match(pair, key):
    ours, ref = pair
    ids, mask = _inputs()
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd[key].view(-1)[5] += 1.0
    broken = UMT5Encoder(TINY).eval()
    broken.load_state_dict(sd)
    with torch.no_grad():
        got = broken(ids, mask)
    assert _rel_err(got, ref) > 1e-3


def test_relative_position_bucket_matches_transformers():
    oracle = _oracle(TINY)
    attn = oracle.encoder.block[0].layer[0].SelfAttention
    pos = torch.arange(600)
    rel = pos[None, :] - pos[:, None]
    ours = relative_position_bucket(rel, TINY.num_buckets, 128)
    assert torch.equal(ours, attn._relative_position_bucket(rel))
    assert ours.min() == 0 and ours.max() == TINY.num_buckets - 1


def _checkpoint_layout() -> dict[str, tuple[int, ...]]:
    """The umT5 section of the key layouts (vocab 64, dim 32, 4 heads, ffn 64, 1 block)."""
    return layout("umT5 encoder")


def test_state_dict_matches_checkpoint_keys_doc():
    doc = _checkpoint_layout()
    cfg = T5Config(vocab_size=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=1)
    model = UMT5Encoder(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == doc


def test_real_size_layout_on_meta():
    cfg = T5Config()
    with torch.device("meta"):
        model = UMT5Encoder(cfg, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert all(v.is_meta and v.dtype == torch.bfloat16 for v in sd.values())
    assert len(sd) == 2 + 10 * cfg.num_layers  # 242 tensors
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["token_embedding.weight"] == (256384, 4096)
    assert shapes["norm.weight"] == (4096,)
    for n in range(24):
        p = f"blocks.{n}."
        assert shapes[p + "norm1.weight"] == (4096,)
        assert shapes[p + "norm2.weight"] == (4096,)
        for w in "qkvo":
            assert shapes[p + f"attn.{w}.weight"] == (4096, 4096)
        assert shapes[p + "ffn.gate.0.weight"] == (10240, 4096)
        assert shapes[p + "ffn.fc1.weight"] == (10240, 4096)
        assert shapes[p + "ffn.fc2.weight"] == (4096, 10240)
        assert shapes[p + "pos_embedding.embedding.weight"] == (32, 64)
    n_params = sum(v.numel() for v in sd.values())
    # 256384*4096 + 24*(4*4096^2 + 3*4096*10240 + 2*4096 + 32*64) + 4096
    assert n_params == 5_680_910_336
    print(f"umT5-XXL encoder params: {n_params:,} ({n_params / 1e9:.2f}B)")


def test_bf16_close_to_fp32():
    # Milder weights than the fp32 oracle test: with N(0, 0.5) weights and no
    # 1/sqrt(d) scaling the logits are so large that bf16 rounding flips
    # softmax winners (transformers' bf16 umT5 errs just as much, ~10%).
    model = _tiny_encoder(seed=0, scale=0.2)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, mask)
        bf = UMT5Encoder(TINY, dtype=torch.bfloat16).eval()
        bf.load_state_dict(model.state_dict())  # copies cast to bf16
        got = bf(ids, mask)
        oracle = _oracle(TINY)
        oracle.load_state_dict(wan_t5_to_transformers(model.state_dict()))
        oracle_bf16 = oracle.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    assert (got[mask == 0] == 0).all()
    err, oracle_err = _rel_err(got, ref), _rel_err(oracle_bf16 * mask.unsqueeze(-1), ref)
    assert err < 5e-2
    assert err < 1.5 * oracle_err + 1e-3  # no worse than transformers in bf16
    # .to(bfloat16) on an fp32 model is allowed and gives the same thing
    with torch.no_grad():
        got2 = _tiny_encoder(seed=0, scale=0.2).to(torch.bfloat16)(ids, mask)
    torch.testing.assert_close(got2, got)


def test_fp16_refused():
    with pytest.raises(ValueError, match="float16"):
        check_t5_dtype(torch.float16)
    with pytest.raises(ValueError, match="float16"):
        UMT5Encoder(TINY, dtype=torch.float16)
    model = UMT5Encoder(TINY)
    with pytest.raises(ValueError, match="float16"):
        model.half()
    with pytest.raises(ValueError, match="float16"):
        model.to(torch.float16)
    with pytest.raises(ValueError, match="float16"):
        model.to("cpu", torch.float16)
    with pytest.raises(ValueError, match="float16"):
        model.to(dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        model.type(torch.float16)
    assert model.dtype == torch.float32  # nothing was converted
    # fp16 weights slipped in with assign=True are caught at forward time
    sd = {k: v.half() for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    ids, mask = _inputs(batch=1, length=8)
    with pytest.raises(ValueError, match="float16"):
        model(ids, mask)
    # allowed dtypes and non-dtype moves pass
    assert check_t5_dtype(torch.bfloat16) is torch.bfloat16
    UMT5Encoder(TINY).to("cpu")
    with pytest.raises(ValueError):
        check_t5_dtype(torch.float64)


def test_dynamic_batch_and_length():
    """Same module, other shapes: no shape baked in anywhere."""
    model = _tiny_encoder(seed=0)
    for b, l in ((1, 1), (2, 33), (1, 512)):
        ids = torch.randint(0, TINY.vocab_size, (b, l))
        mask = torch.ones(b, l, dtype=torch.int64)
        with torch.no_grad():
            out = model(ids, mask)
        assert out.shape == (b, l, TINY.dim) and torch.isfinite(out).all()


def test_torch_export_dynamic_shapes():
    """The forward traces with symbolic batch and length (no data-dependent
    control flow), as `torch.onnx.export(..., dynamo=True)` will need."""
    model = _tiny_encoder(seed=0)
    ids, mask = _inputs(batch=2, length=16)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    dyn = {"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}
    exported = torch.export.export(model, (ids, mask), dynamic_shapes=dyn).module()
    ids2, mask2 = _inputs(batch=3, length=40)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids2, mask2), model(ids2, mask2), rtol=1e-5, atol=1e-5)
