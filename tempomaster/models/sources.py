"""Where the models come from: a checkpoint directory, a release config, the shipped toy set or the built-in tiny set."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import CheckpointError, CheckpointPaths, ModelSet, load_models, read_json
from .presets import DEFAULT_PRESET, get_preset, packaged_weights_dir
from .tiny import build_tiny_models


def release_config_has_models(config: Path | None) -> bool:
    return config is not None and "model_configs" in read_json(config)


def load_model_set(
    preset_name: str | None,
    checkpoints: Path | None,
    config: Path | None,
    dtype: torch.dtype = torch.float32,
) -> ModelSet:
    """--checkpoints DIR wins, then --config's model_configs, then the preset (the trained toy by default)."""
    preset = get_preset(preset_name) if preset_name else None
    if checkpoints is not None:
        return load_models(CheckpointPaths.from_dir(checkpoints), preset, dtype)
    if release_config_has_models(config):
        return load_models(CheckpointPaths.from_release_config(config), preset, dtype)
    preset = preset or get_preset(DEFAULT_PRESET)
    if preset.builtin_weights:
        return build_tiny_models(dtype=dtype)
    if preset.packaged_weights is not None:
        return load_packaged_models(preset.name, dtype)
    raise CheckpointError(
        f"--preset {preset.name}: has no built-in weights; give --checkpoints DIR or --config inference_configs.json"
    )


def load_packaged_models(preset_name: str, dtype: torch.dtype = torch.float32) -> ModelSet:
    """A preset's weights shipped with the package (the trained toy), loaded like any release set."""
    preset = get_preset(preset_name)
    root = packaged_weights_dir(preset)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: the {preset.name} preset's weights are missing from this install; "
            "reinstall the package or retrain them (tm-export train-toy)"
        )
    return load_models(CheckpointPaths.from_dir(root), preset, dtype)
