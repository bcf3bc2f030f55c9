"""The `tiny` preset: the real architectures at toy widths with seeded random weights.

It makes `tm-run generate` work on a fresh machine with nothing downloaded,
and `write_tiny_checkpoints` writes it in the release's file layout so tests
exercise the same loading path as real checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..atomic_write import output_error
from ..errors import UsageError
from .checkpoints import DIT_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE, ModelSet
from .presets import get_preset

TINY_SEED = 20251116
TINY_CONFIG_FILE = "inference_configs.json"


def build_tiny_models(seed: int = TINY_SEED, dtype: torch.dtype = torch.float32) -> ModelSet:
    """Deterministic random weights: the same seed gives the same bytes on every machine."""
    from .dit import WanDiT
    from .t5 import UMT5Encoder
    from .tokenizer import tiny_tokenizer
    from .vae import WanVAE

    preset = get_preset("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = WanDiT(preset.dit)
        vae = WanVAE(preset.vae)
        t5 = UMT5Encoder(preset.t5)
        # The DiT and T5 files are stored in bf16 like the release's: round the
        # weights through bf16 so the built-in set equals the one on disk.
        with torch.no_grad():
            for model in (dit, t5):
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
    models = [m.to(dtype).eval() for m in (dit, vae, t5)]
    return ModelSet(preset=preset, dit=models[0], vae=models[1], t5=models[2], tokenizer=tiny_tokenizer())


def tiny_release_config(root: Path) -> dict:
    """An inference_configs.json in the release's format pointing at a tiny set."""
    cfg = get_preset("tiny").dit
    d = get_preset("tiny").defaults
    return {
        "model_configs": {
            "wan_video_text_encoder_path": str(root / T5_FILE),
            "wan_video_vae_path": str(root / VAE_FILE),
            "wan_video_dit_path": str(root / DIT_FILE),
            "wan_video_dit_config": {
                "has_image_input": False,
                "patch_size": list(cfg.patch_size),
                "in_dim": cfg.in_dim,
                "dim": cfg.dim,
                "ffn_dim": cfg.ffn_dim,
                "freq_dim": cfg.freq_dim,
                "text_dim": cfg.text_dim,
                "out_dim": cfg.out_dim,
                "num_heads": cfg.num_heads,
                "num_layers": cfg.num_layers,
                "eps": cfg.eps,
                "has_image_pos_emb": False,
            },
        },
        "inference_configs": {
            "height": d.height,
            "width": d.width,
            "num_frames": d.num_frames,
            "cfg_scale": d.guidance_scale,
            "tile": False,
            "save_fps": d.save_fps,
            "use_apg": d.use_apg,
            "verbose": False,
            "parallel_configs": {
                "frame_intervals": list(d.frame_intervals),
                "steps_per_stage": list(d.steps_per_stage),
                "shift_per_stage": list(d.shift_per_stage),
            },
        },
        "inference_cases": {},
    }


def write_tiny_checkpoints(out_dir: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny set in the release layout (bf16 files, like the release).

    Everything goes to a temporary folder beside `out_dir` first and is renamed
    into place, so a failure never leaves a half-written set.
    """
    from .tokenizer import build_tiny_tokenizer

    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"--out: {out_dir} exists and is not empty; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    models = build_tiny_models(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "encoders").mkdir()
        torch.save(_bf16(models.dit.state_dict()), tmp / DIT_FILE)
        torch.save(_bf16(models.t5.state_dict()), tmp / T5_FILE)
        # The release's VAE file is float32.
        torch.save({k: v.float().contiguous() for k, v in models.vae.state_dict().items()}, tmp / VAE_FILE)
        build_tiny_tokenizer(tmp / TOKENIZER_DIR)
        with open(tmp / TINY_CONFIG_FILE, "w", encoding="utf-8") as fh:
            json.dump(tiny_release_config(out_dir), fh, indent=2)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk: nothing is left behind
            raise output_error(out_dir, err) from None
        raise
    return out_dir


def _bf16(state: dict) -> dict:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
