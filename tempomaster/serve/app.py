"""The routes: the /v1 API, the page, /healthz and /metrics.

No part of a request becomes a path: a job id from the URL is checked for
its form and looked up in the database, and only a stored id (ours, random)
names a folder; the page's three files are read into memory at start-up.
Errors are JSON {"detail": one line}.

The reading routes are coroutines: each is a few reads of the database
(under its lock, well under a millisecond), and on the event loop they
do not queue behind the thread pool while a worker thread holds the GIL
(with 50 clients polling a busy server, p99 107 ms instead of 698 ms).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..atomic_write import write_bytes
from ..errors import TempoMasterError
from .body import IMAGE_PART, MAX_IMAGES, check_fields, image_frame, parse_json
from .events import ProgressBoard
from .metrics import ServeMetrics
from .queue import FINISHED, JobRow, JobStore, QueueFull, looks_like_job_id, new_job_id
from .worker import BLUEPRINT, VIDEO, DataDir, JobRunner, Worker

MAX_BODY_BYTES = 32 << 20  # a request with its reference images
SSE_POLL_SECONDS = 0.05
SSE_KEEPALIVE_SECONDS = 15.0
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/page/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Served without the token: the page (no data in it: it asks for the token), the API's description, health.
OPEN_PATHS = frozenset(PAGE_FILES) | {"/healthz", "/docs", "/openapi.json"}


@dataclass
class Service:
    runner: JobRunner  # the first device's: requests are checked against it
    store: JobStore
    data: DataDir
    board: ProgressBoard
    metrics: ServeMetrics
    workers: list[Worker]  # one per device, all taking jobs from the one queue
    max_queue: int = 16
    token: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def wake(self) -> None:
        for worker in self.workers:
            worker.wake()

    def cancel(self, job_id: str) -> None:
        for worker in self.workers:  # the one running it stops; the others never see the id
            worker.cancel(job_id)


class TokenCheck:
    """ASGI middleware: `Authorization: Bearer TOKEN` on every request but the open paths (constant-time compare)."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or self.token is None
            or (scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD"))
        ):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return await self.app(scope, receive, send)
        response = JSONResponse(
            {"detail": "missing or wrong token: send the header Authorization: Bearer TOKEN"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def _error(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def _page(name: str) -> bytes:
    return resources.files("tempomaster.serve").joinpath("page", name).read_bytes()


def job_status(service: Service, row: JobRow) -> dict:
    """What GET /v1/videos/{id} says about a job."""
    plan = row.request.get("plan", {})
    stage_steps = plan.get("stage_steps", [])
    progress = service.board.live(row.id) if row.state == "running" else None
    if progress is None:
        total = sum(stage_steps)
        progress = {
            "stage": row.stage,
            "step": row.step,
            "num_steps": row.num_steps,
            "steps_done": total if row.state == "done" else row.steps_done,
            "steps_total": total,
            "stage_steps": stage_steps,
            "stages_done": len(stage_steps) if row.state == "done" else None,
            "eta_seconds": None,
        }
    base = f"/v1/videos/{row.id}"
    return {
        "id": row.id,
        "state": row.state,
        "created": row.created,
        "started": row.started,
        "finished": row.finished,
        "attempts": row.attempts,
        "queue_position": service.store.queue_position(row.id) if row.state == "queued" else None,
        "progress": progress,
        "error": row.error,
        "note": row.note,
        "blueprint_url": f"{base}/{BLUEPRINT}" if row.has_blueprint else None,
        "video_url": f"{base}/{VIDEO}" if row.has_video else None,
        "events_url": f"{base}/events",
        "request": {**row.request.get("fields", {}), "images": sorted(row.request.get("images", {}))},
        "plan": plan,
    }


def _find(service: Service, job_id: str) -> JobRow:
    row = service.store.get(job_id) if looks_like_job_id(job_id) else None
    if row is None:
        raise _error(404, f"no job {job_id!r}")
    return row


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _error(413, f"request body of {declared} bytes; at most {limit} bytes are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _error(413, f"request body larger than {limit} bytes, the most accepted")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_submission(request: Request, body: bytes) -> tuple[dict, list[tuple[str, bytes]]]:
    """(fields, [(FRAME, image bytes)]) from a JSON body or a multipart one (a `request` part and image:FRAME parts)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return check_fields(parse_json(body)), []
    if kind != "multipart/form-data":
        raise _error(415, "send application/json, or multipart/form-data with a 'request' part and image:FRAME files")

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=MAX_IMAGES, max_fields=MAX_IMAGES + 1, max_part_size=1 << 20
        )
    except Exception as err:  # noqa: BLE001 - starlette's multipart errors have no common public base
        raise _error(422, f"multipart body: {getattr(err, 'detail', None) or err}") from None
    fields, images = None, []
    for name, value in form.multi_items():
        if name == "request":
            text = value if isinstance(value, str) else (await value.read()).decode("utf-8", "replace")
            fields = check_fields(parse_json(text, where="request part"))
        elif name.startswith(IMAGE_PART):
            if isinstance(value, str):
                raise _error(422, f"part {name!r}: expected an uploaded image file")
            images.append((image_frame(name), await value.read()))
        else:
            raise _error(422, f"multipart body: unknown part {name!r} (accepted: request, image:FRAME)")
    if fields is None:
        raise _error(422, "multipart body: no 'request' part holding the request's JSON")
    return fields, images


def _hide_paths(message: str, paths: dict[str, Path]) -> str:
    """The server's own upload paths out of an error line: the client named its parts image:FRAME."""
    for frame, path in paths.items():
        message = message.replace(str(path), f"upload image:{frame}")
    return message


def _accept(service: Service, fields: dict, images: list[tuple[str, bytes]]) -> str:
    """Write the uploads under a new id, check the request as the CLI does, queue it; the id.

    Blocking (disk, the checks): run in the thread pool. On any failure what
    was written under the new id is removed.
    """
    job_id = new_job_id()
    folder = service.data.uploads(job_id)
    paths: dict[str, Path] = {}
    try:
        for n, (frame, data) in enumerate(images):
            if frame in paths:
                raise _error(422, f"--image: frame {frame} is given twice")
            folder.mkdir(parents=True, exist_ok=True)
            paths[frame] = write_bytes(folder / f"image{n}", data)
        try:
            checked = service.runner.check(fields, paths)
        except TempoMasterError as err:
            raise _error(422, _hide_paths(str(err), paths)) from None
        h, w = checked.output_size()
        plan = {
            "stage_steps": list(checked.steps_per_stage),
            "intervals": list(checked.frame_intervals),
            "num_frames": checked.num_frames,
            "height": h,
            "width": w,
            "save_fps": checked.save_fps,
        }
        stored = {"fields": fields, "images": {frame: p.name for frame, p in paths.items()}, "plan": plan}
        try:
            service.store.submit(job_id, stored, service.max_queue)
        except QueueFull as err:
            raise _error(429, str(err)) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # only what this request wrote, under its new id
        raise
    return job_id


def openapi_page(schema: dict) -> str:
    """The API as one self-contained HTML page: every operation with its summary and responses, the schema linked."""
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            codes = ", ".join(sorted(op.get("responses", {})))
            summary = op.get("summary") or op.get("description", "").split("\n")[0]
            rows.append(
                f"<tr><td><code>{html.escape(method.upper())} {html.escape(path)}</code></td>"
                f"<td>{html.escape(summary)}</td><td>{html.escape(codes)}</td></tr>"
            )
    info = schema.get("info", {})
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(info.get('title', 'API'))} API</title><style>body{{font:14px sans-serif;margin:2em}}"
        "td{padding:4px 12px;border-bottom:1px solid #ddd;vertical-align:top}</style></head><body>"
        f"<h1>{html.escape(info.get('title', 'API'))} API v{html.escape(str(info.get('version', '')))}</h1>"
        f"<p>{html.escape(info.get('description', ''))}</p><p>The full OpenAPI schema: "
        "<a href='/openapi.json'>/openapi.json</a></p><table><tr><th>operation</th><th>what</th>"
        f"<th>responses</th></tr>{''.join(rows)}</table></body></html>"
    )


def _sse(event: dict) -> str:
    return f"id: {event['seq']}\nevent: {event['event']}\ndata: {json.dumps(event['data'])}\n\n"


def create_app(service: Service) -> FastAPI:
    # FastAPI's own /docs page loads Swagger UI from a CDN; ours is drawn here from the schema, nothing fetched
    app = FastAPI(
        title="TempoMaster",
        version="1",
        docs_url=None,
        redoc_url=None,
        description="Next-frame-rate video generation: the 6 fps blueprint first, then 12 and 24 fps.",
    )
    pages = {path: (_page(name), media) for path, (name, media) in PAGE_FILES.items()}
    app.state.service = service

    def page(path: str):
        content, media = pages[path]
        return Response(content, media_type=media, headers={"Cache-Control": "no-cache"})

    app.get("/", include_in_schema=False)(lambda: page("/"))
    app.get("/page/app.js", include_in_schema=False)(lambda: page("/page/app.js"))
    app.get("/page/style.css", include_in_schema=False)(lambda: page("/page/style.css"))

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(openapi_page(app.openapi()), headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz():
        workers = [{"device": w.runner.device, "alive": w.is_alive(), "running": w.current} for w in service.workers]
        alive = all(w["alive"] for w in workers)
        return JSONResponse(
            {
                "status": "ok" if alive else "worker stopped",
                "worker_alive": alive,
                "backend": getattr(service.runner.backend, "name", None),
                "workers": workers,
            },
            status_code=200 if alive else 503,
        )

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(service.store.counts()), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/videos",
        status_code=201,
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["prompt"],
                            "properties": {
                                "prompt": {"type": "string"},
                                "negative_prompt": {"type": "string"},
                                "num_frames": {"type": "integer"},
                                "height": {"type": "integer"},
                                "width": {"type": "integer"},
                                "intervals": {"type": "array", "items": {"type": "integer"}},
                                "steps": {"type": "array", "items": {"type": "integer"}},
                                "shifts": {"type": "array", "items": {"type": "number"}},
                                "guidance": {"type": "number"},
                                "use_apg": {"type": "boolean"},
                                "seed": {"type": "integer"},
                                "save_fps": {"type": "number"},
                            },
                        }
                    },
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "request": {"type": "string", "description": "the JSON object above"},
                                "image:0": {
                                    "type": "string",
                                    "format": "binary",
                                    "description": "a reference image at stage-0 frame 0 (any image:FRAME, negative from the end)",
                                },
                            },
                        }
                    },
                }
            }
        },
    )
    async def submit(request: Request):
        body = await _read_body(request, service.max_body_bytes)
        try:
            fields, images = await _parse_submission(request, body)
        except TempoMasterError as err:
            raise _error(422, str(err)) from None
        if service.store.counts()["queued"] >= service.max_queue:
            raise _error(429, f"the queue is full ({service.max_queue} waiting jobs, --max-queue); try again later")
        job_id = await run_in_threadpool(_accept, service, fields, images)
        service.board.publish(job_id, "state", {"state": "queued"})
        service.wake()
        return JSONResponse(
            job_status(service, service.store.get(job_id)),
            status_code=201,
            headers={"Location": f"/v1/videos/{job_id}"},
        )

    @app.get("/v1/videos")
    async def recent(limit: int = 50):
        rows = service.store.recent(max(1, min(limit, 200)))
        return {"jobs": [job_status(service, row) for row in rows], "counts": service.store.counts()}

    @app.get("/v1/videos/{job_id}")
    async def status(job_id: str):
        return job_status(service, _find(service, job_id))

    def video_file(job_id: str, name: str):
        row = _find(service, job_id)
        ready = row.has_blueprint if name == BLUEPRINT else row.has_video
        path = service.data.videos(row.id) / name
        if not ready or not path.is_file():
            if name == BLUEPRINT:
                why = (
                    "the blueprint is written when stage 0 is decoded"
                    if row.state in ("queued", "running")
                    else f"the job is {row.state} and has no blueprint"
                )
            else:
                why = (
                    "the video is written when the last stage is decoded"
                    if row.state in ("queued", "running")
                    else f"the job is {row.state} and has no video"
                )
            raise _error(409, f"{name} of job {row.id} is not ready: {why}")
        return FileResponse(path, media_type="video/mp4", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/videos/{job_id}/blueprint.mp4")
    async def blueprint(job_id: str):
        return video_file(job_id, BLUEPRINT)

    @app.get("/v1/videos/{job_id}/video.mp4")
    async def video(job_id: str):
        return video_file(job_id, VIDEO)

    @app.delete("/v1/videos/{job_id}")
    def cancel(job_id: str):
        row = _find(service, job_id)
        state = service.store.cancel(row.id)
        if state == "cancelled":
            if row.state == "queued":
                service.board.publish(row.id, "state", {"state": "cancelled", "error": "cancelled by a DELETE request"})
                shutil.rmtree(service.data.uploads(row.id), ignore_errors=True)
                return {"id": row.id, "state": "cancelled"}
            raise _error(409, f"job {row.id} is cancelled already")
        if state == "running":
            service.cancel(row.id)
            return JSONResponse(
                {"id": row.id, "state": "running", "detail": "stops at the next denoising step"}, status_code=202
            )
        raise _error(409, f"job {row.id} is {state}: nothing to cancel")

    @app.get("/v1/videos/{job_id}/events")
    async def events(job_id: str, request: Request):
        row = _find(service, job_id)
        last = request.headers.get("last-event-id", "")
        start = int(last) if last.isdigit() else 0

        async def stream():
            seq, quiet = start, 0.0
            while True:
                new = service.board.events_after(row.id, seq)
                for event in new:
                    yield _sse(event)
                    seq = event["seq"]
                    if event["event"] == "state" and event["data"]["state"] in FINISHED:
                        return
                if not new and seq == 0:
                    # nothing in memory for this job (the server restarted since): its stored state, once
                    now = await run_in_threadpool(service.store.get, row.id)
                    if now.state in FINISHED:
                        data = {"state": now.state, "error": now.error}
                        if now.has_video:
                            data["url"] = f"/v1/videos/{now.id}/{VIDEO}"
                        yield _sse({"seq": 0, "event": "state", "data": data})
                        return
                if await request.is_disconnected():
                    return
                quiet = 0.0 if new else quiet + SSE_POLL_SECONDS
                if quiet >= SSE_KEEPALIVE_SECONDS:
                    yield ": keep-alive\n\n"
                    quiet = 0.0
                await asyncio.sleep(SSE_POLL_SECONDS)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    app.add_middleware(TokenCheck, token=service.token)
    return app
