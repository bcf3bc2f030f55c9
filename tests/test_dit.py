"""The DiT against diffusers' WanTransformer3DModel (an independent implementation) and float64 references.

Only the oracle tests need diffusers; RoPE, batch independence and key layouts run without it.
"""

import pytest
import torch

from tempomaster.models.dit import WanDiT, apply_rope
from tempomaster.models.presets import DiTConfig, get_preset
from tempomaster.rope import batched_rope_table, rope_split, rope_table


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


CFG = DiTConfig(dim=96, ffn_dim=160, num_heads=4, num_layers=2, text_dim=48)


def wan_dit_to_diffusers(sd: dict) -> dict:
    """Our (= release checkpoint) DiT keys -> diffusers WanTransformer3DModel keys."""
    top = {
        "patch_embedding": "patch_embedding",
        "text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "text_embedding.2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.0": "condition_embedder.time_embedder.linear_1",
        "time_embedding.2": "condition_embedder.time_embedder.linear_2",
        "time_projection.1": "condition_embedder.time_proj",
        "head.head": "proj_out",
    }
    block = {
        "self_attn.q": "attn1.to_q",
        "self_attn.k": "attn1.to_k",
        "self_attn.v": "attn1.to_v",
        "self_attn.o": "attn1.to_out.0",
        "self_attn.norm_q": "attn1.norm_q",
        "self_attn.norm_k": "attn1.norm_k",
        "cross_attn.q": "attn2.to_q",
        "cross_attn.k": "attn2.to_k",
        "cross_attn.v": "attn2.to_v",
        "cross_attn.o": "attn2.to_out.0",
        "cross_attn.norm_q": "attn2.norm_q",
        "cross_attn.norm_k": "attn2.norm_k",
        "norm3": "norm2",
        "ffn.0": "ffn.net.0.proj",
        "ffn.2": "ffn.net.2",
    }
    out = {}
    for key, value in sd.items():
        if key == "head.modulation":
            out["scale_shift_table"] = value
            continue
        if key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            if rest == "modulation":
                out[f"blocks.{idx}.scale_shift_table"] = value
                continue
            module, param = rest.rsplit(".", 1)
            out[f"blocks.{idx}.{block[module]}.{param}"] = value
            continue
        module, param = key.rsplit(".", 1)
        out[f"{top[module]}.{param}"] = value
    return out


def random_dit(cfg=CFG, seed=0) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.05))
    return model


def diffusers_twin(model: WanDiT, diffusers):
    cfg = model.cfg
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    ).eval()
    ref.load_state_dict(wan_dit_to_diffusers(model.state_dict()), strict=True)
    return ref


