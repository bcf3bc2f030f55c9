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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .presets import DiTConfig, Preset, T5Config, VAEConfig, get_preset

DIT_FILE = "wan_video_dit_bf16.bin"
T5_FILE = "encoders/models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "encoders/Wan2.1_VAE.pth"
TOKENIZER_DIR = "encoders/google/umt5-xxl"


from ..errors import CheckpointError, UsageError  # noqa: E402  (CheckpointError re-exported: the loaders raise it)

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


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], path, what: str) -> None:
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
    """Build a model on the meta device, check the state dict, assign it cast to dtype.

    Every tensor of `state` must have the shape of the model's parameter of the same key.
    """
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


_DIT_CONFIG_FIELDS = (
    "patch_size",
    "in_dim",
    "dim",
    "ffn_dim",
    "freq_dim",
    "text_dim",
    "out_dim",
    "num_heads",
    "num_layers",
    "eps",
)


def check_dit_config_against(found: DiTConfig, declared: Mapping, source: str, path) -> None:
    """A release `wan_video_dit_config` (or preset) that disagrees with the tensors is an error."""
    for name in _DIT_CONFIG_FIELDS:
        if name not in declared or name in ("num_heads", "eps"):
            continue
        want = tuple(declared[name]) if name == "patch_size" else declared[name]
        have = getattr(found, name)
        if want != have:
            raise CheckpointError(f"{path}: {source} says DiT {name}={want!r} but the checkpoint has {name}={have!r}")
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
    def from_dir(cls, root: str | os.PathLike) -> CheckpointPaths:
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"{root}: checkpoint directory not found")
        return cls(dit=root / DIT_FILE, t5=root / T5_FILE, vae=root / VAE_FILE, tokenizer=root / TOKENIZER_DIR)

    @classmethod
    def from_release_config(cls, config_path: str | os.PathLike) -> CheckpointPaths:
        """Read `model_configs` of the release's inference_configs.json as it is."""
        config_path = Path(config_path)
        config = read_json(config_path)
        models = config.get("model_configs")
        if not isinstance(models, Mapping):
            raise CheckpointError(f"{config_path}: no 'model_configs' object")
        paths = {}
        for field, key in (
            ("t5", "wan_video_text_encoder_path"),
            ("vae", "wan_video_vae_path"),
            ("dit", "wan_video_dit_path"),
        ):
            if key not in models:
                raise CheckpointError(f"{config_path}: model_configs has no {key!r}")
            if not isinstance(models[key], str) or not models[key].strip():
                raise CheckpointError(
                    f"{config_path}: model_configs.{key} must be a file path (a non-empty string), got {models[key]!r}"
                )
            paths[field] = resolve_release_path(models[key], config_path)
        dit_config = models.get("wan_video_dit_config")
        if dit_config is not None and not isinstance(dit_config, Mapping):
            raise CheckpointError(
                f"{config_path}: model_configs.wan_video_dit_config must be an object, got {dit_config!r}"
            )
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
    """Load the DiT alone; `declared` (a release dit config) must agree with the tensors.

    `state`, when given, is the file's state dict already read (its tensor shapes set every dimension).
    """
    from .dit import WanDiT

    state = read_state_dict(path) if state is None else state
    cfg = infer_dit_config(state, num_heads, path, eps=float((declared or {}).get("eps", 1e-6)))
    if declared:
        check_dit_config_against(cfg, declared, source, path)
    _check_heads(cfg, path)
    return load_into(lambda: WanDiT(cfg), state, path, f"DiT ({_describe(cfg)})", dtype)


def _check_heads(cfg: DiTConfig, path) -> None:
    if cfg.dim % cfg.num_heads:
        raise CheckpointError(
            f"{path}: DiT dim {cfg.dim} (from the checkpoint) is not divisible by num_heads {cfg.num_heads}"
        )


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


def preset_of_width(dim: int) -> Preset | None:
    """The built-in preset whose DiT has this width, if any: a source of generation defaults only."""
    from .presets import PRESETS

    return next((p for p in PRESETS.values() if p.dit.dim == dim), None)


_VAE_FIELDS = ("dim", "z_dim")
_T5_FIELDS = ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_buckets", "num_layers")


