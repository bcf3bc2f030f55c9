"""tm-run serve's HTTP API on the tiny preset, through httpx (starlette's TestClient) against the app."""

from __future__ import annotations

import io
import json
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from serve_helpers import make_service, small_request, status, wait_for, wait_state  # noqa: E402


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = make_service(tmp_path_factory.mktemp("serve"))
    svc.start()
    yield svc
    svc.stop()
    svc.store.close()


@pytest.fixture(scope="module")
def client(service):
    from starlette.testclient import TestClient

    from tempomaster.serve.app import create_app

    with TestClient(create_app(service)) as c:
        yield c


def read_events(client, job_id: str) -> list[tuple[str, dict]]:
    """The job's server-sent events until its final state (the stream ends there)."""
    events, kind = [], None
    with client.stream("GET", f"/v1/videos/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def decode_mp4(data: bytes, tmp_path, name: str):
    from tempomaster.runtime.video import read_video_frames

    path = tmp_path / name
    path.write_bytes(data)
    return read_video_frames(path)


def test_submit_events_in_order_blueprint_then_video(client, tmp_path):
    response = client.post("/v1/videos", json=small_request(seed=7))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["state"] in ("queued", "running") and len(job["id"]) == 22
    assert response.headers["location"] == f"/v1/videos/{job['id']}"
    events = read_events(client, job["id"])
    kinds = [k for k, _ in events]
    states = [d["state"] for k, d in events if k == "state"]
    assert states[-2:] == ["running", "done"]
    stages = [d["stage"] for k, d in events if k == "stage"]
    assert stages == [0, 1, 2]
    # every step of stage s comes after stage s-1 ended and before stage s ends
    order = [(k, d.get("stage")) for k, d in events if k in ("step", "stage", "blueprint")]
    for s in range(3):
        steps = [i for i, (k, st) in enumerate(order) if k == "step" and st == s]
        end = order.index(("stage", s))
        assert len(steps) == 2 and max(steps) < end
        if s:
            assert min(steps) > order.index(("stage", s - 1))
    # the blueprint right after stage 0, before stage 1's first step and long before the video
    assert kinds.index("blueprint") == kinds.index("stage") + 1
    assert kinds.index("blueprint") < [i for i, (k, d) in enumerate(events) if k == "step" and d["stage"] == 1][0]
    done = status(client, job["id"])
    assert done["progress"]["steps_done"] == done["progress"]["steps_total"] == 6
    assert done["blueprint_url"] and done["video_url"]

    blueprint = client.get(done["blueprint_url"])
    video = client.get(done["video_url"])
    assert blueprint.status_code == video.status_code == 200
    bp_frames, bp_fps = decode_mp4(blueprint.content, tmp_path, "b.mp4")
    frames, fps = decode_mp4(video.content, tmp_path, "v.mp4")
    assert bp_frames.shape == (9, 32, 48, 3) and bp_fps == pytest.approx(6.0)
    assert frames.shape == (36, 32, 48, 3) and fps == pytest.approx(24.0)

    # the same request through `tm-run generate` (its own process state, its own backend): the same video
    from tempomaster.cli.run import main

    ref = tmp_path / "ref.mp4"
    assert (
        main(
            [
                "generate",
                "--preset",
                "tiny",
                "--prompt",
                "a red ball bouncing",
                "--num-frames",
                "9",
                "--height",
                "32",
                "--width",
                "48",
                "--steps",
                "2,2,2",
                "--seed",
                "7",
                "--threads",
                "1",
                "--no-progress",
                "--out",
                str(ref),
            ]
        )
        == 0
    )
    from tempomaster.runtime.video import read_video_frames

    expected, _ = read_video_frames(ref)
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1


def test_sse_of_a_finished_job_replays_to_its_end(client):
    job = client.post("/v1/videos", json=small_request(seed=1)).json()
    wait_state(client, job["id"], ("done",))
    events = read_events(client, job["id"])
    assert events[-1] == ("state", {**events[-1][1], "state": "done"})
    assert [d["stage"] for k, d in events if k == "stage"] == [0, 1, 2]
    # what is kept of a finished job's steps: the last of each stage
    assert [(d["stage"], d["step"]) for k, d in events if k == "step"] == [(0, 2), (1, 2), (2, 2)]


def test_events_resume_after_last_event_id(client):
    job = client.post("/v1/videos", json=small_request(seed=2)).json()
    wait_state(client, job["id"], ("done",))
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        ids = [int(line[4:]) for line in response.iter_lines() if line.startswith("id: ")]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    cut = len(ids) // 2
    with client.stream(
        "GET", f"/v1/videos/{job['id']}/events", headers={"Last-Event-ID": str(ids[cut - 1])}
    ) as response:
        rest = [int(line[4:]) for line in response.iter_lines() if line.startswith("id: ")]
    assert rest == ids[cut:]


def test_unknown_and_malformed_ids_are_404_and_unready_files_409(client, service):
    for bad in ("AAAAAAAAAAAAAAAAAAAAAA", "..%2F..%2Fjobs.sqlite3", "x" * 300):
        assert client.get(f"/v1/videos/{bad}").status_code == 404
        assert client.get(f"/v1/videos/{bad}/video.mp4").status_code == 404
        assert client.delete(f"/v1/videos/{bad}").status_code == 404
    long = client.post("/v1/videos", json=small_request(steps=[300, 2, 2])).json()
    queued = client.post("/v1/videos", json=small_request()).json()
    response = client.get(f"/v1/videos/{queued['id']}/blueprint.mp4")
    assert response.status_code == 409 and "stage 0" in response.json()["detail"]
    assert client.get(f"/v1/videos/{queued['id']}/video.mp4").status_code == 409
    for job in (queued, long):
        client.delete(f"/v1/videos/{job['id']}")
    wait_state(client, long["id"], ("cancelled",))


def test_cancel_queued_and_running_then_the_device_is_free(client, service):
    running = client.post("/v1/videos", json=small_request(steps=[300, 2, 2])).json()
    queued = client.post("/v1/videos", json=small_request()).json()
    wait_for(lambda: (status(client, running["id"])["progress"]["steps_done"] or 0) >= 2, what="the first steps")
    assert status(client, queued["id"])["queue_position"] == 0

    response = client.delete(f"/v1/videos/{queued['id']}")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    response = client.delete(f"/v1/videos/{running['id']}")
    assert response.status_code == 202
    stopped = wait_state(client, running["id"], ("cancelled",))
    assert stopped["progress"]["steps_done"] < 300 and stopped["video_url"] is None
    assert status(client, queued["id"])["started"] is None  # never ran
    assert read_events(client, running["id"])[-1][1]["state"] == "cancelled"
    # cancelling a finished job is a conflict; the next job runs at once
    assert client.delete(f"/v1/videos/{running['id']}").status_code == 409
    after = client.post("/v1/videos", json=small_request()).json()
    assert wait_state(client, after["id"], ("done", "failed"), timeout=30)["state"] == "done"


def test_queue_full_is_429(client, service):
    service.max_queue = 2
    try:
        running = client.post("/v1/videos", json=small_request(steps=[300, 2, 2])).json()
        wait_state(client, running["id"], ("running",))
        waiting = [client.post("/v1/videos", json=small_request()) for _ in range(2)]
        assert [r.status_code for r in waiting] == [201, 201]
        full = client.post("/v1/videos", json=small_request())
        assert full.status_code == 429 and "--max-queue" in full.json()["detail"]
    finally:
        service.max_queue = 16
    for job in [running] + [r.json() for r in waiting]:
        client.delete(f"/v1/videos/{job['id']}")
    wait_state(client, running["id"], ("cancelled",))


def test_oversize_body_is_413(client, service):
    service.max_body_bytes = 4096
    try:
        response = client.post("/v1/videos", json=small_request(negative_prompt="x" * 5000))
        assert response.status_code == 413 and "4096" in response.json()["detail"]
        big = io.BytesIO(b"\x89PNG" + bytes(6000))
        response = client.post("/v1/videos", data={"request": json.dumps(small_request())}, files={"image:0": big})
        assert response.status_code == 413
    finally:
        service.max_body_bytes = 32 << 20


def _cli_error(capsys, args: list[str]) -> str:
    from tempomaster.cli.run import main

    assert main(["generate", "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tm-run: error: ") and "\n" not in err
    return err[len("tm-run: error: ") :]


@pytest.mark.parametrize(
    "body, flags",
    [
        ({"prompt": "   "}, ["--prompt", "   "]),
        ({"prompt": "a", "height": 40}, ["--prompt", "a", "--height", "40"]),
        ({"prompt": "a", "steps": [2, 2]}, ["--prompt", "a", "--steps", "2,2"]),
        (
            {"prompt": "a", "num_frames": 9, "intervals": [4, 3, 1]},
            ["--prompt", "a", "--num-frames", "9", "--intervals", "4,3,1"],
        ),
        ({"prompt": "a", "shifts": [1, 2]}, ["--prompt", "a", "--shifts", "1,2"]),
        (
            {"prompt": "a", "num_frames": 5, "intervals": [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1]},
            ["--prompt", "a", "--num-frames", "5", "--intervals", "1024,512,256,128,64,32,16,8,4,2,1"],
        ),
    ],
)
def test_bad_values_get_the_clis_own_line(client, capsys, body, flags, tmp_path):
    response = client.post("/v1/videos", json=body)
    assert response.status_code == 422
    assert response.json()["detail"] == _cli_error(capsys, flags + ["--out", str(tmp_path / "v.mp4")])


def test_image_frame_outside_the_clip_gets_the_clis_line(client, capsys, tmp_path):
    from PIL import Image

    png = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(png)
    response = client.post(
        "/v1/videos",
        data={"request": json.dumps(small_request())},
        files={"image:40": ("first.png", png.read_bytes(), "image/png")},
    )
    assert response.status_code == 422
    cli = _cli_error(
        capsys, ["--prompt", "a", "--num-frames", "9", "--image", f"40:{png}", "--out", str(tmp_path / "v.mp4")]
    )
    assert response.json()["detail"] == cli


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": "a", "guidance": NaN}', "NaN"),
        (b'{"prompt": 5}', "prompt: expected a string"),
        (b'{"prompt": "a", "steps": "2,2,2"}', "steps: expected a list"),
        (b'{"prompt": "a", "out": "/etc/passwd"}', "unknown field 'out'"),
        (b'{"num_frames": 9}', "--prompt: required"),
        (b'{"prompt": "a", "seed": -1}', "--seed must be an integer"),
        (b'{"prompt": "a", "guidance": 0}', "--guidance must be a finite number > 0"),
        (b'{"prompt": "a", "num_frames": "9"}', "--num-frames"),
        (b'{"prompt": "a", "use_apg": "yes"}', "use_apg must be true or false"),
    ],
)
def test_malformed_requests_are_one_line_422(client, body, needle):
    response = client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert needle in detail and "\n" not in detail


