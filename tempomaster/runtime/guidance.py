"""Classifier-free guidance and adaptive projected guidance (APG) for flow matching (SPEC 2).

Both work on the denoised estimates rather than on the velocities.  With
latents ``z`` ``[B, C, F, H, W]``, velocities ``v_c`` (prompt) and ``v_u``
(negative prompt) and ``t = timestep / 1000``:

    D_c = z - t * v_c,   D_u = z - t * v_u
    CFG: D = D_u + w * (D_c - D_u)
    APG: delta = D_c - D_u
         m <- delta + mu * m  (mu = -0.5; first step m = delta);  delta <- m
         delta *= min(1, 27 / ||delta||)   per (batch, frame) over (C, H, W)
         delta <- orthogonal part of delta w.r.t. D_c  (+ eta * parallel, eta = 0)
         D = D_c + (w - 1) * delta
    guided velocity = (z - D) / (t + 1e-8)

APG carries a momentum buffer across the steps of one stage: create a fresh
``APGState`` at the start of every stage (or call ``reset()``).

Precision: the arithmetic runs in float32 (float64 for float64 inputs), the
projection in float64 as the reference does, and results come back in the
input dtype.  The reference does the non-projection arithmetic in the model
dtype (bf16); that difference is within bf16 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "APG_MOMENTUM",
    "APG_NORM_THRESHOLD",
    "APG_ETA",
    "VELOCITY_EPS",
    "APGState",
    "MomentumBuffer",
    "denoised_from_velocity",
    "velocity_from_denoised",
    "cfg_denoised",
    "rescale_per_frame",
    "project",
    "apg_denoised",
    "guided_velocity",
]

APG_MOMENTUM = -0.5  # negative momentum: subtracts part of the previous update
APG_NORM_THRESHOLD = 27.0  # max L2 norm of delta per (batch, frame)
APG_ETA = 0.0  # weight kept of the part of delta parallel to D_c
VELOCITY_EPS = 1e-8  # keeps (z - D) / t finite at t = 0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _t_of(timestep: float | torch.Tensor) -> float:
    # The scalar t = timestep / 1000, shared by the batch (SPEC 1: one timestep
    # value per DiT call).
    return float(timestep) / 1000.0


@dataclass
class APGState:
    """Per-stage APG state: the momentum buffer and the APG constants.

    Fields:
        momentum:        mu in ``m <- delta + mu * m`` (default -0.5).
        norm_threshold:  max L2 norm per (batch, frame); <= 0 disables rescaling.
        eta:             weight of the parallel part kept (default 0).
        running_average: the momentum buffer ``m``; None until the first step.

    Make a fresh one at the start of each stage (the reference builds a new
    guidance object per stage), or call ``reset()``.
    """

    momentum: float = APG_MOMENTUM
    norm_threshold: float = APG_NORM_THRESHOLD
    eta: float = APG_ETA
    running_average: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the momentum buffer (start of a new stage)."""
        self.running_average = None

    def update(self, delta: torch.Tensor) -> torch.Tensor:
        """Fold ``delta`` ``[B, C, F, H, W]`` into the buffer and return the new buffer ``m`` (same shape).

        First call: ``m = delta``.  Later calls: ``m = delta + momentum * m``.
        A momentum of 0 means no buffer at all: ``delta`` is returned as is.
        """
        if self.momentum == 0:
            return delta
        if self.running_average is None:
            self.running_average = delta.clone()
        else:
            if self.running_average.shape != delta.shape:
                raise ValueError(
                    f"APG momentum buffer has shape {tuple(self.running_average.shape)} but this step's "
                    f"delta is {tuple(delta.shape)}: use a fresh APGState for each stage"
                )
            self.running_average = delta + self.momentum * self.running_average.to(delta.dtype)
        return self.running_average


# The reference's name for the buffer; APGState(momentum) builds the same thing.
MomentumBuffer = APGState


