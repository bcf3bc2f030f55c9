"""`tm-export --out DIR`: only a folder of ours is replaced, the refusal comes before any model loads,
and the staging folders a killed export leaves are removed by the next run (ours, stale, on this host only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from export_helpers import micro_models, micro_shape

from tempomaster.cli import export_main
from tempomaster.errors import UsageError
from tempomaster.export.target import STAGING_MARKER, check_replaceable, remove_stale_staging

TESTS = Path(__file__).parent


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: a refused --out must cost nothing."""
    import tempomaster.export.source as export_source

    monkeypatch.setattr(export_source, "load_models_for_export", lambda **k: pytest.fail("a model was loaded"))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _web_app(folder: Path) -> Path:
    """A folder a user might give by mistake: a web app whose manifest.json is a web manifest."""
    rng = np.random.default_rng()
    (folder / "icons").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/", "display": "standalone"}))
    (folder / "index.html").write_text(f"<html><body>{rng.integers(1 << 30)}</body></html>")
    (folder / "icons" / "icon.png").write_bytes(rng.integers(0, 256, 777, dtype=np.uint8).tobytes())
    return folder


def _refused_fast(capsys, args: list[str], needle: str) -> str:
    t0 = time.perf_counter()
    assert export_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert time.perf_counter() - t0 < 5.0
    return err


@pytest.mark.parametrize(
    "command",
    [
        ["onnx", "--preset", "tiny"],
        ["build", "--preset", "tiny"],
        ["onnx", "--preset", "tiny", "--precision", "fp8"],
        ["calibrate", "--preset", "tiny"],
    ],
)
def test_a_folder_with_someone_elses_manifest_json_is_never_replaced(command, tmp_path, capsys, no_model_loads):
    app = _web_app(tmp_path / "app")
    before = _tree(app)
    err = _refused_fast(capsys, [*command, "--out", str(app)], str(app / "manifest.json"))
    assert "not a tm-export build" in err
    assert _tree(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]  # no staging either


