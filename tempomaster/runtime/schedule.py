"""Flow-matching sigma schedule and Euler step, one schedule per stage (SPEC 2).

Each stage of the next-frame-rate pipeline runs its own schedule with its own
number of steps N and shift s:

    sigma_k = s * u_k / (1 + (s - 1) * u_k),  u = linspace(1, 0, N + 1)[:-1]
    timestep_k = 1000 * sigma_k
    x <- x + v * (sigma_{k+1} - sigma_k),     sigma_N = 0

Everything here is a small pure function over tensors so it can be checked
against hand-derived values without any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "flow_match_sigmas",
    "shift_sigmas",
    "sigmas_to_timesteps",
    "StageSchedule",
    "euler_step",
    "model_timestep",
]

# Timesteps are sigmas scaled to the training range [0, 1000].
NUM_TRAIN_TIMESTEPS = 1000


def flow_match_sigmas(num_steps: int, shift: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Shifted flow-match sigmas, ``[num_steps]``, descending from 1 (0 excluded).

    ``dtype`` defaults to float64 so the schedule itself adds no rounding.  The
    reference builds it in torch's default float32 (``torch.linspace`` then the
    shift formula in float32); pass ``dtype=torch.float32`` to reproduce those
    values bit for bit.  The two differ by at most about one float32 ulp.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    # N + 1 points from 1 to 0, last (sigma = 0, the clean sample) dropped: the
    # step after the last sigma goes to 0 implicitly (see StageSchedule.sigma_next).
    unshifted = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)[:-1]
    return shift_sigmas(unshifted, shift)


def shift_sigmas(u: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """``shift * u / (1 + (shift - 1) * u)``: keeps sigma in [0, 1] and spends more of it at high noise.

    ``shift`` may be a tensor broadcasting with ``u`` (a trainer drawing one
    sigma per example, each with its stage's shift).
    """
    return shift * u / (1.0 + (shift - 1.0) * u)


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Model timesteps for ``sigmas`` (any shape, e.g. ``[N]``, in [0, 1]): ``1000 * sigma``, same shape and dtype."""
    return sigmas * NUM_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class StageSchedule:
    """The schedule of one stage.

    Fields:
        sigmas:    float64 ``[N]``, descending, ``sigmas[0] == 1``.
        timesteps: float64 ``[N]``, ``1000 * sigmas``.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def create(cls, num_steps: int, shift: float) -> StageSchedule:
        sigmas = flow_match_sigmas(num_steps, shift)
        return cls(sigmas=sigmas, timesteps=sigmas_to_timesteps(sigmas))

    def __len__(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def num_steps(self) -> int:
        return len(self)

    def sigma(self, i: int) -> float:
        """sigma of step ``i`` as a Python float (float64)."""
        return float(self.sigmas[i])

    def timestep(self, i: int) -> float:
        """Timestep of step ``i`` (``1000 * sigma``) as a Python float."""
        return float(self.timesteps[i])

    def sigma_next(self, i: int) -> float:
        """sigma the step ``i`` moves to: ``sigmas[i + 1]``, or 0 after the last step."""
        if not 0 <= i < len(self):
            raise IndexError(f"step {i} out of range for a {len(self)}-step schedule")
        return float(self.sigmas[i + 1]) if i + 1 < len(self) else 0.0


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One flow-match Euler step: ``x + v * (sigma_next - sigma)``.

    x, v: latents and velocity of one shape (``[B, C, F, H, W]`` in the pipeline); sigmas in [0, 1].

    Dtype behaviour: the update is formed in float32 (or in float64 when ``x``
    is float64) whatever the dtypes of ``x`` and ``v``, then cast back to
    ``x.dtype``.  So bf16 latents get a float32-accurate step rounded once to
    bf16, and a pipeline that keeps its latents in float32 between steps (and
    casts to the model dtype only for the DiT call) never loses precision in
    the accumulation.  The reference instead multiplies and adds in bf16 when
    its latents are bf16; the two agree to bf16 rounding.

    ``sigma``/``sigma_next`` are Python floats (or 0-d tensors); their
    difference is taken in float64 before it scales ``v``.
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    step = float(sigma_next) - float(sigma)
    out = x.to(compute_dtype) + v.to(compute_dtype) * step
    return out.to(x.dtype)


def model_timestep(
    t: float | torch.Tensor,
    dtype: torch.dtype,
    cast_to_model_dtype: bool,
) -> torch.Tensor:
    """The timestep value the DiT's sinusoidal embedding sees, as float32 ``[1]``.

    The reference moves the timestep to the model dtype (bf16) before the DiT
    call, so the embedding sees e.g. 752 instead of 750, or 832 instead of
    833.33: this changes the output, so it is a selectable option here.

    - ``cast_to_model_dtype=True``: round ``t`` the way the reference does
      (float32 schedule value -> ``dtype``) and hand that value back in
      float32.  Backends can feed it to a float32 timestep input unchanged.
    - ``cast_to_model_dtype=False``: ``t`` in float32, no model-dtype rounding.

    With ``dtype`` float32 both options give the same value.
    """
    # Through float32 first: the reference's schedule lives in float32, and
    # rounding float64 -> bf16 directly could differ from float32 -> bf16 in
    # rare double-rounding cases.
    value = torch.as_tensor(t, dtype=torch.float64).reshape(1).to(torch.float32)
    if cast_to_model_dtype:
        value = value.to(dtype).to(torch.float32)
    return value
