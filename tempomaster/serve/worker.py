"""The backend, loaded once, and the thread that runs the queue's jobs on it one after another.

A job's request is checked at submission and again when it starts (the
same `build_jobs` as `tm-run generate`). The 6 fps blueprint is written as
soon as stage 0 is decoded, the video when the last stage is; both through
the package's atomic writers, so a file under videos/ is whole or absent.
A cancel (DELETE) or a stopping server takes effect at the next denoising
step: the generation raises out of the step callback.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import TempoMasterError, UsageError
from ..runtime.request import (
    GenerateOptions,
    available_cores,
    build_jobs,
    preset_defaults,
    resolve_device,
    resolve_dtype,
)
from .body import request_options
from .events import ProgressBoard
from .metrics import ServeMetrics
from .queue import JobRow, JobStore

BLUEPRINT = "blueprint.mp4"
VIDEO = "video.mp4"
# progress rows are written to the database at most this often (and at every stage's end)
PROGRESS_WRITE_SECONDS = 1.0


class JobCancelled(Exception):
    """DELETE asked this running job to stop."""


class ServerStopping(Exception):
    """The server is shutting down: the running job goes back to the queue."""


@dataclass
class DataDir:
    """Where the service keeps its state; every path is built from the server's own names and job ids."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "jobs.sqlite3"

    def videos(self, job_id: str) -> Path:
        return self.root / "videos" / job_id

    def uploads(self, job_id: str) -> Path:
        return self.root / "uploads" / job_id

    def create(self) -> None:
        for sub in ("videos", "uploads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def remove_staging_leftovers(self) -> list[Path]:
        """Temporary files the atomic writers left when the process was killed (`.NAME.xxxx` beside NAME)."""
        ours = re.compile(rf"\.({re.escape(BLUEPRINT)}|{re.escape(VIDEO)}|image[0-9]+)\..+")
        gone = []
        for folder in (self.root / "videos", self.root / "uploads"):
            for path in folder.glob("*/.*"):
                if ours.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    gone.append(path)
        return gone


class JobRunner:
    """The server's options, the model source's defaults, and the loaded backend."""

    def __init__(self, base: GenerateOptions, device: str | None = None):
        if device is not None:
            base = replace(base, device=device, devices=None)
        self.base = base
        self.defaults, self.preset, self.manifest = preset_defaults(base)
        if base.threads is not None and base.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {base.threads}")
        self.threads = base.threads or available_cores()
        self.device = resolve_device(base.device)
        runs_graphs = self.manifest is not None and base.backend != "torch"
        self.dtype = resolve_dtype(base, self.device, self.manifest.precision if runs_graphs else None)
        self.backend = self.tokenizer = None

    def load(self) -> None:
        """Open the backend once (the minutes a 14B model takes are paid here, not per video)."""
        import torch

        from ..runtime.jobs import make_backend

        torch.set_num_threads(self.threads)
        self.backend, self.tokenizer = make_backend(self.base, self.dtype, self.device, self.threads)

    def check(self, fields: dict, images: dict[str, Path]):
        """The GenerationRequest for a request's fields: every check `tm-run generate` makes (UsageError)."""
        from ..runtime.memory import check_fits, check_video_fits, estimate_peak_memory

        request = build_jobs(request_options(self.base, fields, images), self.defaults)[0].request
        check_video_fits(request)
        check_fits(
            estimate_peak_memory(self.preset, request, dtype=self.dtype, device=self.device, manifest=self.manifest)
        )
        if self.backend is not None and hasattr(self.backend, "check_request"):
            h, w = request.output_size()
            self.backend.check_request(h, w, request.num_frames, request.frame_intervals)
        return request


def stage_costs(request) -> tuple[list[int], list[float]]:
    """Steps per stage and the relative cost of one step of each (latent frames through the DiT), for the ETA."""
    from ..planner import plan_stages

    stages = plan_stages(request.num_frames, request.frame_intervals, request.ref_images.keys())
    work = [float(len(s.active_chunks) * s.chunk_frames) for s in stages]
    return list(request.steps_per_stage), work


def upload_paths(data: DataDir, row: JobRow) -> dict[str, Path]:
    return {frame: data.uploads(row.id) / name for frame, name in row.request.get("images", {}).items()}


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class Worker(threading.Thread):
    """Takes the oldest queued job, runs it, records the outcome; until `stop`."""

    def __init__(
        self,
        runner: JobRunner,
        store: JobStore,
        data: DataDir,
        board: ProgressBoard,
        metrics: ServeMetrics,
        idle_wait: float = 0.5,
    ):
        super().__init__(name=f"tempomaster-worker-{runner.device}", daemon=True)
        self.runner, self.store, self.data, self.board, self.metrics = runner, store, data, board, metrics
        self.idle_wait = idle_wait
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self.current: str | None = None

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                row = self.store.claim_next()
            except Exception:  # noqa: BLE001 - a database hiccup (disk full, locked): said, then tried again
                traceback.print_exc(file=sys.stderr)
                self._stopping.wait(1.0)
                continue
            if row is None:
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            self.current = row.id
            try:
                self.run_job(row)
            finally:
                self.current = None
                with self._lock:
                    self._cancel.discard(row.id)

    def _check_stop(self, job_id: str) -> None:
        if self._stopping.is_set():
            raise ServerStopping()
        with self._lock:
            cancelled = job_id in self._cancel
        if cancelled:
            raise JobCancelled()

    def run_job(self, row: JobRow) -> None:
        from ..runtime.pipeline import generate
        from ..runtime.video import to_uint8_frames, write_mp4

        job_id = row.id
        self.board.publish(job_id, "state", {"state": "running", "attempt": row.attempts})
        folder = self.data.videos(job_id)
        try:
            if row.cancel_requested:
                raise JobCancelled()
            request = self.runner.check(row.request["fields"], upload_paths(self.data, row))
            steps, work = stage_costs(request)
            self.board.start(job_id, steps, work)
            folder.mkdir(parents=True, exist_ok=True)
            done = {"steps": 0, "written": 0.0}

            def step_end(event) -> None:
                done["steps"] += 1
                self.metrics.dit_calls.inc()
                live = self.board.step(job_id, event.stage, event.step + 1)
                now = time.monotonic()
                if now - done["written"] >= PROGRESS_WRITE_SECONDS or event.step + 1 == event.num_steps:
                    self.store.progress(job_id, event.stage, event.step + 1, event.num_steps, done["steps"])
                    done["written"] = now
                self.board.publish(
                    job_id,
                    "step",
                    {
                        "stage": event.stage,
                        "step": event.step + 1,
                        "num_steps": event.num_steps,
                        "steps_done": done["steps"],
                        "steps_total": sum(steps),
                        "eta_seconds": live.eta_seconds() if live is not None else None,
                    },
                )
                self._check_stop(job_id)

            def stage_end(stage) -> None:
                self.metrics.stage_seconds.labels(stage=str(stage.index)).observe(stage.seconds)
                self.board.stage_done(job_id, stage.index)
                self.board.publish(
                    job_id,
                    "stage",
                    {
                        "stage": stage.index,
                        "fps": stage.fps,
                        "frames": stage.num_frames,
                        "seconds": round(stage.seconds, 3),
                        "dit_calls": stage.dit_calls,
                    },
                )
                if stage.index == 0 and len(steps) > 1:
                    write_mp4(to_uint8_frames(stage.frames), folder / BLUEPRINT, stage.fps)
                    self.store.blueprint_written(job_id)
                    self.board.publish(
                        job_id,
                        "blueprint",
                        {"url": f"/v1/videos/{job_id}/{BLUEPRINT}", "fps": stage.fps, "frames": stage.num_frames},
                    )
                self._check_stop(job_id)

            result = generate(
                self.runner.backend,
                self.runner.tokenizer,
                request,
                progress=False,
                keep_stages=False,
                on_step_end=step_end,
                on_stage_end=stage_end,
            )
            write_mp4(to_uint8_frames(result.video.frames), folder / VIDEO, result.video.fps)
            self._finish(
                job_id,
                "done",
                None,
                has_video=True,
                extra={"url": f"/v1/videos/{job_id}/{VIDEO}", "seconds": round(result.seconds, 3)},
            )
        except ServerStopping:
            self.store.requeue(job_id, "the server stopped while this job ran; queued again")
            self.board.end(job_id)
            self.board.publish(job_id, "state", {"state": "queued", "note": "the server is stopping"})
        except JobCancelled:
            self._finish(job_id, "cancelled", "cancelled by a DELETE request")
        except TempoMasterError as err:
            self._finish(job_id, "failed", one_line(err))
        except Exception as err:  # noqa: BLE001 - one job's bug must not stop the service
            traceback.print_exc(file=sys.stderr)
            self._finish(
                job_id, "failed", f"internal error ({type(err).__name__}: {one_line(err)}); see the server's log"
            )

    def _finish(self, job_id: str, state: str, error: str | None, has_video: bool = False, extra: dict | None = None):
        self.store.finish(job_id, state, error, has_video=has_video)
        self.metrics.jobs_finished.labels(state=state).inc()
        self.board.end(job_id)
        shutil.rmtree(self.data.uploads(job_id), ignore_errors=True)  # the server's own copies of the uploads
        self.board.publish(job_id, "state", {"state": state, "error": error, **(extra or {})})
