"""tm-run serve over an ONNX build (--engines): the build's graphs on onnxruntime."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("onnxruntime")

from serve_helpers import wait_state  # noqa: E402


def test_serving_an_onnx_build(tiny_build, tmp_path, capsys):
    """--engines BUILD: the build's graphs on onnxruntime, its shape the default, other shapes refused as by the CLI."""
    from starlette.testclient import TestClient

    from tempomaster.runtime.request import GenerateOptions
    from tempomaster.serve.app import create_app
    from tempomaster.serve.server import ServeOptions, build_service

    service = build_service(
        ServeOptions(base=GenerateOptions(engines=tiny_build, threads=1, progress=False), data=tmp_path / "data"),
        None,
        log=lambda line: None,
    )
    service.start()
    try:
        with TestClient(create_app(service)) as c:
            assert c.get("/healthz").json()["backend"] == "onnxruntime"
            job = c.post("/v1/videos", json={"prompt": "a red ball", "steps": [1, 1, 1]}).json()
            assert job["plan"]["height"] == 32 and job["plan"]["width"] == 48 and job["plan"]["num_frames"] == 9
            assert wait_state(c, job["id"], ("done", "failed"))["state"] == "done"
            response = c.post("/v1/videos", json={"prompt": "a red ball", "height": 64})
            assert response.status_code == 422
            cli = _cli_error_with(
                capsys,
                [
                    "--engines",
                    str(tiny_build),
                    "--prompt",
                    "a red ball",
                    "--height",
                    "64",
                    "--out",
                    str(tmp_path / "v.mp4"),
                ],
            )
            assert response.json()["detail"] == cli
    finally:
        service.stop()
        service.store.close()


def _cli_error_with(capsys, args: list[str]) -> str:
    from tempomaster.cli.run import main

    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    return err[len("tm-run: error: ") :]
