"""The release's tiled VAE (`"tile": true`): placement, masks, blending.

Placements are worked out by hand; masks and blends are checked against a
float64 transcription of the rule written here from its description (loops,
no shared code), applied to the untiled model's output on each tile crop.
"""

from __future__ import annotations

import pytest
import torch

from tempomaster.models.presets import get_preset
from tempomaster.models.vae import WanVAE
from tempomaster.models.vae_tiling import (
    RELEASE_TILE,
    TileSpec,
    axis_mask,
    tile_grid,
    tile_mask,
    tile_shapes,
    tile_spans,
    tile_starts,
    tiled_decode,
    tiled_encode,
)

# ---------------------------------------------------------------------------
# the rule, transcribed in float64
# ---------------------------------------------------------------------------


def ref_axis(length: int, border: int, lead_edge: bool, trail_edge: bool) -> list[float]:
    out = []
    for i in range(length):
        w = 1.0
        if not lead_edge and i < border:
            w = (i + 1) / border
        if not trail_edge and i >= length - border:  # written second: wins where both apply
            w = (length - i) / border
        out.append(w)
    return out


def ref_mask(h: int, w: int, border: tuple[int, int], bounds) -> torch.Tensor:
    mh = ref_axis(h, border[0], bounds[0], bounds[1])
    mw = ref_axis(w, border[1], bounds[2], bounds[3])
    return torch.tensor([[min(a, b) for b in mw] for a in mh], dtype=torch.float64)


def ref_blend(tiles, out_hw, border, clamp: bool) -> torch.Tensor:
    """tiles: [(tensor [..., th, tw] at output offset (y, x), bounds)] -> float64 blend."""
    first = tiles[0][0]
    values = torch.zeros((*first.shape[:-2], *out_hw), dtype=torch.float64)
    weight = torch.zeros(out_hw, dtype=torch.float64)
    for t, (y, x), bounds in tiles:
        th, tw = t.shape[-2:]
        m = ref_mask(th, tw, border, bounds)
        values[..., y : y + th, x : x + tw] += t.double() * m
        weight[y : y + th, x : x + tw] += m
    out = values / weight
    return out.clamp(-1, 1) if clamp else out


# ---------------------------------------------------------------------------
# placement, by hand
# ---------------------------------------------------------------------------


def test_release_480x832_is_nine_full_tiles():
    # latent 60 x 104, size (30, 52), stride (15, 26)
    # h: 45 is skipped (30 + 30 >= 60); w: 78 is skipped (52 + 52 >= 104)
    assert tile_starts(60, 30, 15) == [0, 15, 30]
    assert tile_starts(104, 52, 26) == [0, 26, 52]
    assert tile_spans(60, 30, 15) == [(0, 30, True, False), (15, 45, False, False), (30, 60, False, True)]
    grid = tile_grid(60, 104, RELEASE_TILE)
    assert len(grid) == 9
    assert [(h[0], w[0]) for h, w in grid] == [(h, w) for h in (0, 15, 30) for w in (0, 26, 52)]
    assert tile_shapes(60, 104, RELEASE_TILE) == [(30, 52)]
    # encode: the same tiles in pixels
    px = RELEASE_TILE.scaled(8)
    assert px.size == (240, 416) and px.stride == (120, 208)
    assert tile_starts(480, 240, 120) == [0, 120, 240]
    assert tile_starts(832, 416, 208) == [0, 208, 416]


def test_placement_when_the_stride_divides_the_extent():
    # 45 = 3 x 15: 0, 15 kept (15 - 15 + 30 = 30 < 45), 30 skipped (15 + 30 >= 45)
    assert tile_spans(45, 30, 15) == [(0, 30, True, False), (15, 45, False, True)]
    # 60 = 4 x 15 (the release's height) is the case above: the last start, 45, is skipped
    assert tile_starts(60, 30, 15) == [0, 15, 30]


def test_placement_with_a_cut_last_tile():
    # 64: 45 kept (30 + 30 = 60 < 64) and cut to 19; 60 skipped (45 + 30 >= 64)
    assert tile_spans(64, 30, 15) == [
        (0, 30, True, False),
        (15, 45, False, False),
        (30, 60, False, False),
        (45, 64, False, True),
    ]
    # 720p width, latent 160: starts 0..130 by 26, the last cut to 30
    assert tile_starts(160, 52, 26) == [0, 26, 52, 78, 104, 130]
    assert tile_spans(160, 52, 26)[-1] == (130, 160, False, True)
    assert tile_shapes(90, 160, RELEASE_TILE) == [(30, 52), (30, 30)]


