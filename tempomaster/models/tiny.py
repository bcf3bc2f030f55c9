"""The `tiny` preset: the real architectures at toy widths with seeded random weights.

It makes `tm-run generate` work on a fresh machine with nothing downloaded,
and `write_tiny_checkpoints` writes it in the release's file layout so tests
exercise the same loading path as real checkpoints (`write_release_checkpoints`
does the same for any model set with the tiny tokenizer: the CPU benchmark's
weights, for the release's own loader).
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
    return release_config(root, get_preset("tiny"))


def release_config(root: Path, preset) -> dict:
    """An inference_configs.json in the release's format: the file set under `root`, `preset`'s DiT and defaults."""
    cfg = preset.dit
    d = preset.defaults
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
    """Write the tiny set in the release layout (bf16 files, like the release)."""
    out_dir = Path(out_dir).resolve()
    return write_release_checkpoints(build_tiny_models(seed), out_dir, tiny_release_config(out_dir))


def write_release_checkpoints(models: ModelSet, out_dir: str | os.PathLike, config: dict) -> Path:
    """Write `models` as the release's file set: the DiT and umT5 state dicts in
    bf16 (as the release ships them), the VAE's in float32, the tiny tokenizer
    (the only one a written set can carry) and `config` as inference_configs.json.

    The DiT and umT5 weights must already be bf16 values (as `build_tiny_models`
    makes them), so that the files hold exactly the models' numbers. Everything
    goes to a temporary folder beside `out_dir` first and is renamed into
    place, so a failure never leaves a half-written set.
    """
    from .tokenizer import build_tiny_tokenizer

    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"--out: {out_dir} exists and is not empty; choose a new directory")
    dit, t5 = _bf16(models.dit.state_dict(), "DiT"), _bf16(models.t5.state_dict(), "umT5 encoder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "encoders").mkdir()
        torch.save(dit, tmp / DIT_FILE)
        del dit
        torch.save(t5, tmp / T5_FILE)
        # The release's VAE file is float32.
        torch.save({k: v.float().contiguous() for k, v in models.vae.state_dict().items()}, tmp / VAE_FILE)
        build_tiny_tokenizer(tmp / TOKENIZER_DIR)
        with open(tmp / TINY_CONFIG_FILE, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk: nothing is left behind
            raise output_error(out_dir, err) from None
        raise
    return out_dir


def _bf16(state: dict, what: str) -> dict:
    """The state dict in bf16; a value bf16 cannot hold exactly is an error (the file would differ from the model)."""
    out = {}
    for k, v in state.items():
        b = v.detach().to(torch.bfloat16).contiguous()
        if v.dtype != torch.bfloat16 and not torch.equal(b.to(v.dtype), v):
            raise ValueError(f"{what} weight {k!r} is not a bf16 value; round the weights through bf16 before writing")
        out[k] = b
    return out
