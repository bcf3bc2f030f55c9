"""Each job's progress as it happens: an ordered event log per job (the server-sent events) and live counters.

The worker thread publishes; the routes read. Events carry a sequence
number per job, so a client that reconnects with Last-Event-ID misses
nothing and sees nothing twice while the job runs; once it has finished,
only the last step event of each stage is kept (the others are progress
that is over). Kept in memory for the newest KEEP_JOBS
jobs; after a restart a job's stream starts from its stored state.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

KEEP_JOBS = 200
FINISHED = ("done", "failed", "cancelled")


@dataclass
class Live:
    """A running job's counters; stage_work[s] is the relative cost of one step of stage s."""

    stage_steps: list[int]
    stage_work: list[float]
    started: float = field(default_factory=time.monotonic)
    stage: int = 0
    step: int = 0  # steps done in `stage`
    steps_done: int = 0
    stages_done: int = 0

    def done_work(self) -> float:
        finished = sum(n * w for n, w in zip(self.stage_steps[: self.stage], self.stage_work[: self.stage]))
        return finished + self.step * self.stage_work[self.stage]

    def eta_seconds(self) -> float | None:
        """Seconds left: the time so far per unit of DiT work, times the work left (None before the first step)."""
        done = self.done_work()
        if done <= 0:
            return None
        total = sum(n * w for n, w in zip(self.stage_steps, self.stage_work))
        return (time.monotonic() - self.started) / done * max(0.0, total - done)


class ProgressBoard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logs: OrderedDict[str, list[dict]] = OrderedDict()
        self._next: dict[str, int] = {}
        self._live: dict[str, Live] = {}

    def publish(self, job_id: str, kind: str, data: dict) -> int:
        with self._lock:
            log = self._logs.setdefault(job_id, [])
            self._logs.move_to_end(job_id)
            while len(self._logs) > KEEP_JOBS:
                old, _ = self._logs.popitem(last=False)
                self._live.pop(old, None)
                self._next.pop(old, None)
            seq = self._next.get(job_id, 0) + 1
            self._next[job_id] = seq
            log.append({"seq": seq, "event": kind, "data": data})
            if kind == "state" and data.get("state") in FINISHED:
                # a finished job keeps its stage events and the last step of each stage, not every step
                last_step = {e["data"]["stage"]: e["seq"] for e in log if e["event"] == "step"}
                log[:] = [e for e in log if e["event"] != "step" or last_step[e["data"]["stage"]] == e["seq"]]
            return seq

    def events_after(self, job_id: str, seq: int) -> list[dict]:
        with self._lock:
            return [e for e in self._logs.get(job_id, ()) if e["seq"] > seq]

    def start(self, job_id: str, stage_steps: list[int], stage_work: list[float]) -> None:
        with self._lock:
            self._live[job_id] = Live(list(stage_steps), list(stage_work))

    def step(self, job_id: str, stage: int, step_done: int) -> Live | None:
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                live.stage, live.step = stage, step_done
                live.steps_done = sum(live.stage_steps[:stage]) + step_done
            return live

    def stage_done(self, job_id: str, stage: int) -> None:
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                live.stages_done = stage + 1

    def end(self, job_id: str) -> None:
        with self._lock:
            self._live.pop(job_id, None)

    def live(self, job_id: str) -> dict | None:
        """A copy of a running job's counters, with its ETA."""
        with self._lock:
            live = self._live.get(job_id)
            if live is None:
                return None
            return {
                "stage": live.stage,
                "step": live.step,
                "num_steps": live.stage_steps[live.stage],
                "steps_done": live.steps_done,
                "steps_total": sum(live.stage_steps),
                "stage_steps": list(live.stage_steps),
                "stages_done": live.stages_done,
                "eta_seconds": live.eta_seconds(),
            }
