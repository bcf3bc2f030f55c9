"""Train the toy TempoMaster on synthetic clips, on a CPU, in under an hour (58 minutes measured on 2 cores).

Three phases, each resumable from its own checkpoint in a work folder:

1. ``vae``: the Wan2.1 VAE at the toy width learns to reconstruct clips
   (random crops of 9-frame windows at 24, 12 or 6 fps, then of whole
   17-frame windows) through slightly noisy latents, so the decoder tolerates
   imperfect DiT output; afterwards the latents' statistics are folded into
   its weights so that they are zero-mean and unit-variance (the DiT's noise
   scale). A fine-tune (``vae_motion_steps``; 0 turns it off) then also
   matches the frame-to-frame differences, so the four pixel frames of a
   latent frame keep more of their motion, and the statistics are folded
   again. An optional decoder fine-tune (``vae_decoder_steps``, off by
   default) then trains the decoder alone, the encoder frozen, to also put
   the object where it is in every frame (a soft colour-mask centroid
   term): the latent space, and so every later phase, is unchanged by it.
2. ``tasks``: every training task is built once, through the runtime's own
   planner (`plan_stages`, `chunk_condition_video`, `stage0_condition_video`)
   and the torch backend's VAE and text encoder, and cached: a stage-0
   blueprint (6 fps) with or without a reference image at frame 0, one chunk
   of stage 1 (6 -> 12 fps) and one chunk of stage 2 (12 -> 24 fps) per clip,
   each with its mask and RoPE positions. The later stages' known frames are
   decoded, as at inference: the stage above's target, encoded and decoded.
3. ``dit``: flow matching (x_t = (1 - s) x0 + s e, target e - x0, s drawn
   with the stage's inference shift) on those tasks, the caption replaced by
   the empty prompt or the default negative prompt for a share of examples
   so guidance has an unconditional model to push against; an EMA of the
   weights is what ships.

The text encoder is not trained: it is the toy preset's seeded random umT5,
frozen (the DiT learns to read its outputs), so its file is the same bytes
on every machine.

Every random draw comes from a generator seeded by (seed, phase, step), so a
resumed run takes the same path as an uninterrupted one.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..interrupts import raise_if_interrupted
from ..models.checkpoints import DIT_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE, ModelSet
from ..models.presets import get_preset
from ..planner import VAE_TEMPORAL_FACTOR, chunk_condition_video, plan_stages
from ..rope import rope_table
from ..runtime.schedule import shift_sigmas
from ..runtime.pipeline import DEFAULT_NEGATIVE_PROMPT, _BackendClock, decode_chunks, stage0_condition_video
from .clips import all_captions, caption_vocabulary, object_centre, render_clip, sample_clip_spec
from .state_files import SUFFIX as STATE_SUFFIX
from .state_files import load_state, save_state

__all__ = [
    "ToyTrainConfig",
    "toy_corpus",
    "build_untrained_toy",
    "train_toy",
    "export_toy_weights",
    "plot_losses",
]

TOY_PRESET = "toy"
# The tasks are those of the preset's default video: 17 frames at 6 fps -> 34 at 12 -> 68 at 24.
_DEFAULTS = get_preset(TOY_PRESET).defaults
STAGE0_FRAMES = _DEFAULTS.num_frames
INTERVALS = tuple(_DEFAULTS.frame_intervals)
STAGE_SHIFTS = tuple(_DEFAULTS.shift_per_stage)  # each stage's sigmas are drawn with its inference shift
CLIP_FRAMES = STAGE0_FRAMES * INTERVALS[0] // INTERVALS[-1]  # the final video's frames at 24 fps
VAE_CROP = (32, 48)
# Object pixels: saturated colours on grey backgrounds (`clips`), so max - min over RGB (in [-1, 1]) above this.
OBJECT_SATURATION = 0.4


@dataclass(frozen=True)
class ToyTrainConfig:
    seed: int = 20261124
    vae_steps: int = 1500
    vae_batch: int = 6
    vae_frames: int = 9  # 1 + 4 + 4: first the cheap windows, where the causal caches reach their steady state
    # then the runtime's whole 17-frame chunks: trained on 9 frames only, the
    # 4th and 5th latent frames drift (measured: colour washes at frames 12-16)
    vae_long_from: int = 1000
    vae_long_frames: int = 17
    vae_long_batch: int = 3
    vae_lr: float = 1e-3
    # A fine-tune of the folded VAE on 17-frame windows that also matches the frame-to-frame
    # differences (0 steps: off). Plain reconstruction keeps about half the motion inside a
    # latent frame. These 1000 steps cut the largest 24 fps step of a ground-truth round trip
    # from 4.5 to 3.0 px (median of 16 clips) and a DiT trained on the result is smoother on
    # 24 prompts (11 within 6 px against 6; README). 400 steps at 3e-4 gave DiTs no smoother
    # than without (README, "What changed from the first toy").
    vae_motion_steps: int = 1000
    vae_motion_batch: int = 3
    vae_motion_lr: float = 5e-4
    vae_motion_weight: float = 1.0
    # The fine-tune's frame strides (4: 6 fps windows). (4,) alone took the 6 fps round trip's largest
    # position error from 4.8 to 3.2 px and its largest step from 9.5 to 7.7 px (median of 16 clips)
    # but 24 fps from 1.0 to 1.8 and 1.8 to 2.2 px; its DiT's blueprints stepped less, its videos were
    # no smoother overall (README, "What changed from the first toy").
    vae_motion_strides: tuple[int, ...] = (1, 2, 4)
    # A fine-tune of the decoder alone (0 steps: off) that also matches the object's centroid in
    # every frame, against the staircase of decoded 6 fps frames (the object moves early in a
    # latent frame, then holds). The encoder is frozen, so the latents, the tasks and the DiT do
    # not depend on it. Off: 1000 steps on the shipped toy cut the round trip's largest 6 fps
    # position error from 5.6 to 5.5 px and its largest 24 fps step from 3.0 to 2.2 px (median of
    # 16 clips), but generated videos were no smoother (9 of 24 prompts within 6 px against the
    # shipped 11; README, "What changed from the first toy").
    vae_decoder_steps: int = 0
    vae_decoder_batch: int = 3
    vae_decoder_lr: float = 5e-4
    vae_decoder_motion_weight: float = 2.0
    vae_decoder_centroid_weight: float = 0.05
    clips: int = 1000
    dit_steps: int = 11000
    dit_batch: int = 16
    dit_lr: float = 5e-4
    ema_decay: float = 0.999
    text_dropout: float = 0.15
    reference_share: float = 0.3  # stage-0 examples that condition on a reference image at frame 0
    # clips whose stage-1 and stage-2 chunks condition on decoded (VAE round-tripped) known
    # frames, as at inference, rather than the ground truth (`build_clip_tasks`). With it, stage 1
    # run on round-tripped 6 fps frames misplaced the object by 5.2 px instead of 7.3 (median of 10
    # clips' largest error; 8500 DiT steps), and the first toy trained so stayed within 6 px per frame
    # on 15 of 24 prompts against 11 (the shipped one, its compiled rerun: 10 of 24, but a worst test
    # prompt of 6.6 px against 9.3; README).
    round_trip_share: float = 1.0
    stage_shares: tuple[float, float, float] = (0.4, 0.3, 0.3)
    # The DiT's loss on the latent pixels the object passes over in a latent frame (and their
    # neighbours: `object_latent_cover`) counts 1 + this times as much as on the background.
    # The object covers about a quarter of the latent, the rest is grey background. On (4) since
    # the circle slowed to the slides' speed (`clips._CIRCLE_PERIOD`): with it (and no first-frame
    # weight) a toy stayed within 6 px per frame on 5 of the 6 test prompts and 16 of 24 (the one
    # before, unweighted, on the faster circle: 4 of 6, 10 of 24; README, "The DiT's loss weighted
    # on the object").
    object_loss_weight: float = 4.0
    # The DiT's loss on each task's first latent frame counts 1 + this times as much (times the
    # object weight). A chunk's first latent frame encodes one pixel frame, not four, and the
    # toy VAE codes colour there about 3x more weakly: a red and a yellow ball's latents differ
    # by 0.33 rms in it against 0.93 in the others (so 1/8 of the squared error). Unweighted, the
    # DiT drew every chunk's first frame orange for red (the centroid of the red pixels left
    # jumped 7 px there). With it the shipped toy stays within 6 px on 6 of the 6 test prompts and
    # 18 of 24 (without: 5 of 6, 16 of 24; README, "The first latent frame weighted").
    first_frame_loss_weight: float = 4.0
    checkpoint_every: int = 250


def toy_corpus() -> str:
    """The toy tokenizer's corpus: the caption vocabulary first (so every word is one piece), then the tiny corpus."""
    from ..models.tokenizer import TINY_CORPUS

    words = " ".join(caption_vocabulary())
    return "\n".join([words] * 40 + [TINY_CORPUS])