def inputs(cfg=CFG, b=2, f=3, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, h, w, generator=g)
    y = torch.randn(b, 20, f, h, w, generator=g)
    ctx = torch.randn(b, 512, cfg.text_dim, generator=g)
    t = torch.rand(1, generator=g) * 1000
    return x, y, t, ctx


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def consecutive_rope(b, f, h, w, head_dim):
    cos, sin = rope_table(list(range(f)), h // 2, w // 2, head_dim)
    return cos.expand(b, -1, -1), sin.expand(b, -1, -1)


def test_dit_matches_diffusers(diffusers):
    model = random_dit()
    ref = diffusers_twin(model, diffusers)
    x, y, t, ctx = inputs()
    cos, sin = consecutive_rope(2, 3, 4, 6, CFG.head_dim)
    with torch.no_grad():
        ours = model(x, y, t, ctx, cos, sin)
        theirs = ref(torch.cat([x, y], 1), t.expand(2), ctx, return_dict=False)[0]
    assert ours.shape == (2, 16, 3, 4, 6)
    assert rel_err(ours, theirs) < 1e-4


def test_perturbed_weight_breaks_the_match(diffusers):
    model = random_dit()
    ref = diffusers_twin(model, diffusers)
    with torch.no_grad():
        model.blocks[1].self_attn.k.weight[3, 5] += 0.5
    x, y, t, ctx = inputs(seed=2)
    cos, sin = consecutive_rope(2, 3, 4, 6, CFG.head_dim)
    with torch.no_grad():
        ours = model(x, y, t, ctx, cos, sin)
        theirs = ref(torch.cat([x, y], 1), t.expand(2), ctx, return_dict=False)[0]
    assert rel_err(ours, theirs) > 1e-4


def complex_rope_float64(positions, h, w, head_dim):
    """Wan's own construction in float64: a complex polar table per axis, concatenated -> [f*h*w, head_dim/2]."""
    c = head_dim // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]

    def table(pos, d):
        freqs = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        return torch.polar(
            torch.ones(len(pos), d // 2, dtype=torch.float64),
            torch.outer(torch.tensor(pos, dtype=torch.float64), freqs),
        )

    f = len(positions)
    ft, fh, fw = (
        table(positions, 2 * parts[0]),
        table(list(range(h)), 2 * parts[1]),
        table(list(range(w)), 2 * parts[2]),
    )
    return torch.cat(
        [
            ft[:, None, None].expand(f, h, w, -1),
            fh[None, :, None].expand(f, h, w, -1),
            fw[None, None].expand(f, h, w, -1),
        ],
        -1,
    ).reshape(f * h * w, c)


def test_dit_forward_past_position_1024_against_float64():
    # positions of a long video's last chunks, far past the reference's 1024-entry table
    model = random_dit().double()
    x, y, t, ctx = (v.double() for v in inputs(b=1, f=3, h=4, w=6, seed=7))
    far = [4000, 4004, 4008]
    cos, sin = rope_table(far, 2, 3, CFG.head_dim)
    table = complex_rope_float64(far, 2, 3, CFG.head_dim)
    with torch.no_grad():
        ours = model(x, y, t, ctx, cos[None].double(), sin[None].double())
        ref = model(x, y, t, ctx, table.real[None], table.imag[None])
        # RoPE is relative: the same chunk at positions 0, 4, 8 attends identically
        near_cos, near_sin = rope_table([0, 4, 8], 2, 3, CFG.head_dim)
        near = model(x, y, t, ctx, near_cos[None].double(), near_sin[None].double())
    assert rel_err(ours, ref) < 1e-7  # float32 tables past 1024 vs float64 complex ones (measured 1.7e-9)
    assert rel_err(ours, near) < 1e-7
    # and the positions matter: another spacing changes the output
    other_cos, other_sin = rope_table([4000, 4001, 4002], 2, 3, CFG.head_dim)
    with torch.no_grad():
        other = model(x, y, t, ctx, other_cos[None].double(), other_sin[None].double())
    assert rel_err(other, ours) > 1e-4  # measured 8e-4


def test_rope_equals_complex_reference():
    # Wan's reference: complex polar table, x viewed as complex pairs.
    head_dim, f, h, w = 24, 3, 2, 3
    positions = [0, 8, 4000]  # past the reference's 1024 cap on purpose
    cos, sin = rope_table(positions, h, w, head_dim)
    c = head_dim // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]
    assert [2 * p for p in parts] == list(rope_split(head_dim))

    freqs = complex_rope_float64(positions, h, w, head_dim)[:, None]
    x = torch.randn(1, f * h * w, 2, head_dim, dtype=torch.float64)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(1, f * h * w, 2, c, 2)) * freqs).flatten(3)
    ours = apply_rope(x.float(), cos[None], sin[None])
    assert rel_err(ours, ref) < 1e-6


def test_batched_rope_positions_differ_per_chunk():
    cos, sin = batched_rope_table([[0, 1], [2, 3]], 2, 2, 24)
    assert cos.shape == (2, 8, 12)
    # chunk 1's first frame is chunk 0's position 2: differs from chunk 0's first frame
    assert not torch.allclose(cos[0, :4], cos[1, :4])
    single, _ = rope_table([2, 3], 2, 2, 24)
    assert torch.equal(cos[1], single)


def test_batch_items_are_independent():
    model = random_dit()
    x, y, t, ctx = inputs(b=2)
    cos, sin = batched_rope_table([[0, 4, 8], [12, 16, 20]], 2, 3, CFG.head_dim)
    with torch.no_grad():
        both = model(x, y, t, ctx, cos, sin)
        one = model(x[1:], y[1:], t, ctx[1:], cos[1:], sin[1:])
    assert rel_err(both[1:], one) < 1e-5


def test_real_preset_key_layout_on_meta():
    with torch.device("meta"):
        model = WanDiT(get_preset("tempomaster-14b").dit)
    sd = model.state_dict()
    assert sd["patch_embedding.weight"].shape == (5120, 36, 1, 2, 2)
    assert sd["time_projection.1.weight"].shape == (30720, 5120)
    assert sd["blocks.39.ffn.0.weight"].shape == (13824, 5120)
    assert sd["head.head.weight"].shape == (64, 5120)
    assert "blocks.40.modulation" not in sd
    n = sum(p.numel() for p in model.parameters())
    assert 13.5e9 < n < 14.5e9
