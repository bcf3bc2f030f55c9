"""Phase 3: the toy DiT trained by flow matching on the cached tasks; an EMA of its weights ships."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..interrupts import raise_if_interrupted
from ..models.checkpoints import ModelSet
from ..rope import rope_table
from ..runtime.schedule import shift_sigmas
from .config import INTERVALS, STAGE_SHIFTS, ToyTrainConfig
from .phases import cosine_lr, resume_phase, seeded_rng, seeded_torch_generator, state_file
from .state_files import save_state
from .tasks import TaskSet


def condition_input(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """y = [mask (4) | condition latents (16)]: ``[B, 4, f]`` and ``[B, 16, f, h, w]`` -> ``[B, 20, f, h, w]``, as pipeline.condition_latents."""
    n, _, f, h, w = latents.shape
    return torch.cat([mask[:, :, :, None, None].expand(n, 4, f, h, w).to(latents.dtype), latents], dim=1)


def dit_training_batch(tasks: TaskSet, cfg: ToyTrainConfig, step: int, head_dim: int):
    """One batch: (x_t, y, sigma, context, cos, sin, target velocity, loss weight ``[B, 1, f, h, w]`` or None: all 1)."""
    rng = seeded_rng(cfg.seed, 4, step)
    gen = seeded_torch_generator(cfg.seed, 5, step)
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
def _rope_table(
    positions: tuple[int, ...], height: int, width: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
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


def train_dit(
    models: ModelSet,
    tasks: TaskSet,
    cfg: ToyTrainConfig,
    work: Path,
    progress: bool = True,
    compile_dit: bool = False,
    echo: Callable[[str], None] = print,
) -> tuple[dict, list[dict]]:
    """Train, keep an EMA, checkpoint; returns the EMA state dict and the loss log.

    ``compile_dit``: the training forward goes through ``torch.compile`` (its
    first step compiles, about 40 s on 2 cores, then a step is about 15%
    faster); if compiling fails (no C++ compiler, for one), the run says so
    and goes on eagerly.
    """
    from tqdm.auto import tqdm

    path = state_file(work, "dit")
    dit = models.dit.train()
    forward = torch.compile(dit, dynamic=False) if compile_dit else dit
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.dit_lr, weight_decay=0.01)
    state, log, start = resume_phase(path, dit, opt)
    ema = state["ema"] if state is not None else {k: v.detach().clone() for k, v in dit.state_dict().items()}
    head_dim = dit.cfg.head_dim
    with tqdm(total=cfg.dit_steps, initial=start, desc="toy DiT", disable=not progress) as bar:
        for step in range(start, cfg.dit_steps):
            raise_if_interrupted()
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.dit_lr, step, cfg.dit_steps)
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
                save_state(
                    {"model": dit.state_dict(), "opt": opt.state_dict(), "ema": ema, "log": log, "step": step + 1}, path
                )
    dit.eval()
    return ema, log
