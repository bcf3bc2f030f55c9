"""Calibration prompts: a built-in set, held-out prompts for the quality report, and prompt files.

Prompt file format (``--calib-prompts FILE``), UTF-8, one video per line:

    # a comment; blank lines are skipped
    a red fox trotting through fresh snow at dawn
    0:images/cat.png|a cat jumps onto the sofa
    0:first.png,8:last.png|a timelapse of clouds over a mountain lake

A line may start with reference images: ``FRAME:PATH`` entries (a stage-0
frame index and an image file) separated by commas, then ``|``, then the
prompt. Relative paths are taken from the prompt file's directory. A line
whose text before the first ``|`` is not such a list is a plain prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# Diverse on purpose: people, animals, landscapes, close-ups, fast and slow
# motion, day and night, camera moves, art styles, text-free and crowded scenes.
BUILTIN_PROMPTS = (
    "a red fox trotting through fresh snow at dawn, soft golden light",
    "a chef flipping vegetables in a wok over a tall flame, close-up",
    "aerial drone shot flying over a turquoise river winding through a canyon",
    "a little girl in a yellow raincoat jumping into puddles on a rainy street",
    "timelapse of clouds rolling over snowy mountain peaks",
    "a surfer riding a large wave, spray glittering in the sun, slow motion",
    "neon-lit city street at night with cars passing and reflections on wet asphalt",
    "a cat stretching and yawning on a sunny windowsill",
    "an old man playing chess in a park, shallow depth of field",
    "a hummingbird hovering next to a red flower, extreme close-up",
    "a steam locomotive crossing a stone bridge in autumn forest",
    "a ballet dancer spinning on a dark stage under a single spotlight",
    "underwater shot of a sea turtle gliding over a coral reef",
    "a busy food market in Southeast Asia, people walking, handheld camera",
    "a candle flame flickering in a dark room, macro",
    "a herd of horses galloping across a grassy plain, dust in the air",
    "a watercolor painting of a village coming to life, animated brush strokes",
    "a robot arm assembling a car in a factory, sparks flying",
    "a woman walking through a field of sunflowers, camera tracking from behind",
    "lightning storm over the ocean at night",
    "a toddler laughing while blowing soap bubbles in a garden",
    "slow pan across a cluttered artist's desk with paint tubes and brushes",
    "a skateboarder performing a kickflip in an empty pool",
    "snow falling gently on a quiet street lined with wooden houses, evening",
    "a 3D cartoon dragon flying over a medieval castle",
    "close-up of coffee being poured into a white cup, steam rising",
    "a pack of wolves running through a pine forest in winter",
    "fireworks exploding over a city harbor, reflections on the water",
    "a man typing on a laptop in a dim office, screen light on his face",
    "a paper boat floating down a stream after the rain",
    "a group of friends dancing at an outdoor concert, confetti in the air",
    "a jellyfish pulsing in deep blue water, bioluminescent glow",
    "wheat field swaying in the wind under a stormy sky, wide shot",
    "a basketball player dunking in slow motion, stadium lights",
    "a black and white film scene of a train arriving at a station",
    "an astronaut floating inside a space station, earth visible through the window",
)

# Never used for calibration: the quality report generates on these.
HELD_OUT_PROMPTS = (
    "a golden retriever catching a frisbee on a beach at sunset",
    "rain running down a window with blurred city lights behind it",
    "a potter shaping clay on a spinning wheel, close-up of hands",
    "a flock of birds taking off from a lake in the morning mist",
    "a vintage car driving along a coastal road, camera following",
    "an ink drop spreading in a glass of water, macro",
    "children flying kites on a windy hill",
    "a snowboarder carving down a powder slope, sunny day",
)


@dataclass(frozen=True)
class CalibrationSet:
    """`--calib-set`: how many of the built-in prompts, and what share of the preset's steps per stage."""

    prompts: int
    step_fraction: float


# Chosen from benchmarks/calibration_convergence.py (results/calibration_convergence.json, .png):
# "small" is the smallest set whose scales and all-FP8 velocity error stay within
# CALIB_TOLERANCE of "full" (the 36-video, full-step calibration) on the trained toy, and
# whose projected cost on tempomaster-14b at 480x832 is under one GPU-hour (calibration.cost).
# On the toy, 4 prompts at a quarter of the steps: mean amax change 8.9%, velocity error
# 0.0336 against 0.0341. The largest single change is larger (36%, one tensor): a
# tensor's maximum keeps moving with more prompts (16 -> 36 full-step prompts still moves
# one by 13%), so the tolerance is on the mean and on what the DiT computes.
CALIB_SETS = {
    "small": CalibrationSet(prompts=4, step_fraction=0.25),
    "full": CalibrationSet(prompts=len(BUILTIN_PROMPTS), step_fraction=1.0),
}
DEFAULT_CALIB_SET = "small"
# Mean relative amax change within 10% (most scales within one E4M3 step, 3 mantissa bits),
# and the all-FP8 velocity error at most 10% above the full run's.
CALIB_TOLERANCE = {"mean_rel_amax_change": 0.10, "velocity_error_growth": 0.10}


@dataclass(frozen=True)
class CalibrationPrompt:
    prompt: str
    images: dict[int, Path] = field(default_factory=dict)  # stage-0 frame -> image file

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "images": {str(k): str(v) for k, v in sorted(self.images.items())}}


_IMAGES_RE = re.compile(r"^\s*\d+\s*:[^,|]+(,\s*\d+\s*:[^,|]+)*$")


def parse_prompt_line(line: str, base: Path, where: str) -> CalibrationPrompt | None:
    from ..errors import UsageError

    text = line.strip()
    if not text or text.startswith("#"):
        return None
    images: dict[int, Path] = {}
    if "|" in text:
        head, rest = text.split("|", 1)
        if _IMAGES_RE.match(head):
            for item in head.split(","):
                frame, path = item.split(":", 1)
                p = Path(path.strip())
                p = p if p.is_absolute() else base / p
                if not p.is_file():
                    raise UsageError(f"{where}: reference image {p} not found")
                images[int(frame)] = p
            text = rest.strip()
            if not text:
                raise UsageError(f"{where}: reference images but no prompt after '|'")
    return CalibrationPrompt(text, images)


def read_prompt_file(path: str | Path) -> list[CalibrationPrompt]:
    """The prompts of a ``--calib-prompts`` file (format in the module docstring)."""
    from ..errors import UsageError
    from ..limits import MAX_PROMPTS, read_prompt_lines

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--calib-prompts {path}: file not found")
    lines = read_prompt_lines(path, "--calib-prompts")
    prompts = []
    for i, line in enumerate(lines, 1):
        p = parse_prompt_line(line, path.parent, f"--calib-prompts {path}:{i}")
        if p is not None:
            prompts.append(p)
    if not prompts:
        raise UsageError(f"--calib-prompts {path}: no prompts (the file is empty or only comments)")
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(f"--calib-prompts {path}: {len(prompts)} prompts; at most {MAX_PROMPTS} are accepted")
    return prompts


def builtin_prompts(count: int | None = None) -> list[CalibrationPrompt]:
    chosen = BUILTIN_PROMPTS if count is None else BUILTIN_PROMPTS[:count]
    return [CalibrationPrompt(p) for p in chosen]


def held_out_prompts(count: int) -> list[CalibrationPrompt]:
    return [CalibrationPrompt(p) for p in HELD_OUT_PROMPTS[:count]]
