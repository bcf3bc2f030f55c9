"""Reading the release's checkpoint files into the three models.

The files are read as the release ships them: `.bin`/`.pth` torch state dicts
(only tensors are unpickled: `weights_only=True`, memory-mapped) and
`.safetensors`. Every dimension a checkpoint determines is read from its
tensors; a config or preset that disagrees is an error naming both values.
Models are built on the meta device and the loaded tensors are assigned, so a
14B checkpoint is never held twice.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch

from .presets import DiTConfig, Preset, T5Config, VAEConfig, get_preset

DIT_FILE = "wan_video_dit_bf16.bin"
T5_FILE = "encoders/models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "encoders/Wan2.1_VAE.pth"
TOKENIZER_DIR = "encoders/google/umt5-xxl"


from ..errors import CheckpointError  # noqa: E402  (re-exported: the loaders raise it)


# ----------------------------------------------------------------------------
# Files -> state dicts
# ----------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one checkpoint file, on the CPU, in their stored dtype."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # Legacy (non-zip) torch files cannot be memory-mapped.
                state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # truncated zip, bad header, unsafe pickle ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {reason}); "
            "the file may be truncated or not a torch/safetensors state dict"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
    return dict(state)


def _few(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}{', ...' if len(keys) > limit else ''} ({len(keys)} in all)"


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], path, what: str
) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshapen key."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    wrong = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} ({len(wrong)} in all)")
    if problems:
        raise CheckpointError(f"{path}: does not match the {what}: " + " | ".join(problems))


def load_into(model_factory, state: Mapping[str, torch.Tensor], path, what: str, dtype: torch.dtype):
    """Build a model on the meta device, check the state dict, assign it cast to dtype."""
    with torch.device("meta"):
        model = model_factory()
    check_state_dict(model.state_dict(), state, path, what)
    cast = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    # Non-persistent buffers (the VAE's latent statistics) are constants the model rebuilds.
    if any(b.is_meta for b in model.buffers()):
        init = getattr(model, "init_constant_buffers", None)
        if init is None:
            raise CheckpointError(f"{path}: {what} has buffers that are not in the checkpoint and cannot be rebuilt")
        init(device="cpu")
    return model.eval()


# ----------------------------------------------------------------------------
# Dimensions read from the tensors
# ----------------------------------------------------------------------------

def _count_blocks(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in state if (m := regex.match(k))}
    return max(indices) + 1 if indices else 0


def _need(state, key: str, path) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{path}: missing key {key!r}, needed to read the model's dimensions")
    return state[key]


def infer_dit_config(state, num_heads: int, path="<state dict>", eps: float = 1e-6) -> DiTConfig:
    patch = _need(state, "patch_embedding.weight", path)  # [dim, in_dim, pt, ph, pw]
    head = _need(state, "head.head.weight", path)  # [out_dim * pt*ph*pw, dim]
    patch_size = tuple(int(s) for s in patch.shape[2:])
    dim = int(patch.shape[0])
    return DiTConfig(
        dim=dim,
        in_dim=int(patch.shape[1]),
        patch_size=patch_size,
        ffn_dim=int(_need(state, "blocks.0.ffn.0.weight", path).shape[0]),
        text_dim=int(_need(state, "text_embedding.0.weight", path).shape[1]),
        freq_dim=int(_need(state, "time_embedding.0.weight", path).shape[1]),
        out_dim=int(head.shape[0]) // (patch_size[0] * patch_size[1] * patch_size[2]),
        num_layers=_count_blocks(state, r"blocks\.(\d+)\.modulation$"),
        num_heads=num_heads,
        eps=eps,
    )


def infer_vae_config(state, path="<state dict>") -> VAEConfig:
    return VAEConfig(
        dim=int(_need(state, "encoder.conv1.weight", path).shape[0]),
        z_dim=int(_need(state, "conv2.weight", path).shape[0]),
    )


def infer_t5_config(state, path="<state dict>") -> T5Config:
    emb = _need(state, "token_embedding.weight", path)  # [vocab, dim]
    rel = _need(state, "blocks.0.pos_embedding.embedding.weight", path)  # [buckets, heads]
    return T5Config(
        vocab_size=int(emb.shape[0]),
        dim=int(emb.shape[1]),
        dim_attn=int(_need(state, "blocks.0.attn.q.weight", path).shape[0]),
        dim_ffn=int(_need(state, "blocks.0.ffn.fc1.weight", path).shape[0]),
        num_heads=int(rel.shape[1]),
        num_buckets=int(rel.shape[0]),
        num_layers=_count_blocks(state, r"blocks\.(\d+)\.norm1\.weight$"),
    )


_DIT_CONFIG_FIELDS = ("patch_size", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads", "num_layers", "eps")


def check_dit_config_against(found: DiTConfig, declared: Mapping, source: str, path) -> None:
    """A release `wan_video_dit_config` (or preset) that disagrees with the tensors is an error."""
    for name in _DIT_CONFIG_FIELDS:
        if name not in declared or name in ("num_heads", "eps"):
            continue
        want = tuple(declared[name]) if name == "patch_size" else declared[name]
        have = getattr(found, name)
        if want != have:
            raise CheckpointError(
                f"{path}: {source} says DiT {name}={want!r} but the checkpoint has {name}={have!r}"
            )
    for flag in ("has_image_input", "has_image_pos_emb"):
        if declared.get(flag):
            raise CheckpointError(f"{source}: {flag}=true (a CLIP image branch) is not supported by TempoMaster's DiT")


# ----------------------------------------------------------------------------
# The release's file set
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointPaths:
    dit: Path
    t5: Path
    vae: Path
    tokenizer: Path
    dit_config: Mapping | None = None  # the release's wan_video_dit_config, if given

    @classmethod
    def from_dir(cls, root: str | os.PathLike) -> "CheckpointPaths":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"{root}: checkpoint directory not found")
        return cls(dit=root / DIT_FILE, t5=root / T5_FILE, vae=root / VAE_FILE, tokenizer=root / TOKENIZER_DIR)

    @classmethod
    def from_release_config(cls, config_path: str | os.PathLike) -> "CheckpointPaths":
        """Read `model_configs` of the release's inference_configs.json as it is."""
        config_path = Path(config_path)
        config = read_json(config_path)
        models = config.get("model_configs")
        if not isinstance(models, Mapping):
            raise CheckpointError(f"{config_path}: no 'model_configs' object")
        paths = {}
        for field, key in (("t5", "wan_video_text_encoder_path"), ("vae", "wan_video_vae_path"), ("dit", "wan_video_dit_path")):
            if key not in models:
                raise CheckpointError(f"{config_path}: model_configs has no {key!r}")
            if not isinstance(models[key], str) or not models[key].strip():
                raise CheckpointError(
                    f"{config_path}: model_configs.{key} must be a file path (a non-empty string), got {models[key]!r}"
                )
            paths[field] = resolve_release_path(models[key], config_path)
        dit_config = models.get("wan_video_dit_config")
        if dit_config is not None and not isinstance(dit_config, Mapping):
            raise CheckpointError(f"{config_path}: model_configs.wan_video_dit_config must be an object, got {dit_config!r}")
        # The release puts the tokenizer beside the text encoder file.
        tokenizer = paths["t5"].parent / "google" / "umt5-xxl"
        return cls(tokenizer=tokenizer, dit_config=dit_config, **paths)


