"""The toy's training settings and the untrained toy they start from (docs/toy.md: why each value)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from ..models.checkpoints import ModelSet
from ..models.presets import get_preset
from .clips import caption_vocabulary

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
    """The recipe of the shipped toy; docs/toy.md ("Settings and why") gives the measurement behind each choice."""

    seed: int = 20261124
    vae_steps: int = 1500
    vae_batch: int = 6
    vae_frames: int = 9  # 1 + 4 + 4: first the cheap windows, where the causal caches reach their steady state
    # then the runtime's whole 17-frame chunks (docs/toy.md: why)
    vae_long_from: int = 1000  # the VAE step where the long windows take over
    vae_long_frames: int = 17
    vae_long_batch: int = 3
    vae_lr: float = 1e-3
    # clips whose latents set the folded per-channel mean and std after a VAE phase
    latent_statistics_clips: int = 48
    # fine-tune matching frame-to-frame differences too (0: off; docs/toy.md)
    vae_motion_steps: int = 1000
    vae_motion_batch: int = 3
    vae_motion_lr: float = 5e-4
    vae_motion_weight: float = 1.0
    # its frame strides (4: 6 fps windows; docs/toy.md)
    vae_motion_strides: tuple[int, ...] = (1, 2, 4)
    # decoder-only fine-tune with a centroid term (0: off, as shipped; docs/toy.md)
    vae_decoder_steps: int = 0
    vae_decoder_batch: int = 3
    vae_decoder_lr: float = 5e-4
    vae_decoder_motion_weight: float = 2.0
    vae_decoder_centroid_weight: float = 0.05
    clips: int = 1000  # synthetic training clips, drawn from the seed
    dit_steps: int = 11000
    dit_batch: int = 16
    dit_lr: float = 5e-4
    ema_decay: float = 0.999  # the shipped DiT is the EMA of its weights
    text_dropout: float = 0.15  # share of examples trained on the empty or negative prompt (guidance's other half)
    reference_share: float = 0.3  # stage-0 examples that condition on a reference image at frame 0
    # clips whose stage-1/2 chunks condition on decoded known frames (docs/toy.md)
    round_trip_share: float = 1.0
    stage_shares: tuple[float, float, float] = (0.4, 0.3, 0.3)
    # extra loss weight on the latent pixels the object passes over (docs/toy.md)
    object_loss_weight: float = 4.0
    # extra loss weight on each task's first latent frame (docs/toy.md)
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


# What a setting was before it existed: a folder from then ran without the VAE fine-tunes, on
# ground-truth known frames (its unbuilt task shards, if any, tie stage 2's chunk to stage 1's).
SETTINGS_BEFORE_THEY_EXISTED = {
    "vae_motion_steps": 0,
    "vae_decoder_steps": 0,
    "round_trip_share": 0.0,
    "object_loss_weight": 0.0,
    "first_frame_loss_weight": 0.0,
}


def comparable_settings(settings: dict) -> dict:
    """A saved run's settings, with those it predates filled in, and a fine-tune's own dropped when it is off."""
    defaults = json.loads(json.dumps(asdict(ToyTrainConfig())))
    filled = {
        **{k: SETTINGS_BEFORE_THEY_EXISTED.get(k, v) for k, v in defaults.items() if k not in settings},
        **settings,
    }
    for prefix in ("vae_motion_", "vae_decoder_"):
        if filled.get(prefix + "steps") == 0:  # the fine-tune's batch, rate and weights are then never used
            filled = {k: v for k, v in filled.items() if not k.startswith(prefix) or k == prefix + "steps"}
    return filled
