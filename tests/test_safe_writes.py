"""Nothing lost: a failed write keeps the previous output, and tm-run never replaces a folder it did not write.

The full-disk cases run on a real 2 MiB tmpfs (root may mount one); they are
skipped, saying why, where mounting is not permitted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tempomaster.cli import run_main
from tempomaster.runtime.video import read_video_frames, write_mp4, write_png_frames

# the smallest real generation: random tiny weights, 5 -> 10 frames of 32x32
TINY = [
    "--preset",
    "tiny",
    "--prompt",
    "a red ball",
    "--num-frames",
    "5",
    "--intervals",
    "2,1",
    "--steps",
    "1,1",
    "--shifts",
    "3,3",
    "--height",
    "32",
    "--width",
    "32",
    "--no-progress",
]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test, unmounted after it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill_disk(mnt: Path, leave: int = 8192) -> None:
    """Fill the filesystem with random bytes, then free `leave` bytes: a disk with a few KB left."""
    filler = mnt / "filler"
    rng = np.random.default_rng()
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: the last short write does not fail again at close
        try:
            while True:
                fh.write(rng.bytes(1 << 16))
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def random_frames(t: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, (t, size, size, 3), dtype=np.uint8)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------
# Item 1: a full disk keeps the previous output and stops with one line
# ----------------------------------------------------------------------------


def test_full_disk_keeps_the_previous_mp4(small_disk, capfd):
    video = small_disk / "v.mp4"
    write_mp4(random_frames(6), video, 24)
    before = digest(video)
    fill_disk(small_disk)
    rc = run_main(["generate", *TINY, "--out", str(video)])
    err = capfd.readouterr().err.strip()  # fd level: ffmpeg's own messages count too
    assert rc == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("tm-run: error: cannot write") and str(video) in err and "previous v.mp4 is kept" in err, err
    assert digest(video) == before  # bit-identical
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "v.mp4"]  # no temporary left


def test_full_disk_keeps_the_previous_png_frames(small_disk):
    from tempomaster.errors import OutputError

    folder = write_png_frames(random_frames(3), small_disk / "frames", fps=24)
    before = folder_digest(folder)
    fill_disk(small_disk)
    with pytest.raises(OutputError, match="frames: No space left on device; the previous frames is kept"):
        write_png_frames(random_frames(8, size=64), folder, fps=24)  # random pixels: PNG cannot compress them
    assert folder_digest(folder) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "frames"]


def test_full_disk_keeps_the_previous_build_manifest(small_disk):
    from tempomaster.engines.plans import write_manifest
    from tempomaster.errors import OutputError

    rng = np.random.default_rng()
    write_manifest(small_disk, {"format": "tempomaster-build", "seed": int(rng.integers(1 << 30))})
    before = digest(small_disk / "manifest.json")
    fill_disk(small_disk)
    big = {"format": "tempomaster-build", "noise": rng.bytes(64 << 10).hex()}
    with pytest.raises(OutputError, match="manifest.json: No space left on device; the previous manifest.json is kept"):
        write_manifest(small_disk, big)
    assert digest(small_disk / "manifest.json") == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "manifest.json"]


# ----------------------------------------------------------------------------
# Item 3: never delete what tm-run did not write
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("with_marker", [False, True], ids=["users-folder", "our-folder-with-a-users-file"])
def test_generate_refuses_a_job_folder_it_did_not_write(with_marker, tmp_path, capsys, monkeypatch):
    import tempomaster.runtime.jobs as jobs

    monkeypatch.setattr(jobs, "make_backend", lambda *a: pytest.fail("a model was loaded"))
    job_folder = tmp_path / "run" / "video"
    if with_marker:
        job_folder.parent.mkdir()
        write_png_frames(random_frames(2), job_folder)
    else:
        job_folder.mkdir(parents=True)
    note = job_folder / "notes.txt"
    note.write_bytes(np.random.default_rng().bytes(100))
    before = folder_digest(job_folder)
    assert run_main(["generate", *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("tm-run: error: --out:") and str(job_folder) in err and "refusing to replace it" in err, err
    assert folder_digest(job_folder) == before


def test_our_frames_folder_is_replaced_and_nothing_else_is_touched(tmp_path):
    from tempomaster.runtime.video import FRAMES_MARKER

    folder = tmp_path / "frames"
    write_png_frames(random_frames(5), folder, fps=12)
    # a leftover of an older tm-run, with a user's file in it, and a user's file beside
    leftover = tmp_path / ".frames.old"
    leftover.mkdir()
    (leftover / "keep.txt").write_text("mine")
    (tmp_path / "beside.txt").write_text("mine too")
    new = random_frames(3)
    write_png_frames(new, folder, fps=24)
    frames, _ = read_video_frames(folder)
    np.testing.assert_array_equal(frames, new)
    assert sorted(p.name for p in folder.iterdir()) == sorted([FRAMES_MARKER, "00000.png", "00001.png", "00002.png"])
    assert json.loads((folder / FRAMES_MARKER).read_text())["frames"] == 3
    assert (leftover / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".frames.old", "beside.txt", "frames"]


# ----------------------------------------------------------------------------
# Item 10: --out clip.gif writes a GIF; other picture/video suffixes are refused
# ----------------------------------------------------------------------------


def test_out_gif_writes_an_animated_gif(tmp_path, capsys):
    out = tmp_path / "clip.gif"
    assert run_main(["generate", *TINY, "--out", str(out)]) == 0
    assert out.is_file()
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 10 and gif.size == (32, 32)
    frames, fps = read_video_frames(out)
    assert frames.shape == (10, 32, 32, 3)
    assert fps == pytest.approx(24, rel=0.1)  # the GIF keeps 10 ms steps: 40 ms a frame
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]


@pytest.mark.parametrize("name", ["clip.webm", "clip.PNG", "clip.avi"])
def test_out_with_an_unsupported_video_suffix_is_refused(name, tmp_path, capsys, monkeypatch):
    import tempomaster.runtime.jobs as jobs

    monkeypatch.setattr(jobs, "make_backend", lambda *a: pytest.fail("a model was loaded"))
    assert run_main(["generate", *TINY, "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--out" in err and ".mp4 or .gif" in err and Path(name).suffix.lower() in err, err
    assert list(tmp_path.iterdir()) == []


def test_train_toy_out_never_deletes_a_users_files_beside_a_weight_file(tmp_path, capsys):
    """A folder that merely holds a file named like the DiT's is not a weight set: refused before any training."""
    from tempomaster.cli import export_main
    from tempomaster.models.checkpoints import DIT_FILE

    out = tmp_path / "weights"
    out.mkdir()
    (out / DIT_FILE).write_bytes(b"x" * 16)
    notes = out / "notes.txt"
    notes.write_text("mine")
    rc = export_main(["train-toy", "--work", str(tmp_path / "work"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--out" in err and "notes.txt" in err
    assert notes.read_text() == "mine" and (out / DIT_FILE).read_bytes() == b"x" * 16
    assert not (tmp_path / "work").exists()


def test_toy_weights_replace_an_earlier_set_whole_with_the_umask_mode(tmp_path):
    """export_toy_weights swaps a complete set in; the earlier set goes, nothing staged stays beside it."""
    import os

    from tempomaster.models.checkpoints import DIT_FILE
    from tempomaster.toy.config import build_untrained_toy
    from tempomaster.toy.train import export_toy_weights

    out = tmp_path / "weights"
    export_toy_weights(build_untrained_toy(1), out)
    first = (out / DIT_FILE).read_bytes()
    old_umask = os.umask(0o027)
    try:
        export_toy_weights(build_untrained_toy(2), out)
    finally:
        os.umask(old_umask)
    assert (out / DIT_FILE).read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]
    assert (out.stat().st_mode & 0o777) == 0o750