def denoised_from_velocity(z: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """``D = z - t * v``: the clean-sample estimate implied by velocity ``v``.

    z, v: latents ``[B, C, F, H, W]``; t = timestep / 1000 = sigma, in [0, 1].
    """
    return z - t * v


def velocity_from_denoised(z: torch.Tensor, denoised: torch.Tensor, t: float) -> torch.Tensor:
    """``v = (z - D) / (t + 1e-8)``, the inverse of ``denoised_from_velocity``.

    z, denoised: latents ``[B, C, F, H, W]``; t = timestep / 1000 = sigma, in [0, 1].
    """
    return (z - denoised) / (t + VELOCITY_EPS)


def cfg_denoised(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on denoised estimates ``[B, C, F, H, W]``: ``D_u + w * (D_c - D_u)``."""
    return d_uncond + scale * (d_cond - d_uncond)


def rescale_per_frame(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale ``delta`` ``[B, C, F, H, W]`` so each (batch, frame) slice has L2 norm <= threshold.

    The norm is over (channel, height, width); slices already under the
    threshold are left unchanged.  ``threshold <= 0`` disables the rescale.
    """
    if threshold <= 0:
        return delta
    if delta.dim() != 5:
        raise ValueError(f"expected latents [B, C, F, H, W], got shape {tuple(delta.shape)}")
    norm = torch.linalg.vector_norm(delta, ord=2, dim=(1, 3, 4), keepdim=True)
    # +1e-8 as in the reference: a zero slice stays zero instead of NaN.
    factor = torch.clamp(threshold / (norm + 1e-8), max=1.0)
    return delta * factor


def project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``v0`` into parts parallel and orthogonal to ``v1``, per batch item.

    v0, v1: ``[B, ...]`` of one shape (latents ``[B, C, F, H, W]`` here).
    Each batch item is treated as one flat vector over all its elements.  The
    arithmetic is float64 (the dot products run over millions of elements);
    both parts come back in ``v0.dtype``.
    """
    out_dtype = v0.dtype
    a = v0.to(torch.float64).flatten(1)
    b = v1.to(torch.float64).flatten(1)
    # Unit vector along v1; eps as torch.nn.functional.normalize uses (1e-12).
    b_unit = b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp_min(1e-12)
    parallel = (a * b_unit).sum(dim=1, keepdim=True) * b_unit
    orthogonal = a - parallel
    return parallel.view_as(v0).to(out_dtype), orthogonal.view_as(v0).to(out_dtype)


def apg_denoised(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale: float, state: APGState) -> torch.Tensor:
    """Adaptive projected guidance on denoised estimates ``[B, C, F, H, W]``; updates ``state``'s momentum."""
    delta = state.update(d_cond - d_uncond)
    delta = rescale_per_frame(delta, state.norm_threshold)
    parallel, orthogonal = project(delta, d_cond)
    delta = orthogonal + state.eta * parallel
    return d_cond + (scale - 1.0) * delta


def guided_velocity(
    z: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None,
    timestep: float | torch.Tensor,
    scale: float,
    use_apg: bool,
    state: APGState | None = None,
) -> torch.Tensor:
    """The guided velocity for one denoising step.

    Args:
        z:        latents ``[B, C, F, H, W]`` the DiT saw.
        v_cond:   DiT velocity with the prompt, same shape.
        v_uncond: DiT velocity with the negative prompt, same shape; may be
                  None when ``scale == 1``.
        timestep: the step's timestep (``1000 * sigma``), float or 0-d/1-element
                  tensor; ``t = timestep / 1000``.  Pass the value the DiT was
                  given (see ``schedule.model_timestep``) to match the
                  reference, which used the bf16-rounded timestep here too.
        scale:    guidance scale w.  ``scale == 1`` returns ``v_cond`` unchanged
                  (no guidance; the pipeline then skips the negative-prompt DiT
                  call entirely, and the APG momentum is not touched).
        use_apg:  APG if True, plain CFG if False.
        state:    the stage's ``APGState``; required when ``use_apg`` and
                  ``scale != 1``, ignored otherwise.

    Returns the guided velocity in ``z.dtype``.
    """
    if scale == 1:
        return v_cond
    if v_uncond is None:
        raise ValueError("guided_velocity: v_uncond is required when scale != 1")
    if use_apg and state is None:
        raise ValueError("guided_velocity: use_apg needs an APGState (a fresh one per stage)")
    if not (z.shape == v_cond.shape == v_uncond.shape):
        raise ValueError(
            f"shape mismatch: z {tuple(z.shape)}, v_cond {tuple(v_cond.shape)}, v_uncond {tuple(v_uncond.shape)}"
        )
    out_dtype = z.dtype
    dtype = _compute_dtype(z)
    t = _t_of(timestep)
    zc = z.to(dtype)
    d_cond = denoised_from_velocity(zc, v_cond.to(dtype), t)
    d_uncond = denoised_from_velocity(zc, v_uncond.to(dtype), t)
    if use_apg:
        denoised = apg_denoised(d_cond, d_uncond, scale, state)
    else:
        denoised = cfg_denoised(d_cond, d_uncond, scale)
    return velocity_from_denoised(zc, denoised, t).to(out_dtype)