def test_uploads_are_checked_as_images_and_never_leak_a_server_path(client, service):
    before = set((service.data.root / "uploads").iterdir())
    response = client.post(
        "/v1/videos",
        data={"request": json.dumps(small_request())},
        files={"image:0": ("x.png", b"not an image at all" * 10, "image/png")},
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("--image: cannot read image upload image:0") and str(service.data.root) not in detail
    # a header declaring 9000 x 9000 pixels is refused before any pixel is decoded
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    header = bytearray(buf.getvalue())
    header[16:24] = (9000).to_bytes(4, "big") * 2  # IHDR width and height, its CRC made to match
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    response = client.post(
        "/v1/videos",
        data={"request": json.dumps(small_request())},
        files={"image:0": ("big.png", bytes(header), "image/png")},
    )
    assert response.status_code == 422 and "declares 9000x9000" in response.json()["detail"]
    response = client.post(
        "/v1/videos",
        data={"request": json.dumps(small_request())},
        files={"image:x": ("a.png", buf.getvalue(), "image/png")},
    )
    assert response.status_code == 422 and "--image: frame index must be an integer" in response.json()["detail"]
    assert set((service.data.root / "uploads").iterdir()) == before  # nothing of the refused requests is kept


def test_reference_image_upload_runs(client, service, tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    response = client.post(
        "/v1/videos",
        data={"request": json.dumps(small_request())},
        files={"image:0": ("first.png", buf.getvalue(), "image/png")},
    )
    assert response.status_code == 201, response.text
    job = wait_state(client, response.json()["id"], ("done", "failed"))
    assert job["state"] == "done" and job["request"]["images"] == ["0"]
    assert not service.data.uploads(job["id"]).exists()  # the server's copy goes with the job


def test_metrics_and_health(client):
    from prometheus_client.parser import text_string_to_metric_families

    job = client.post("/v1/videos", json=small_request()).json()
    wait_state(client, job["id"], ("done",))
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["worker_alive"] is True
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    jobs = {s.labels["state"]: s.value for s in families["tempomaster_jobs"].samples}
    counts = client.get("/v1/videos").json()["counts"]
    assert jobs == {k: float(v) for k, v in counts.items()} and jobs["done"] >= 1
    calls = [s.value for s in families["tempomaster_dit_calls"].samples if s.name == "tempomaster_dit_calls_total"]
    assert calls[0] >= 6 * jobs["done"]
    stage_counts = {
        s.labels["stage"]: s.value
        for s in families["tempomaster_stage_seconds"].samples
        if s.name == "tempomaster_stage_seconds_count"
    }
    assert set(stage_counts) == {"0", "1", "2"} and stage_counts["2"] >= jobs["done"]


def test_the_page_is_served_and_fetches_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="submit-form"' in page.text
    for path in ("/page/app.js", "/page/style.css"):
        response = client.get(path)
        assert response.status_code == 200
        assert "http://" not in response.text and "https://" not in response.text and "//cdn" not in response.text
    assert "http" not in page.text.replace("http-equiv", "")
    assert client.get("/page/../queue.py").status_code == 404
    assert client.get("/openapi.json").json()["paths"]["/v1/videos"]["post"]


def test_token_is_required_beyond_loopback(service, tmp_path, capsys, monkeypatch):
    from starlette.testclient import TestClient

    from tempomaster.cli.run import main
    from tempomaster.serve.app import Service, create_app

    monkeypatch.delenv("TEMPOMASTER_TOKEN", raising=False)
    assert main(["serve", "--preset", "tiny", "--host", "0.0.0.0", "--data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("tm-run: error: --host 0.0.0.0 accepts connections from other machines: give --token")
        and "\n" not in err
    )
    assert not (tmp_path / "d").exists()

    guarded = Service(
        runner=service.runner,
        store=service.store,
        data=service.data,
        board=service.board,
        metrics=service.metrics,
        workers=service.workers,
        token="s3cret-token",
    )
    with TestClient(create_app(guarded)) as c:
        for method, path in (
            ("GET", "/v1/videos"),
            ("POST", "/v1/videos"),
            ("GET", "/metrics"),
            ("DELETE", "/v1/videos/AAAAAAAAAAAAAAAAAAAAAA"),
        ):
            assert c.request(method, path).status_code == 401
            assert c.request(method, path, headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        ok = c.get("/v1/videos", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        assert c.get("/").status_code == 200 and c.get("/healthz").status_code == 200


def test_one_worker_per_device_runs_jobs_side_by_side(tmp_path):
    """--devices cpu:2: two backends, two workers on the one queue; two jobs run at the same time."""
    from starlette.testclient import TestClient

    from tempomaster.runtime.request import GenerateOptions
    from tempomaster.serve.app import create_app
    from tempomaster.serve.server import ServeOptions, build_service

    service = build_service(
        ServeOptions(base=GenerateOptions(preset="tiny", devices="cpu:2", progress=False), data=tmp_path / "data"),
        None,
        log=lambda line: None,
    )
    assert [w.runner.device for w in service.workers] == ["cpu", "cpu"]
    assert service.workers[0].runner.backend is not service.workers[1].runner.backend
    service.start()
    try:
        with TestClient(create_app(service)) as c:
            jobs = [c.post("/v1/videos", json=small_request(seed=s, steps=[60, 2, 2])).json()["id"] for s in (1, 2)]
            wait_for(
                lambda: all(status(c, j)["state"] == "running" for j in jobs),
                timeout=60,
                what="both jobs running at once",
            )
            running = {w["running"] for w in c.get("/healthz").json()["workers"]}
            assert running == set(jobs)
            for j in jobs:
                assert wait_state(c, j, ("done", "failed"), timeout=120)["state"] == "done"
    finally:
        service.stop()
        service.store.close()


def test_host_rules():
    from tempomaster.errors import UsageError
    from tempomaster.runtime.request import GenerateOptions
    from tempomaster.serve.server import ServeOptions, check_serve_options, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.4.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.org")
    base = GenerateOptions(preset="tiny")
    with pytest.raises(UsageError, match="--token: at least 8"):
        check_serve_options(ServeOptions(base=base, host="0.0.0.0", token="short"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_api_page_lists_every_operation_and_fetches_nothing(client):
    """/docs is drawn from the OpenAPI schema on the server: no script, stylesheet or image from anywhere."""
    import re

    res = client.get("/docs")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    page = res.text
    schema = client.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        for method in ops:
            assert f"{method.upper()} {path}" in page
    assert "POST /v1/videos" in page
    assert not re.search(r"<(script|link|img)\b", page, re.I) and "//" not in page.replace(
        "<a href='/openapi.json'>", ""
    )