def read_json(path: Path) -> dict:
    """A JSON config file holding one object; at most ``MAX_CONFIG_FILE_BYTES`` are read."""
    from ..limits import MAX_CONFIG_FILE_BYTES, TooLarge, read_limited

    try:
        config = json.loads(read_limited(path, MAX_CONFIG_FILE_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a JSON config file") from None
    except TooLarge as err:
        raise CheckpointError(f"{path}: {err}, the most a config file may hold") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a JSON text file (not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    return config


def resolve_release_path(value: str, config_path: Path) -> Path:
    """Relative paths in the release's config are relative to where infer.py ran
    (the repository root); also try the config's folder and its parent."""
    p = Path(value)
    if p.is_absolute():
        return p
    candidates = [Path.cwd() / p, config_path.parent / p, config_path.parent.parent / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    return candidates[0]


def load_dit(
    path,
    num_heads: int,
    dtype=torch.float32,
    declared: Mapping | None = None,
    source: str = "wan_video_dit_config",
    state: Mapping[str, torch.Tensor] | None = None,
):
    """Load the DiT; `declared` (a release dit config or a preset's fields) must agree with the tensors."""
    from .dit import WanDiT

    state = read_state_dict(path) if state is None else state
    cfg = infer_dit_config(state, num_heads, path, eps=float((declared or {}).get("eps", 1e-6)))
    if declared:
        check_dit_config_against(cfg, declared, source, path)
    if cfg.dim % num_heads:
        raise CheckpointError(f"{path}: DiT dim {cfg.dim} (from the checkpoint) is not divisible by num_heads {num_heads}")
    return load_into(lambda: WanDiT(cfg), state, path, f"DiT ({_describe(cfg)})", dtype)


def load_vae(path, preset: Preset, dtype=torch.float32):
    from .vae import WanVAE

    state = read_state_dict(path)
    cfg = replace(preset.vae, **_fields(infer_vae_config(state, path), ("dim", "z_dim")))
    return load_into(lambda: WanVAE(cfg), state, path, f"VAE of preset {preset.name!r} ({_describe(cfg)})", dtype)


def load_t5(path, preset: Preset, dtype=torch.float32):
    from .t5 import UMT5Encoder, check_t5_dtype

    check_t5_dtype(dtype)
    state = read_state_dict(path)
    cfg = replace(preset.t5, **_fields(infer_t5_config(state, path), ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_buckets", "num_layers")))
    return load_into(lambda: UMT5Encoder(cfg), state, path, f"umT5 encoder of preset {preset.name!r} ({_describe(cfg)})", dtype)


def _fields(cfg, names) -> dict:
    return {n: getattr(cfg, n) for n in names}


def _describe(cfg) -> str:
    keys = ("dim", "num_layers", "num_heads", "z_dim", "vocab_size")
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in keys if hasattr(cfg, k))


# ----------------------------------------------------------------------------
# All three models at once
# ----------------------------------------------------------------------------

@dataclass
class ModelSet:
    """The three models and the tokenizer, as the runtime's torch backend needs them."""

    preset: Preset
    dit: torch.nn.Module
    vae: torch.nn.Module
    t5: torch.nn.Module
    tokenizer: object


def _preset_by_width(dim: int, path) -> Preset:
    from .presets import PRESETS

    for preset in PRESETS.values():
        if preset.dit.dim == dim:
            return preset
    widths = ", ".join(f"{p.name}: {p.dit.dim}" for p in PRESETS.values())
    raise CheckpointError(
        f"{path}: DiT width {dim} matches no preset ({widths}); give the head count with "
        "--config (model_configs.wan_video_dit_config.num_heads)"
    )


def preset_for_dit_file(path) -> Preset:
    state = read_state_dict(path)
    return _preset_by_width(int(_need(state, "patch_embedding.weight", path).shape[0]), path)


def load_models(
    paths: CheckpointPaths,
    preset: Preset | None = None,
    dtype: torch.dtype = torch.float32,
    t5_dtype: torch.dtype | None = None,
) -> ModelSet:
    """Load the release's checkpoint set.

    The DiT's head count comes from the release config if given, else from the
    named preset, else from the preset whose width the checkpoint has. Any
    dimension the config or the named preset states must agree with the files.
    """
    from .tokenizer import PromptTokenizer

    dit_state = read_state_dict(paths.dit)
    dim = int(_need(dit_state, "patch_embedding.weight", paths.dit).shape[0])
    if paths.dit_config:
        declared, source = dict(paths.dit_config), "wan_video_dit_config"
    elif preset is not None:
        declared = {f: getattr(preset.dit, f) for f in _DIT_CONFIG_FIELDS}
        source = f"preset {preset.name!r}"
    else:
        declared, source = None, ""
    chosen = preset or _preset_by_width(dim, paths.dit)
    num_heads = int(declared["num_heads"]) if declared and "num_heads" in declared else chosen.dit.num_heads
    dit = load_dit(paths.dit, num_heads, dtype, declared, source, state=dit_state)
    del dit_state
    vae = load_vae(paths.vae, chosen, dtype)
    # umT5 overflows in fp16: it stays in fp32 unless bf16 is asked for.
    t5 = load_t5(paths.t5, chosen, t5_dtype or (torch.float32 if dtype == torch.float16 else dtype))
    if preset is not None:
        for what, have, want, path in (("VAE", vae.cfg, preset.vae, paths.vae), ("umT5", t5.cfg, preset.t5, paths.t5)):
            for name in ("dim", "z_dim", "dim_ffn", "num_heads", "num_layers", "vocab_size"):
                if hasattr(want, name) and getattr(have, name) != getattr(want, name):
                    raise CheckpointError(
                        f"{path}: preset {preset.name!r} says {what} {name}={getattr(want, name)} "
                        f"but the checkpoint has {name}={getattr(have, name)}"
                    )
    tokenizer = PromptTokenizer.from_dir(paths.tokenizer, seq_len=chosen.t5.text_len)
    return ModelSet(preset=chosen, dit=dit, vae=vae, t5=t5, tokenizer=tokenizer)
