"""A POST /v1/videos body -> the runtime's GenerateOptions, checked by the same function as `tm-run generate`.

Only the shape of the JSON is checked here (known fields, strings where
strings go, lists where lists go, no NaN); every value is then checked by
`runtime.request.build_jobs`, so a bad value gets the CLI's own one-line
message. Reference images arrive as multipart parts named `image:FRAME`
(FRAME as in `--image FRAME:PATH`); their bytes are written under a name
the server chooses, and build_jobs opens them as it opens `--image` files
(the declared size checked before any pixel is decoded).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from ..runtime.request import GenerateOptions, parse_frame_index

# What a request may set (JSON name -> GenerateOptions field); the model, device and output are the server's.
FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "num_frames": "num_frames",
    "height": "height",
    "width": "width",
    "intervals": "intervals",
    "steps": "steps",
    "shifts": "shifts",
    "guidance": "guidance",
    "use_apg": "use_apg",
    "seed": "seed",
    "save_fps": "save_fps",
}
LIST_FIELDS = {"intervals": "[4, 2, 1]", "steps": "[50, 32, 32]", "shifts": "[5, 3, 3]"}
TEXT_FIELDS = ("prompt", "negative_prompt")
FLOAT_FIELDS = ("shifts", "guidance", "save_fps")
MAX_LIST = 64  # stages; far past any plan (each halves the interval)
MAX_TEXT_CHARS = 100_000  # a prompt is tokenized to 512 tokens (the toy's 32): the rest is never read
MAX_IMAGES = 16
IMAGE_PART = "image:"


def _describe(value) -> str:
    return f"{value!r} (a {type(value).__name__})"


def _no_constants(name: str):
    raise UsageError(f"request body: {name} is not a number JSON accepts")


def parse_json(data: bytes | str, where: str = "request body") -> dict:
    """The body's JSON object; anything else (not UTF-8, not JSON, NaN, not an object) is one UsageError line."""
    try:
        value = json.loads(data, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply") from None
    if not isinstance(value, dict):
        raise UsageError(f'{where}: expected a JSON object such as {{"prompt": "..."}}, got {type(value).__name__}')
    return value


def check_fields(body: dict) -> dict:
    """The request's fields, their containers checked; the values are left to build_jobs."""
    unknown = sorted(k for k in body if k not in FIELDS)
    if unknown:
        raise UsageError(f"request body: unknown field {unknown[0]!r} (accepted: {', '.join(FIELDS)})")
    fields = {}
    for key, value in body.items():
        if value is None:
            continue  # the server's default, as a flag left out
        if key in TEXT_FIELDS:
            if not isinstance(value, str):
                raise UsageError(f"{key}: expected a string, got {_describe(value)}")
            if len(value) > MAX_TEXT_CHARS:
                raise UsageError(f"{key}: {len(value)} characters; at most {MAX_TEXT_CHARS} are accepted")
        if key in LIST_FIELDS:
            if not isinstance(value, list) or not value or len(value) > MAX_LIST:
                raise UsageError(
                    f"{key}: expected a list of 1 to {MAX_LIST} numbers such as {LIST_FIELDS[key]}, "
                    f"got {_describe(value)}"
                )
            value = list(value)
        fields[key] = value
    if "prompt" not in fields:
        raise UsageError('--prompt: required (the request\'s "prompt" field)')
    return fields


def image_frame(part_name: str) -> str:
    """The FRAME of a multipart part named `image:FRAME` (checked as `--image` checks it)."""
    frame = part_name[len(IMAGE_PART) :]
    parse_frame_index(frame, "--image")
    return frame.strip()


def _as_float(value):
    """A JSON integer where the CLI reads a float (its flag's type is float): 1 -> 1.0, so messages read alike."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def request_options(base: GenerateOptions, fields: dict, images: dict[str, Path]) -> GenerateOptions:
    """The server's options with this request's fields; `images` maps FRAME to a file the server wrote."""
    values = {}
    for key, value in fields.items():
        if key in FLOAT_FIELDS:
            value = [_as_float(v) for v in value] if isinstance(value, list) else _as_float(value)
        values[FIELDS[key]] = tuple(value) if key in LIST_FIELDS else value
    return replace(
        base, **values, images=[f"{frame}:{path}" for frame, path in images.items()], prompts=None, progress=False
    )
