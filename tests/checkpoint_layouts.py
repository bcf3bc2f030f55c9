"""The release's checkpoint key layouts, kept as test data in tests/data/checkpoint_keys.md."""

from __future__ import annotations

import re
from pathlib import Path

KEYS_FILE = Path(__file__).with_name("data") / "checkpoint_keys.md"


def layout(section: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the section whose heading starts with `section` ("DiT", "umT5 encoder", "VAE")."""
    text = KEYS_FILE.read_text(encoding="utf-8")
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    block = body.split("```", 2)[1]
    out = {}
    for line in block.strip().splitlines():
        m = re.fullmatch(r"(\S+) \[([\d, ]+)\]", line.strip())
        if m:
            out[m.group(1)] = tuple(int(s) for s in m.group(2).split(","))
    assert out, f"no keys parsed in section {section!r} of {KEYS_FILE}"
    return out