def checkpoint_preset(
    paths: CheckpointPaths,
    typed: Preset | None = None,
    dit_state: Mapping[str, torch.Tensor] | None = None,
) -> Preset:
    """The preset a checkpoint set runs as: every model dimension from the files.

    Dimensions come from the tensors (and the release's `wan_video_dit_config`,
    which must agree with them). `typed` is a preset the user named (`--preset`):
    its dimensions must agree with the files, and the refusal names the flag.
    Without one, the built-in preset whose DiT width the files have lends its
    name and generation defaults (sizes, steps) and nothing else; a width no
    preset has takes the release's defaults. Only the files are read (memory-mapped).
    `dit_state` is the DiT file's state dict when already read; the width is the
    shape of its `patch_embedding.weight` [dim, in_dim, pt, ph, pw].
    """
    dit_state = read_state_dict(paths.dit) if dit_state is None else dit_state
    dim = int(_need(dit_state, "patch_embedding.weight", paths.dit).shape[0])
    guessed = preset_of_width(dim)
    lender = typed or guessed or get_preset("tempomaster-14b")
    declared = dict(paths.dit_config) if paths.dit_config else {}
    if "num_heads" in declared:
        num_heads = int(declared["num_heads"])
    elif typed is not None or guessed is not None:
        num_heads = lender.dit.num_heads
    else:
        raise CheckpointError(
            f"{paths.dit}: DiT width {dim} matches no preset "
            f"({', '.join(f'{p.name}: {p.dit.dim}' for p in _presets())}); give the head count with "
            "--config (model_configs.wan_video_dit_config.num_heads)"
        )
    dit = infer_dit_config(dit_state, num_heads, paths.dit, eps=float(declared.get("eps", 1e-6)))
    if declared:
        check_dit_config_against(dit, declared, "wan_video_dit_config", paths.dit)
    vae = replace(VAEConfig(), **_fields(infer_vae_config(read_state_dict(paths.vae), paths.vae), _VAE_FIELDS))
    t5 = replace(T5Config(), **_fields(infer_t5_config(read_state_dict(paths.t5), paths.t5), _T5_FIELDS))
    if typed is not None:
        _check_typed_preset(typed, paths, dit, vae, t5)
    _check_heads(dit, paths.dit)
    # The text length is no tensor's dimension: the toy's umT5 was trained on 32
    # tokens, the release's on 512. A preset lends its own only to its own umT5.
    if typed is not None or _fields(t5, _T5_FIELDS) == _fields(lender.t5, _T5_FIELDS):
        t5 = replace(t5, text_len=lender.t5.text_len)
    return replace(lender, dit=dit, vae=vae, t5=t5)


def _presets():
    from .presets import PRESETS

    return PRESETS.values()


def _check_typed_preset(typed: Preset, paths: CheckpointPaths, dit: DiTConfig, vae: VAEConfig, t5: T5Config) -> None:
    """A --preset the user typed is a claim about the files: any dimension it states must be theirs."""
    checks = [
        ("DiT", paths.dit, dit, typed.dit, tuple(f for f in _DIT_CONFIG_FIELDS if f != "eps")),
        ("VAE", paths.vae, vae, typed.vae, _VAE_FIELDS),
        ("umT5", paths.t5, t5, typed.t5, _T5_FIELDS),
    ]
    for what, path, have, want, names in checks:
        for name in names:
            if getattr(have, name) != getattr(want, name):
                raise UsageError(
                    f"--preset {typed.name}: the preset says {what} {name}={getattr(want, name)!r} but {path} "
                    f"has {name}={getattr(have, name)!r}; leave --preset out to run the files as they are"
                )


def load_models(
    paths: CheckpointPaths,
    preset: Preset | None = None,
    dtype: torch.dtype = torch.float32,
    t5_dtype: torch.dtype | None = None,
) -> ModelSet:
    """Load the release's checkpoint set as `checkpoint_preset` reads it.

    `preset` is one the user named (or the one a shipped set belongs to): its
    dimensions must agree with the files. Without it every dimension is the files'.
    """
    from .dit import WanDiT
    from .t5 import UMT5Encoder, check_t5_dtype
    from .tokenizer import PromptTokenizer
    from .vae import WanVAE

    dit_state = read_state_dict(paths.dit)
    chosen = checkpoint_preset(paths, preset, dit_state)
    dit = load_into(lambda: WanDiT(chosen.dit), dit_state, paths.dit, f"DiT ({_describe(chosen.dit)})", dtype)
    del dit_state
    vae = load_into(
        lambda: WanVAE(chosen.vae), read_state_dict(paths.vae), paths.vae, f"VAE ({_describe(chosen.vae)})", dtype
    )
    # umT5 overflows in fp16: it stays in fp32 unless bf16 is asked for.
    t5_dtype = t5_dtype or (torch.float32 if dtype == torch.float16 else dtype)
    check_t5_dtype(t5_dtype)
    t5 = load_into(
        lambda: UMT5Encoder(chosen.t5),
        read_state_dict(paths.t5),
        paths.t5,
        f"umT5 encoder ({_describe(chosen.t5)})",
        t5_dtype,
    )
    tokenizer = PromptTokenizer.from_dir(paths.tokenizer, seq_len=chosen.t5.text_len)
    return ModelSet(preset=chosen, dit=dit, vae=vae, t5=t5, tokenizer=tokenizer)
