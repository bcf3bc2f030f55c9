"""tm-run serve killed with SIGKILL mid-job and started again: nothing lost, nothing half-written."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_helpers import free_port, small_request, wait_for  # noqa: E402

from tempomaster.serve.queue import MAX_ATTEMPTS, JobStore  # noqa: E402


def start_server(data, port, log):
    cmd = [
        sys.executable,
        "-c",
        "import sys; from tempomaster.cli import run_main; sys.exit(run_main())",
        "serve",
        "--preset",
        "tiny",
        "--threads",
        "1",
        "--data",
        str(data),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=90, every=0.2, what="the server to answer")
    return proc, base


def job(base, job_id):
    return httpx.get(f"{base}/v1/videos/{job_id}", timeout=10).json()


def test_sigkill_mid_job_then_restart(tmp_path):
    data, port = tmp_path / "data", free_port()
    log = open(tmp_path / "server.log", "w")
    proc, base = start_server(data, port, log)
    try:
        first = httpx.post(f"{base}/v1/videos", json=small_request(seed=1, steps=[1, 1, 1]), timeout=30).json()["id"]
        wait_for(lambda: job(base, first)["state"] == "done", timeout=60, what="the first job")
        first_video = httpx.get(f"{base}/v1/videos/{first}/video.mp4", timeout=10).content
        # long enough to be killed in the middle, then one waiting behind it
        long = httpx.post(f"{base}/v1/videos", json=small_request(seed=2, steps=[1, 40, 1]), timeout=30).json()["id"]
        waiting = httpx.post(f"{base}/v1/videos", json=small_request(seed=3, steps=[1, 1, 1]), timeout=30).json()["id"]
        # killed after the blueprint is written, while stage 1 runs
        wait_for(
            lambda: (job(base, long)["progress"]["stage"] or 0) >= 1 and job(base, long)["blueprint_url"],
            timeout=60,
            what="the long job's stage 1",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()

    # what the database held at the moment of the kill (read with sqlite3 itself)
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        states = dict(db.execute("SELECT id, state FROM jobs").fetchall())
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert states == {first: "done", long: "running", waiting: "queued"}

    proc, base = start_server(data, port, log)
    try:
        again = job(base, long)
        assert again["state"] in ("queued", "running") and again["attempts"] >= 1
        assert "the server stopped while this job ran" in again["note"]
        assert httpx.get(f"{base}/v1/videos/{first}/video.mp4", timeout=10).content == first_video
        for job_id in (long, waiting):
            wait_for(
                lambda job_id=job_id: job(base, job_id)["state"] in ("done", "failed"),
                timeout=120,
                what=f"job {job_id}",
            )
            assert job(base, job_id)["state"] == "done"
        assert job(base, long)["attempts"] == 2 and job(base, waiting)["attempts"] == 1
        # the stream of a job finished before this process started: its final state
        with httpx.stream("GET", f"{base}/v1/videos/{first}/events", timeout=10) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert len(lines) == 1 and '"done"' in lines[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # every video whole, no temporary file left, no upload kept
    from tempomaster.runtime.video import read_video_frames

    for job_id in (first, long, waiting):
        folder = data / "videos" / job_id
        assert sorted(p.name for p in folder.iterdir()) == ["blueprint.mp4", "video.mp4"]
        frames, fps = read_video_frames(folder / "video.mp4")
        assert frames.shape == (36, 32, 48, 3) and fps == pytest.approx(24.0)
    assert list((data / "uploads").iterdir()) == []


def test_a_job_interrupted_too_often_is_failed_with_the_reason(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.submit("A" * 22, {"fields": {"prompt": "a"}}, max_queue=4)
    store.submit("B" * 22, {"fields": {"prompt": "b"}}, max_queue=4)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert store.claim_next().id == "A" * 22
        assert store.recover() == ["A" * 22]  # as a restart after a kill
        row = store.get("A" * 22)
        if attempt < MAX_ATTEMPTS:
            assert row.state == "queued" and f"attempt {attempt}" in row.note
    assert row.state == "failed" and f"{MAX_ATTEMPTS} times" in row.error
    # a running job whose cancel was asked is cancelled, not run again
    assert store.claim_next().id == "B" * 22
    assert store.cancel("B" * 22) == "running"
    store.recover()
    assert store.get("B" * 22).state == "cancelled"
    store.close()