def test_placement_smaller_than_a_tile():
    # one tile, cut to the extent, both sides on the border (weights all 1)
    assert tile_spans(4, 30, 15) == [(0, 4, True, True)]
    assert tile_spans(30, 30, 15) == [(0, 30, True, True)]  # exactly one tile: 15 is skipped
    assert tile_shapes(4, 6, RELEASE_TILE) == [(4, 6)]  # the tiny preset's 32x48 pixels
    assert torch.equal(tile_mask(4, 6, (120, 208), (True, True, True, True)), torch.ones(4, 6))


def test_tile_spec_rejects_gaps():
    with pytest.raises(ValueError, match="stride"):
        TileSpec((4, 6), (5, 3))


# ---------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length, border", [(30, 15), (240, 120), (416, 208), (19, 7), (10, 7), (12, 0)])
def test_axis_mask_matches_the_rule(length, border):
    for lead in (False, True):
        for trail in (False, True):
            ours = axis_mask(length, border, lead, trail)
            assert ours.dtype == torch.float32
            ref = torch.tensor(ref_axis(length, border, lead, trail), dtype=torch.float64)
            torch.testing.assert_close(ours.double(), ref, rtol=0, atol=6e-8)


def test_ramp_values_by_hand():
    # border 4, inner on both sides: 1/4 2/4 3/4 1 ... 1 1 3/4 2/4 1/4 (the far side falls)
    m = axis_mask(10, 4, False, False)
    assert m.tolist() == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert axis_mask(6, 4, True, False).tolist() == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_2d_mask_is_the_minimum_of_the_axes():
    g = torch.Generator().manual_seed(11)
    for _ in range(12):
        h, w = (int(v) for v in torch.randint(9, 40, (2,), generator=g))
        border = (
            int(torch.randint(0, h // 2 + 1, (1,), generator=g)),
            int(torch.randint(0, w // 2 + 1, (1,), generator=g)),
        )
        bounds = tuple(bool(b) for b in torch.randint(0, 2, (4,), generator=g))
        ours = tile_mask(h, w, border, bounds)
        torch.testing.assert_close(ours.double(), ref_mask(h, w, border, bounds), rtol=0, atol=6e-8)


# ---------------------------------------------------------------------------
# blending on the tiny VAE, two tiles wide (and two tall)
# ---------------------------------------------------------------------------

SPEC = TileSpec((4, 6), (2, 3))
# latent 6 x 9: h tiles [0, 4), [2, 6); w tiles [0, 6), [3, 9) (by hand, as above)
H_TILES = [(0, 4, True, False), (2, 6, False, True)]
W_TILES = [(0, 6, True, False), (3, 9, False, True)]


@pytest.fixture(scope="module")
def vae():
    model = WanVAE(get_preset("tiny").vae).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                # a larger output conv than usual: some pixels leave [-1, 1], so clamping matters
                scale = 0.3 if name.startswith("decoder.head.2") else 0.08
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def test_grid_of_the_test_clip():
    assert tile_grid(6, 9, SPEC) == [(h, w) for h in H_TILES for w in W_TILES]


def test_tiled_decode_equals_the_rule_on_per_tile_outputs(vae):
    g = torch.Generator().manual_seed(21)
    lat = torch.randn(1, 16, 3, 6, 9, generator=g)
    tiles = []
    for h0, h1, top, bottom in H_TILES:
        for w0, w1, left, right in W_TILES:
            out = vae.decode(lat[..., h0:h1, w0:w1], clamp=False)
            tiles.append((out, (8 * h0, 8 * w0), (top, bottom, left, right)))
    ref = ref_blend(tiles, (48, 72), (16, 24), clamp=True)
    ours = vae.decode(lat, tile=SPEC)
    assert ours.shape == (1, 3, 9, 48, 72) and ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max() < 2e-6
    # the tiling changed the picture (the mid attention sees only its tile), and it clamped after blending
    assert (ours - vae.decode(lat)).abs().max() > 1e-2
    unclamped = ref_blend(tiles, (48, 72), (16, 24), clamp=False)
    assert (unclamped.abs() > 1).any()
    per_tile_clamped = ref_blend([(t.clamp(-1, 1), o, b) for t, o, b in tiles], (48, 72), (16, 24), clamp=True)
    assert (per_tile_clamped - ref).abs().max() > 1e-3


def test_tiled_encode_equals_the_rule_on_per_tile_outputs(vae):
    g = torch.Generator().manual_seed(22)
    video = torch.rand(1, 3, 5, 48, 72, generator=g) * 2 - 1
    tiles = []
    for h0, h1, top, bottom in H_TILES:
        for w0, w1, left, right in W_TILES:
            out = vae.encode(video[..., 8 * h0 : 8 * h1, 8 * w0 : 8 * w1])
            tiles.append((out, (h0, w0), (top, bottom, left, right)))
    # encode ramps over (size - stride) * 8 / 8 latent positions
    ref = ref_blend(tiles, (6, 9), (2, 3), clamp=False)
    ours = vae.encode(video, tile=SPEC)
    assert ours.shape == (1, 16, 2, 6, 9)
    assert (ours.double() - ref).abs().max() < 2e-6
    assert (ours - vae.encode(video)).abs().max() > 1e-3


def test_blend_before_clamp_on_a_stand_in():
    """Tiles that disagree far outside [-1, 1]: only a clamp after blending gives the mean."""
    calls = []

    def fn(z):  # latent tile -> 8x upsampled constant per tile
        calls.append(tuple(z.shape))
        value = 3.0 if len(calls) == 1 else -2.0
        return torch.full((*z.shape[:-2], 8 * z.shape[-2], 8 * z.shape[-1]), value)

    z = torch.zeros(1, 1, 1, 4, 9)
    out = tiled_decode(fn, z, TileSpec((4, 6), (4, 3)))
    assert calls == [(1, 1, 1, 4, 6), (1, 1, 1, 4, 6)]
    row = out[0, 0, 0, 0]
    tiles = [
        (torch.full((1, 1, 1, 32, 48), 3.0), (0, 0), (True, True, True, False)),
        (torch.full((1, 1, 1, 32, 48), -2.0), (0, 24), (True, True, False, True)),
    ]
    ref = ref_blend(tiles, (32, 72), (0, 24), clamp=True)[0, 0, 0, 0]
    torch.testing.assert_close(row.double(), ref, rtol=0, atol=1e-6)
    # across the 24-pixel overlap the blend passes through [-1, 1] linearly
    assert row[23] == 1 and row[48] == -1 and -1 < row[36] < 1


def test_sums_in_the_latents_dtype_on_the_host(vae):
    """bf16 latents: tiles, masks, sums and the division are bf16 on the host, as in a bf16 release run."""
    g = torch.Generator().manual_seed(23)
    lat = torch.randn(1, 16, 2, 6, 9, generator=g).bfloat16()

    def fn(z):
        return vae.decode(z.float(), clamp=False).bfloat16()

    ours = tiled_decode(fn, lat, SPEC)
    assert ours.dtype == torch.bfloat16 and ours.device.type == "cpu"
    tiles = [
        (fn(lat[..., h0:h1, w0:w1]), (8 * h0, 8 * w0), (top, bottom, left, right))
        for h0, h1, top, bottom in H_TILES
        for w0, w1, left, right in W_TILES
    ]
    exact = ref_blend(tiles, (48, 72), (16, 24), clamp=True)
    # within a few bf16 steps of the exact blend of the same tiles ...
    assert (ours.double() - exact).abs().max() <= 4 / 128
    # ... and not the float32 sum rounded once: the sums really are bf16
    assert not torch.equal(ours, exact.bfloat16())
    video = (torch.rand(1, 3, 5, 48, 72, generator=g) * 2 - 1).bfloat16()
    z = tiled_encode(lambda v: vae.encode(v.float()).bfloat16(), video, SPEC)
    assert z.dtype == torch.bfloat16 and z.shape == (1, 16, 2, 6, 9)
    z_exact = ref_blend(
        [
            (vae.encode(video[..., 8 * h0 : 8 * h1, 8 * w0 : 8 * w1].float()).bfloat16(), (h0, w0), (t, b, l, r))
            for h0, h1, t, b in H_TILES
            for w0, w1, l, r in W_TILES
        ],
        (6, 9),
        (2, 3),
        clamp=False,
    )
    assert (z.double() - z_exact).abs().max() <= 4 / 128 * max(1.0, float(z_exact.abs().max()))
