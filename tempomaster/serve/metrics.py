"""The service's Prometheus metrics (prometheus-client, a registry of its own per service)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .queue import STATES

# seconds of one stage, from a toy stage on a CPU (tenths of a second) to a 14B stage (many minutes)
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, 3600)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("tempomaster_jobs", "Jobs in the store, by state", ["state"], registry=self.registry)
        self.dit_calls = Counter(
            "tempomaster_dit_calls", "DiT calls made (one per denoising step)", registry=self.registry
        )
        self.stage_seconds = Histogram(
            "tempomaster_stage_seconds",
            "Wall seconds of one stage (denoise and decode)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "tempomaster_jobs_finished",
            "Jobs that ended in this process, by final state",
            ["state"],
            registry=self.registry,
        )

    def render(self, counts: dict[str, int]) -> bytes:
        """The text format, with the job gauge set from the store's counts at this moment."""
        for state in STATES:
            self.jobs.labels(state=state).set(counts.get(state, 0))
        return generate_latest(self.registry)
