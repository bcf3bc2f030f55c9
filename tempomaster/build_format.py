"""The build directory's format constants and file hashing, shared by the writer (export) and the readers.

Kept below every layer so export can write a manifest that engines and the
runtime read, without export importing either of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

MANIFEST_FILE = "manifest.json"
FORMAT = "tempomaster-build"
FORMAT_VERSION = 1
# The manifest's own checksum, a key of the manifest: sha256 of its other keys
# as canonical JSON. Inside the file rather than beside it, so the manifest and
# its checksum are written by one rename and can never disagree after a crash.
MANIFEST_SHA256_KEY = "manifest_sha256"
# `tm-export calibrate` writes BUILD/calibration/amax.json in this format.
CALIBRATION_DIR = "calibration"
CALIBRATION_FILE = "amax.json"
CALIBRATION_FORMAT = "tempomaster-fp8-calibration"
# Every graph a build can hold, in export order.
GRAPH_NAMES = ("dit", "vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder", "t5")
# ONNX TensorProto element types -> the dtype names a manifest records
ONNX_DTYPE_NAMES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
    17: "float8e4m3fn",
}
# ... and, while it runs, the maxima so far (resumed by a rerun with the same arguments)
CALIBRATION_PROGRESS_FILE = "progress.json"
CALIBRATION_PROGRESS_FORMAT = "tempomaster-fp8-calibration-progress"


def manifest_sha256(data: Mapping) -> str:
    """The checksum a manifest carries: every key but the checksum, sorted, compact, UTF-8."""
    body = {k: v for k, v in data.items() if k != MANIFEST_SHA256_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_text(data: Mapping) -> str:
    """The manifest.json text of `data`, sealed with its checksum (what every writer of a manifest writes)."""
    sealed = {k: v for k, v in data.items() if k != MANIFEST_SHA256_KEY}
    sealed[MANIFEST_SHA256_KEY] = manifest_sha256(sealed)
    return json.dumps(sealed, indent=1) + "\n"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
