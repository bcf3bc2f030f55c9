"""`tm-run serve`: its flags (the model source and backend flags of `generate`, and the listening ones)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_backend, add_model_source, bounded_int, options_from_flags


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP API and a web page: the models loaded once, a durable job queue")
    add_model_source(p)
    add_backend(p, "as tm-run generate chooses")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="model dtype (default: as tm-run generate)")
    p.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:N (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="one backend and one worker per device, all taking jobs from the one queue: CUDA indices "
        "0,1,2,3, or cpu:N (a job runs on one device)",
    )
    p.add_argument(
        "--threads",
        type=bounded_int(1),
        default=None,
        help="CPU threads for torch and onnxruntime (with --devices cpu:N: per worker; default the cores shared out)",
    )
    p.add_argument("--tile", action=argparse.BooleanOptionalAction, default=None, help="the release's tiled VAE")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs --token)"
    )
    p.add_argument("--port", type=bounded_int(0, 65535), default=8000, help="port (default 8000)")
    p.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        default=Path("serve-data"),
        help="folder of the job database and the videos (default serve-data; kept across restarts)",
    )
    p.add_argument(
        "--max-queue",
        type=bounded_int(1),
        default=16,
        help="waiting jobs accepted at most; more are answered 429 (default 16)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="every API request must send Authorization: Bearer TOKEN (default: $TEMPOMASTER_TOKEN; "
        "required with a --host other than loopback)",
    )


def serve(args) -> int:
    from ..runtime.request import GenerateOptions
    from ..serve.server import ServeOptions, run_serve

    base = options_from_flags(GenerateOptions, args, progress=False)
    return run_serve(options_from_flags(ServeOptions, args, base=base))