def build_untrained_toy(seed: int) -> ModelSet:
    """The toy architecture with seeded random weights (the T5 keeps these: it is frozen)."""
    from ..models.dit import WanDiT
    from ..models.t5 import UMT5Encoder
    from ..models.tokenizer import PromptTokenizer, tiny_fast_tokenizer
    from ..models.vae import WanVAE

    preset = get_preset(TOY_PRESET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit, vae, t5 = WanDiT(preset.dit), WanVAE(preset.vae), UMT5Encoder(preset.t5)
        with torch.no_grad():
            dit.head.head.weight.zero_()  # start from a zero velocity, as Wan initialises its head
            for p in t5.parameters():  # stored in bf16: keep the frozen encoder exactly what ships
                p.copy_(p.to(torch.bfloat16).float())
    tokenizer = PromptTokenizer(tiny_fast_tokenizer(toy_corpus()), seq_len=preset.t5.text_len, source="<toy built-in>")
    return ModelSet(preset=preset, dit=dit, vae=vae, t5=t5.eval(), tokenizer=tokenizer)


# ---------------------------------------------------------------------------
# Small helpers: seeded generators, saved states, cosine schedules
# ---------------------------------------------------------------------------

def _rng(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, step])


def _torch_gen(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(seed, phase, step).integers(2**62)))


def _cosine_lr(base: float, step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _state_file(work: Path, name: str) -> Path:
    """Where a phase (or task shard) ``name`` keeps its state in the work folder."""
    return work / f"{name}{STATE_SUFFIX}"


def _load(path: Path):
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
        raise UsageError(f"--work: {path} is not a training state that can be read safely ({type(err).__name__}: "
                         f"{first}); remove it to redo that part") from None


def _has_state(work: Path, name: str) -> bool:
    path = _state_file(work, name)
    return path.is_file() or path.with_suffix(".pt").is_file()


def _resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict | None, list[dict], int]:
    """(checkpoint or None, loss log, first step) of a phase; the model and optimiser take the checkpoint's state."""
    state = _load(path)
    if state is None:
        return None, [], 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return state, state["log"], state["step"]


# ---------------------------------------------------------------------------
# Phase 1: the VAE
# ---------------------------------------------------------------------------

