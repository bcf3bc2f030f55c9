"""Phase 2: the tasks the runtime poses (stage-0 blueprints, stage-1/2 chunks), encoded once and cached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..interrupts import raise_if_interrupted
from ..models.checkpoints import ModelSet
from ..planner import VAE_TEMPORAL_FACTOR, chunk_condition_video, plan_stages
from ..runtime.pipeline import DEFAULT_NEGATIVE_PROMPT, BackendClock, decode_chunks, stage0_condition_video
from .clips import all_captions, render_clip, sample_clip_spec
from .config import CLIP_FRAMES, INTERVALS, STAGE0_FRAMES, ToyTrainConfig
from .phases import load_phase_state, seeded_rng, state_file
from .state_files import save_state


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
    per_latent_frame = torch.cat(
        [first, rest.reshape(-1, VAE_TEMPORAL_FACTOR, *rest.shape[1:]).any(1)]
    ).float()  # [f, H, W]
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


def build_clip_tasks(
    backend,
    clips: list[torch.Tensor],
    rngs: list[np.random.Generator],
    references: list[bool],
    round_trips: list[bool],
    encode_batch: int = 8,
) -> dict[str, torch.Tensor]:
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

    ``clips``: float32 ``[3, 68, H, W]`` in [-1, 1] each (`render_clip`).
    Returns rows grouped by stage, 3 per clip: ``x0``/``cond`` float16 latents
    ``[N, 16, f, H/8, W/8]``, ``mask``, ``rope``, ``stage``, ``object`` (see `TaskSet`),
    ``clip`` (the clip's index in ``clips``).
    """
    height, width = clips[0].shape[-2:]
    plans = plan_clip_tasks(rngs, references)

    def encode(videos: list[torch.Tensor]) -> torch.Tensor:
        """``[3, T, H, W]`` videos in [-1, 1] -> their normalised latents ``[len(videos), 16, f, H/8, W/8]``, in order."""
        # Stage 0 without a reference image conditions on an all-zero video (most clips): encoded once, alone.
        blank = [not v.any() for v in videos]
        rest = [v for v, b in zip(videos, blank) if not b]
        latents = [
            backend.vae_encode(torch.stack(rest[i : i + encode_batch])) for i in range(0, len(rest), encode_batch)
        ]
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
            decoded = dict(zip(picked, decode_chunks(backend, x0[picked], BackendClock(), batch=8))) if picked else {}
            for i, (clip, (stages, chunks)) in enumerate(zip(clips, plans)):
                frames = clip[:, :: stages[s].interval]
                if i in decoded:
                    chunk = chunks[s]
                    frames = frames.clone()
                    frames[:, chunk.start : chunk.start + chunk.num_valid] = decoded[i][:, : chunk.num_valid]
                previous[i] = frames
    return {
        "x0": torch.cat(rows["x0"]),
        "cond": torch.cat(rows["cond"]),
        "mask": torch.stack(rows["mask"]),
        "rope": torch.stack(rows["rope"]),
        "stage": torch.tensor(rows["stage"]),
        "clip": torch.tensor(rows["clip"]),
        "object": rows["object"],
    }


def plan_clip_tasks(rngs: list[np.random.Generator], references: list[bool]) -> list[tuple]:
    """Each clip's (stage plans, the chunk trained on per stage), drawn from the clip's generator."""
    plans = []
    for rng, reference in zip(rngs, references):
        stages = plan_stages(STAGE0_FRAMES, INTERVALS, {0} if reference else ())
        plans.append((stages, clip_task_chunks(stages, rng)))
    return plans


def task_target(clip: torch.Tensor, stage, chunk) -> torch.Tensor:
    """The pixel frames a task's chunk generates: ``clip`` at the stage's frame rate, the chunk's span.

    clip ``[3, 68, H, W]`` (24 fps, in [-1, 1]) -> ``[3, chunk.num_frames, H, W]``.
    """
    return clip[:, :: stage.interval][:, chunk.start : chunk.start + chunk.num_frames]


def task_object_cover(clips: list[torch.Tensor], plans: list[tuple]) -> torch.Tensor:
    """`object_latent_cover` of every task's target chunk, rows grouped by stage as `build_clip_tasks`'s.

    clips ``[3, 68, H, W]`` each -> bool ``[len(INTERVALS) * len(clips), f, H/8, W/8]``.
    """
    return torch.stack(
        [
            object_latent_cover(task_target(clip, stages[s], chunks[s]))
            for s in range(len(INTERVALS))
            for clip, (stages, chunks) in zip(clips, plans)
        ]
    )


def _draw_shard_clips(cfg: ToyTrainConfig, first: int, stop: int) -> tuple[list, ...]:
    """Clips ``first`` to ``stop`` (exclusive): (clips, generators, references, round trips, caption rows)."""
    captions = all_captions()
    clips, rngs, references, round_trips, caption_rows = [], [], [], [], []
    for index in range(first, stop):
        rng = seeded_rng(cfg.seed, 3, index)
        spec = sample_clip_spec(int(rng.integers(2**31)))
        clips.append(render_clip(spec, CLIP_FRAMES))
        references.append(bool(rng.random() < cfg.reference_share))
        round_trips.append(bool(rng.random() < cfg.round_trip_share))
        rngs.append(rng)
        caption_rows.append(captions.index(spec.caption))
    return clips, rngs, references, round_trips, caption_rows


def build_task_set(
    models: ModelSet, cfg: ToyTrainConfig, work: Path, progress: bool = True, encode_batch: int = 8
) -> TaskSet:
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
            path = state_file(work, f"tasks-{first:05d}")
            shard = load_phase_state(path)
            if shard is None:
                clips, rngs, references, round_trips, caption_rows = _draw_shard_clips(
                    cfg, first, min(cfg.clips, first + shard_size)
                )
                shard = build_clip_tasks(backend, clips, rngs, references, round_trips, encode_batch)
                shard["caption"] = torch.tensor(caption_rows)[shard.pop("clip")]
                save_state(shard, path)
            elif "object" not in shard:  # a shard made before the object maps: they are drawn again, not encoded
                clips, rngs, references, _, _ = _draw_shard_clips(cfg, first, min(cfg.clips, first + shard_size))
                shard["object"] = task_object_cover(clips, plan_clip_tasks(rngs, references))
                save_state(shard, path)
            bar.update(min(cfg.clips, first + shard_size) - first)
            shards.append(shard)
    clock = BackendClock()
    contexts = []
    for text in captions + ["", DEFAULT_NEGATIVE_PROMPT]:
        context, _ = encode_prompts(backend, models.tokenizer, text, None, clock)
        contexts.append(context[0])
    return TaskSet(
        **{k: torch.cat([s[k] for s in shards]) for k in ("x0", "cond", "mask", "rope", "stage", "caption", "object")},
        contexts=torch.stack(contexts),
    )