def test_manifest_json_that_only_looks_like_ours_is_refused(tiny_build, tmp_path, capsys, no_model_loads):
    # a link to a real build's manifest: the folder itself is still someone else's
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "photo.raw").write_bytes(os.urandom(512))
    (linked / "manifest.json").symlink_to(tiny_build / "manifest.json")
    err = _refused_fast(capsys, ["onnx", "--preset", "tiny", "--out", str(linked)], "not a regular file")
    assert str(linked / "manifest.json") in err and (linked / "photo.raw").is_file()
    # our format key with a version that is not ours, and a file that is not JSON at all
    for name, text in (
        ("wrong-version", json.dumps({"format": "tempomaster-build", "format_version": "1"})),
        ("not-json", "\x00\x01 binary"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
        _refused_fast(capsys, ["build", "--preset", "tiny", "--out", str(folder)], str(folder / "manifest.json"))
        assert (folder / "manifest.json").read_text() == text
    # a lone calibration/ folder is ours only with our amax.json in it
    cal = tmp_path / "camera"
    (cal / "calibration").mkdir(parents=True)
    (cal / "calibration" / "amax.json").write_text(json.dumps({"lens": "wide"}))
    _refused_fast(capsys, ["onnx", "--preset", "tiny", "--out", str(cal)], str(cal / "calibration" / "amax.json"))
    assert json.loads((cal / "calibration" / "amax.json").read_text()) == {"lens": "wide"}


def test_an_out_that_cannot_be_written_is_refused_before_loading(tmp_path, capsys, no_model_loads):
    _refused_fast(
        capsys, ["onnx", "--preset", "tiny", "--out", "/proc/tm-export-test/build"], "--out: cannot write under /proc"
    )
    (tmp_path / "notes.txt").write_text("mine")
    _refused_fast(
        capsys,
        ["build", "--preset", "tiny", "--out", str(tmp_path / "notes.txt" / "build")],
        f"--out: {tmp_path / 'notes.txt'} is not a directory",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_folders_of_ours_may_be_replaced(tiny_build, tmp_path):
    check_replaceable(tmp_path / "new")  # absent
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    check_replaceable(shutil.copytree(tiny_build, tmp_path / "build"))
    legacy = shutil.copytree(tiny_build, tmp_path / "legacy")  # written before manifests carried a checksum
    data = json.loads((legacy / "manifest.json").read_text())
    data.pop("manifest_sha256", None)
    (legacy / "manifest.json").write_text(json.dumps(data))
    check_replaceable(legacy)
    cal = tmp_path / "calibrated"
    (cal / "calibration").mkdir(parents=True)
    (cal / "calibration" / "amax.json").write_text(
        json.dumps({"format": "tempomaster-fp8-calibration", "format_version": 1})
    )
    check_replaceable(cal)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        check_replaceable(tmp_path / "file")


# ----------------------------------------------------------------------------
# Staging folders left by a killed export
# ----------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _staging(parent: Path, target: str, suffix: str, marker: dict | None, size: int = 4096) -> Path:
    folder = parent / f".{target}.tmp-{suffix}"
    (folder / "onnx").mkdir(parents=True)
    (folder / "onnx" / "dit.onnx.data").write_bytes(os.urandom(size))
    if marker is not None:
        (folder / STAGING_MARKER).write_text(json.dumps(marker))
    return folder


def _marker(target: str, pid: int, **over) -> dict:
    return {
        "format": "tempomaster-export-staging",
        "format_version": 1,
        "pid": pid,
        "host": socket.gethostname(),
        "target": target,
        "created": time.time() - 60,
        **over,
    }


def test_only_stale_staging_of_our_own_is_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        stale = [_staging(tmp_path, "build", f"dead{i}", _marker("build", dead)) for i in range(2)]
        kept = [
            _staging(tmp_path, "build", "live", _marker("build", sleeper.pid, created=time.time())),  # its export runs
            _staging(tmp_path, "build", "nomarker", None),  # not provably ours
            _staging(tmp_path, "build", "otherhost", _marker("build", dead, host="elsewhere-" + socket.gethostname())),
            _staging(tmp_path, "build", "othertarget", _marker("other", dead)),
            _staging(tmp_path, "build", "future", _marker("build", dead, created=time.time() + 3600)),
            _staging(tmp_path, "other", "dead", _marker("other", dead)),  # another target's
        ]
        link = tmp_path / ".build.tmp-link"
        link.symlink_to(stale[0])  # a link is never followed into a removal
        lines = []
        removed = remove_stale_staging(tmp_path / "build", log=lines.append)
        assert sorted(removed) == sorted(stale)
        assert not any(p.exists() for p in stale)
        assert all(p.is_dir() for p in kept) and link.is_symlink()
        assert len(lines) == 1 and "removed 2 staging folder(s)" in lines[0]
        assert all(p.name in lines[0] for p in stale)
        assert remove_stale_staging(tmp_path / "build", log=lines.append) == [] and len(lines) == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_reused_pid_does_not_keep_a_staging_folder_alive(tmp_path):
    """The marker's pid now belongs to a process started after the marker was written: the export is gone."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(1.5)
        folder = _staging(tmp_path, "build", "reused", _marker("build", sleeper.pid, created=time.time() - 3600))
        assert remove_stale_staging(tmp_path / "build", log=lambda _l: None) == [folder]
    finally:
        sleeper.kill()
        sleeper.wait()


KILLED_EXPORT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from export_helpers import micro_models, micro_shape
from tempomaster.export.build import export_onnx

def die():
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would, mid-export

export_onnx(micro_models(), "fp32", micro_shape(), {out!r}, graphs=["dit"], progress=False,
            graph_overrides={{"dit": die}})
"""


def test_the_next_export_removes_what_a_killed_one_left(tmp_path, capfd):
    from tempomaster.export.build import export_onnx

    out = tmp_path / "build"
    res = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT.format(tests=str(TESTS), out=str(out))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".build.tmp-")]
    assert len(left) == 1 and (left[0] / STAGING_MARKER).is_file()
    export_onnx(micro_models(), "fp32", micro_shape(), out, graphs=["t5"], progress=False, audit=False)
    err = capfd.readouterr().err
    assert f"removed 1 staging folder(s) left by an interrupted export to {out}" in err and left[0].name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert STAGING_MARKER not in manifest["files"] and not (out / STAGING_MARKER).exists()
    assert manifest["manifest_sha256"] and sorted(manifest["graphs"]) == ["t5"]
    # and the build, being ours, is replaced by the next export
    (out / "onnx" / "t5.onnx").unlink()
    export_onnx(micro_models(), "fp32", micro_shape(), out, graphs=["t5"], progress=False, audit=False)
    assert (out / "onnx" / "t5.onnx").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["build"]
    assert "staging" not in capfd.readouterr().err
