"""What every training phase shares: seeded draws (by seed, phase, step), a cosine learning rate, resumable states."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .state_files import SUFFIX as STATE_SUFFIX
from .state_files import load_state


def seeded_rng(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, step])


def seeded_torch_generator(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seeded_rng(seed, phase, step).integers(2**62)))


def cosine_lr(base: float, step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def state_file(work: Path, name: str) -> Path:
    """Where a phase (or task shard) ``name`` keeps its state in the work folder."""
    return work / f"{name}{STATE_SUFFIX}"


def load_phase_state(path: Path):
    """The state at ``path``, or the pickled one an earlier version left beside it (``NAME.pt``), or None."""
    if path.is_file():
        return load_state(path)
    legacy = path.with_suffix(".pt")
    return _load_legacy(legacy) if legacy.is_file() else None


def _load_legacy(path: Path):
    """An earlier version's ``.pt`` state, through torch's tensors-only unpickler: its states hold only
    tensors, containers and scalars, so they resume; anything else in it is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"--work: {path} is not a training state that can be read safely ({type(err).__name__}: "
            f"{first}); remove it to redo that part"
        ) from None


def has_phase_state(work: Path, name: str) -> bool:
    path = state_file(work, name)
    return path.is_file() or path.with_suffix(".pt").is_file()


def resume_phase(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict | None, list[dict], int]:
    """(checkpoint or None, loss log, first step) of a phase; the model and optimiser take the checkpoint's state."""
    state = load_phase_state(path)
    if state is None:
        return None, [], 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return state, state["log"], state["step"]
