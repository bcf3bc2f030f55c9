"""Shared pieces of the serve tests: a service on the tiny preset, small requests, waiting, a live server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

# Small and quick on a CPU: 9 stage-0 frames of 32x48, 2 steps a stage (9, 18 then 36 frames).
SMALL = {"num_frames": 9, "height": 32, "width": 48, "steps": [2, 2, 2]}


def small_request(prompt: str = "a red ball bouncing", **fields) -> dict:
    return {"prompt": prompt, **SMALL, **fields}


def make_service(data: Path, token: str | None = None, max_queue: int = 16):
    from tempomaster.runtime.request import GenerateOptions
    from tempomaster.serve.server import ServeOptions, build_service

    options = ServeOptions(
        base=GenerateOptions(preset="tiny", threads=1, progress=False), data=data, max_queue=max_queue
    )
    return build_service(options, token, log=lambda line: None)


def wait_for(check, timeout: float = 60.0, every: float = 0.05, what: str = "condition"):
    """check() until it returns something true; its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def status(client, job_id: str) -> dict:
    response = client.get(f"/v1/videos/{job_id}")
    assert response.status_code == 200
    return response.json()


def wait_state(client, job_id: str, states, timeout=60.0) -> dict:
    return wait_for(
        lambda: (s := status(client, job_id))["state"] in states and s,
        timeout=timeout,
        what=f"job {job_id} to be {states}",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """uvicorn serving `app` on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
