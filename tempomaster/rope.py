"""Real-valued 3D rotary position tables for the DiT (SPEC section 1).

Pure functions shared by the model, the exporter and the runtime: the runtime
computes the cos/sin tables per chunk and every backend takes them as inputs,
so no graph needs complex numbers or a fixed-size position table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real channels of the (temporal, height, width) parts of one head.

    Wan2.1 builds its complex table from parts of d - 4*(d//6), 2*(d//6) and
    2*(d//6) real channels (SPEC's d - 2*(d//3), d//3, d//3 for d = 128).
    """
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _rope_angles(positions: torch.Tensor, part_dim: int, theta: float) -> torch.Tensor:
    # [P] -> [P, part_dim // 2]; float64 so large positions keep their precision.
    inv_freq = 1.0 / theta ** (torch.arange(0, part_dim, 2, dtype=torch.float64) / part_dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def rope_table(
    temporal_positions: Sequence[int] | torch.Tensor,
    height: int,
    width: int,
    head_dim: int,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for a chunk of tokens laid out (frame, row, column).

    temporal_positions: the timeline position of each latent frame of the chunk
    (any integers, no upper limit); height, width: the token grid after
    patchify. Returns cos, sin of shape [f*height*width, head_dim // 2],
    float32, in the token order of `WanDiT.patchify`.
    """
    t_pos = torch.as_tensor(temporal_positions, dtype=torch.float64).reshape(-1)
    d_t, d_h, d_w = rope_split(head_dim)
    f = t_pos.numel()
    ang_t = _rope_angles(t_pos, d_t, theta)  # [f, d_t/2]
    ang_h = _rope_angles(torch.arange(height), d_h, theta)  # [h, d_h/2]
    ang_w = _rope_angles(torch.arange(width), d_w, theta)  # [w, d_w/2]
    angles = torch.cat(
        [
            ang_t[:, None, None, :].expand(f, height, width, -1),
            ang_h[None, :, None, :].expand(f, height, width, -1),
            ang_w[None, None, :, :].expand(f, height, width, -1),
        ],
        dim=-1,
    ).reshape(f * height * width, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def batched_rope_table(
    positions_per_item: Sequence[Sequence[int]], height: int, width: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-chunk tables: [B, L, head_dim // 2] each for cos and sin."""
    tables = [rope_table(p, height, width, head_dim) for p in positions_per_item]
    return torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables])
