"""Reading a JSON object from a file the user named, with one error that names the file.

Kept below every layer (it imports nothing of the package), so manifests,
calibrations and step-cache curves read their files the same way.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path, error: type[Exception], what: str) -> dict:
    """The JSON object in `path`; `error("PATH: unreadable WHAT (...)")` when it cannot be read, is not
    UTF-8 JSON, or holds something other than an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: unreadable {what} ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must hold a JSON object, got {type(data).__name__}")
    return data
