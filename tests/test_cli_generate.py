"""`tm-run generate` and `tm-export init-tiny` as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tempomaster.cli import export_main, run_main
from tempomaster.runtime.video import read_video_frames

FAST = ["--steps", "2,1,1", "--no-progress"]


@pytest.fixture(scope="module")
def ref_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "some.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_writes_final_and_stage_videos(tmp_path, ref_png, capsys):
    out = tmp_path / "ball.mp4"
    rc = run_main(
        [
            "generate",
            "--prompt",
            "a red ball",
            "--num-frames",
            "17",
            "--image",
            f"0:{ref_png}",
            "--save-stages",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert rc == 0
    # plan for 17 frames at [4,2,1]: 17 -> 34 -> 68 frames at 6, 12, 24 fps
    # the last stage is the video itself: not written a second time as ball_stage2.mp4
    expected = {out: (68, 24.0), tmp_path / "ball_stage0.mp4": (17, 6.0), tmp_path / "ball_stage1.mp4": (34, 12.0)}
    for path, (frames, fps) in expected.items():
        data, got_fps = read_video_frames(path)
        assert data.shape == (frames, 64, 96, 3), path
        assert got_fps == pytest.approx(fps), path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in expected)
    summary = capsys.readouterr().out
    assert "DiT calls: 4 (the reference makes 8" in summary


def test_generate_to_directory_writes_png_frames(tmp_path):
    rc = run_main(
        [
            "generate",
            "--prompt",
            "a boat",
            "--num-frames",
            "5",
            "--intervals",
            "2,1",
            "--steps",
            "1,1",
            "--shifts",
            "3,3",
            "--save-stages",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert rc == 0
    # 5 frames at [2,1]: stage 1 has 10 frames
    assert len(list((tmp_path / "run" / "video").glob("*.png"))) == 10
    assert len(list((tmp_path / "run" / "video_stage0").glob("*.png"))) == 5
    assert (tmp_path / "run" / "video" / "00000.png").exists()


def test_config_cases_and_release_format(tmp_path, ref_png, tiny_checkpoints):
    config = json.loads((tiny_checkpoints / "inference_configs.json").read_text())
    config["inference_configs"]["parallel_configs"] = {
        "frame_intervals": [2, 1],
        "steps_per_stage": [1, 1],
        "shift_per_stage": [3, 3],
    }
    config["inference_configs"]["num_frames"] = 5
    config["inference_cases"] = {
        "first": {"prompt": "a cat", "ref_images": {"0": str(ref_png)}},
        "second": {"prompt": "a dog", "ref_images": {}},
    }
    path = tmp_path / "inference_configs.json"
    path.write_text(json.dumps(config))
    rc = run_main(["generate", "--config", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    assert len(list((tmp_path / "out" / "first").glob("*.png"))) == 10
    assert len(list((tmp_path / "out" / "second").glob("*.png"))) == 10


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--intervals", "4,3,1"], "--intervals"),
        (["--intervals", "1,2"], "--intervals"),
        (["--steps", "5,5"], "--steps"),
        (["--shifts", "5,3"], "--shifts"),
        (["--num-frames", "0"], "--num-frames"),
        (["--height", "40"], "--height"),
        (["--width", "100"], "--width"),
        (["--image", "99:x.png"], "--image"),
        (["--image", "0:/nonexistent/img.png"], "--image"),
        (["--image", "zero.png"], "--image"),
        (["--out", "BLOCKED/video.mp4"], "--out"),
        (["--steps", "a,b"], "--steps"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, needle, tmp_path, capsys, monkeypatch):
    import tempomaster.runtime.jobs as jobs

    monkeypatch.setattr(jobs, "make_backend", lambda *a: pytest.fail("a model was loaded"))
    blocker = tmp_path.parent / f"{tmp_path.name}-a-file"
    blocker.write_text("not a directory")
    flags = [f.replace("BLOCKED", str(blocker)) for f in flags]
    args = ["generate", "--prompt", "x", "--num-frames", "17", *flags]
    if "--out" not in flags:
        args += ["--out", str(tmp_path / "v.mp4")]
    assert _exit_code(run_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


def _exit_code(main, args) -> int:
    """The code the command exits with, whether argparse raised SystemExit or the command returned it."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


def test_init_tiny_then_inspect_from_the_cli(tmp_path):
    out = tmp_path / "ckpt"
    assert export_main(["init-tiny", "--out", str(out)]) == 0
    for rel in (
        "wan_video_dit_bf16.bin",
        "encoders/models_t5_umt5-xxl-enc-bf16.pth",
        "encoders/Wan2.1_VAE.pth",
        "encoders/google/umt5-xxl/tokenizer.json",
        "inference_configs.json",
    ):
        assert (out / rel).is_file(), rel
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    tm_export = Path(sys.executable).parent / "tm-export"  # the installed console script
    res = subprocess.run([str(tm_export), "inspect", "--checkpoints", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "dit" in res.stdout and "vae" in res.stdout and "t5" in res.stdout
    # a second init-tiny into the same folder is refused, leaving it intact
    assert export_main(["init-tiny", "--out", str(out)]) == 2
