"""Model sizes and default generation shapes of the built-in presets.

A preset names the architecture of all three models plus the shape that both
`tm-run generate` and `tm-export onnx` use when no shape flag is given.
Dimensions that a checkpoint determines are read from the checkpoint
(`checkpoints.infer_*_config`); a preset only supplies what tensors cannot
tell (the DiT's head count) and the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120  # token width
    ffn_dim: int = 13824  # hidden width of each block's GELU MLP
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36  # 16 noisy latent + 4 mask + 16 condition latent
    out_dim: int = 16
    text_dim: int = 4096  # umT5's output width (the cross-attention context)
    freq_dim: int = 256  # sinusoidal timestep embedding width
    patch_size: tuple[int, int, int] = (1, 2, 2)  # latent (t, h, w) per token
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384  # umT5's sentencepiece vocabulary
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240  # gated-GELU hidden width
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets (one bias table per layer)
    text_len: int = 512  # tokens per prompt, padded
    eps: float = 1e-6


@dataclass(frozen=True)
class GenerationDefaults:
    height: int = 480
    width: int = 832
    num_frames: int = 109
    frame_intervals: tuple[int, ...] = (4, 2, 1)
    steps_per_stage: tuple[int, ...] = (50, 32, 32)
    shift_per_stage: tuple[float, ...] = (5.0, 3.0, 3.0)
    guidance_scale: float = 8.0
    use_apg: bool = True
    save_fps: int = 24


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    t5: T5Config
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    # The tiny preset builds its own weights and tokenizer; the others need files.
    builtin_weights: bool = False
    # A preset whose trained weights ship inside the package: the folder's name
    # under tempomaster/toy/ (the release's file layout).
    packaged_weights: str | None = None


# umT5 at toy width: the tiny preset's (random) and the toy's (frozen at its seeded weights).
_SMALL_T5 = T5Config(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
# The toy's captions are 10 tokens: padded to 512, the 500 identical padding keys took most of
# the DiT's cross-attention (measured: 4-52% of it on the caption per layer); 32 leaves room
# for any caption and halves a DiT step on the CPU. Longer prompts are cut at 32 tokens.
_TOY_T5 = replace(_SMALL_T5, text_len=32)

PRESETS: dict[str, Preset] = {
    "tempomaster-14b": Preset(
        name="tempomaster-14b",
        dit=DiTConfig(),
        vae=VAEConfig(),
        t5=T5Config(),
    ),
    "wan-1.3b": Preset(
        name="wan-1.3b",
        dit=DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
        vae=VAEConfig(),
        t5=T5Config(),
    ),
    "tiny": Preset(
        name="tiny",
        dit=DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32),
        vae=VAEConfig(dim=8),
        t5=_SMALL_T5,
        defaults=GenerationDefaults(height=64, width=96, num_frames=17, steps_per_stage=(6, 4, 4)),
        builtin_weights=True,
    ),
    # Trained on synthetic clips (tempomaster/toy): the default of `tm-run generate`.
    "toy": Preset(
        name="toy",
        dit=DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_dim=32),
        vae=VAEConfig(dim=8),
        t5=_TOY_T5,
        defaults=GenerationDefaults(height=64, width=96, num_frames=17, steps_per_stage=(16, 8, 8), guidance_scale=5.0),
        packaged_weights="weights",
    ),
}


# What `tm-run generate` and `tm-export` use when no preset, checkpoints or config is given.
DEFAULT_PRESET = "toy"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; accepted: {', '.join(sorted(PRESETS))}") from None


def packaged_weights_dir(preset: Preset) -> Path:
    """Where a preset's shipped weights live (a folder under tempomaster/toy/, release layout)."""
    if preset.packaged_weights is None:
        raise ValueError(f"preset {preset.name!r} ships no weights")
    # A data path only: the models layer never imports the toy package.
    return Path(__file__).resolve().parents[1] / "toy" / preset.packaged_weights


__all__ = [
    "DEFAULT_PRESET",
    "packaged_weights_dir",
    "DiTConfig",
    "VAEConfig",
    "T5Config",
    "GenerationDefaults",
    "Preset",
    "PRESETS",
    "get_preset",
    "replace",
]
