"""`tm-run serve`: check the flags, load the backend once, recover the queue, listen.

Safe by default: it listens on 127.0.0.1; any other address needs a token
(--token or TEMPOMASTER_TOKEN) that every API request must send.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import MissingDependencyError, UsageError
from ..runtime.request import GenerateOptions

TOKEN_ENV = "TEMPOMASTER_TOKEN"


@dataclass
class ServeOptions:
    base: GenerateOptions  # the model source, device, dtype, backend: as `tm-run generate`'s flags
    host: str = "127.0.0.1"
    port: int = 8000
    data: Path = Path("serve-data")
    max_queue: int = 16
    token: str | None = None  # None: TEMPOMASTER_TOKEN, else no token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_serve_options(options: ServeOptions) -> str | None:
    """The token in force (None on loopback without one); one-line UsageErrors for the rest."""
    token = options.token if options.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and (len(token) < 8 or any(c.isspace() for c in token) or not token.isascii()):
        raise UsageError(
            "--token: at least 8 printable ASCII characters without spaces (e.g. from: openssl rand -hex 16)"
        )
    if not is_loopback(options.host) and token is None:
        raise UsageError(
            f"--host {options.host} accepts connections from other machines: give --token TOKEN "
            f"(or set {TOKEN_ENV}), which every request must then send as Authorization: Bearer TOKEN"
        )
    if not 0 <= options.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {options.port}")
    if options.max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {options.max_queue}")
    if options.data.exists() and not options.data.is_dir():
        raise UsageError(f"--data: {options.data} exists and is not a directory")
    from ..atomic_write import check_writable_folder

    check_writable_folder(options.data, flag="--data")
    return token


def require_serve_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "multipart", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingDependencyError(f"tm-run serve needs {', '.join(missing)}: pip install -e '.[serve]'")


def worker_devices(options: ServeOptions) -> list[str | None]:
    """One worker per device of --devices (CUDA indices, or cpu:N), else one on --device."""
    if options.base.devices is None:
        return [None]
    from ..runtime.workers import parse_devices

    devices = parse_devices(options.base.devices)
    if options.base.device is not None:
        raise UsageError("--device and --devices: give one of them")
    return [str(d) if d.type == "cpu" else f"cuda:{d.index}" for d in devices]


def build_service(options: ServeOptions, token: str | None, log=print):
    """Everything but the listening socket: the loaded backends, the recovered store, the (unstarted) workers."""
    from .app import Service
    from .events import ProgressBoard
    from .metrics import ServeMetrics
    from .queue import FINISHED, JobStore, looks_like_job_id
    from .worker import DataDir, JobRunner, Worker

    devices = worker_devices(options)
    base = options.base
    if len(devices) > 1 and base.threads is None and devices[0] == "cpu":
        from ..runtime.request import available_cores

        base = replace(base, threads=max(1, available_cores() // len(devices)))  # the cores shared out
    runners = [JobRunner(base, device) for device in devices]  # flags checked, nothing loaded yet
    runner = runners[0]
    data = DataDir(options.data)
    data.create()
    store = JobStore(data.database)
    for job_id in store.recover():
        row = store.get(job_id)
        log(
            f"job {job_id}: interrupted by the last shutdown; now {row.state}"
            + (f" ({row.error})" if row.error else "")
        )
    for path in data.remove_staging_leftovers():
        log(f"removed an unfinished temporary file: {path}")
    for folder in sorted((data.root / "uploads").iterdir()):
        row = store.get(folder.name) if looks_like_job_id(folder.name) else None
        if (
            folder.is_dir()
            and not folder.is_symlink()
            and looks_like_job_id(folder.name)
            and (row is None or row.state in FINISHED)
        ):
            shutil.rmtree(folder, ignore_errors=True)  # uploads of a request that was never accepted, or is over
    for each in runners:
        each.load()
    board, metrics = ProgressBoard(), ServeMetrics()
    workers = [Worker(each, store, data, board, metrics) for each in runners]
    return Service(
        runner=runner,
        store=store,
        data=data,
        board=board,
        metrics=metrics,
        workers=workers,
        max_queue=options.max_queue,
        token=token,
    )


def run_serve(options: ServeOptions) -> int:
    token = check_serve_options(options)
    require_serve_extra()
    import uvicorn

    from .app import create_app

    def log(line: str) -> None:
        print(f"tm-run serve: {line}", file=sys.stderr, flush=True)

    service = build_service(options, token, log)
    app = create_app(service)
    counts = service.store.counts()
    log(
        f"{service.runner.backend.name} backend on {', '.join(w.runner.device for w in service.workers)}, data in {options.data} "
        f"({counts['queued']} queued, {counts['done']} done); http://{options.host}:{options.port}/"
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: end with the worker stopped
    # (its job back in the queue) and exit 0, rather than die by the default handler.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    service.start()
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        service.stop()
        service.store.close()
        signal.signal(signal.SIGTERM, previous)
        log("stopped")
    return 0


def _exit_cleanly(signum, frame):
    raise SystemExit(0)
