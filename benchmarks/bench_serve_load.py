"""Load check of `tm-run serve`: concurrent status polls and a burst of submissions against a running server.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve_load.py [--preset toy] [--pollers 50] [--submissions 20]
        [--max-queue 8] [--steps 4,2,2] [--threads 1] [--out results.json]

Starts the server as a subprocess on a free loopback port (its own data
folder), sends the submissions all at once while `--pollers` clients poll
job status (GET /v1/videos/{id}, round robin over the accepted jobs) without
pause, each on its own keep-alive connection (threads and http.client: a
client light enough that the numbers are the server's), until every
accepted job has finished, then checks: no request failed
except by 429 (queue full), every accepted job is in the database and done.
Writes the status latencies (p50, p90, p99, max) and the counts as JSON.
A check, not a timed test: the latencies depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--pollers", type=int, default=50)
    p.add_argument("--submissions", type=int, default=20)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--steps", default="4,2,2", help="steps per stage of each submitted job")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, data: Path, port: int, log) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from tempomaster.cli import run_main; sys.exit(run_main())",
        "serve",
        "--preset",
        args.preset,
        "--threads",
        str(args.threads),
        "--data",
        str(data),
        "--port",
        str(port),
        "--max-queue",
        str(args.max_queue),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer within 180 s")


class Connection:
    """One keep-alive HTTP connection (http.client: a light client, so the numbers are the server's)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if attempt:  # the server closed an idle keep-alive connection: one fresh try
                    raise
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        raise AssertionError("unreachable")


def run_load(args, port: int) -> dict:
    """`--submissions` threads POST at once while `--pollers` threads poll status without pause."""
    steps = [int(s) for s in args.steps.split(",")]
    lock = threading.Lock()
    accepted: list[str] = []
    codes: dict[str, int] = {}
    failures: list[str] = []
    latencies: list[float] = []
    finished = threading.Event()
    go = threading.Barrier(args.submissions)

    def submit(i: int) -> None:
        conn = Connection(port)
        body = {"prompt": f"a red ball bouncing on a striped background {i}", "steps": steps, "seed": i}
        go.wait()
        try:
            status, data = conn.request("POST", "/v1/videos", body)
        except OSError as err:
            with lock:
                failures.append(f"submit {i}: {type(err).__name__}: {err}")
            return
        with lock:
            codes[str(status)] = codes.get(str(status), 0) + 1
            if status == 201:
                accepted.append(json.loads(data)["id"])
            elif status != 429:
                failures.append(f"submit {i}: {status} {data[:200]!r}")

    def poll(k: int) -> None:
        conn, n, mine = Connection(port), k, []
        while not finished.is_set():
            with lock:
                job_id = accepted[n % len(accepted)] if accepted else None
            if job_id is None:
                time.sleep(0.01)
                continue
            n += 1
            start = time.perf_counter()
            try:
                status, data = conn.request("GET", f"/v1/videos/{job_id}")
            except OSError as err:
                with lock:
                    failures.append(f"poll: {type(err).__name__}: {err}")
                continue
            mine.append(time.perf_counter() - start)
            if status != 200:
                with lock:
                    failures.append(f"poll: {status} {data[:200]!r}")
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    pollers = [threading.Thread(target=poll, args=(k,)) for k in range(args.pollers)]
    submitters = [threading.Thread(target=submit, args=(i,)) for i in range(args.submissions)]
    for t in pollers + submitters:
        t.start()
    for t in submitters:
        t.join()
    submitted = time.perf_counter() - start
    watcher = Connection(port)
    while True:  # until nothing is queued or running
        time.sleep(0.5)
        counts = json.loads(watcher.request("GET", "/v1/videos?limit=1")[1])["counts"]
        if counts["queued"] == 0 and counts["running"] == 0:
            break
    finished.set()
    for t in pollers:
        t.join()
    wall = time.perf_counter() - start
    states: dict[str, int] = {}
    for job_id in accepted:
        state = json.loads(watcher.request("GET", f"/v1/videos/{job_id}")[1])["state"]
        states[state] = states.get(state, 0) + 1
    lat = np.array(latencies) * 1000
    return {
        "accepted": len(accepted),
        "status_codes": codes,
        "failures": failures[:20],
        "failure_count": len(failures),
        "final_states": states,
        "accepted_ids": accepted,
        "status_polls": len(latencies),
        "status_polls_per_second": round(len(latencies) / wall, 1),
        "status_ms": {q: round(float(np.percentile(lat, p)), 2) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(float(lat.max()), 2), "mean": round(float(lat.mean()), 2)},
        "submit_burst_seconds": round(submitted, 3),
        "wall_seconds": round(wall, 2),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tm-serve-load-") as tmp:
        data, port = Path(tmp) / "data", free_port()
        with open(Path(tmp) / "server.log", "w") as log:
            proc = start_server(args, data, port, log)
            try:
                load_before = os.getloadavg()
                result = run_load(args, port)
                load_after = os.getloadavg()
            finally:
                proc.terminate()
                proc.wait(60)
        with sqlite3.connect(data / "jobs.sqlite3") as db:
            stored = dict(db.execute("SELECT id, state FROM jobs").fetchall())
    lost = [j for j in result.pop("accepted_ids") if stored.get(j) != "done"]
    result.update(lost_jobs=len(lost), jobs_in_database=len(stored))
    ok = (
        result["failure_count"] == 0
        and not lost
        and result["accepted"] + result["status_codes"].get("429", 0) == args.submissions
    )
    report = {
        "benchmark": "serve_load",
        "ok": ok,
        "preset": args.preset,
        "steps": args.steps,
        "pollers": args.pollers,
        "submissions": args.submissions,
        "max_queue": args.max_queue,
        "server_threads": args.threads,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
        "date": time.strftime("%Y-%m-%d"),
        **result,
    }
    text = json.dumps(report, indent=2)
    print(text)
    out = args.out or RESULTS_DIR / f"serve-load-{args.preset}-cpu-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"written {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
