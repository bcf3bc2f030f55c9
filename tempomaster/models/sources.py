"""Where the models come from: a checkpoint directory, a release config, or the built-in tiny set."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import CheckpointError, CheckpointPaths, ModelSet, load_models, read_json
from .presets import get_preset
from .tiny import build_tiny_models


def release_config_has_models(config: Path | None) -> bool:
    return config is not None and "model_configs" in read_json(config)


def load_model_set(
    preset_name: str | None,
    checkpoints: Path | None,
    config: Path | None,
    dtype: torch.dtype = torch.float32,
) -> ModelSet:
    """--checkpoints DIR wins, then --config's model_configs, then the preset (tiny by default)."""
    preset = get_preset(preset_name) if preset_name else None
    if checkpoints is not None:
        return load_models(CheckpointPaths.from_dir(checkpoints), preset, dtype)
    if release_config_has_models(config):
        return load_models(CheckpointPaths.from_release_config(config), preset, dtype)
    if preset is None or preset.builtin_weights:
        return build_tiny_models(dtype=dtype)
    raise CheckpointError(
        f"--preset {preset.name}: has no built-in weights; give --checkpoints DIR or --config inference_configs.json"
    )
