"""The largest request the tools accept: checked before any work, so a typo cannot cost hours or GBs.

Kept below every layer and free of imports, so the command line can apply
these bounds while parsing flags (before torch is loaded) and the planner
can apply them to any caller.  Each bound is far past what a real run asks
for; what decides whether a request fits a machine is the memory estimate
(runtime/memory.py), made once the request is known to be bounded.
"""

from __future__ import annotations

# Frames of the finished video (stage-0 frames x first interval / last interval):
# about 12 hours at 24 fps.  Planning is linear in it; past this it takes GBs.
MAX_VIDEO_FRAMES = 2**20
# A stage's frame interval; RoPE positions grow with it (frame x interval).
MAX_FRAME_INTERVAL = 1024
# Denoising steps of one stage: one per training timestep (runtime.schedule.NUM_TRAIN_TIMESTEPS);
# more distinguish nothing, and the schedule's arrays are sized by it.
MAX_STEPS_PER_STAGE = 1000
# Output height and width in pixels.
MAX_SIDE = 2**16
# A reference image's declared size (width x height): 8192 x 8192. It is checked from the
# file's header, before decoding, since a few KB of PNG can declare gigapixels.
MAX_REFERENCE_PIXELS = 8192 * 8192
# A --prompts file: its size and its lines (a device such as /dev/zero never ends).
MAX_PROMPTS_FILE_BYTES = 1 << 20
MAX_PROMPTS = 10_000
# A --config JSON file (the release's is a few KB).
MAX_CONFIG_FILE_BYTES = 16 << 20


class TooLarge(ValueError):
    """A file past its size bound; the message says the bound."""


def read_limited(path, limit: int) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them: one more is ``TooLarge``.

    Reads ``limit + 1`` bytes at most, so a device file (/dev/zero,
    /dev/urandom) or a huge file costs no more than the bound.  OSError
    (missing, a folder, no permission) is left to the caller to word.
    """
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"larger than {limit} bytes")
    return data


def read_prompt_lines(path, flag: str) -> list[str]:
    """The lines of a prompts file (``flag`` names it in errors), bounded by MAX_PROMPTS_FILE_BYTES.

    UsageError, one line, when it is too large, missing, a folder, unreadable or not UTF-8.
    """
    from .errors import UsageError

    try:
        return read_limited(path, MAX_PROMPTS_FILE_BYTES).decode("utf-8").splitlines()
    except TooLarge as err:
        raise UsageError(f"{flag} {path}: {err}, the most a prompts file may hold") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path}: unreadable ({type(err).__name__}: {err})") from None
