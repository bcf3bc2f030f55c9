"""`tm-run serve`: the models loaded once, an HTTP API and a web page over a durable job queue.

One module per job: `body` (a request's JSON and uploads -> the runtime's
GenerateOptions), `queue` (the SQLite job store), `worker` (the thread that
runs jobs on the loaded backend), `events` (each job's progress, for the
server-sent events), `metrics` (Prometheus), `app` (the routes), `server` (loading,
the safety checks, uvicorn), `page/` (the static page).
Needs the `serve` extra: pip install -e '.[serve]'.
"""
