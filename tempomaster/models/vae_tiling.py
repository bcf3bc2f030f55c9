"""The release's spatial tiling of the VAE (`"tile": true`), as pure functions.

With tiling on, the release runs every VAE encode and decode on overlapping
spatial tiles and blends them. Its rule, per axis of extent `n`, tile `size`
and `stride` (all in the input's units):

    starts   every multiple p of stride below n, except when the previous
             tile already reached the edge: p - stride >= 0 and
             p - stride + size >= n
    span     [p, min(p + size, n))           (the last tile may be cut)
    mask     1, except ramps (i + 1) / border on each side that is not the
             image border, falling on the far side; border = (size - stride)
             scaled to the output's units; the 2-D mask is the minimum of
             the two axes' masks
    blend    sum(tile * mask) / sum(mask), accumulated on the host in the
             input's dtype; decode clamps to [-1, 1] after dividing, never
             a tile on its own

The tile size and stride are given in latent units (the release passes
(30, 52) / (15, 26)); encode works in pixels, so both are multiplied by the
VAE's spatial ratio there. Each tile is one call of a per-tile function over
every frame, so a causal VAE keeps its temporal cache per tile, and the same
blending serves the torch model and the exported step graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "TileSpec",
    "RELEASE_TILE",
    "resolve_tile",
    "tile_starts",
    "tile_spans",
    "tile_grid",
    "tile_shapes",
    "axis_mask",
    "tile_mask",
    "blend_tiles",
    "tiled_decode",
    "tiled_encode",
]


@dataclass(frozen=True)
class TileSpec:
    """Tile size and stride as (height, width), in latent units."""

    size: tuple[int, int] = (30, 52)
    stride: tuple[int, int] = (15, 26)

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "stride", tuple(int(v) for v in self.stride))
        if len(self.size) != 2 or len(self.stride) != 2:
            raise ValueError(f"tile size and stride are (height, width) pairs, got {self}")
        # stride > size would leave pixels no tile covers (a zero weight sum).
        if not all(0 < s <= z for s, z in zip(self.stride, self.size)):
            raise ValueError(
                f"tiling needs 0 < stride <= size on both axes, got size {self.size}, stride {self.stride}"
            )

    def scaled(self, factor: int) -> TileSpec:
        return TileSpec(tuple(v * factor for v in self.size), tuple(v * factor for v in self.stride))

    def as_dict(self) -> dict:
        return {"size": list(self.size), "stride": list(self.stride)}

    @classmethod
    def from_dict(cls, data: dict) -> TileSpec:
        return cls(tuple(data["size"]), tuple(data["stride"]))


# The pipeline's values, not the VAE wrapper's own (34, 34) / (18, 16) defaults.
RELEASE_TILE = TileSpec((30, 52), (15, 26))


def resolve_tile(tile: bool | TileSpec | None) -> TileSpec | None:
    """A backend's `tile` option: False/None = untiled, True = the release's tiling."""
    if tile is None or tile is False:
        return None
    if tile is True:
        return RELEASE_TILE
    if isinstance(tile, TileSpec):
        return tile
    raise TypeError(f"tile must be a bool or a TileSpec, got {tile!r}")


# ---------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------


def tile_starts(extent: int, size: int, stride: int) -> list[int]:
    """Start of every tile along one axis."""
    return [p for p in range(0, extent, stride) if not (p - stride >= 0 and p - stride + size >= extent)]


def tile_spans(extent: int, size: int, stride: int) -> list[tuple[int, int, bool, bool]]:
    """(start, stop, at_lead_border, at_trail_border) of every tile along one axis.

    A tile reaches the far border when its uncut end is at or past the extent."""
    return [(p, min(p + size, extent), p == 0, p + size >= extent) for p in tile_starts(extent, size, stride)]


def tile_grid(
    height: int, width: int, spec: TileSpec
) -> list[tuple[tuple[int, int, bool, bool], tuple[int, int, bool, bool]]]:
    """Every tile as (h span, w span), rows outer, as the release visits them."""
    hs = tile_spans(height, spec.size[0], spec.stride[0])
    ws = tile_spans(width, spec.size[1], spec.stride[1])
    return [(h, w) for h in hs for w in ws]


def tile_shapes(height: int, width: int, spec: TileSpec) -> list[tuple[int, int]]:
    """The distinct (h, w) tile shapes of a grid, largest first.

    Only the last tile of an axis can be cut, so there are at most four."""
    shapes = {(h[1] - h[0], w[1] - w[0]) for h, w in tile_grid(height, width, spec)}
    return sorted(shapes, key=lambda s: (-s[0] * s[1], -s[0], -s[1]))


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def axis_mask(length: int, border: int, lead_bound: bool, trail_bound: bool) -> torch.Tensor:
    """float32 weights of one tile along one axis.

    The trailing ramp is written after the leading one, so where a tile has
    both and they overlap (stride < size / 2), the trailing one wins, as in
    the release. A tile the placement rule keeps is always longer than
    `border`."""
    x = torch.ones(length)
    if border > 0:
        ramp = (torch.arange(border) + 1) / border
        if not lead_bound:
            x[:border] = ramp
        if not trail_bound:
            x[-border:] = ramp.flip(0)
    return x


def tile_mask(height: int, width: int, border: tuple[int, int], bounds: tuple[bool, bool, bool, bool]) -> torch.Tensor:
    """float32 [height, width] weights: the minimum of the two axes' masks.

    bounds: (top, bottom, left, right) sides that are the image's border."""
    mh = axis_mask(height, border[0], bounds[0], bounds[1])
    mw = axis_mask(width, border[1], bounds[2], bounds[3])
    return torch.minimum(mh[:, None].expand(height, width), mw[None, :].expand(height, width))


