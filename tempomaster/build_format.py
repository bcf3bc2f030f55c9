"""The build directory's format constants and file hashing, shared by the writer (export) and the readers.

Kept below every layer so export can write a manifest that engines and the
runtime read, without export importing either of them.
"""
from __future__ import annotations

import hashlib
import os

MANIFEST_FILE = "manifest.json"
FORMAT = "tempomaster-build"
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
