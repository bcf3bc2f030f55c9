"""Phase 1: the toy VAE learns to reconstruct clips; its latent statistics are folded into its weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..interrupts import raise_if_interrupted
from ..models.checkpoints import ModelSet
from .clips import object_centre, render_clip, sample_clip_spec
from .config import CLIP_FRAMES, INTERVALS, OBJECT_SATURATION, STAGE0_FRAMES, VAE_CROP, ToyTrainConfig
from .phases import cosine_lr, resume_phase, seeded_rng, seeded_torch_generator, state_file
from .state_files import save_state


def vae_training_batch(
    seed: int, step: int, batch: int, frames_per_clip: int = 9, strides: tuple[int, ...] = (1, 2, 4)
) -> torch.Tensor:
    """[B, 3, frames, 32, 48]: frames at one of ``strides`` (1, 2, 4: 24/12/6 fps), cropped around the object half the time."""
    rng = seeded_rng(seed, 1, step)
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
    """The VAE's causal chunked encode, with gradients (encode() itself is inference-only).

    video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1] -> normalised latents ``[B, z, 1 + k, H/8, W/8]``.
    """
    cache = vae.new_encoder_cache(video.shape[0], video.shape[3], video.shape[4])
    out = [vae.encode_chunk(video[:, :, :1], cache)]
    for i in range(1, video.shape[2], vae.temporal_ratio):
        out.append(vae.encode_chunk(video[:, :, i : i + vae.temporal_ratio], cache))
    return torch.cat(out, dim=2)


def vae_decode_train(vae, z: torch.Tensor) -> torch.Tensor:
    """The causal decode with gradients: normalised latents ``[B, z, F, h, w]`` -> ``[B, 3, 1 + 4(F-1), 8h, 8w]``, unclamped."""
    cache = vae.new_decoder_cache(z.shape[0], z.shape[3], z.shape[4])
    return torch.cat([vae.decode_chunk(z[:, :, i : i + 1], cache) for i in range(z.shape[2])], dim=2)


def vae_loss(vae, video: torch.Tensor, gen: torch.Generator, motion_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Weighted L1 + L2 reconstruction through slightly noisy latents, plus ``motion_weight`` times
    `motion_error` (the fine-tune's term).

    video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1]; the loss is a scalar.

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
    """Mean L1 distance (px) between the soft object centroids of ``recon`` and ``video`` ``[B, 3, T, H, W]``.

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
        spec = sample_clip_spec(int(seeded_rng(seed, 6, i).integers(2**31)))
        clip = render_clip(spec, CLIP_FRAMES)
        video = clip[:, :: INTERVALS[0]] if i % 2 == 0 else clip[:, :STAGE0_FRAMES]
        latents.append(vae.encode(video[None]))
    z = torch.cat(latents).double()
    return z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))


@torch.no_grad()
def fold_latent_statistics(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rescale the VAE so its normalised latents get zero mean and unit std per channel; decode(encode(x)) is unchanged.

    mean, std: ``[z]``, the normalised latents' per-channel statistics (`latent_statistics`).

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
    vae,
    cfg: ToyTrainConfig,
    path: Path,
    steps: int,
    lr: float,
    warmup: int,
    desc: str,
    batch: Callable[[int], torch.Tensor],
    loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]],
    progress: bool,
    params: list[torch.nn.Parameter] | None = None,
    fold: bool = True,
) -> list[dict]:
    """One resumable VAE phase: ``steps`` AdamW steps of ``params`` (all by default) on
    ``loss(batch(step), step)``, then, if ``fold``, the latents' statistics folded."""
    from tqdm.auto import tqdm

    vae.train()
    opt = torch.optim.AdamW(list(vae.parameters()) if params is None else params, lr=lr, weight_decay=0.0)
    state, log, start = resume_phase(path, vae, opt)
    with tqdm(total=steps, initial=start, desc=desc, disable=not progress) as bar:
        for step in range(start, steps):
            raise_if_interrupted()
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, step, steps, warmup)
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
        mean, std = latent_statistics(vae, cfg.seed, cfg.latent_statistics_clips)
        fold_latent_statistics(vae, mean, std)
        save_state(
            {
                "model": vae.state_dict(),
                "opt": opt.state_dict(),
                "log": log,
                "step": steps,
                "folded": True,
                "latent_mean": mean,
                "latent_std": std,
            },
            path,
        )
    return log


def train_vae(models: ModelSet, cfg: ToyTrainConfig, work: Path, progress: bool = True) -> list[dict]:
    def batch(step: int) -> torch.Tensor:
        if step < cfg.vae_long_from:
            return vae_training_batch(cfg.seed, step, cfg.vae_batch, cfg.vae_frames)
        return vae_training_batch(cfg.seed, step, cfg.vae_long_batch, cfg.vae_long_frames)

    return _train_vae_phase(
        models.vae,
        cfg,
        state_file(work, "vae"),
        cfg.vae_steps,
        cfg.vae_lr,
        100,
        "toy VAE",
        batch,
        lambda video, step: vae_loss(models.vae, video, seeded_torch_generator(cfg.seed, 2, step)),
        progress,
    )


def train_vae_motion(models: ModelSet, cfg: ToyTrainConfig, work: Path, progress: bool = True) -> list[dict]:
    """The fine-tune (skipped when ``vae_motion_steps`` is 0): the motion term on 17-frame windows, then the statistics folded again."""
    if cfg.vae_motion_steps <= 0:
        return []
    return _train_vae_phase(
        models.vae,
        cfg,
        state_file(work, "vae-motion"),
        cfg.vae_motion_steps,
        cfg.vae_motion_lr,
        20,
        "toy VAE motion",
        # batches drawn apart from phase 1's (its steps are below 100000)
        lambda step: vae_training_batch(
            cfg.seed, 100_000 + step, cfg.vae_motion_batch, cfg.vae_long_frames, cfg.vae_motion_strides
        ),
        lambda video, step: vae_loss(
            models.vae, video, seeded_torch_generator(cfg.seed, 7, step), cfg.vae_motion_weight
        ),
        progress,
    )


def decoder_loss(
    vae, video: torch.Tensor, gen: torch.Generator, motion_weight: float, centroid_weight: float
) -> tuple[torch.Tensor, dict]:
    """The decoder fine-tune's loss: `vae_loss`'s terms on the frozen encoder's latents, plus the centroid term.

    video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1]; the loss is a scalar.
    """
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
        vae,
        cfg,
        state_file(work, "vae-decoder"),
        cfg.vae_decoder_steps,
        cfg.vae_decoder_lr,
        20,
        "toy VAE decoder",
        # batches drawn apart from the other phases' (their steps are below 200000)
        lambda step: vae_training_batch(cfg.seed, 200_000 + step, cfg.vae_decoder_batch, cfg.vae_long_frames),
        lambda video, step: decoder_loss(
            vae,
            video,
            seeded_torch_generator(cfg.seed, 8, step),
            cfg.vae_decoder_motion_weight,
            cfg.vae_decoder_centroid_weight,
        ),
        progress,
        params=params,
        fold=False,
    )