# ---------------------------------------------------------------------------
# Blending
# ---------------------------------------------------------------------------

TileFn = Callable[[torch.Tensor], torch.Tensor]  # one tile in, its encoding or decoding out
Device = torch.device | str | None


def blend_tiles(
    fn: TileFn, x: torch.Tensor, spec: TileSpec, up: int = 1, down: int = 1, device: Device = None
) -> torch.Tensor:
    """Run `fn` on every tile of x [..., H, W] and blend the results.

    spec is in x's units. The output's spatial units are x's times up / down
    (decode: up 8; encode: down 8). Every tile is moved to `device` (default:
    x's) for `fn`; its result comes back to the host, where sums and weights
    live in x's dtype. Returns the blended host tensor, unclamped.
    """
    host = torch.device("cpu")
    device = torch.device(device) if device is not None else x.device
    height, width = x.shape[-2:]
    out_h, out_w = height * up // down, width * up // down
    border = tuple((z - s) * up // down for z, s in zip(spec.size, spec.stride))
    values = weight = None
    for (h0, h1, top, bottom), (w0, w1, left, right) in tile_grid(height, width, spec):
        tile = fn(x[..., h0:h1, w0:w1].to(device)).to(host)
        th, tw = tile.shape[-2:]
        if values is None:
            values = torch.zeros((*tile.shape[:-2], out_h, out_w), dtype=x.dtype)
            weight = torch.zeros((out_h, out_w), dtype=x.dtype)
        mask = tile_mask(th, tw, border, (top, bottom, left, right)).to(x.dtype)
        y0, x0 = h0 * up // down, w0 * up // down
        values[..., y0 : y0 + th, x0 : x0 + tw] += tile * mask
        weight[y0 : y0 + th, x0 : x0 + tw] += mask
    return values / weight


def tiled_decode(
    fn: TileFn, latents: torch.Tensor, spec: TileSpec = RELEASE_TILE, ratio: int = 8, device: Device = None
) -> torch.Tensor:
    """latents [B, z, F, h, w] -> frames [B, 3, T, ratio*h, ratio*w] in [-1, 1], on the host.

    fn decodes one latent tile over all its frames, unclamped."""
    return blend_tiles(fn, latents, spec, up=ratio, device=device).clamp_(-1, 1)


def tiled_encode(
    fn: TileFn, video: torch.Tensor, spec: TileSpec = RELEASE_TILE, ratio: int = 8, device: Device = None
) -> torch.Tensor:
    """video [B, 3, T, H, W] -> latents [B, z, F, H/ratio, W/ratio], on the host.

    spec is in latent units; the tiles are spec x ratio pixels."""
    return blend_tiles(fn, video, spec.scaled(ratio), down=ratio, device=device)