def vae_training_batch(seed: int, step: int, batch: int, frames_per_clip: int = 9,
                       strides: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """[B, 3, frames, 32, 48]: frames at one of ``strides`` (1, 2, 4: 24/12/6 fps), cropped around the object half the time."""
    rng = _rng(seed, 1, step)
    crop_h, crop_w = VAE_CROP
    out = []
    for _ in range(batch):
        spec = sample_clip_spec(int(rng.integers(2**31)))
        stride = int(rng.choice(list(strides)))
        span = (frames_per_clip - 1) * stride + 1
        start = int(rng.integers(0, CLIP_FRAMES - span + 1))
        frames = render_clip(spec, span, start)[:, ::stride]
        if rng.random() < 0.5:
            cx, cy = object_centre(spec, start)
            top = int(np.clip(cy - crop_h / 2 + rng.integers(-8, 9), 0, spec.height - crop_h))
            left = int(np.clip(cx - crop_w / 2 + rng.integers(-12, 13), 0, spec.width - crop_w))
        else:
            top = int(rng.integers(0, spec.height - crop_h + 1))
            left = int(rng.integers(0, spec.width - crop_w + 1))
        out.append(frames[:, :, top : top + crop_h, left : left + crop_w])
    return torch.stack(out)


def vae_encode_train(vae, video: torch.Tensor) -> torch.Tensor:
    """The VAE's causal chunked encode, with gradients (encode() itself is inference-only)."""
    cache = vae.new_encoder_cache(video.shape[0], video.shape[3], video.shape[4])
    out = [vae.encode_chunk(video[:, :, :1], cache)]
    for i in range(1, video.shape[2], vae.temporal_ratio):
        out.append(vae.encode_chunk(video[:, :, i : i + vae.temporal_ratio], cache))
    return torch.cat(out, dim=2)


def vae_decode_train(vae, z: torch.Tensor) -> torch.Tensor:
    cache = vae.new_decoder_cache(z.shape[0], z.shape[3], z.shape[4])
    return torch.cat([vae.decode_chunk(z[:, :, i : i + 1], cache) for i in range(z.shape[2])], dim=2)


def vae_loss(vae, video: torch.Tensor, gen: torch.Generator, motion_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Weighted L1 + L2 reconstruction through slightly noisy latents, plus ``motion_weight`` times
    `motion_error` (the fine-tune's term).

    No penalty on the latents' statistics: one pulling them to unit variance
    during training collapses the encoder to a fixed pattern (measured: the
    latents stop depending on the input within 20 steps). The statistics are
    set afterwards, exactly, by `fold_latent_statistics`.
    """
    z = vae_encode_train(vae, video)  # normalised latents
    recon = vae_decode_train(vae, z + 0.05 * torch.randn(z.shape, generator=gen))
    rec, weight = reconstruction_error(recon, video)
    parts = {"latent_std": float(z.detach().std())}
    if motion_weight:
        motion = motion_error(recon, video, weight)
        parts["motion"] = float(motion.detach())
        rec = rec + motion_weight * motion
    return rec, parts


def reconstruction_error(recon: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted L1 + L2 error of ``[B, 3, T, H, W]`` videos, and the per-pixel weight ``[B, 1, T, H, W]`` it used."""
    # Objects are a few percent of the pixels: weigh saturated (object) pixels up.
    saturation = video.amax(dim=1, keepdim=True) - video.amin(dim=1, keepdim=True)
    weight = 1.0 + 4.0 * (saturation > OBJECT_SATURATION).float()
    err = recon - video
    return (weight * err.abs()).mean() + (weight * err.square()).mean(), weight


def motion_error(recon: torch.Tensor, video: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted L1 error of the frame-to-frame differences of ``[B, 3, T, H, W]`` videos.

    A reconstruction that holds a moving object still has zero differences
    where the true ones are large, which plain reconstruction error punishes
    little when the object is small.
    """
    diff_weight = torch.maximum(weight[:, :, 1:], weight[:, :, :-1])
    return (diff_weight * (recon.diff(dim=2) - video.diff(dim=2)).abs()).mean()


def soft_object_centroids(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable object centroids of ``[B, 3, T, H, W]`` videos in [-1, 1]: ``([B, T, 2] (x, y) px, [B, T] mass)``.

    A soft threshold at `OBJECT_SATURATION` is the object's mask.
    """
    saturation = video.amax(dim=1) - video.amin(dim=1)
    p = torch.sigmoid((saturation - OBJECT_SATURATION) * 20.0)  # [B, T, H, W]
    h, w = p.shape[-2:]
    ys = torch.arange(h, dtype=p.dtype, device=p.device).view(h, 1)
    xs = torch.arange(w, dtype=p.dtype, device=p.device).view(1, w)
    mass = p.sum(dim=(-2, -1))
    centroid = torch.stack([(p * xs).sum(dim=(-2, -1)), (p * ys).sum(dim=(-2, -1))], dim=-1)
    return centroid / mass.clamp_min(1.0)[..., None], mass


def centroid_error(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance (px) between the soft object centroids of ``recon`` and ``video``.

    Counted only in frames where the whole object is in view: at least 30
    pixels and 80% of its largest mass in the clip (a crop can cut it).
    """
    truth, mass = soft_object_centroids(video)
    found, _ = soft_object_centroids(recon)
    valid = ((mass > 30) & (mass > 0.8 * mass.amax(dim=-1, keepdim=True))).to(video.dtype)
    return ((found - truth).abs().sum(dim=-1) * valid).sum() / valid.sum().clamp_min(1.0)


@torch.no_grad()
def latent_statistics(vae, seed: int, clips: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the normalised latents of ``clips`` 17-frame clips at 6 and 24 fps."""
    latents = []
    for i in range(clips):
        spec = sample_clip_spec(int(_rng(seed, 6, i).integers(2**31)))
        clip = render_clip(spec, CLIP_FRAMES)
        video = clip[:, :: INTERVALS[0]] if i % 2 == 0 else clip[:, :STAGE0_FRAMES]
        latents.append(vae.encode(video[None]))
    z = torch.cat(latents).double()
    return z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))


@torch.no_grad()
def fold_latent_statistics(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rescale the VAE so its normalised latents get zero mean and unit std per channel; decode(encode(x)) is unchanged.

    The latent normalisation (z = (mu - M) / S, Wan2.1's 16 constants) is
    fixed, so the correction z' = (z - m) / s goes into the weights: the
    encoder's 1x1x1 ``conv1`` (its mu half) emits mu' = M + (mu - M - m S) / s,
    and the decoder's 1x1x1 ``conv2`` takes mu' back to mu = M + s (mu' - M) + m S.
    """
    z_dim = vae.z_dim
    M = vae.latents_mean.double()
    S = vae.latents_std.double()
    m, s = mean.double(), std.double()
    w1, b1 = vae.conv1.weight, vae.conv1.bias  # [2z, 2z, 1, 1, 1]
    w1.data[:z_dim] = (w1.data[:z_dim].double() / s.view(-1, 1, 1, 1, 1)).to(w1.dtype)
    b1.data[:z_dim] = (b1.data[:z_dim].double() / s + M * (1 - 1 / s) - m * S / s).to(b1.dtype)
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # [z, z, 1, 1, 1]
    shift = m * S + M - s * M  # mu = s * mu' + shift
    b2.data = (b2.data.double() + w2.data.double()[:, :, 0, 0, 0] @ shift).to(b2.dtype)
    w2.data = (w2.data.double() * s.view(1, -1, 1, 1, 1)).to(w2.dtype)


def _train_vae_phase(
    vae, cfg: ToyTrainConfig, path: Path, steps: int, lr: float, warmup: int, desc: str,
    batch: Callable[[int], torch.Tensor], loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]], progress: bool,
    params: list[torch.nn.Parameter] | None = None, fold: bool = True,
) -> list[dict]:
    """One resumable VAE phase: ``steps`` AdamW steps of ``params`` (all by default) on
    ``loss(batch(step), step)``, then, if ``fold``, the latents' statistics folded."""
    from tqdm.auto import tqdm

    vae.train()
    opt = torch.optim.AdamW(list(vae.parameters()) if params is None else params, lr=lr, weight_decay=0.0)
    state, log, start = _resume(path, vae, opt)
    with tqdm(total=steps, initial=start, desc=desc, disable=not progress) as bar:
        for step in range(start, steps):
            raise_if_interrupted()
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(lr, step, steps, warmup)
            value, parts = loss(batch(step), step)
            opt.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            log.append({"step": step, "loss": value.item(), **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                save_state({"model": vae.state_dict(), "opt": opt.state_dict(), "log": log, "step": step + 1}, path)
    vae.eval()
    if fold and not (state or {}).get("folded"):
        mean, std = latent_statistics(vae, cfg.seed)
        fold_latent_statistics(vae, mean, std)
        save_state({"model": vae.state_dict(), "opt": opt.state_dict(), "log": log, "step": steps,
                      "folded": True, "latent_mean": mean, "latent_std": std}, path)
    return log


def train_vae(models: ModelSet, cfg: ToyTrainConfig, work: Path, progress: bool = True) -> list[dict]:
    def batch(step: int) -> torch.Tensor:
        if step < cfg.vae_long_from:
            return vae_training_batch(cfg.seed, step, cfg.vae_batch, cfg.vae_frames)
        return vae_training_batch(cfg.seed, step, cfg.vae_long_batch, cfg.vae_long_frames)

    return _train_vae_phase(
        models.vae, cfg, _state_file(work, "vae"), cfg.vae_steps, cfg.vae_lr, 100, "toy VAE", batch,
        lambda video, step: vae_loss(models.vae, video, _torch_gen(cfg.seed, 2, step)), progress,
    )


def train_vae_motion(models: ModelSet, cfg: ToyTrainConfig, work: Path, progress: bool = True) -> list[dict]:
    """The fine-tune (skipped when ``vae_motion_steps`` is 0): the motion term on 17-frame windows, then the statistics folded again."""
    if cfg.vae_motion_steps <= 0:
        return []
    return _train_vae_phase(
        models.vae, cfg, _state_file(work, "vae-motion"), cfg.vae_motion_steps, cfg.vae_motion_lr, 20, "toy VAE motion",
        # batches drawn apart from phase 1's (its steps are below 100000)
        lambda step: vae_training_batch(cfg.seed, 100_000 + step, cfg.vae_motion_batch, cfg.vae_long_frames,
                                        cfg.vae_motion_strides),
        lambda video, step: vae_loss(models.vae, video, _torch_gen(cfg.seed, 7, step), cfg.vae_motion_weight),
        progress,
    )


def decoder_loss(vae, video: torch.Tensor, gen: torch.Generator, motion_weight: float, centroid_weight: float) -> tuple[torch.Tensor, dict]:
    """The decoder fine-tune's loss: `vae_loss`'s terms on the frozen encoder's latents, plus the centroid term."""
    with torch.no_grad():
        z = vae_encode_train(vae, video)
    recon = vae_decode_train(vae, z + 0.05 * torch.randn(z.shape, generator=gen))
    rec, weight = reconstruction_error(recon, video)
    motion = motion_error(recon, video, weight)
    centroid = centroid_error(recon, video)
    value = rec + motion_weight * motion + centroid_weight * centroid
    return value, {"motion": float(motion.detach()), "centroid_px": float(centroid.detach())}


def train_vae_decoder(models: ModelSet, cfg: ToyTrainConfig, work: Path, progress: bool = True) -> list[dict]:
    """The decoder fine-tune (skipped when ``vae_decoder_steps`` is 0): the encoder and the latent statistics stay as they are."""
    if cfg.vae_decoder_steps <= 0:
        return []
    vae = models.vae
    # the encoder runs under no_grad (decoder_loss) and only the decoder's side is optimised
    params = list(vae.decoder.parameters()) + list(vae.conv2.parameters())
    return _train_vae_phase(
        vae, cfg, _state_file(work, "vae-decoder"), cfg.vae_decoder_steps, cfg.vae_decoder_lr, 20, "toy VAE decoder",
        # batches drawn apart from the other phases' (their steps are below 200000)
        lambda step: vae_training_batch(cfg.seed, 200_000 + step, cfg.vae_decoder_batch, cfg.vae_long_frames),
        lambda video, step: decoder_loss(vae, video, _torch_gen(cfg.seed, 8, step),
                                         cfg.vae_decoder_motion_weight, cfg.vae_decoder_centroid_weight),
        progress, params=params, fold=False,
    )


# ---------------------------------------------------------------------------
# Phase 2: the tasks the runtime poses, encoded once
# ---------------------------------------------------------------------------

@dataclass
class TaskSet:
    """Cached training tasks, one row each.

    x0:        float16 [N, 16, f, h, w] clean latents of the chunk to generate;
    cond:      float16 [N, 16, f, h, w] VAE latents of its condition video;
    mask:      float32 [N, 4, f] latent mask (the plan's);
    rope:      int64 [N, f] temporal RoPE positions (the plan's);
    stage:     int64 [N] stage index (its shift);
    caption:   int64 [N] row of the caption in ``contexts``;
    contexts:  float32 [C, text_len, text_dim]: every caption, then "" and the default negative prompt;
    object:    bool [N, f, h, w] the latent pixels the object covers (`object_latent_cover`).
    """

    x0: torch.Tensor
    cond: torch.Tensor
    mask: torch.Tensor
    rope: torch.Tensor
    stage: torch.Tensor
    caption: torch.Tensor
    contexts: torch.Tensor
    object: torch.Tensor

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def __post_init__(self) -> None:
        # the rows of each stage, looked up by every training step
        self.rows_by_stage = [np.flatnonzero(self.stage.numpy() == s) for s in range(len(INTERVALS))]


def object_latent_cover(frames: torch.Tensor) -> torch.Tensor:
    """Where the object is in latent space: ``[3, F, H, W]`` clip frames in [-1, 1] -> bool ``[f, h, w]``.

    A latent pixel is covered when the object (the only saturated colour in a
    clip) touches its 8x8 pixels in any frame its latent frame encodes (the
    first alone, then four at a time), or touches a neighbouring latent pixel:
    the VAE's convolutions spread the object's code that far.
    """
    saturated = (frames.amax(0) - frames.amin(0)) > 0.3  # [F, H, W]; a grey's channels are equal
    first, rest = saturated[:1], saturated[1:]
    per_latent_frame = torch.cat([first, rest.reshape(-1, VAE_TEMPORAL_FACTOR, *rest.shape[1:]).any(1)]).float()  # [f, H, W]
    cover = F.max_pool2d(per_latent_frame[:, None], 8)  # [f, 1, H/8, W/8]
    return F.max_pool2d(cover, 3, stride=1, padding=1)[:, 0] > 0


def clip_task_chunks(stages, rng: np.random.Generator) -> list:
    """The chunk each stage trains on for one clip: stage 0's only chunk, a random chunk of stage 1,
    then a random chunk of stage 2 among those whose known frames all come from the stage-1 chunk.

    Tying stage 2 to stage 1 lets the stage-2 chunk condition on the stage-1
    chunk's decoded frames; each stage-2 chunk stays equally likely.
    """
    chunks = [stages[0].chunks[0]]
    for stage in stages[1:]:
        above = chunks[-1]
        covered = range(above.start, above.start + above.num_valid)
        fed = [c for c in stage.chunks if c.known_frames and all(src in covered for _, src in c.known_frames)]
        candidates = fed or list(stage.chunks)
        chunks.append(candidates[int(rng.integers(len(candidates)))])
    return chunks


def build_clip_tasks(backend, clips: list[torch.Tensor], rngs: list[np.random.Generator], references: list[bool],
                     round_trips: list[bool], encode_batch: int = 8) -> dict[str, torch.Tensor]:
    """The runtime's three kinds of task for each 68-frame 24 fps clip, built by the runtime's planner and encoded.

    Per clip: the stage-0 blueprint (every 4th frame) with a reference image
    at frame 0 if asked, one chunk of stage 1 conditioned on 6 fps frames, one
    chunk of stage 2 conditioned on 12 fps frames (`clip_task_chunks`). A
    later stage's known frames are the ground truth, or, for a clip with
    ``round_trip``, the stage above's target chunk encoded and decoded as the
    runtime decodes a stage: at inference the known frames are always decoded
    frames, and a DiT trained on the ground truth alone places the object
    worse on them (measured: stage 1's largest position error 4.6 px on
    ground-truth frames, 7.3 px on round-tripped ones; median of 10 clips).

    Returns rows grouped by stage: ``x0``/``cond`` float16 latents, ``mask``,
    ``rope``, ``stage``, ``object`` (see `TaskSet`), ``clip`` (the clip's index in ``clips``).
    """
    height, width = clips[0].shape[-2:]
    plans = plan_clip_tasks(rngs, references)

    def encode(videos: list[torch.Tensor]) -> torch.Tensor:
        # Stage 0 without a reference image conditions on an all-zero video (most clips): encoded once, alone.
        blank = [not v.any() for v in videos]
        rest = [v for v, b in zip(videos, blank) if not b]
        latents = [backend.vae_encode(torch.stack(rest[i : i + encode_batch])) for i in range(0, len(rest), encode_batch)]
        if any(blank):
            latents.append(backend.vae_encode(videos[blank.index(True)][None]))  # row len(rest)
        rest_rows = iter(range(len(rest)))
        return torch.cat(latents)[[len(rest) if b else next(rest_rows) for b in blank]]

    rows = {k: [] for k in ("x0", "cond", "mask", "rope", "stage", "clip")}
    rows["object"] = task_object_cover(clips, plans)
    previous = [None] * len(clips)  # each clip's frames the next stage conditions on
    for s in range(len(INTERVALS)):
        targets, conditions = [], []
        for i, (clip, (stages, chunks)) in enumerate(zip(clips, plans)):
            stage, chunk = stages[s], chunks[s]
            targets.append(task_target(clip, stage, chunk))
            if s == 0:
                images = {0: clip[:, 0]} if references[i] else {}
                conditions.append(stage0_condition_video(stage, images, height, width)[0])
            else:
                conditions.append(chunk_condition_video(previous[i], stage, chunk))
            rows["mask"].append(chunk.latent_mask)
            rows["rope"].append(torch.tensor(chunk.rope_positions))
            rows["stage"].append(s)
            rows["clip"].append(i)
        x0 = encode(targets)
        rows["x0"].append(x0.to(torch.float16))
        rows["cond"].append(encode(conditions).to(torch.float16))
        if s + 1 < len(INTERVALS):
            picked = [i for i in range(len(clips)) if round_trips[i]]
            # as the runtime decodes a stage (a batch of 8: the toy's chunks are small)
            decoded = dict(zip(picked, decode_chunks(backend, x0[picked], _BackendClock(), batch=8))) if picked else {}
            for i, (clip, (stages, chunks)) in enumerate(zip(clips, plans)):
                frames = clip[:, :: stages[s].interval]
                if i in decoded:
                    chunk = chunks[s]
                    frames = frames.clone()
                    frames[:, chunk.start : chunk.start + chunk.num_valid] = decoded[i][:, : chunk.num_valid]
                previous[i] = frames
    return {
        "x0": torch.cat(rows["x0"]), "cond": torch.cat(rows["cond"]),
        "mask": torch.stack(rows["mask"]), "rope": torch.stack(rows["rope"]),
        "stage": torch.tensor(rows["stage"]), "clip": torch.tensor(rows["clip"]), "object": rows["object"],
    }


def plan_clip_tasks(rngs: list[np.random.Generator], references: list[bool]) -> list[tuple]:
    """Each clip's (stage plans, the chunk trained on per stage), drawn from the clip's generator."""
    plans = []
    for rng, reference in zip(rngs, references):
        stages = plan_stages(STAGE0_FRAMES, INTERVALS, {0} if reference else ())
        plans.append((stages, clip_task_chunks(stages, rng)))
    return plans


def task_target(clip: torch.Tensor, stage, chunk) -> torch.Tensor:
    """The pixel frames a task's chunk generates: ``clip`` at the stage's frame rate, the chunk's span."""
    return clip[:, :: stage.interval][:, chunk.start : chunk.start + chunk.num_frames]


def task_object_cover(clips: list[torch.Tensor], plans: list[tuple]) -> torch.Tensor:
    """`object_latent_cover` of every task's target chunk, rows grouped by stage as `build_clip_tasks`'s."""
    return torch.stack([
        object_latent_cover(task_target(clip, stages[s], chunks[s]))
        for s in range(len(INTERVALS)) for clip, (stages, chunks) in zip(clips, plans)
    ])


def _draw_shard_clips(cfg: ToyTrainConfig, first: int, stop: int) -> tuple[list, ...]:
    """Clips ``first`` to ``stop`` (exclusive): (clips, generators, references, round trips, caption rows)."""
    captions = all_captions()
    clips, rngs, references, round_trips, caption_rows = [], [], [], [], []
    for index in range(first, stop):
        rng = _rng(cfg.seed, 3, index)
        spec = sample_clip_spec(int(rng.integers(2**31)))
        clips.append(render_clip(spec, CLIP_FRAMES))
        references.append(bool(rng.random() < cfg.reference_share))
        round_trips.append(bool(rng.random() < cfg.round_trip_share))
        rngs.append(rng)
        caption_rows.append(captions.index(spec.caption))
    return clips, rngs, references, round_trips, caption_rows


def build_task_set(models: ModelSet, cfg: ToyTrainConfig, work: Path, progress: bool = True, encode_batch: int = 8) -> TaskSet:
    """Encode every clip's tasks with the torch backend (the runtime's encoder path), in resumable shards."""
    from tqdm.auto import tqdm

    from ..runtime.backends.torch import TorchBackend
    from ..runtime.pipeline import encode_prompts

    backend = TorchBackend(models)
    captions = all_captions()
    shard_size = 100
    shards = []
    with tqdm(total=cfg.clips, desc="toy tasks", disable=not progress) as bar:
        for first in range(0, cfg.clips, shard_size):
            raise_if_interrupted()
            path = _state_file(work, f"tasks-{first:05d}")
            shard = _load(path)
            if shard is None:
                clips, rngs, references, round_trips, caption_rows = _draw_shard_clips(cfg, first, min(cfg.clips, first + shard_size))
                shard = build_clip_tasks(backend, clips, rngs, references, round_trips, encode_batch)
                shard["caption"] = torch.tensor(caption_rows)[shard.pop("clip")]
                save_state(shard, path)
            elif "object" not in shard:  # a shard made before the object maps: they are drawn again, not encoded
                clips, rngs, references, _, _ = _draw_shard_clips(cfg, first, min(cfg.clips, first + shard_size))
                shard["object"] = task_object_cover(clips, plan_clip_tasks(rngs, references))
                save_state(shard, path)
            bar.update(min(cfg.clips, first + shard_size) - first)
            shards.append(shard)
    clock = _BackendClock()
    contexts = []
    for text in captions + ["", DEFAULT_NEGATIVE_PROMPT]:
        context, _ = encode_prompts(backend, models.tokenizer, text, None, clock)
        contexts.append(context[0])
    return TaskSet(
        **{k: torch.cat([s[k] for s in shards]) for k in ("x0", "cond", "mask", "rope", "stage", "caption", "object")},
        contexts=torch.stack(contexts),
    )


# ---------------------------------------------------------------------------
# Phase 3: the DiT
# ---------------------------------------------------------------------------

def condition_input(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """y = [mask (4) | condition latents (16)]: ``[B, 4, f]`` and ``[B, 16, f, h, w]`` -> ``[B, 20, f, h, w]``, as pipeline.condition_latents."""
    n, _, f, h, w = latents.shape
    return torch.cat([mask[:, :, :, None, None].expand(n, 4, f, h, w).to(latents.dtype), latents], dim=1)


def dit_training_batch(tasks: TaskSet, cfg: ToyTrainConfig, step: int, head_dim: int):
    """One batch: (x_t, y, sigma, context, cos, sin, target velocity, loss weight ``[B, 1, f, h, w]`` or None: all 1)."""
    rng = _rng(cfg.seed, 4, step)
    gen = _torch_gen(cfg.seed, 5, step)
    b = cfg.dit_batch
    # pick tasks by stage share
    stage_of_row = rng.choice(len(INTERVALS), size=b, p=np.asarray(cfg.stage_shares) / sum(cfg.stage_shares))
    rows = []
    for s in stage_of_row:
        candidates = tasks.rows_by_stage[s]
        rows.append(int(candidates[rng.integers(len(candidates))]))
    rows = torch.tensor(rows)
    x0 = tasks.x0[rows].float()
    h, w = x0.shape[-2:]
    y = condition_input(tasks.mask[rows], tasks.cond[rows].float())
    caption = tasks.caption[rows].clone()
    drop = torch.from_numpy(rng.random(b) < cfg.text_dropout)
    # dropped text: the empty prompt or the runtime's default negative prompt, half each
    null_rows = len(tasks.contexts) - 2 + torch.from_numpy(rng.integers(0, 2, size=b))
    caption = torch.where(drop, null_rows, caption)
    context = tasks.contexts[caption]
    shifts = torch.tensor([STAGE_SHIFTS[s] for s in stage_of_row], dtype=torch.float32)
    # the inference schedule's shift on uniform draws: training spends its noise levels where sampling does
    sigma = shift_sigmas(torch.rand(b, generator=gen), shifts)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    tables = [_rope_table(tuple(p), h // 2, w // 2, head_dim) for p in tasks.rope[rows].tolist()]
    cos, sin = torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables])
    return x_t, y, sigma, context, cos, sin, noise - x0, dit_loss_weight(tasks.object[rows], cfg)


def dit_loss_weight(cover: torch.Tensor, cfg: ToyTrainConfig) -> torch.Tensor | None:
    """Per latent pixel loss weight ``[B, 1, f, h, w]`` from the object cover ``[B, f, h, w]`` (None: all 1)."""
    if not cfg.object_loss_weight and not cfg.first_frame_loss_weight:
        return None
    weight = 1.0 + cfg.object_loss_weight * cover[:, None].float()
    weight[:, :, 0] *= 1.0 + cfg.first_frame_loss_weight  # each chunk's first latent frame: one pixel frame alone
    return weight


@functools.lru_cache(maxsize=64)
def _rope_table(positions: tuple[int, ...], height: int, width: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The tasks hold a handful of distinct position lists (7 at the toy's default video): built once each.
    return rope_table(positions, height, width, head_dim)


def _loss_and_grads(dit, opt: torch.optim.Optimizer, batch: tuple) -> torch.Tensor:
    """The flow-matching loss of one `dit_training_batch`, its gradients left in the parameters."""
    x_t, y, sigma, context, cos, sin, target, weight = batch
    pred = dit(x_t, y, sigma * 1000.0, context, cos, sin, timestep_per_sample=True)
    if weight is None:
        loss = F.mse_loss(pred.float(), target)
    else:
        loss = ((pred.float() - target).square() * weight).mean() / weight.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def train_dit(models: ModelSet, tasks: TaskSet, cfg: ToyTrainConfig, work: Path, progress: bool = True,
              compile_dit: bool = False, echo: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Train, keep an EMA, checkpoint; returns the EMA state dict and the loss log.

    ``compile_dit``: the training forward goes through ``torch.compile`` (its
    first step compiles, about 40 s on 2 cores, then a step is about 15%
    faster); if compiling fails (no C++ compiler, for one), the run says so
    and goes on eagerly.
    """
    from tqdm.auto import tqdm

    path = _state_file(work, "dit")
    dit = models.dit.train()
    forward = torch.compile(dit, dynamic=False) if compile_dit else dit
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.dit_lr, weight_decay=0.01)
    state, log, start = _resume(path, dit, opt)
    ema = state["ema"] if state is not None else {k: v.detach().clone() for k, v in dit.state_dict().items()}
    head_dim = dit.cfg.head_dim
    with tqdm(total=cfg.dit_steps, initial=start, desc="toy DiT", disable=not progress) as bar:
        for step in range(start, cfg.dit_steps):
            raise_if_interrupted()
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(cfg.dit_lr, step, cfg.dit_steps)
            batch = dit_training_batch(tasks, cfg, step, head_dim)
            try:  # the compiled backward is built at the first backward: both are inside
                loss = _loss_and_grads(forward, opt, batch)
            except Exception as err:  # the compiled step failed: retried eagerly, where a real error raises again
                raise_if_interrupted()  # not a compile failure: Ctrl-C that the compiler turned into an error
                if forward is dit:
                    raise
                first_line = (str(err).strip().splitlines() or [""])[0]
                echo(f"torch.compile failed ({type(err).__name__}: {first_line}); training the DiT without it")
                forward = dit
                loss = _loss_and_grads(dit, opt, batch)
            torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for k, v in dit.state_dict().items():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
            log.append({"step": step, "loss": loss.item()})
            bar.update(1)
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.dit_steps:
                save_state({"model": dit.state_dict(), "opt": opt.state_dict(), "ema": ema, "log": log, "step": step + 1}, path)
    dit.eval()
    return ema, log


# ---------------------------------------------------------------------------
# The whole run, and what ships
# ---------------------------------------------------------------------------

def train_toy(
    work: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ToyTrainConfig = ToyTrainConfig(),
    progress: bool = True,
    echo: Callable[[str], None] = print,
    compile_dit: bool = False,
) -> dict:
    """All three phases into ``work`` (resumable), then the release-layout weights into ``out``.

    ``compile_dit``: train the DiT through ``torch.compile`` (`train_dit`;
    ``tm-export train-toy`` does unless told ``--no-compile``).

    Both folders are checked before any training: ``out`` is replaced at the
    end, so it must be new, empty, or an earlier toy set; ``work`` must be a
    folder whose saved settings (if any) are these.
    """
    work, out = Path(work), Path(out)
    check_weights_target(out)
    if work.exists() and not work.is_dir():
        raise UsageError(f"--work: {work} exists and is not a folder")
    saved = work / "config.json"
    # the preset's text length shapes the DiT's inputs: a DiT checkpoint made at another is not resumable
    settings = {**asdict(cfg), "text_len": get_preset(TOY_PRESET).t5.text_len}
    if saved.is_file():
        previous = json.loads(saved.read_text())
        if _comparable_settings(previous) != _comparable_settings(json.loads(json.dumps(settings))):
            raise UsageError(f"--work: {work} holds a run with other settings ({saved}); use a new folder to change them")
    else:
        work.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(settings, indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    models = build_untrained_toy(cfg.seed)
    _channels_last_convs(models.vae)
    timings = {}
    t0 = time.perf_counter()
    vae_log = train_vae(models, cfg, work, progress)
    timings["vae_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_vae_motion(models, cfg, work, progress)
    timings["vae_motion_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_vae_decoder(models, cfg, work, progress)
    timings["vae_decoder_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        tasks = build_task_set(models, cfg, work, progress)
    timings["tasks_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ema, dit_log = train_dit(models, tasks, cfg, work, progress, compile_dit, echo)
    timings["dit_s"] = time.perf_counter() - t0
    models.dit.load_state_dict(ema)
    out = export_toy_weights(models, out)
    summary = {"timings": timings, "final_vae_loss": _tail_mean(vae_log), "final_dit_loss": _tail_mean(dit_log)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"toy weights written to {out} (VAE {timings['vae_s']:.0f} s, tasks {timings['tasks_s']:.0f} s, DiT {timings['dit_s']:.0f} s)")
    return summary


def _channels_last_convs(vae: torch.nn.Module) -> None:
    """Put the VAE's 3-D convolution weights in channels-last order (values unchanged).

    On a CPU oneDNN then runs them faster: a training step about 12% faster,
    an encode of 8 toy clips 0.52 -> 0.40 s (decode unchanged). The shipped
    weights are written contiguous (`export_toy_weights`).
    """
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.to(memory_format=torch.channels_last_3d)


# What a setting was before it existed: a folder from then ran without the VAE fine-tunes, on
# ground-truth known frames (its unbuilt task shards, if any, tie stage 2's chunk to stage 1's).
_SETTINGS_BEFORE_THEY_EXISTED = {"vae_motion_steps": 0, "vae_decoder_steps": 0, "round_trip_share": 0.0,
                                 "object_loss_weight": 0.0, "first_frame_loss_weight": 0.0}


def _comparable_settings(settings: dict) -> dict:
    """A saved run's settings, with those it predates filled in, and a fine-tune's own dropped when it is off."""
    defaults = json.loads(json.dumps(asdict(ToyTrainConfig())))
    filled = {**{k: _SETTINGS_BEFORE_THEY_EXISTED.get(k, v) for k, v in defaults.items() if k not in settings}, **settings}
    for prefix in ("vae_motion_", "vae_decoder_"):
        if filled.get(prefix + "steps") == 0:  # the fine-tune's batch, rate and weights are then never used
            filled = {k: v for k, v in filled.items() if not k.startswith(prefix) or k == prefix + "steps"}
    return filled


def _tail_mean(log: list[dict], n: int = 100) -> float:
    tail = [r["loss"] for r in log[-n:]]
    return float(sum(tail) / len(tail)) if tail else float("nan")


def check_weights_target(out: Path) -> None:
    """`out` is replaced whole at the end: it must be new, empty, or hold nothing but a weight set's files."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder; choose a new folder")
    ours = {DIT_FILE, T5_FILE, VAE_FILE}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink() or (path.is_file() and rel not in ours and not rel.startswith(TOKENIZER_DIR + "/")):
            raise UsageError(f"--out: {out} holds {rel}, which a toy weight set does not (it would be deleted); "
                             "choose a new folder")


def export_toy_weights(models: ModelSet, out: str | os.PathLike) -> Path:
    """Write the set in the release's layout (DiT and T5 bf16, VAE float32, tokenizer dir), atomically."""
    from ..models.tokenizer import build_tiny_tokenizer

    out = Path(out).resolve()
    check_weights_target(out)  # again: the folder may have changed during training
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "encoders").mkdir()
        bf16 = lambda m: {k: v.detach().to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}  # noqa: E731
        torch.save(bf16(models.dit), tmp / DIT_FILE)
        torch.save(bf16(models.t5), tmp / T5_FILE)
        torch.save({k: v.detach().float().contiguous() for k, v in models.vae.state_dict().items()}, tmp / VAE_FILE)
        build_tiny_tokenizer(tmp / TOKENIZER_DIR, corpus=toy_corpus(), model_max_length=models.preset.t5.text_len)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the finished set gets a new folder's mode
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def require_matplotlib() -> None:
    """Refuse before an hour of training, not after, when the loss curves cannot be drawn."""
    import importlib.util

    from ..errors import MissingDependencyError

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("--loss-png needs matplotlib: pip install -e '.[train]'")


def plot_losses(work: str | os.PathLike, png: str | os.PathLike) -> Path:
    """Loss per step of every phase that ran (raw and a 50-step running mean) as a PNG (needs matplotlib)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = Path(work)
    panels = [("vae", "toy VAE (weighted L1 + L2)"), ("dit", "toy DiT (flow-matching MSE)")]
    if _has_state(work, "vae-motion"):
        panels.insert(1, ("vae-motion", "toy VAE fine-tune (+ motion term)"))
    if _has_state(work, "vae-decoder"):
        panels.insert(-1, ("vae-decoder", "toy VAE decoder (+ motion, centroid)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (name, title) in zip(axes, panels):
        state = _load(_state_file(work, name))
        if state is None:
            continue
        loss = np.asarray([r["loss"] for r in state["log"]])
        ax.plot(loss, lw=0.5, alpha=0.4, color="tab:blue")
        k = 50
        if len(loss) >= k:
            ax.plot(np.arange(k - 1, len(loss)), np.convolve(loss, np.ones(k) / k, mode="valid"), color="tab:blue")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
