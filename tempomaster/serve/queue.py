"""The job store: every job and its state in one SQLite database (stdlib sqlite3, WAL mode).

The database is the truth: a job is accepted once its row is committed, and
every state change is one transaction, so a server killed at any moment
restarts from what was committed. `recover` runs at start-up: a job that was
running when the server died is queued again (or failed, once it has been
interrupted MAX_ATTEMPTS times, with the reason).

States: queued -> running -> done | failed | cancelled; queued -> cancelled.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
# A job interrupted this many times (the server died while it ran) is failed rather than run again:
# a job that kills the server must not kill it forever.
MAX_ATTEMPTS = 3
# secrets.token_urlsafe(16): 22 characters of [A-Za-z0-9_-], 128 random bits
JOB_ID_CHARS = 22

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- queue order only; never shown
    id TEXT NOT NULL UNIQUE,                 -- random, what clients see
    state TEXT NOT NULL,
    request TEXT NOT NULL,                   -- the checked request, JSON
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,     -- times it was started
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    stage INTEGER,                           -- last progress: stage, step done, steps of that stage
    step INTEGER,
    num_steps INTEGER,
    steps_done INTEGER NOT NULL DEFAULT 0,   -- over all stages
    has_blueprint INTEGER NOT NULL DEFAULT 0,
    has_video INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    note TEXT                                -- e.g. why a job was queued again
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs."""


@dataclass(frozen=True)
class JobRow:
    id: str
    state: str
    request: dict
    created: float
    started: float | None
    finished: float | None
    attempts: int
    cancel_requested: bool
    stage: int | None
    step: int | None
    num_steps: int | None
    steps_done: int
    has_blueprint: bool
    has_video: bool
    error: str | None
    note: str | None


def new_job_id() -> str:
    return secrets.token_urlsafe(16)


def looks_like_job_id(text: str) -> bool:
    """A string that could be one of our ids (checked before any lookup)."""
    return len(text) == JOB_ID_CHARS and all(c.isascii() and (c.isalnum() or c in "-_") for c in text)


class JobStore:
    """Thread-safe access to the jobs table (one connection, one lock: writes are few and small)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite would not switch to WAL mode (got {mode})")
            # FULL: a committed transaction survives a power cut, not only a killed process
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args=()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # -- submitting and reading ------------------------------------------------

    def submit(self, job_id: str, request: dict, max_queue: int) -> None:
        """Add a queued job, or raise QueueFull when `max_queue` jobs are already waiting."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                waiting = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
                if waiting >= max_queue:
                    raise QueueFull(
                        f"the queue holds {waiting} waiting jobs (--max-queue {max_queue}); try again later"
                    )
                self._db.execute(
                    "INSERT INTO jobs (id, state, request, created) VALUES (?, 'queued', ?, ?)",
                    (job_id, json.dumps(request), time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(row) if row is not None else None

    def recent(self, limit: int = 50) -> list[JobRow]:
        """The newest jobs first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {state: n for state, n in rows}
        return {state: found.get(state, 0) for state in STATES}

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs are ahead of this queued one (0: next), None when it is not queued."""
        with self._lock:
            row = self._db.execute("SELECT seq, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "queued":
                return None
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (row["seq"],)
            ).fetchone()[0]

    # -- the worker's transitions ----------------------------------------------

    def claim_next(self) -> JobRow | None:
        """The oldest queued job, now running; None when nothing waits."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, stage = NULL, "
                        "step = NULL, num_steps = NULL, steps_done = 0 WHERE id = ?",
                        (time.time(), row["id"]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(row["id"]) if row is not None else None

    def progress(self, job_id: str, stage: int, step: int, num_steps: int, steps_done: int) -> None:
        self._write(
            "UPDATE jobs SET stage = ?, step = ?, num_steps = ?, steps_done = ? WHERE id = ?",
            (stage, step, num_steps, steps_done, job_id),
        )

    def blueprint_written(self, job_id: str) -> None:
        self._write("UPDATE jobs SET has_blueprint = 1 WHERE id = ?", (job_id,))

    def finish(self, job_id: str, state: str, error: str | None = None, has_video: bool = False) -> None:
        if state not in FINISHED:
            raise ValueError(f"not a final state: {state!r}")
        self._write(
            "UPDATE jobs SET state = ?, finished = ?, error = ?, has_video = ? WHERE id = ? AND state = 'running'",
            (state, time.time(), error, int(has_video), job_id),
        )

    def requeue(self, job_id: str, note: str) -> None:
        """A running job back in the queue at its old place (the server is stopping)."""
        self._write("UPDATE jobs SET state = 'queued', note = ? WHERE id = ? AND state = 'running'", (note, job_id))

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, or ask a running one to stop; the state after, None if unknown."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    state = None
                elif row["state"] == "queued":
                    self._db.execute(
                        "UPDATE jobs SET state = 'cancelled', finished = ?, cancel_requested = 1 WHERE id = ?",
                        (time.time(), job_id),
                    )
                    state = "cancelled"
                elif row["state"] == "running":
                    self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                    state = "running"
                else:
                    state = row["state"]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return state

    def recover(self) -> list[str]:
        """At start-up: the jobs that were running when the server died are queued again, or failed.

        Returns their ids. A job whose cancel was asked is cancelled; one started
        MAX_ATTEMPTS times is failed with the reason.
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, attempts, cancel_requested FROM jobs WHERE state = 'running'"
                ).fetchall()
                for row in rows:
                    if row["cancel_requested"]:
                        self._db.execute(
                            "UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (now, row["id"])
                        )
                    elif row["attempts"] >= MAX_ATTEMPTS:
                        self._db.execute(
                            "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                            (
                                now,
                                f"the server stopped while this job ran, {row['attempts']} times; not started again",
                                row["id"],
                            ),
                        )
                    else:
                        self._db.execute(
                            "UPDATE jobs SET state = 'queued', note = ? WHERE id = ?",
                            (
                                f"the server stopped while this job ran (attempt {row['attempts']}); queued again",
                                row["id"],
                            ),
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [row["id"] for row in rows]


def _row(row: sqlite3.Row) -> JobRow:
    return JobRow(
        id=row["id"],
        state=row["state"],
        request=json.loads(row["request"]),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        stage=row["stage"],
        step=row["step"],
        num_steps=row["num_steps"],
        steps_done=row["steps_done"],
        has_blueprint=bool(row["has_blueprint"]),
        has_video=bool(row["has_video"]),
        error=row["error"],
        note=row["note"],
    )
